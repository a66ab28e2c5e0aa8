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
from ..login import LoginFailed, Upstream, login
from ..tokens import TokenBroker
from . import upstream
from .core import Close, ImapFront, Login, Send, StartTLS

log = logging.getLogger("proxy.imap")
_NO_CODES = {LoginFailed.CREDENTIALS: "AUTHENTICATIONFAILED", LoginFailed.REAUTHORIZE: "AUTHENTICATIONFAILED",
             LoginFailed.REJECTED: "AUTHENTICATIONFAILED", LoginFailed.UNAVAILABLE: "UNAVAILABLE"}


class ImapProxy:
    def __init__(self, config: Config, broker: TokenBroker, *, upstream_tls: ssl.SSLContext,
                 throttle: FailureThrottle | None = None):
        self.config = config
        self.broker = broker
        self.upstream_tls = upstream_tls
        self.throttle = throttle or FailureThrottle()
        self.server: asyncio.AbstractServer | None = None
        self.sessions: set[asyncio.Task] = set()
        self._upstream = Upstream(
            connect=lambda: upstream.connect(config.imap.upstream, upstream_tls),
            authenticate=upstream.authenticate,
            is_closed=lambda conn: conn.endpoint.is_closing,
            close=lambda conn: conn.close())

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
        try:
            if event.authzid and event.authzid.casefold() != event.username.casefold():
                raise LoginFailed(LoginFailed.CREDENTIALS, "Logging in on behalf of another user is not supported")
            conn, caps, _ = await login(
                self.broker, self.throttle, self._upstream, username=event.username, password=event.password,
                source=peer.rsplit(":", 1)[0], timeout=self.config.limits.login_timeout, protocol="imap")
        except LoginFailed as failure:
            return core.login_failed(_NO_CODES[failure.kind], failure.text)
        self.throttle.succeeded(event.username.casefold())
        log.info("imap %s login %s ok (%.0f ms)", peer, event.username, (time.monotonic() - started) * 1000)
        client.write(core.login_succeeded(caps))
        return conn

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


def _peername(ep: Endpoint) -> str:
    name = ep.transport.get_extra_info("peername") if ep.transport else None
    return f"{name[0]}:{name[1]}" if name else "?"


def _sockname(sock) -> str:
    name = sock.getsockname()
    return f"{name[0]}:{name[1]}"
