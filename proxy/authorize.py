"""`proxy authorize`: get a token owner's first tokens and seal them with its local password.

Three ways, all through msal:

- browser (default where a browser can open): the OAuth2 authorization code flow with PKCE.
  msal builds the request (PKCE, state, nonce) and redeems the code; we own the localhost
  listener that receives the redirect, so we control its port, the countdown and the deadline.
  The redirect arrives as a form POST (response_mode=form_post, as msal itself uses) or as a
  query string; both are accepted.
- device code (``--device``, and the default where no browser can open: a container, a server
  without a desktop): the user opens the verification address on any device and types the code.
- app-only (accounts with ``flow: client_credentials``): nobody signs in; the app's secret or
  certificate gets a token, which proves the configuration works, and the local password the
  mail client will use is set. The proxy later fetches app-only tokens by itself.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import secrets
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import webbrowser
from typing import TextIO

from .config import AccountConfig, Config
from .hints import hint_for, network_problem, shorten
from .system import current_user, make_private_dir
from .tokens.errors import TokenError
from .tokens.identity import (begin_browser_sign_in, begin_device_sign_in, cached_home_account_id,
                              describe_msal_error, fetch_app_only_token, finish_browser_sign_in,
                              finish_device_sign_in, make_msal_app, new_cache, signed_in_identity)
from .tokens.state import token_meta, token_payload
from .tokens.folder import FolderStore
from .tokens.store import Key, StoreError, derive_key, open_store

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title></head>
<body style="font-family:sans-serif;max-width:40em;margin:3em auto"><h1>{title}</h1><p>{text}</p></body></html>"""


class AuthorizeError(Exception):
    """The sign-in did not complete; the message says what to do next."""


class _Server(http.server.ThreadingHTTPServer):
    """One thread per connection (each with a deadline), so a connection that sends nothing, or
    sends slowly, cannot keep the real redirect out; quiet about broken requests."""

    daemon_threads = True
    MAX_CONNECTIONS = 32

    def __init__(self, *args, **kwargs) -> None:
        self._slots = threading.BoundedSemaphore(self.MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):  # a flood: drop the newcomer, keep serving the others
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:  # no traceback on the terminal
        pass


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _Catcher:
    """A localhost HTTP listener that waits for the identity provider's redirect.

    Any local process can reach it (and read the sign-in address, with its ``state``, from the
    browser's command line): a response is taken only if it carries the sign-in's ``state``;
    anything else, an ``error=`` included, is answered 400 and changes nothing. Whoever signed
    in is checked afterwards (:func:`check_signed_in`).
    """

    REQUEST_TIMEOUT = 10.0  # seconds a connection may take to send its request

    def __init__(self, port: int):
        self.state: str | None = None
        self.response: dict[str, str] | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        catcher = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = self.REQUEST_TIMEOUT

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                query = urllib.parse.urlsplit(self.path).query
                catcher.handle(self, dict(urllib.parse.parse_qsl(query)))

            def do_POST(self) -> None:  # noqa: N802
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= 64 * 1024:
                    _reply(self, 400, "Bad request", "This address only receives the sign-in result.")
                    return
                body = self.rfile.read(length).decode("utf-8", "replace")
                catcher.handle(self, dict(urllib.parse.parse_qsl(body)))

            def log_message(self, *args) -> None:  # the URL carries the authorization code
                pass

        self.servers: list[http.server.HTTPServer] = [_Server(("127.0.0.1", port), Handler)]
        self.port = self.servers[0].server_address[1]
        if socket.has_ipv6:  # browsers may resolve "localhost" to ::1 first
            try:
                self.servers.append(_V6Server(("::1", self.port), Handler))
            except OSError:
                pass
        for server in self.servers:
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()

    def handle(self, request: http.server.BaseHTTPRequestHandler, params: dict[str, str]) -> None:
        if "code" not in params and "error" not in params:
            _reply(request, 404, "Waiting for the sign-in", "This address only receives the sign-in result.")
            return
        with self._lock:
            taken = not self.done.is_set() and self.state is not None and \
                secrets.compare_digest(params.get("state", ""), self.state)
            if taken:
                self.response = params
                self.done.set()
        if not taken:
            _reply(request, 400, "Unexpected sign-in response",
                   "This response does not belong to the sign-in that `proxy authorize` is waiting for.")
        elif "error" in params:
            _reply(request, 200, "Sign-in failed", "Return to the terminal for details.")
        else:
            _reply(request, 200, "Sign-in complete",
                   "Return to the terminal: `proxy authorize` checks who signed in and stores the tokens.")

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


def _reply(request: http.server.BaseHTTPRequestHandler, status: int, title: str, text: str) -> None:
    body = _PAGE.format(title=title, text=text).encode("utf-8")
    request.send_response(status)
    request.send_header("Content-Type", "text/html; charset=utf-8")
    request.send_header("Content-Length", str(len(body)))
    request.send_header("Cache-Control", "no-store")
    request.end_headers()
    request.wfile.write(body)


def authorize_browser(config: Config, account: AccountConfig, password: str, *, timeout: float = 30.0,
                      open_browser: bool = True, port: int = 0, out: TextIO = sys.stderr) -> dict:
    """Run the sign-in and store the tokens. Returns the token file's metadata."""
    cache = new_cache()
    app = _msal_app(config, cache)
    try:
        catcher = _Catcher(port)
    except OSError as exc:
        raise AuthorizeError(f"cannot listen on localhost port {port} for the sign-in redirect "
                             f"({exc.strerror}); choose another with --port") from None
    try:
        redirect_uri = f"http://localhost:{catcher.port}"
        flow = begin_browser_sign_in(app, config.identity, redirect_uri, account.username)
        catcher.state = flow["state"]
        print(f"Sign in as {account.username} in the browser to authorize the proxy.", file=out)
        if open_browser:
            print("Opening your browser. If it does not open, visit this address:", file=out)
            threading.Thread(target=_open, args=(flow["auth_uri"],), daemon=True).start()
        else:
            print("Open this address in a browser on this computer:", file=out)
        print(f"  {flow['auth_uri']}", file=out, flush=True)
        _countdown(catcher.done, timeout, out)
        if catcher.response is None:
            raise AuthorizeError(
                f"No sign-in arrived within {timeout:.0f} s. Run the command again when ready; "
                "--timeout 120 gives more time, --no-browser prints the address to open yourself, "
                f"and the browser must be able to reach {redirect_uri} on this computer")
    finally:
        catcher.close()
    response = catcher.response
    if "error" in response:
        raise AuthorizeError(f"the identity provider refused the sign-in: {response.get('error')}: "
                             f"{shorten(response.get('error_description', ''), 300)}")
    try:
        result = finish_browser_sign_in(app, flow, response)
    except ValueError as exc:
        raise AuthorizeError(f"the sign-in response was not valid ({shorten(str(exc), 200)})") from None
    except Exception as exc:
        raise _unreachable(config, exc) from None
    if "access_token" not in result:
        raise AuthorizeError(_refused(result))
    check_signed_in(config, account, result)
    return save_tokens(config, account, password, cache, result)


def _refused(result: dict, what: str = "issue tokens", flow: str | None = None) -> str:
    text = describe_msal_error(result)
    hint = hint_for(text, flow=flow)
    return f"the identity provider refused to {what}: {text}" + (f"\n  What to do: {hint}" if hint else "")


def check_signed_in(config: Config, owner: AccountConfig, result: dict) -> None:
    """The person who signed in must be the token owner being authorized (its ``preferred_username``,
    or its object id if the config names the owner by it); otherwise nothing is stored.

    Anyone on this computer can read the sign-in address from the browser's command line, sign
    in as somebody else and deliver that code to the redirect listener: without this check the
    account would silently hold the other person's tokens.
    """
    username, oid = signed_in_identity(result)
    wanted = owner.username.casefold()
    if (username is not None and username.casefold() == wanted) or (oid is not None and oid.casefold() == wanted):
        return
    who = username or (f"the user with object id {oid}" if oid else "a user the identity provider did not name")
    users = ", ".join(a.username for a in config.sharing(owner.username)) or owner.username
    raise AuthorizeError(
        f"signed in as {who}, but this authorizes {owner.username} (for {users}); nothing was stored. "
        f"Run it again and sign in as {owner.username} (in the browser choose \"Use another account\" if "
        "it picks one by itself). If this was not you, someone on this computer may have answered the "
        "sign-in: run it again and watch the browser. If the account really signs in under another name "
        "(its user principal name), name that one in the config with token:")


def browser_unavailable(env: dict[str, str] | None = None, platform: str = sys.platform) -> str | None:
    """Why no browser can be opened here (None if one probably can): decides the default flow.

    ``$BROWSER`` set means the user chose one. On Linux and other Unix desktops a graphical
    browser needs ``$DISPLAY`` (X11) or ``$WAYLAND_DISPLAY``; without them (ssh, a container, a
    service account) only console browsers exist, which cannot run Microsoft's sign-in page.
    Elsewhere (Windows, macOS) Python's webbrowser module must find one.
    """
    env = os.environ if env is None else env
    if env.get("BROWSER"):
        return None
    if not platform.startswith(("win", "darwin", "cygwin")) and not env.get("DISPLAY") \
            and not env.get("WAYLAND_DISPLAY"):
        return "no graphical display here (DISPLAY and WAYLAND_DISPLAY are unset) and BROWSER is not set"
    try:
        webbrowser.get()
    except webbrowser.Error:
        return "Python finds no web browser on this computer"
    return None


def authorize_device(config: Config, account: AccountConfig, password: str, *, timeout: float | None = None,
                     out: TextIO = sys.stderr) -> dict:
    """The device code flow: print the address and code, poll until approved, then store the tokens.

    Waits until the code expires (its own lifetime, 15 minutes at Microsoft) or ``timeout``
    seconds, whichever comes first. msal's polling is blocking; Ctrl+C interrupts it (the caller
    reports that nothing was stored).
    """
    cache = new_cache()
    app = _msal_app(config, cache)
    try:
        flow = begin_device_sign_in(app, config.identity)
    except Exception as exc:  # network errors from requests, ValueError from msal
        raise _unreachable(config, exc) from None
    if flow is None:
        raise AuthorizeError("the device code flow needs a public client: identity.client_secret is set, so "
                             "use the browser sign-in, or remove client_secret and allow public client flows")
    if "user_code" not in flow:
        raise AuthorizeError(_refused(flow, "start a device sign-in", "device"))
    expires_at = float(flow.get("expires_at") or time.time() + float(flow.get("expires_in") or 900))
    deadline = min(expires_at, time.time() + timeout) if timeout else expires_at
    print(f"Sign in as {account.username} to authorize the proxy, on any device with a browser:", file=out)
    print(f"  1. open   {flow['verification_uri']}", file=out)
    print(f"  2. enter  {flow['user_code']}", file=out)
    print(f"The code is valid for {(expires_at - time.time()) / 60:.0f} min; Ctrl+C cancels.", file=out, flush=True)
    ticker = _Ticker(deadline, out)
    try:
        result = finish_device_sign_in(app, flow, ticker.expired)
    except Exception as exc:  # the network went away while waiting
        raise _unreachable(config, exc) from None
    finally:
        ticker.finish()
    if "access_token" not in result:
        error = result.get("error")
        if error in ("authorization_pending", "slow_down"):
            waited = f"within {timeout:.0f} s" if timeout and deadline < expires_at else "before the code expired"
            raise AuthorizeError(f"No sign-in arrived {waited}. Run the command again for a new code "
                                 "(--timeout gives more time)")
        if error == "expired_token":
            raise AuthorizeError("the code expired before the sign-in; run the command again for a new code")
        if error in ("authorization_declined", "access_denied"):
            raise AuthorizeError("the sign-in was declined; nothing was stored")
        raise AuthorizeError(_refused(result, flow="device"))
    check_signed_in(config, account, result)
    return save_tokens(config, account, password, cache, result)


def authorize_app_only(config: Config, account: AccountConfig, password: str, *, out: TextIO = sys.stderr) -> dict:
    """``flow: client_credentials``: fetch one app-only token (proves the app's credential and
    tenant work) and seal it with the local password the mail client will use."""
    app_only = config.identity.app_only
    print(f"{account.username} uses app-only access (client credentials of app {app_only.client_id}): "
          "no sign-in needed.", file=out)
    try:
        result = fetch_app_only_token(config.identity)
    except TokenError as exc:
        hint = hint_for(str(exc))
        raise AuthorizeError(f"cannot get an app-only token from {app_only.authority}: {exc}; check "
                             "identity.app_only, identity.ca_file and the network"
                             + (f"\n  What to do: {hint}" if hint else "")) from None
    return save_tokens(config, account, password, new_cache(), result)


def _msal_app(config: Config, cache):
    try:
        return make_msal_app(config.identity, cache)
    except Exception as exc:  # msal raises ValueError and requests errors during discovery
        raise _unreachable(config, exc) from None


def _unreachable(config: Config, exc: BaseException) -> AuthorizeError:
    """The identity provider could not be reached: the same words and advice as `proxy check`."""
    identity = config.identity
    problem, todo = network_problem(exc, where=identity.authority, proxy=getattr(identity, "http_proxy", None),
                                    timeout=identity.timeout)
    return AuthorizeError(f"cannot reach the identity provider at {identity.authority}: {problem}\n"
                          f"  What to do: {todo}")


def check_token_store(config: Config) -> bool:
    """Before the sign-in: the token store can take the tokens (the folder is writable, or the
    database answers and has its table); raise AuthorizeError saying why not. Returns True if it
    created the token folder."""
    if config.token_store.store == "folder":
        return check_token_folder(config)
    try:
        asyncio.run(_open_store(config))
    except StoreError as exc:
        raise AuthorizeError(str(exc)) from None
    return False


async def _open_store(config: Config) -> None:
    store = open_store(config)
    try:
        await store.open()
    finally:
        await store.close()


def check_token_folder(config: Config) -> bool:
    """Create the token folder if needed (private to this user) and prove a file can be written
    and replaced there; raise AuthorizeError naming the folder and the user otherwise. Run before
    the sign-in, so nobody completes a sign-in (and MFA) for tokens that cannot be stored.
    Returns True if it created the folder."""
    folder = config.token_path
    created = False
    try:
        created = make_private_dir(folder)
        FolderStore(folder).check_private()  # a folder or file other users could tamper with is refused
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=folder)
        os.close(fd)
        os.replace(probe, probe + "-renamed")
        os.unlink(probe + "-renamed")
        return created
    except StoreError as exc:
        raise AuthorizeError(str(exc)) from None
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise AuthorizeError(f"the token folder {folder} cannot be written by user {current_user()} ({reason}): "
                             "run this command as the user the proxy runs as, fix the folder's permissions, or "
                             "choose another folder with tokens.path") from None


class _Ticker:
    """msal's device-flow exit condition (called about once a second): shows the time left."""

    def __init__(self, deadline: float, out: TextIO):
        self.deadline, self.out = deadline, out
        self.interactive = out.isatty()
        self.last_shown: int | None = None

    def expired(self, _flow: dict | None = None) -> bool:
        left = self.deadline - time.time()
        if left <= 0:
            return True
        shown = int(left + 0.999)
        if self.interactive:
            print(f"\rWaiting for the sign-in: {shown:4d} s left ", end="", file=self.out, flush=True)
        elif self.last_shown is None or self.last_shown - shown >= 60:
            print(f"Waiting for the sign-in: {shown} s left", file=self.out, flush=True)
            self.last_shown = shown
        return False

    def finish(self) -> None:
        if self.interactive:
            print(file=self.out)


def save_tokens(config: Config, account: AccountConfig, password: str, cache,
                result: dict) -> dict:
    """Seal a fresh msal result with a new key derived from ``password`` (new salt)."""
    now = time.time()
    lifetime = float(result.get("expires_in") or 3600)
    expires_at = now + lifetime
    home = cached_home_account_id(cache)
    info = result.get("id_token_claims") or {}
    meta = token_meta(account.username, expires_at=expires_at, has_refresh_token="refresh_token" in result,
                      last_refresh=now, last_error=None, flow=account.flow)
    if info.get("preferred_username"):
        meta["signed_in_as"] = info["preferred_username"]
    try:
        asyncio.run(_store(config, account.username, derive_key(password),
                           token_payload(cache, home, result["access_token"], expires_at, lifetime), meta))
    except OSError as exc:
        raise AuthorizeError(f"the tokens could not be stored in {config.token_path} as user {current_user()} "
                             f"({exc.strerror or exc.__class__.__name__}); nothing was stored") from None
    except StoreError as exc:
        raise AuthorizeError(f"the tokens could not be stored: {exc}; nothing was stored") from None
    return meta


async def _store(config: Config, name: str, key: Key, payload: dict, meta: dict) -> None:
    """Write the new record unconditionally: a new sign-in (or password) always wins over the
    tokens a running proxy may be refreshing; it sees the change and follows."""
    store = open_store(config)
    try:
        await store.open()
        await store.write(name, key, payload, meta)
    finally:
        await store.close()


def _open(url: str) -> None:
    try:
        webbrowser.open(url)
    except Exception:
        pass  # the address is printed; the user can open it by hand


def _countdown(done: threading.Event, timeout: float, out: TextIO) -> None:
    deadline = time.monotonic() + timeout
    interactive = out.isatty()
    last_shown = None
    while not done.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        shown = int(left + 0.999)
        if interactive:
            print(f"\rWaiting for the sign-in: {shown:3d} s left ", end="", file=out, flush=True)
        elif shown != last_shown and (shown % 10 == 0 or shown <= 5 or last_shown is None):
            print(f"Waiting for the sign-in: {shown} s left", file=out, flush=True)
        last_shown = shown
        done.wait(min(1.0, left))
    if interactive:
        print(file=out)
