"""The login sequence shared by the IMAP and SMTP fronts.

check the local password → get an access token (one with half its lifetime left, see
:mod:`proxy.tokens.policy`) → open the upstream connection → authenticate with XOAUTH2 →

- the server refuses the token: drop it, refresh once, retry once;
- Exchange accepts the token but does not open the mailbox ("User is authenticated but not
  connected", :class:`UpstreamRefused` ``NOT_CONNECTED``): that is about rights or, briefly,
  throttling: pause, retry once on a new connection with the same token;
- any other refusal that is not about the token (SMTP AUTH disabled, ``535 5.7.139``): no
  refresh, no retry, the advice for that case.

All within one deadline; failures come out as :class:`LoginFailed` with a kind the protocol
front maps to its own reply (IMAP ``NO [...]``, SMTP ``535``/``454``) and a human text that
names what to do (:mod:`proxy.hints`). :func:`upstream_user` decides the XOAUTH2 ``user=``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import ssl
import time
from typing import Awaitable, Callable, Generic, TypeVar

from . import hints
from .admission import Slot
from .config import FLOW_CLIENT_CREDENTIALS, AccountConfig
from .logs import log_event
from .metrics import METRICS
from .permissions import missing_permission
from .tls import describe_tls_error
from .tlsendpoint import TlsEndpoint, open_tls
from .webproxy import WebProxy
from .outcomes import Accepted, Outcome, Refused, TokenRefused
from .throttle import FailureThrottle
from .tokens import LoginGrant, LoginRefused, TokenBroker, TokenError

log = logging.getLogger("proxy.login")
C = TypeVar("C")  # an upstream connection
T = TypeVar("T")
#: Before the one retry after Exchange's "authenticated but not connected" (seconds).
NOT_CONNECTED_PAUSE = 2.0


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


class UpstreamRefused(Exception):
    """The upstream server refused the login for a reason that is not the token (``kind``)."""

    NOT_CONNECTED = Refused.NOT_CONNECTED            # IMAP: "User is authenticated but not connected."
    SMTP_AUTH_DISABLED = Refused.SMTP_AUTH_DISABLED  # SMTP: 535 5.7.139

    def __init__(self, kind: str, text: str):
        super().__init__(text)
        self.kind = kind


def login_result(outcome: Outcome) -> str | None:
    """What an upstream login machine's outcome means for the login sequence: the capabilities
    after an :class:`Accepted`, else the exception for the others."""
    if isinstance(outcome, Accepted):
        return outcome.capabilities
    if isinstance(outcome, TokenRefused):
        raise TokenRejected(outcome.text, outcome.details)
    if isinstance(outcome, Refused):
        raise UpstreamRefused(outcome.kind, outcome.text)
    raise UpstreamError(outcome.text)


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


class _Progress:
    """What a login is waiting for, so a timeout names the real cause."""

    PASSWORD, TOKEN, SERVER = "password", "token", "server"

    def __init__(self) -> None:
        self.step = self.PASSWORD


def timeout_text(step: str, timeout: float) -> str:
    """The refusal for a login that ran out of time while waiting for ``step``."""
    if step == _Progress.PASSWORD:
        return (f"Login timed out after {timeout:.0f} s: the proxy is busy checking other login attempts "
                "for this account (many at once, possibly password guessing); try again in a minute")
    if step == _Progress.TOKEN:
        return f"Login timed out after {timeout:.0f} s: the identity provider is not answering; try again later"
    return f"Login timed out after {timeout:.0f} s: the mail server is not answering; try again later"


async def login(broker: TokenBroker, throttle: FailureThrottle, upstream: Upstream[C], *, username: str,
                password: str, source: str, timeout: float, protocol: str,
                slot: Slot | None = None) -> tuple[C, object, LoginGrant]:
    """Run the whole login; returns (connection, authenticate's result, the grant for relogin).

    ``slot`` (the connection's place in its listener's :class:`~proxy.admission.Admission`) is
    told what the login is doing: checking, verified, penalised (a failure holds it for its whole
    delay, also if the client hangs up meanwhile) and finally logged in or idle again.
    """
    started = time.monotonic()
    progress = _Progress()
    guessed = _owner_of(broker, username)  # whose password a wrong guess was for (None: an unknown name)
    if slot is not None:
        slot.checking()
    try:
        try:
            result = await within(timeout, _login(broker, upstream, username, password, timeout, protocol,
                                                  progress, slot))
        except asyncio.TimeoutError:
            raise LoginFailed(LoginFailed.UNAVAILABLE, timeout_text(progress.step, timeout)) from None
    except LoginFailed as failure:
        delay = 0.0
        if failure.kind == LoginFailed.CREDENTIALS:
            delay = throttle.failed(guessed, source)  # recorded (and logged below) before any waiting
        duration = time.monotonic() - started
        METRICS.login(protocol, failure.kind, duration)
        shown = username if guessed is not None else unknown_name(username)
        log_event(log, "%s %s login %s failed: %s%s", protocol, source, shown, failure.text,
                  f" (answered after {delay:.1f} s more)" if delay else "", event="login", protocol=protocol,
                  peer=source, account=shown, result=failure.kind, duration_s=round(duration, 3),
                  delay_s=round(delay, 3))
        if delay > 0:
            if slot is not None:
                slot.penalize(delay)
            # (never past the client's patience: the answer comes within the login timeout)
            await asyncio.sleep(max(0.0, min(delay, timeout - (time.monotonic() - started) - 0.5)))
        if slot is not None:
            slot.idle()
        raise
    except BaseException:
        if slot is not None:
            slot.idle()
        raise
    if guessed is not None:
        throttle.succeeded(guessed)
    if slot is not None:
        slot.logged_in()
    METRICS.login(protocol, "ok", time.monotonic() - started)
    return result


_TIMEOUT = getattr(asyncio, "timeout", None)  # (Python 3.11 and later)


async def within(timeout: float, coro: Awaitable[T]) -> T:
    """``await coro``, raising asyncio.TimeoutError after ``timeout`` seconds (and cancelling it).

    From Python 3.11 on in the caller's own task (``asyncio.timeout``): ``asyncio.wait_for`` runs
    the coroutine in a task of its own, which starts on the event loop's next iteration and wakes
    the caller on another, two more iterations on every login's path to its reply."""
    if _TIMEOUT is None:
        return await asyncio.wait_for(coro, timeout)
    async with _TIMEOUT(timeout):
        return await coro


_NAME_KEY = secrets.token_bytes(16)  # (this process only: the fingerprints cannot be looked up elsewhere)


def unknown_name(username: str) -> str:
    """How a user name that is not configured appears in the log: never as typed.

    A user who types the password into the user name field (or the user name and the password
    in one go) would otherwise leave it in the log. The length and a fingerprint keyed for
    this process let an admin see that the same unknown name keeps coming back (a mail client
    set up with a wrong name, or a guesser), without the name. `proxy status` lists the names
    that exist."""
    fingerprint = hmac.new(_NAME_KEY, username.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:8]
    return f"<unknown user name, {len(username)} characters, #{fingerprint}>"


def _owner_of(broker: TokenBroker, username: str) -> str | None:
    """The token owner whose password a login for ``username`` checks; None for an unknown name."""
    config = getattr(broker, "config", None)  # (the tests' stand-ins for the broker may have none)
    account = config.account(username) if config is not None else None
    return account.owner if account is not None else None


async def relogin(broker: TokenBroker, upstream: Upstream[C], grant: LoginGrant, *, timeout: float,
                  protocol: str) -> tuple[C, object]:
    """Open a new upstream session for an account whose client already logged in.

    Used when an upstream connection is lost mid-session, so a front never has to keep the
    client's password in memory.
    """
    progress = _Progress()
    try:
        return await within(timeout, _upstream_login(broker, upstream, grant, timeout, protocol, progress))
    except asyncio.TimeoutError:
        raise LoginFailed(LoginFailed.UNAVAILABLE, timeout_text(progress.step, timeout)) from None
    except LoginFailed as failure:
        log.info("%s re-login %s failed: %s", protocol, grant.account.username, failure.text)
        raise


async def _login(broker: TokenBroker, upstream: Upstream[C], username: str, password: str, timeout: float,
                 protocol: str, progress: _Progress, slot: Slot | None) -> tuple[C, object, LoginGrant]:
    try:
        grant = await broker.authenticate(username, password)
    except LoginRefused as exc:
        raise LoginFailed(LoginFailed.CREDENTIALS, str(exc).capitalize()) from None
    except TokenError as exc:
        raise token_failure(exc) from None
    if slot is not None:
        slot.verified()
    return (*await _upstream_login(broker, upstream, grant, timeout, protocol, progress), grant)


def upstream_user(account: AccountConfig, protocol: str) -> str:
    """The XOAUTH2 ``user=`` for ``account`` over ``protocol``.

    The mailbox, except for SMTP of a delegated account opened with another owner's token:
    Exchange refuses a shared mailbox as the SMTP AUTH identity (``535 5.7.3``), even with a
    delegate's token, so the owner logs in as itself and the client's MAIL FROM (the shared
    address) is checked against the owner's Send As right. App-only tokens log in as the mailbox.
    """
    if protocol == "smtp" and account.shared and account.flow != FLOW_CLIENT_CREDENTIALS:
        return account.owner
    return account.mailbox


async def _upstream_login(broker: TokenBroker, upstream: Upstream[C], grant: LoginGrant,
                          timeout: float, protocol: str, progress: _Progress | None = None) -> tuple[C, object]:
    progress = progress or _Progress()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    account = grant.account
    user = upstream_user(account, protocol)
    progress.step = _Progress.SERVER
    conn: C | None = await _connect(upstream)
    refreshed = paused = False
    try:
        while True:
            progress.step = _Progress.TOKEN
            try:
                token = await broker.access_token(grant, max(1.0, deadline - loop.time()))
            except TokenError as exc:
                raise token_failure(exc) from None
            progress.step = _Progress.SERVER
            try:
                return conn, await upstream.authenticate(conn, user, token)
            except TokenRejected as exc:
                if refreshed or not broker.reject(grant, token, protocol):
                    raise LoginFailed(LoginFailed.REJECTED, rejected_text(
                        account, protocol, str(exc), missing_permission(protocol, token, grant.state.granted_scope))
                    ) from None
                refreshed = True
                log.info("%s server refused the token for %s; refreshing once and retrying", protocol, user)
            except UpstreamRefused as exc:
                if exc.kind != UpstreamRefused.NOT_CONNECTED or paused \
                        or deadline - loop.time() < NOT_CONNECTED_PAUSE + 2:
                    raise LoginFailed(LoginFailed.REJECTED, refused_text(account, protocol, exc)) from None
                paused = True
                log.info("%s server accepted the token for %s but is not connected to the mailbox; "
                         "trying once more in %.0f s", protocol, user, NOT_CONNECTED_PAUSE)
                upstream.close(conn)
                conn = None
                await asyncio.sleep(NOT_CONNECTED_PAUSE)
            except UpstreamError as exc:
                raise LoginFailed(LoginFailed.UNAVAILABLE, f"Mail server problem: {exc}") from None
            if conn is not None and upstream.is_closed(conn):
                upstream.close(conn)
                conn = None
            if conn is None:
                conn = await _connect(upstream)
    except BaseException:
        if conn is not None:
            upstream.close(conn)
        raise


async def _connect(upstream: Upstream[C]) -> C:
    try:
        return await upstream.connect()
    except UpstreamError as exc:
        raise LoginFailed(LoginFailed.UNAVAILABLE, f"Mail server unreachable: {exc}") from None


def rejected_text(account: AccountConfig, protocol: str, reply: str, missing: str | None = None) -> str:
    """What to tell the client when the mail server refused even a fresh token (``missing``: the
    permission the token is known to lack for this protocol)."""
    mailbox, owner = account.mailbox, account.owner
    app_only = account.flow == FLOW_CLIENT_CREDENTIALS
    if missing and not app_only:
        return (f"The mail server refused the access token ({reply}): the authorization of {owner} does "
                f"not include {missing} (for example, it was given before this protocol was configured). Run "
                f"`proxy authorize {owner}` again to add it; if that does not help, the app registration "
                f"needs the permission {missing} (docs/azure-setup.md)")
    if protocol == "smtp":
        user = upstream_user(account, protocol)
        return (f"The mail server refused the token of {owner} for sending as {user} ({reply}). "
                + hints.smtp_refused_hint(reply, user, owner, app_only))
    if app_only:
        return (f"The mail server refused the app's token for the mailbox {mailbox} ({reply}). "
                + (hints.imap_refused_hint(mailbox, owner, True) if protocol == "imap" else
                   "An Exchange admin must register the app's service principal and give it access to this "
                   "mailbox (see docs/azure-setup.md)"))
    checks = hints.imap_refused_hint(mailbox, owner, False) + " " if protocol == "imap" else ""
    if account.shared:
        return (f"The mail server refused to open the mailbox {mailbox} with the token of {owner} ({reply}). "
                f"{checks}If {owner}'s own logins fail too, run `proxy authorize {owner}` again")
    return (f"The mail server refused the access token ({reply}). {checks}If this persists, run "
            f"`proxy authorize {owner}` again and check that the mailbox {mailbox} allows this protocol")


def refused_text(account: AccountConfig, protocol: str, refusal: UpstreamRefused) -> str:
    """What to tell the client when the mail server refused for a reason that is not the token."""
    if refusal.kind == UpstreamRefused.NOT_CONNECTED:
        who = "the app's token" if account.flow == FLOW_CLIENT_CREDENTIALS else f"the token of {account.owner}"
        what = f"accepted {who} but does not open the mailbox {account.mailbox}"
    else:
        what = f"does not allow SMTP AUTH for {upstream_user(account, protocol)}"
    return f"The mail server {what} ({refusal}). " + refusal_hint(account, protocol, refusal)


def refusal_hint(account: AccountConfig, protocol: str, refusal: UpstreamRefused) -> str:
    """What to do about a refusal that is not about the token (for the client and `proxy check`)."""
    if refusal.kind == UpstreamRefused.NOT_CONNECTED:
        return hints.not_connected_hint(account.mailbox, account.owner, account.flow == FLOW_CLIENT_CREDENTIALS)
    return hints.smtp_auth_disabled_hint(str(refusal), upstream_user(account, protocol))


def token_failure(exc: TokenError) -> LoginFailed:
    if exc.reauthorize:
        return LoginFailed(LoginFailed.REAUTHORIZE, str(exc))
    return LoginFailed(LoginFailed.UNAVAILABLE, f"Cannot get an access token: {exc}. Try again later")
