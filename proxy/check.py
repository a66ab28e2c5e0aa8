"""`proxy check [USER]`: diagnose the setup end to end, without a mail client.

Steps, each printed as ``ok``/``FAIL``/``skip`` with what to do on failure:

1. the config (it loaded, so it is valid; the accounts it lists);
2. the identity provider answers its OpenID configuration (and the app-only authority, if any);
3. with USER: a token can be obtained *now* (a forced refresh, or an app-only token) and carries
   the permissions IMAP and SMTP need;
4. the upstream IMAP and SMTP servers (and POP3, with a ``pop3`` section) are reachable with
   verified TLS and offer XOAUTH2, and with USER they accept the token: IMAP opens the account's
   mailbox (the same post-login probe as the proxy's, so Exchange's "authenticated but not
   connected" is caught and explained), SMTP logs in as the account's sending identity (the
   owner, for a shared mailbox).

An authorization given before POP3 was configured lacks its permission (the proxy keeps such
accounts working for IMAP and SMTP); step 3 says so, and that `proxy authorize` adds it.
The probes use the proxy's own upstream code (proxy/imap/upstream.py, proxy/smtp/upstream.py,
proxy/pop3/upstream.py),
so a passing check means the proxy's real login path works. (aioimaplib would be the obvious
IMAP client, but it is GPL-3.0-only and the proxy is Apache-2.0: it stays a test dependency.)
A refresh done here is saved to the token file like the proxy's own refreshes. Nothing printed
contains a token or a password.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
import time
from typing import Awaitable, Callable, TextIO

import requests

from .config import FLOW_CLIENT_CREDENTIALS, AccountConfig, Config
from .hints import hint_for, imap_refused_hint, network_problem, pop3_refused_hint, smtp_refused_hint
from .imap import upstream as imap_upstream
from .login import TokenRejected, UpstreamError, UpstreamRefused, refusal_hint, upstream_user
from .logs import register_secret
from .permissions import PERMISSIONS, granted_permissions, missing_permission
from .pop3 import upstream as pop3_upstream
from .smtp import upstream as smtp_upstream
from .smtp.server import local_hostname
from .tls import client_context
from .tokens import LoginRefused, TokenBroker, TokenError
from .tokens.identity import describe_msal_error, fetch_app_only_token, http_session
from .tokens.state import (NEEDS_AUTHORIZATION, NOT_AUTHORIZED, OK, STORE_UNAVAILABLE, UNREADABLE, owner_statuses,
                           stored_status)
from .tokens.store import StoreError, open_store


class Report:
    """Prints the result lines and counts failures."""

    def __init__(self, out: TextIO):
        self.out, self.failures = out, 0

    def ok(self, what: str, detail: str = "") -> None:
        self._line("ok  ", what, detail)

    def skip(self, what: str, detail: str) -> None:
        self._line("skip", what, detail)

    def fail(self, what: str, problem: str, todo: str | None) -> None:
        self.failures += 1
        self._line("FAIL", what, problem)
        if todo:
            print(f"      what to do: {todo}", file=self.out, flush=True)

    def _line(self, mark: str, what: str, detail: str) -> None:
        print(f"{mark}  {what}" + (f": {detail}" if detail else ""), file=self.out, flush=True)


async def run_check(config: Config, user: str | None, *, password_stdin: bool = False,
                    out: TextIO = sys.stdout) -> int:
    report = Report(out)
    account = _account(config, user) if user else None
    if user and account is None:
        names = ", ".join(a.username for a in config.accounts)
        print(f"proxy: {user} is not in the config's accounts (configured: {names})", file=sys.stderr)
        return 2
    password = None
    if account is not None and account.flow != FLOW_CLIENT_CREDENTIALS:
        password = _read_password(account, password_stdin)
    report.ok("config", f"{config.source or 'config'} is valid; {len(config.accounts)} account(s)")
    idp_ok = await _check_identity(config, report, account)
    token = None
    if account is not None:
        if not idp_ok:
            report.skip(f"token for {account.username}", "the identity provider is not reachable")
        else:
            token = await _check_token(config, report, account, password)
    else:
        await _check_authorizations(config, report)
    timeout = config.limits.login_timeout
    await _check_imap(config, report, account, token, timeout)
    await _check_smtp(config, report, account, token, timeout)
    if config.pop3 is not None:
        await _check_pop3(config, report, account, token, timeout)
    if report.failures:
        print(f"{report.failures} problem(s) found.", file=out)
        return 1
    print("Everything works." if account else
          "No problem found (give an account, `proxy check USER`, to test its token and logins too).", file=out)
    return 0


def _account(config: Config, user: str) -> AccountConfig | None:
    return config.account(user) or config.owner_account(user)


def _read_password(account: AccountConfig, from_stdin: bool) -> str | None:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        return None
    return getpass.getpass(f"Local password of {account.owner} (unlocks its tokens): ")


# ------------------------------------------------------------------------------ identity provider
async def _check_identity(config: Config, report: Report, account: AccountConfig | None) -> bool:
    identity = config.identity
    authorities = [("identity provider", identity.authority)]
    app_only = identity.app_only
    if app_only and app_only.authority != identity.authority and (
            account is None or account.flow == FLOW_CLIENT_CREDENTIALS):
        authorities.append(("identity provider (app-only)", app_only.authority))
    ok = True
    for label, authority in authorities:
        url = f"{authority}/v2.0/.well-known/openid-configuration"
        problem, todo = await asyncio.get_running_loop().run_in_executor(None, _discover, config, url)
        if problem:
            report.fail(f"{label} {authority}", problem, todo)
            ok = False
        else:
            report.ok(f"{label} {authority}", "answers (OpenID configuration)")
    return ok


def _discover(config: Config, url: str) -> tuple[str | None, str | None]:
    identity = config.identity
    session = http_session(identity)
    try:
        response = session.get(url)
    except (requests.RequestException, OSError) as exc:  # the same advice as `proxy authorize`
        return network_problem(exc, where=url, proxy=getattr(identity, "http_proxy", None), timeout=identity.timeout)
    finally:
        session.close()
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200 or "token_endpoint" not in body:
        text = describe_msal_error(body) if body.get("error") else f"HTTP {response.status_code}"
        return (f"no OpenID configuration ({text})", hint_for(text) or
                "check identity.authority: https://login.microsoftonline.com/<tenant-id or organizations>")
    return None, None


# ------------------------------------------------------------------------------ token
async def _check_token(config: Config, report: Report, account: AccountConfig, password: str | None) -> str | None:
    what = f"token for {account.username}" + (f" (tokens of {account.owner})" if account.owner_key != account.key
                                              else "")
    if account.flow == FLOW_CLIENT_CREDENTIALS:
        return await _check_app_only_token(config, report, account, what)
    if password is None:
        report.skip(what, "needs the local password of the token owner (type it, or use --password-stdin)")
        return None
    store = open_store(config)
    broker = TokenBroker(config, store)
    try:
        try:
            await store.open()
            grant = await broker.authenticate(account.username, password)
        except LoginRefused:
            report.fail(what, f"wrong local password for {account.owner}",
                        f"use the password chosen at `proxy authorize {account.owner}`, or run that again to set "
                        "a new one")
            return None
        except TokenError as exc:
            report.fail(what, str(exc), hint_for(str(exc)) or f"run `proxy authorize {account.owner}`")
            return None
        try:
            token = await broker.force_refresh(grant, config.limits.login_timeout)
        except TokenError as exc:
            report.fail(what, f"the identity provider issued no token: {exc}",
                        hint_for(str(exc)) or f"run `proxy authorize {account.owner}` again")
            return None
        register_secret(token)
        _token_ok(config, report, account, what, token, grant.state.granted_scope, grant.state.expires_at)
        return token
    except StoreError as exc:
        report.fail(what, str(exc), "check tokens.store and the database (docs/scale-out.md)")
        return None
    finally:
        await broker.close()
        await store.close()


async def _check_app_only_token(config: Config, report: Report, account: AccountConfig, what: str) -> str | None:
    started = time.time()
    try:
        result = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
            None, fetch_app_only_token, config.identity), config.limits.login_timeout)
    except asyncio.TimeoutError:
        report.fail(what, "the identity provider did not answer in time", "check the network; try again later")
        return None
    except TokenError as exc:
        report.fail(what, str(exc), hint_for(str(exc)) or
                    "check identity.app_only (client_id, authority with your tenant id, secret or certificate)")
        return None
    token = result["access_token"]
    register_secret(token)
    _token_ok(config, report, account, what, token, result.get("scope"),
              started + float(result.get("expires_in") or 0))
    store = open_store(config)
    try:
        await store.open()
        status = await stored_status(store, account.token_owner)
    except StoreError as exc:
        status = None
        report.fail(f"local password of {account.owner}", str(exc), "check tokens.store and the database")
    finally:
        await store.close()
    if status is not None and status.state == NOT_AUTHORIZED:
        report.fail(f"local password of {account.owner}", "not set yet",
                    f"run `proxy authorize {account.owner}` (no sign-in: it only sets the mail client's password)")
    elif status is not None and status.state in (UNREADABLE, STORE_UNAVAILABLE):
        report.fail(f"local password of {account.owner}", str(status.last_error),
                    f"run `proxy authorize {account.owner}` again")
    return token


def _token_ok(config: Config, report: Report, account: AccountConfig, what: str, token: str, scope: str | None,
              expires_at: float) -> None:
    granted = granted_permissions(token, scope)
    minutes = max(0.0, (expires_at - time.time()) / 60)
    detail = f"obtained from the identity provider, valid {minutes:.0f} min"
    if granted is not None:
        detail += f"; permissions: {' '.join(sorted(granted)) or 'none'}"
    report.ok(what, detail)
    if granted is None:
        return
    for protocol in ("imap", "smtp") + (("pop3",) if config.pop3 is not None else ()):
        if not missing_permission(protocol, token, scope):
            continue
        needed = PERMISSIONS[protocol]
        grant = (f"add {needed[0]} (delegated) or {needed[1]} (app-only) to the app's API permissions with admin "
                 "consent and list it in identity.scopes")
        todo = f"{grant}, then run `proxy authorize` again (docs/azure-setup.md)"
        if protocol == "pop3" and account.flow != FLOW_CLIENT_CREDENTIALS:
            todo = (f"run `proxy authorize {account.owner}` again: the authorization was probably given before POP3 "
                    f"was configured (IMAP and SMTP keep working meanwhile). If POP is still missing after that, "
                    f"{grant} (docs/azure-setup.md)")
        report.fail(f"{what}: {protocol.upper()} permission", f"the token carries none of {', '.join(needed)}",
                    todo)


async def _check_authorizations(config: Config, report: Report) -> None:
    store = open_store(config)
    try:
        await store.open()
        statuses = await owner_statuses(config, store)
    except StoreError as exc:
        report.fail(f"token store ({store.describe()})", str(exc), "check tokens.store and the database")
        return
    finally:
        await store.close()
    for owner_key, status in statuses.items():
        owner = config.owner_account(owner_key).username
        what = f"tokens of {owner}"
        if status.state == NOT_AUTHORIZED:
            report.fail(what, "not authorized yet", f"run `proxy authorize {owner}`")
        elif status.state == NEEDS_AUTHORIZATION:
            report.fail(what, f"the stored authorization no longer works ({status.last_error})",
                        hint_for(str(status.last_error)) or f"run `proxy authorize {owner}` again")
        elif status.state != OK:
            report.fail(what, str(status.last_error), f"run `proxy authorize {owner}` again")
        else:
            report.ok(what, "stored" + (f" (last error: {status.last_error})" if status.last_error else ""))


# ------------------------------------------------------------------------------ mail servers
async def _check_imap(config: Config, report: Report, account: AccountConfig | None, token: str | None,
                      timeout: float) -> None:
    address = config.imap.upstream
    what = f"IMAP {address}"
    try:
        conn = await asyncio.wait_for(imap_upstream.connect(address, client_context(config.imap.ca_file),
                                                            via=config.imap.upstream_proxy), timeout)
    except (UpstreamError, asyncio.TimeoutError) as exc:
        report.fail(what, str(exc) or "no greeting in time", _reach_hint(address, "imap", config.imap))
        return
    try:
        offered = "AUTH=XOAUTH2" in {c.upper() for c in conn.capabilities}
        if await _offers_and_accepts(report, "IMAP", address, offered, "AUTH=XOAUTH2", account, token, timeout,
                                     lambda: imap_upstream.authenticate(conn, account.mailbox, token),
                                     lambda exc, app_only: imap_refused_hint(account.mailbox, account.owner, app_only)):
            conn.endpoint.write(b"Z LOGOUT\r\n")
    finally:
        conn.close()


async def _check_smtp(config: Config, report: Report, account: AccountConfig | None, token: str | None,
                      timeout: float) -> None:
    address = config.smtp.upstream
    what = f"SMTP {address}"
    try:
        conn = await asyncio.wait_for(smtp_upstream.connect(address, config.smtp.upstream_tls,
                                                            client_context(config.smtp.ca_file), local_hostname(),
                                                            via=config.smtp.upstream_proxy),
                                      timeout)
    except (UpstreamError, asyncio.TimeoutError) as exc:
        report.fail(what, str(exc) or "no greeting in time", _reach_hint(address, "smtp", config.smtp))
        return
    try:
        if "XOAUTH2" not in conn.extensions.get("AUTH", "").upper().split():
            report.fail(what, "does not offer AUTH XOAUTH2 after TLS",
                        "check smtp.upstream (smtp.office365.com:587) and smtp.upstream_tls")
            return
        mode = "STARTTLS" if config.smtp.upstream_tls == "starttls" else "TLS"
        report.ok(what, f"{mode} certificate verified; offers AUTH XOAUTH2")
        if account is None:
            return
        user = upstream_user(account, "smtp")
        await _probe_login(report, "SMTP", account, token, timeout,
                           lambda: smtp_upstream.authenticate(conn, user, token),
                           lambda exc, app_only: smtp_refused_hint(str(exc), user, account.owner, app_only))
    finally:
        conn.quit(grace=1.0)
        try:
            await asyncio.wait_for(asyncio.shield(conn.endpoint.closed), 1.5)
        except asyncio.TimeoutError:
            conn.abort()


async def _offers_and_accepts(report: Report, protocol: str, address, offered: bool, mechanism: str,
                              account: AccountConfig | None, token: str | None, timeout: float,
                              authenticate: Callable[[], Awaitable[object]],
                              refused_hint: Callable[[Exception, bool], str]) -> bool:
    """Report whether the server (connected over verified TLS) offers XOAUTH2 and, with an account,
    accepts the token; True if logged in."""
    what = f"{protocol} {address}"
    if not offered:
        report.fail(what, f"does not offer {mechanism}",
                    f"check {protocol.lower()}.upstream ({_UPSTREAM_DEFAULTS[protocol.lower()]})")
        return False
    report.ok(what, f"TLS certificate verified; offers {mechanism}")
    if account is None:
        return False
    return await _probe_login(report, protocol, account, token, timeout, authenticate, refused_hint)


async def _probe_login(report: Report, protocol: str, account: AccountConfig, token: str | None, timeout: float,
                       authenticate: Callable[[], Awaitable[object]],
                       refused_hint: Callable[[Exception, bool], str]) -> bool:
    """Log in upstream with ``token`` for ``account``'s mailbox and report how it went (the same
    login as the proxy's, so the same refusals and the same advice)."""
    user = upstream_user(account, protocol.lower())
    if user != account.mailbox:  # SMTP of a shared mailbox: the owner logs in and sends as the mailbox
        login = f"{protocol} login as {user} (to send as {account.mailbox}, which needs Send As)"
    else:
        login = f"{protocol} login to {account.mailbox}" + (f" with the token of {account.owner}" if account.shared
                                                             else "")
    if token is None:
        report.skip(login, "no token")
        return False
    try:
        await asyncio.wait_for(authenticate(), timeout)
    except TokenRejected as exc:
        report.fail(login, f"refused: {exc}", refused_hint(exc, account.flow == FLOW_CLIENT_CREDENTIALS))
        return False
    except UpstreamRefused as exc:
        report.fail(login, f"refused: {exc}", refusal_hint(account, protocol.lower(), exc))
        return False
    except (UpstreamError, asyncio.TimeoutError) as exc:
        report.fail(login, str(exc) or "no answer in time", hint_for(str(exc)) or
                    "try again; if it persists, check the server status")
        return False
    report.ok(login, "accepted")
    return True


async def _check_pop3(config: Config, report: Report, account: AccountConfig | None, token: str | None,
                      timeout: float) -> None:
    settings = config.pop3
    assert settings is not None
    address = settings.upstream
    what = f"POP3 {address}"
    try:
        conn = await asyncio.wait_for(pop3_upstream.connect(address, client_context(settings.ca_file),
                                                            via=settings.upstream_proxy), timeout)
    except (UpstreamError, asyncio.TimeoutError) as exc:
        report.fail(what, str(exc) or "no greeting in time", _reach_hint(address, "pop3", settings))
        return
    try:
        try:
            caps = await asyncio.wait_for(pop3_upstream.capabilities(conn), timeout)
        except (UpstreamError, asyncio.TimeoutError) as exc:
            report.fail(what, f"CAPA: {exc or 'no answer in time'}", _reach_hint(address, "pop3", settings))
            return
        offered = "XOAUTH2" in {m.upper() for m in caps.get("SASL", [])}
        if await _offers_and_accepts(report, "POP3", address, offered, "SASL XOAUTH2", account, token, timeout,
                                     lambda: pop3_upstream.authenticate(conn, account.mailbox, token),
                                     lambda exc, app_only: pop3_refused_hint(account.mailbox, account.owner, app_only)):
            conn.endpoint.write(b"QUIT\r\n")
    finally:
        conn.close()


_UPSTREAM_DEFAULTS = {"imap": "outlook.office365.com:993", "smtp": "smtp.office365.com:587",
                      "pop3": "outlook.office365.com:995"}


def _reach_hint(address, protocol: str, listener=None) -> str:
    default = _UPSTREAM_DEFAULTS[protocol]
    if listener is not None and listener.upstream_proxy is not None:
        return (f"check {protocol}.upstream ({default} for Microsoft 365) and that the web proxy "
                f"{listener.upstream_proxy} lets CONNECT to port {address.port} through; or set "
                f"{protocol}.via_http_proxy: false where that port is open directly")
    return (f"check {protocol}.upstream ({default} for Microsoft 365), DNS and the firewall (outgoing port "
            f"{address.port} must be open; where only a web proxy lets traffic out, set {protocol}.via_http_proxy: "
            f"true); with a TLS-inspecting proxy set {protocol}.ca_file")
