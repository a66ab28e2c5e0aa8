"""The login sequence shared by the IMAP and SMTP fronts.

check the local password → get an access token → open the upstream connection →
authenticate with XOAUTH2 → if the server refuses the token: drop it, refresh once, retry once.
All within one deadline; failures come out as :class:`LoginFailed` with a kind the protocol
front maps to its own reply (IMAP ``NO [...]``, SMTP ``535``/``454``) and a human text that
names `proxy authorize` where re-authorization is the fix.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Awaitable, Callable, Generic, TypeVar

from .throttle import FailureThrottle
from .config import FLOW_CLIENT_CREDENTIALS
from .logs import log_event
from .metrics import METRICS
from .permissions import missing_permission
from .tls import describe_tls_error
from .tlsendpoint import TlsEndpoint, open_tls
from .webproxy import WebProxy
from .tokens import LoginGrant, LoginRefused, TokenBroker, TokenError

log = logging.getLogger("proxy.login")
C = TypeVar("C")  # an upstream connection


class UpstreamError(Exception):
    """The upstream server is unreachable or misbehaved."""


async def connect_tls(address, context: ssl.SSLContext, *, via: WebProxy | None = None) -> TlsEndpoint:
    """Connect to the upstream ``address`` (a config Address) with verified TLS, through the web proxy
    ``via`` if given; UpstreamError says why not.

    TLS through memory BIOs (proxy/tlsendpoint.py): asyncio's own TLS costs 256 KiB per idle session.
    """
    try:
        return await open_tls(address.host, address.port, context, via=via)
    except ssl.SSLError as exc:
        raise UpstreamError(f"TLS handshake with {address} failed: {describe_tls_error(exc)}") from None
    except OSError as exc:
        raise UpstreamError(f"cannot connect to {address} ({exc.strerror or exc.__class__.__name__})") from None


class TokenRejected(Exception):
    """The upstream server refused the access token."""

    def __init__(self, text: str, details: dict | None = None):
        super().__init__(text)
        self.details = details or {}


class LoginFailed(Exception):
    """A login that did not succeed. ``kind`` is one of the class constants."""

    CREDENTIALS = "credentials"    # unknown user or wrong local password
    REAUTHORIZE = "reauthorize"    # the stored authorization is missing or dead
    REJECTED = "rejected"          # the upstream refused even a fresh token
    UNAVAILABLE = "unavailable"    # identity provider or upstream unreachable, or timed out

    def __init__(self, kind: str, text: str):
        super().__init__(text)
        self.kind, self.text = kind, text


class Upstream(Generic[C]):
    """What a protocol supplies: how to connect, authenticate and close."""

    def __init__(self, connect: Callable[[], Awaitable[C]],
                 authenticate: Callable[[C, str, str], Awaitable[object]],
                 is_closed: Callable[[C], bool], close: Callable[[C], None]):
        self.connect, self.authenticate, self.is_closed, self.close = connect, authenticate, is_closed, close


async def login(broker: TokenBroker, throttle: FailureThrottle, upstream: Upstream[C], *, username: str,
                password: str, source: str, timeout: float, protocol: str) -> tuple[C, object, LoginGrant]:
    """Run the whole login; returns (connection, authenticate's result, the grant for relogin)."""
    started = time.monotonic()
    try:
        try:
            result = await asyncio.wait_for(_login(broker, upstream, username, password, timeout, protocol),
                                            timeout)
        except asyncio.TimeoutError:
            raise LoginFailed(LoginFailed.UNAVAILABLE, f"Login timed out after {timeout:.0f} s (identity "
                              "provider or mail server not answering); try again later") from None
    except LoginFailed as failure:
        if failure.kind == LoginFailed.CREDENTIALS:
            throttle.failed(username.casefold(), source)
            delay = throttle.delay(username.casefold(), source)
            await asyncio.sleep(max(0.0, min(delay, timeout - (time.monotonic() - started) - 0.5)))
        duration = time.monotonic() - started
        METRICS.login(protocol, failure.kind, duration)
        log_event(log, "%s %s login %s failed: %s", protocol, source, username, failure.text, event="login",
                  protocol=protocol, peer=source, account=username, result=failure.kind,
                  duration_s=round(duration, 3))
        raise
    METRICS.login(protocol, "ok", time.monotonic() - started)
    return result


async def relogin(broker: TokenBroker, upstream: Upstream[C], grant: LoginGrant, *, timeout: float,
                  protocol: str) -> tuple[C, object]:
    """Open a new upstream session for an account whose client already logged in.

    Used when an upstream connection is lost mid-session, so a front never has to keep the
    client's password in memory.
    """
    try:
        return await asyncio.wait_for(_upstream_login(broker, upstream, grant, timeout, protocol), timeout)
    except asyncio.TimeoutError:
        raise LoginFailed(LoginFailed.UNAVAILABLE, f"Reconnecting timed out after {timeout:.0f} s") from None
    except LoginFailed as failure:
        log.info("%s re-login %s failed: %s", protocol, grant.account.username, failure.text)
        raise


async def _login(broker: TokenBroker, upstream: Upstream[C], username: str, password: str,
                 timeout: float, protocol: str) -> tuple[C, object, LoginGrant]:
    try:
        grant = await broker.authenticate(username, password)
    except LoginRefused as exc:
        raise LoginFailed(LoginFailed.CREDENTIALS, str(exc).capitalize()) from None
    except TokenError as exc:
        raise token_failure(exc) from None
    return (*await _upstream_login(broker, upstream, grant, timeout, protocol), grant)


async def _upstream_login(broker: TokenBroker, upstream: Upstream[C], grant: LoginGrant,
                          timeout: float, protocol: str) -> tuple[C, object]:
    mailbox = grant.account.mailbox  # XOAUTH2 user=: a shared mailbox is opened with its owner's token
    conn = await _connect(upstream)
    try:
        for attempt in (1, 2):
            try:
                token = await broker.access_token(grant, timeout)
            except TokenError as exc:
                raise token_failure(exc) from None
            try:
                return conn, await upstream.authenticate(conn, mailbox, token)
            except TokenRejected as exc:
                if attempt == 2 or not broker.reject(grant, token, protocol):
                    raise LoginFailed(LoginFailed.REJECTED, rejected_text(
                        grant, str(exc), missing_permission(protocol, token, grant.state.granted_scope))) from None
                log.info("upstream refused the token for %s; refreshing once and retrying", mailbox)
                if upstream.is_closed(conn):
                    upstream.close(conn)
                    conn = await _connect(upstream)
            except UpstreamError as exc:
                raise LoginFailed(LoginFailed.UNAVAILABLE, f"Mail server problem: {exc}") from None
    except BaseException:
        upstream.close(conn)
        raise
    raise AssertionError("unreachable")


async def _connect(upstream: Upstream[C]) -> C:
    try:
        return await upstream.connect()
    except UpstreamError as exc:
        raise LoginFailed(LoginFailed.UNAVAILABLE, f"Mail server unreachable: {exc}") from None


def rejected_text(grant: LoginGrant, reply: str, missing: str | None = None) -> str:
    """What to tell the client when the mail server refused even a fresh token (``missing``: the
    permission the token is known to lack for this protocol)."""
    account, mailbox = grant.account, grant.account.mailbox
    if missing and account.flow != FLOW_CLIENT_CREDENTIALS:
        return (f"The mail server refused the access token ({reply}): the authorization of {account.owner} does "
                f"not include {missing} (for example, it was given before this protocol was configured). Run "
                f"`proxy authorize {account.owner}` again to add it; if that does not help, the app registration "
                f"needs the permission {missing} (docs/azure-setup.md)")
    if account.flow == FLOW_CLIENT_CREDENTIALS:
        return (f"The mail server refused the app's token for the mailbox {mailbox} ({reply}). An Exchange "
                "admin must register the app's service principal and give it access to this mailbox "
                "(see docs/azure-setup.md)")
    if account.shared:
        return (f"The mail server refused to open the mailbox {mailbox} with the token of {account.owner} "
                f"({reply}): {account.owner} may not open {mailbox}. An Exchange admin grants it with "
                f"Add-MailboxPermission -Identity {mailbox} -User {account.owner} -AccessRights FullAccess; "
                f"if {account.owner}'s own logins fail too, run `proxy authorize {account.owner}` again")
    return (f"The mail server refused the access token ({reply}). If this persists, run "
            f"`proxy authorize {account.owner}` again and check that the mailbox {mailbox} allows this protocol")


def token_failure(exc: TokenError) -> LoginFailed:
    if exc.reauthorize:
        return LoginFailed(LoginFailed.REAUTHORIZE, str(exc))
    return LoginFailed(LoginFailed.UNAVAILABLE, f"Cannot get an access token: {exc}. Try again later")
