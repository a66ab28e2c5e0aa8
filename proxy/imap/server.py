"""The IMAP listener: a thin asyncio shell around the pre-auth core.

Per connection: greet, feed the client's bytes to :class:`~proxy.imap.core.ImapFront`, and
when it produces a ``Login`` event check the local password, get an access token from the
broker, log in upstream with XOAUTH2 (one retry with a fresh token if the server refuses it),
answer the client with the upstream's capabilities, and pipe the two sockets together.
The whole login is answered within ``limits.login_timeout`` seconds, whatever the peers do.

TLS towards the client: ``imap.tls_listen`` accepts implicit TLS (IMAPS); ``imap.starttls``
offers STARTTLS on the plain listener (``required``: LOGINDISABLED until TLS is up). Settings
are read from ``self.config`` per connection and per login, so :meth:`ImapProxy.reconfigure`
changes them for new sessions without touching open ones.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

from ..config import STARTTLS_OFF, STARTTLS_REQUIRED, Config
from ..listeners import HANDSHAKE_TIMEOUT, Listeners
from ..logs import log_event
from ..metrics import METRICS
from ..relay import WRITE_HIGH_WATER, Endpoint, pipe
from ..throttle import FailureThrottle
from ..login import LoginFailed, Upstream, login
from ..tls import describe_tls_error
from ..tokens import TokenBroker
from . import upstream
from .core import Close, ImapFront, Login, Send, StartTLS

log = logging.getLogger("proxy.imap")
_BYE_SHUTDOWN = b"* BYE The proxy is shutting down; please reconnect later\r\n"
_NO_CODES = {LoginFailed.CREDENTIALS: "AUTHENTICATIONFAILED", LoginFailed.REAUTHORIZE: "AUTHENTICATIONFAILED",
             LoginFailed.REJECTED: "AUTHENTICATIONFAILED", LoginFailed.UNAVAILABLE: "UNAVAILABLE"}


class ImapProxy(Listeners):
    def __init__(self, config: Config, broker: TokenBroker, *, upstream_tls: ssl.SSLContext,
                 throttle: FailureThrottle | None = None, server_tls: ssl.SSLContext | None = None):
        self.config = config
        self.broker = broker
        self.upstream_tls = upstream_tls
        self.server_tls = server_tls  # for imap.tls_listen and STARTTLS
        self.throttle = throttle or FailureThrottle()
        self.sessions: set[asyncio.Task] = set()
        self.draining = False
        self._reading: set[Endpoint] = set()  # sessions waiting for a command before login
        self._upstream = Upstream(
            connect=lambda: upstream.connect(self.config.imap.upstream, self.upstream_tls,
                                             via=self.config.imap.upstream_proxy),
            authenticate=upstream.authenticate,
            is_closed=lambda conn: conn.endpoint.is_closing,
            close=lambda conn: conn.close())

    async def start(self) -> asyncio.AbstractServer:
        return await self._listen(log, "IMAP", self.config.imap, lambda: Endpoint(on_connect=self._accept),
                                  lambda: Endpoint(on_connect=lambda ep: self._accept(ep, tls=True)),
                                  self.server_tls)

    def reconfigure(self, config: Config, upstream_tls: ssl.SSLContext) -> None:
        """Use ``config`` for new connections and logins; open sessions keep going."""
        self.config, self.upstream_tls = config, upstream_tls

    def _accept(self, client: Endpoint, tls: bool = False) -> None:
        if len(self.sessions) >= self.config.limits.max_connections:
            client.write(b"* BYE Too many connections to the proxy, try again later\r\n")
            client.close()
            return
        task = asyncio.get_running_loop().create_task(self._session(client, tls))
        self.sessions.add(task)
        task.add_done_callback(self.sessions.discard)

    async def _session(self, client: Endpoint, tls: bool = False) -> None:
        peer = _peername(client)
        started = time.monotonic()
        starttls = STARTTLS_OFF if tls or self.server_tls is None else self.config.imap.starttls
        core = ImapFront(id_fields={"name": "oauth2-mail-proxy"}, tls_active=tls,
                         starttls=starttls != STARTTLS_OFF, login_requires_tls=starttls == STARTTLS_REQUIRED)
        METRICS.session_opened("imap")
        log_event(log, "imap %s session start%s", peer, " (TLS)" if tls else "", event="session_start",
                  protocol="imap", peer=peer, tls=tls)
        client.write(core.greeting())
        account, result = None, "closed before login"
        try:
            deadline = started + self.config.limits.preauth_timeout
            events: list = []
            while True:
                if not events:
                    if self.draining:
                        client.write(_BYE_SHUTDOWN)
                        result = "proxy shutting down"
                        return
                    self._reading.add(client)
                    try:
                        data = await asyncio.wait_for(client.read(), max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        client.write(b"* BYE No login within the time allowed\r\n")
                        result = "pre-login timeout"
                        return
                    finally:
                        self._reading.discard(client)
                    events = core.receive_data(data)
                    continue
                event = events.pop(0)
                if isinstance(event, Send):
                    client.write(event.data)
                elif isinstance(event, StartTLS):
                    if not await self._start_tls(client, deadline):
                        result = "TLS handshake failed"
                        return
                    tls = True
                    core.tls_started()
                elif isinstance(event, Close):
                    return
                elif isinstance(event, Login):
                    account = event.username
                    outcome = await self._login(client, core, event, peer)
                    if isinstance(outcome, upstream.Connection):
                        result = "logged in"
                        await self._relay(client, outcome, core, peer, account, started, tls)
                        return
                    events = outcome + events
        except Exception:  # a bug must not take the listener down; never log event contents
            log.exception("imap %s: session failed", peer)
        finally:
            client.close()
            METRICS.session_closed("imap")
            if result != "logged in":
                duration = time.monotonic() - started
                log_event(log, "imap %s session end: %s (user %s, %.0f ms)", peer, result, account or "-",
                          duration * 1000, event="session_end", protocol="imap", peer=peer, account=account,
                          result=result, duration_s=round(duration, 3), bytes_from_client=0, bytes_to_client=0)

    async def _start_tls(self, client: Endpoint, deadline: float) -> bool:
        """The TLS handshake after STARTTLS; False if it failed (the connection is then closed)."""
        client.take_buffer()  # plaintext sent after STARTTLS could be injected: never parse it
        loop = asyncio.get_running_loop()
        timeout = max(1.0, min(HANDSHAKE_TIMEOUT, deadline - time.monotonic()))
        try:
            transport = await loop.start_tls(client.transport, client, self.server_tls, server_side=True,
                                             ssl_handshake_timeout=timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError, RuntimeError) as exc:
            log.info("imap %s STARTTLS failed: %s", _peername(client), describe_tls_error(exc))
            return False
        if transport is None:
            return False
        client.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        return True

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
        duration = time.monotonic() - started
        log_event(log, "imap %s login %s ok (%.0f ms)", peer, event.username, duration * 1000, event="login",
                  protocol="imap", peer=peer, account=event.username, result="ok",
                  duration_s=round(duration, 3))
        client.write(core.login_succeeded(caps))
        return conn

    async def _relay(self, client: Endpoint, conn: upstream.Connection, core: ImapFront, peer: str,
                     account: str, started: float, tls: bool = False) -> None:
        server = conn.endpoint
        pending = core.take_pending()
        client_base = client.bytes_received - len(pending) - len(client._buffer)
        server_base = server.bytes_received - len(server._buffer)

        def relayed() -> tuple[int, int]:
            return client.bytes_received - client_base, server.bytes_received - server_base

        key = object()
        METRICS.relayed.track(key, "imap", relayed)
        pipe(client, server, pending, b"")
        try:
            await asyncio.wait([client.closed, server.closed], return_when=asyncio.ALL_COMPLETED)
        finally:
            server.close()
            METRICS.relayed.finish(key)
            up, down = relayed()
            duration = time.monotonic() - started
            log_event(log, "imap %s session end: user %s, %s, %.1f s, %d bytes from client, %d bytes to client",
                      peer, account, "ok", duration, up, down, event="session_end", protocol="imap", peer=peer,
                      account=account, result="ok", duration_s=round(duration, 3), bytes_from_client=up,
                      bytes_to_client=down, tls=tls)

    async def close(self) -> None:
        """Stop listening and end the open sessions."""
        self.stop_listening()
        for task in list(self.sessions):
            task.cancel()
        await asyncio.gather(*self.sessions, return_exceptions=True)

    async def drain(self, grace: float) -> int:
        """Stop listening, end the sessions that have not logged in (nothing is in progress
        there), give the others ``grace`` seconds to end, then end the rest.

        Returns how many sessions had to be cut.
        """
        self.stop_listening()
        self.draining = True
        for client in list(self._reading):  # not logged in, nothing in progress: end them now
            client.write(_BYE_SHUTDOWN)
            client.close()
        if self.sessions:
            await asyncio.wait(list(self.sessions), timeout=grace)
        left = len(self.sessions)
        await self.close()
        return left


def _peername(ep: Endpoint) -> str:
    name = ep.transport.get_extra_info("peername") if ep.transport else None
    return f"{name[0]}:{name[1]}" if name else "?"

