"""The IMAP listener: a thin asyncio shell around the pre-auth core.

Per connection: greet, feed the client's bytes to :class:`~proxy.imap.core.ImapFront`, and
when it produces a ``Login`` event check the local password, get an access token from the
broker, log in upstream with XOAUTH2 (one retry with a fresh token if the server refuses it),
answer the client with the upstream's capabilities, and pipe the two sockets together.
The whole login is answered within ``limits.login_timeout`` seconds, whatever the peers do.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

from ..config import Config
from ..relay import Endpoint, pipe
from ..throttle import FailureThrottle
from ..tokens import LoginRefused, TokenBroker, TokenError
from . import upstream
from .core import Close, ImapFront, Login, Send, StartTLS

log = logging.getLogger("proxy.imap")
MAX_BUFFERED_DURING_LOGIN = 256 * 1024


class LoginFailed(Exception):
    def __init__(self, code: str, text: str, password_wrong: bool = False):
        super().__init__(text)
        self.code, self.text, self.password_wrong = code, text, password_wrong


class ImapProxy:
    def __init__(self, config: Config, broker: TokenBroker, *, upstream_tls: ssl.SSLContext,
                 throttle: FailureThrottle | None = None):
        self.config = config
        self.broker = broker
        self.upstream_tls = upstream_tls
        self.throttle = throttle or FailureThrottle()
        self.server: asyncio.AbstractServer | None = None
        self.sessions: set[asyncio.Task] = set()

    async def start(self) -> asyncio.AbstractServer:
        listen = self.config.imap.listen
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Endpoint(on_connect=self._accept),
                                               listen.host, listen.port, backlog=1024)
        log.info("IMAP listening on %s, upstream %s", ", ".join(_sockname(s) for s in self.server.sockets),
                 self.config.imap.upstream)
        return self.server

    def _accept(self, client: Endpoint) -> None:
        if len(self.sessions) >= self.config.limits.max_connections:
            client.write(b"* BYE Too many connections to the proxy, try again later\r\n")
            client.close()
            return
        task = asyncio.get_running_loop().create_task(self._session(client))
        self.sessions.add(task)
        task.add_done_callback(self.sessions.discard)

    async def _session(self, client: Endpoint) -> None:
        peer = _peername(client)
        started = time.monotonic()
        core = ImapFront(id_fields={"name": "oauth2-mail-proxy"})
        client.write(core.greeting())
        account, result = None, "closed before login"
        try:
            deadline = started + self.config.limits.preauth_timeout
            events: list = []
            while True:
                if not events:
                    try:
                        data = await asyncio.wait_for(client.read(), max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        client.write(b"* BYE No login within the time allowed\r\n")
                        result = "pre-login timeout"
                        return
                    events = core.receive_data(data)
                    continue
                event = events.pop(0)
                if isinstance(event, Send):
                    client.write(event.data)
                elif isinstance(event, (Close, StartTLS)):  # STARTTLS is not offered by this listener
                    return
                elif isinstance(event, Login):
                    account = event.username
                    outcome = await self._login(client, core, event, peer)
                    if isinstance(outcome, upstream.Connection):
                        result = "logged in"
                        await self._relay(client, outcome, core, peer, account, started)
                        return
                    events = outcome + events
        except Exception:  # a bug must not take the listener down; never log event contents
            log.exception("imap %s: session failed", peer)
        finally:
            client.close()
            if result != "logged in":
                log.info("imap %s session end: %s (user %s, %.0f ms)", peer, result, account or "-",
                         (time.monotonic() - started) * 1000)

    async def _login(self, client: Endpoint, core: ImapFront, event: Login,
                     peer: str) -> upstream.Connection | list:
        """Log in; returns the upstream connection, or the core's events after a failure."""
        started = time.monotonic()
        timeout = self.config.limits.login_timeout
        try:
            try:
                conn, caps = await asyncio.wait_for(self._authenticate(event, client), timeout)
            except asyncio.TimeoutError:
                raise LoginFailed("UNAVAILABLE", f"Login timed out after {timeout:.0f} s (identity provider "
                                  "or upstream server not answering); try again later") from None
        except LoginFailed as failure:
            elapsed = time.monotonic() - started
            if failure.password_wrong:
                self.throttle.failed(event.username.casefold(), peer.rsplit(":", 1)[0])
                delay = self.throttle.delay(event.username.casefold(), peer.rsplit(":", 1)[0])
                await asyncio.sleep(max(0.0, min(delay, timeout - elapsed - 0.5)))
            log.info("imap %s login %s failed: %s", peer, event.username, failure.text)
            return core.login_failed(failure.code, failure.text)
        self.throttle.succeeded(event.username.casefold())
        log.info("imap %s login %s ok (%.0f ms)", peer, event.username, (time.monotonic() - started) * 1000)
        client.write(core.login_succeeded(caps))
        return conn

    async def _authenticate(self, event: Login, client: Endpoint):
        if event.authzid and event.authzid.casefold() != event.username.casefold():
            raise LoginFailed("AUTHORIZATIONFAILED", "Logging in on behalf of another user is not supported")
        try:
            state = await self.broker.authenticate(event.username, event.password)
        except LoginRefused as exc:
            raise LoginFailed("AUTHENTICATIONFAILED", str(exc).capitalize(), password_wrong=True) from None
        except TokenError as exc:
            raise _token_failure(exc) from None
        mailbox = state.account.username
        conn = await self._connect()
        try:
            for attempt in (1, 2):
                try:
                    token = await self.broker.access_token(state, self.config.limits.login_timeout)
                except TokenError as exc:
                    raise _token_failure(exc) from None
                try:
                    caps = await upstream.authenticate(conn, mailbox, token)
                    return conn, caps
                except upstream.TokenRejected as exc:
                    if attempt == 2 or not self.broker.reject(state, token):
                        raise LoginFailed("AUTHENTICATIONFAILED", (
                            f"The mail server refused the access token ({exc}). Run `proxy authorize "
                            f"{state.account.username}` again, and check that IMAP is enabled for {mailbox}"))
                    log.info("upstream refused the token for %s; refreshing once and retrying", mailbox)
                    if conn.endpoint.is_closing:
                        conn.close()
                        conn = await self._connect()
                except upstream.UpstreamError as exc:
                    raise LoginFailed("UNAVAILABLE", f"Mail server problem: {exc}") from None
        except BaseException:
            conn.close()
            raise

    async def _connect(self) -> upstream.Connection:
        try:
            return await upstream.connect(self.config.imap.upstream, self.upstream_tls)
        except upstream.UpstreamError as exc:
            raise LoginFailed("UNAVAILABLE", f"Mail server unreachable: {exc}") from None

    async def _relay(self, client: Endpoint, conn: upstream.Connection, core: ImapFront, peer: str,
                     account: str, started: float) -> None:
        server = conn.endpoint
        pipe(client, server, core.take_pending(), b"")
        try:
            await asyncio.wait([client.closed, server.closed], return_when=asyncio.ALL_COMPLETED)
        finally:
            server.close()
        log.info("imap %s session end: user %s, %.1f s, %d bytes from client, %d bytes to client",
                 peer, account, time.monotonic() - started, client.bytes_received, server.bytes_received)

    async def close(self) -> None:
        """Stop listening and end the open sessions."""
        if self.server is not None:
            self.server.close()
        for task in list(self.sessions):
            task.cancel()
        await asyncio.gather(*self.sessions, return_exceptions=True)


def _token_failure(exc: TokenError) -> LoginFailed:
    if exc.reauthorize:
        return LoginFailed("AUTHENTICATIONFAILED", str(exc))
    return LoginFailed("UNAVAILABLE", f"Cannot get an access token: {exc}. Try again later")


def _peername(ep: Endpoint) -> str:
    name = ep.transport.get_extra_info("peername") if ep.transport else None
    return f"{name[0]}:{name[1]}" if name else "?"


def _sockname(sock) -> str:
    name = sock.getsockname()
    return f"{name[0]}:{name[1]}"
