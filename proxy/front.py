"""The asyncio shell shared by the fronts whose pre-login side is a pure core (IMAP, POP3).

Per connection: greet, feed the client's bytes to the protocol's core (:mod:`proxy.imap.core`,
:mod:`proxy.pop3.core`), act on its events (:mod:`proxy.events`), and when it produces a
``Login`` run the shared login sequence (:func:`proxy.login.login`: local password, access
token, upstream XOAUTH2 with one retry on a fresh token), answer the client, and pipe the two
sockets together (:func:`proxy.relay.pipe`), counting the bytes for the metrics and the
session's log line. The whole login is answered within ``limits.login_timeout`` seconds,
whatever the peers do; a client gets ``limits.preauth_timeout`` seconds to log in at all.

What differs per protocol is supplied by a subclass: its settings section, its core, how to
reach and log in to its upstream server, and the few replies the shell writes itself. Settings
are read from ``self.config`` per connection and per login, so :meth:`CoreFront.reconfigure`
changes them for new sessions without touching open ones.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any, Protocol

from .admission import Admission, Slot
from .config import STARTTLS_OFF, STARTTLS_REQUIRED, Config
from .events import Close, Event, Login, Send, StartTLS
from .listeners import HANDSHAKE_TIMEOUT, Listeners, unread_input
from .login import LoginFailed, Upstream, login
from .logs import log_event
from .metrics import METRICS
from .relay import WRITE_HIGH_WATER, Endpoint, pipe
from .throttle import FailureThrottle
from .tls import describe_tls_error
from .tlsendpoint import start_tls
from .tokens import TokenBroker


class Core(Protocol):
    """What the shell needs from a protocol's pre-login core."""

    def greeting(self) -> bytes: ...
    def receive_data(self, data: bytes) -> list[Event]: ...
    def tls_started(self) -> None: ...
    def take_pending(self) -> bytes: ...


class UpstreamConnection(Protocol):
    """What the shell needs from a logged-in upstream connection."""

    endpoint: Endpoint

    def close(self) -> None: ...


class CoreFront(Listeners):
    """One protocol's listeners and sessions; subclasses fill in the protocol."""

    protocol = ""                 # "imap", "pop3": metrics labels and log lines
    name = ""                     # "IMAP", "POP3": the listeners' log lines
    log = logging.getLogger("proxy")
    busy_reply = b""              # over limits.max_connections, then closed
    shutdown_reply = b""          # the proxy is shutting down, then closed
    timeout_reply = b""           # no login within limits.preauth_timeout, then closed
    evicted_reply = b""           # dropped for a newer connection (pre-login budget full), then closed
    idle_reply = b""              # no command within limits.prelogin_idle_timeout (%d: the seconds), then closed

    def __init__(self, config: Config, broker: TokenBroker, *, upstream_tls: ssl.SSLContext,
                 throttle: FailureThrottle | None = None, server_tls: ssl.SSLContext | None = None):
        self.config = config
        self.broker = broker
        self.upstream_tls = upstream_tls
        self.server_tls = server_tls  # for tls_listen and STARTTLS
        self.throttle = throttle or FailureThrottle()
        self.sessions: set[asyncio.Task] = set()
        self.admission = Admission()
        self._log = self.log
        self.draining = False
        self._reading: set[Endpoint] = set()  # sessions waiting for a command before login
        self._upstream: Upstream[Any] = Upstream(
            connect=self.connect_upstream, authenticate=self.authenticate_upstream,
            is_closed=lambda conn: conn.endpoint.is_closing, close=lambda conn: conn.close())

    # -- what a protocol supplies (and ``settings``, declared by Listeners) ---------------------
    def new_core(self, *, tls_active: bool, starttls: bool, login_requires_tls: bool) -> Core:
        raise NotImplementedError

    async def connect_upstream(self) -> UpstreamConnection:
        """Open the upstream connection (raises proxy.login.UpstreamError)."""
        raise NotImplementedError

    async def authenticate_upstream(self, conn: Any, user: str, token: str) -> object:
        """XOAUTH2 on ``conn`` (raises TokenRejected or UpstreamError); the result goes to login_reply."""
        raise NotImplementedError

    def login_reply(self, core: Any, result: object) -> bytes:
        """The client's success reply, from the core, with what authenticate_upstream returned."""
        raise NotImplementedError

    def login_refusal(self, core: Any, failure: LoginFailed) -> list[Event]:
        """The core's events for a failed login."""
        raise NotImplementedError

    # -- listeners --------------------------------------------------------------------------
    async def start(self) -> asyncio.AbstractServer:
        return await self._listen(self.log, self.name, self.settings, lambda: Endpoint(on_connect=self._accept),
                                  lambda: Endpoint(on_connect=lambda ep: self._accept(ep, tls=True)),
                                  self.server_tls, refusal=self.busy_reply)

    def reconfigure(self, config: Config, upstream_tls: ssl.SSLContext) -> None:
        """Use ``config`` for new connections and logins; open sessions keep going."""
        self.config, self.upstream_tls = config, upstream_tls

    def _accept(self, client: Endpoint, tls: bool = False) -> None:
        slot = self._admit()
        if slot is None:
            client.write(self.busy_reply)
            client.close()
            return

        def evict() -> None:
            client.write(self.evicted_reply)
            client.close()
        slot.on_evict = evict
        slot.has_input = lambda: bool(client._buffer) or unread_input(client.transport)
        task = asyncio.get_running_loop().create_task(self._session(client, tls, slot))
        self.sessions.add(task)
        task.add_done_callback(self.sessions.discard)

    # -- one session ------------------------------------------------------------------------
    async def _session(self, client: Endpoint, tls: bool = False, slot: Slot | None = None) -> None:
        log, protocol = self.log, self.protocol
        peer = _peername(client)
        started = time.monotonic()
        starttls = STARTTLS_OFF if tls or self.server_tls is None else self.settings.starttls
        core = self.new_core(tls_active=tls, starttls=starttls != STARTTLS_OFF,
                             login_requires_tls=starttls == STARTTLS_REQUIRED)
        METRICS.session_opened(protocol)
        log_event(log, "%s %s session start%s", protocol, peer, " (TLS)" if tls else "", event="session_start",
                  protocol=protocol, peer=peer, tls=tls)
        client.write(core.greeting())
        if slot is not None:
            slot.waiting()  # (greeted: from now on it waits for its client)
        account, result = None, "closed before login"
        try:
            limits = self.config.limits
            deadline = started + limits.preauth_timeout
            last_command = started
            events: list = []
            while True:
                if not events:
                    if self.draining:
                        client.write(self.shutdown_reply)
                        result = "proxy shutting down"
                        return
                    if slot is not None and slot.released:
                        result = "dropped for a newer connection"
                        return
                    idle_until = last_command + limits.prelogin_idle_timeout
                    self._reading.add(client)
                    try:
                        data = await asyncio.wait_for(client.read(),
                                                      max(0.0, min(deadline, idle_until) - time.monotonic()))
                    except asyncio.TimeoutError:
                        if idle_until < deadline:
                            client.write(self.idle_reply % limits.prelogin_idle_timeout)
                            result = "pre-login idle timeout"
                        else:
                            client.write(self.timeout_reply)
                            result = "pre-login timeout"
                        return
                    finally:
                        self._reading.discard(client)
                    events = core.receive_data(data)
                    if events:  # a command (bytes that make none, a byte at a time, do not count)
                        last_command = time.monotonic()
                        if slot is not None:
                            slot.waiting()  # answered below: then it waits for the client again
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
                    conn, refusal = await self._login(client, core, event, peer, slot)
                    if conn is not None:
                        result = "logged in"
                        # Nothing of the login phase stays referenced for the session's lifetime:
                        # not the pre-login core (~2 KiB per idle session), not the password.
                        pending, core, event, events = core.take_pending(), None, None, []
                        await self._relay(client, conn, pending, peer, account, started, tls)
                        return
                    events = refusal + events
                    last_command = time.monotonic()
        except Exception:  # a bug must not take the listener down; never log event contents
            log.exception("%s %s: session failed", protocol, peer)
        finally:
            client.close()
            if slot is not None:
                slot.release()
            METRICS.session_closed(protocol)
            if result != "logged in":
                duration = time.monotonic() - started
                log_event(log, "%s %s session end: %s (user %s, %.0f ms)", protocol, peer, result, account or "-",
                          duration * 1000, event="session_end", protocol=protocol, peer=peer, account=account,
                          result=result, duration_s=round(duration, 3), bytes_from_client=0, bytes_to_client=0)

    async def _start_tls(self, client: Endpoint, deadline: float) -> bool:
        """The TLS handshake after STARTTLS; False if it failed (the connection is then closed)."""
        client.take_buffer()  # plaintext sent after STARTTLS could be injected: never parse it
        timeout = max(1.0, min(HANDSHAKE_TIMEOUT, deadline - time.monotonic()))
        try:  # TLS on memory BIOs: asyncio's start_tls costs 256 KiB per connection (tlsendpoint.py)
            transport = await start_tls(client.transport, client, self.server_tls, timeout=timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError, RuntimeError) as exc:
            self.log.info("%s %s STARTTLS failed: %s", self.protocol, _peername(client), describe_tls_error(exc))
            return False
        if transport is None:
            return False
        client.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        return True

    async def _login(self, client: Endpoint, core: Core, event: Login, peer: str,
                     slot: Slot | None = None) -> tuple[UpstreamConnection | None, list[Event]]:
        """Log in; returns the upstream connection, or None and the core's events after a failure."""
        started = time.monotonic()
        protocol = self.protocol
        try:
            if event.authzid and event.authzid.casefold() != event.username.casefold():
                raise LoginFailed(LoginFailed.CREDENTIALS, "Logging in on behalf of another user is not supported")
            conn, result, grant = await login(
                self.broker, self.throttle, self._upstream, username=event.username, password=event.password,
                source=peer.rsplit(":", 1)[0], timeout=self.config.limits.login_timeout, protocol=protocol,
                slot=slot)
        except LoginFailed as failure:
            return None, self.login_refusal(core, failure)
        duration = time.monotonic() - started
        client.write(self.login_reply(core, result))  # (the answer first: the log line is not on its way)
        log_event(self.log, "%s %s login %s ok (%.0f ms)", protocol, peer, event.username, duration * 1000,
                  event="login", protocol=protocol, peer=peer, account=event.username, result="ok",
                  duration_s=round(duration, 3))

        def close(reason: str) -> None:  # (no goodbye line: the relay may be in the middle of a response)
            self.log.info("%s %s: closing the session of %s: %s", protocol, peer, grant.account.username, reason)
            client.close()
        self.track_session(client, grant.account, close)
        return conn, []

    async def _relay(self, client: Endpoint, conn: UpstreamConnection, pending: bytes, peer: str,
                     account: str, started: float, tls: bool = False) -> None:
        """``pending``: what the client sent after its login command, for the upstream."""
        server = conn.endpoint
        client_base = client.bytes_received - len(pending) - len(client._buffer)
        server_base = server.bytes_received - len(server._buffer)

        def relayed() -> tuple[int, int]:
            return client.bytes_received - client_base, server.bytes_received - server_base

        key = object()
        METRICS.relayed.track(key, self.protocol, relayed)
        pipe(client, server, pending, b"")
        try:
            # Both ends closed (their futures never hold an exception). Awaited in turn rather than
            # with asyncio.wait, whose coroutines, waiter and callbacks would stay in memory for
            # the whole session: thousands of idle sessions each keep this frame.
            await client.closed
            await server.closed
        finally:
            self.untrack_session(client)
            server.close()
            METRICS.relayed.finish(key)
            up, down = relayed()
            duration = time.monotonic() - started
            log_event(self.log, "%s %s session end: user %s, %s, %.1f s, %d bytes from client, %d bytes to client",
                      self.protocol, peer, account, "ok", duration, up, down, event="session_end",
                      protocol=self.protocol, peer=peer, account=account, result="ok",
                      duration_s=round(duration, 3), bytes_from_client=up, bytes_to_client=down, tls=tls)

    # -- stopping ---------------------------------------------------------------------------
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
            client.write(self.shutdown_reply)
            client.close()
        if self.sessions:
            await asyncio.wait(list(self.sessions), timeout=grace)
        left = len(self.sessions)
        await self.close()
        return left


def _peername(ep: Endpoint) -> str:
    name = ep.transport.get_extra_info("peername") if ep.transport else None
    return f"{name[0]}:{name[1]}" if name else "?"
