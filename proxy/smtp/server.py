"""The SMTP listener: mail clients submit with the same local password they use for IMAP.

One :class:`~proxy.smtp.session.ProxySMTP` (aiosmtpd's protocol) per client connection;
this module owns what they share: the token broker, the failure throttle, how to reach and
log in to the upstream server, the cache of its EHLO keywords, the deadlines, and the
connection limit. TLS towards the client: ``smtp.tls_listen`` (implicit TLS, SMTPS) and
``smtp.starttls`` on the plain listener (aiosmtpd's STARTTLS; ``required``: no AUTH before it).
Settings are read from ``self.config`` per session, so :meth:`SmtpProxy.reconfigure` applies a
reloaded config to new sessions and logins only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from dataclasses import dataclass

from ..admission import Admission
from ..config import Config, ListenerConfig
from ..listeners import Listeners
from ..login import Upstream
from ..throttle import FailureThrottle
from ..tokens import TokenBroker
from . import upstream
from .capabilities import UpstreamExtensions
from .session import ProxySMTP

log = logging.getLogger("proxy.smtp")
TOO_MANY = b"421 4.7.0 Too many connections to the proxy; please try again later"


@dataclass(frozen=True)
class Timeouts:
    """Deadlines in seconds.

    aiosmtpd's timer bounds each client command including the wait before it; the proxy's
    waits for the upstream are shorter, so a slow upstream earns the client a 4xx reply
    rather than a dropped connection. While a message is relayed the timer is extended by
    ``reply + final``.
    """

    reply: float = 120.0  # upstream reply to MAIL, RCPT, DATA, RSET, NOOP (RFC 5321 4.5.3.2: 2 to 5 min)
    final: float = 600.0  # sending a message and the reply to its final dot (RFC 5321 4.5.3.2.6)
    idle: float = 300.0   # a client command, including the wait before it (RFC 5321 4.5.3.2.7)
    probe: float = 10.0   # learning the upstream's extensions before any login

    def command(self, login_timeout: float) -> float:
        """aiosmtpd's per-command timeout: also fits a MAIL that logs in again and is retried."""
        return max(self.idle, login_timeout + 2 * self.reply + 10)


class SmtpProxy(Listeners):
    """``start()`` listens on ``config.smtp.listen``; ``close()`` ends every session."""

    def __init__(self, config: Config, broker: TokenBroker, *, upstream_tls: ssl.SSLContext,
                 throttle: FailureThrottle | None = None, timeouts: Timeouts = Timeouts(),
                 server_tls: ssl.SSLContext | None = None):
        self.config = config
        self.broker = broker
        self.throttle = throttle or FailureThrottle()
        self.timeouts = timeouts
        self.hostname = local_hostname()
        self.upstream_tls = upstream_tls
        self.server_tls = server_tls  # for smtp.tls_listen and STARTTLS
        self.sessions: set[ProxySMTP] = set()
        # Every connection takes its slot when its protocol is made (asyncio accepts a burst of
        # connections and makes all their protocols before any is connected).
        self.admission = Admission()
        self._log = log
        self.draining = False

        async def connect() -> upstream.Connection:
            settings = self.config.smtp
            return await upstream.connect(settings.upstream, settings.upstream_tls, self.upstream_tls, self.hostname,
                                          via=settings.upstream_proxy)

        async def probe() -> dict[str, str]:
            settings = self.config.smtp
            return await upstream.probe(settings.upstream, settings.upstream_tls, self.upstream_tls, self.hostname,
                                        via=settings.upstream_proxy)

        self.login_upstream: Upstream[upstream.Connection] = Upstream(
            connect=connect, authenticate=upstream.authenticate,
            is_closed=lambda conn: conn.is_closed, close=lambda conn: conn.abort())
        self.extensions = UpstreamExtensions(probe, timeout=timeouts.probe)

    @property
    def settings(self) -> ListenerConfig:
        return self.config.smtp

    async def start(self) -> asyncio.AbstractServer:
        # aiosmtpd logs every command (and message lines at DEBUG), and warns about its own
        # deprecated Session.login_data at each AUTH: keep it to real errors.
        logging.getLogger("mail.log").setLevel(logging.ERROR)
        settings = self.config.smtp
        server = await self._listen(log, "SMTP", settings, self._protocol, lambda: self._protocol(tls=True),
                                    self.server_tls, " (STARTTLS)" if settings.upstream_tls == "starttls"
                                    else " (implicit TLS)", refusal=TOO_MANY + b"\r\n")
        self.extensions.refresh()
        return server

    def reconfigure(self, config: Config, upstream_tls: ssl.SSLContext) -> None:
        """Use ``config`` for new sessions and logins; open sessions keep going."""
        old, self.config, self.upstream_tls = self.config, config, upstream_tls
        if (old.smtp.upstream, old.smtp.upstream_tls) != (config.smtp.upstream, config.smtp.upstream_tls):
            self.extensions.refresh()

    def _protocol(self, tls: bool = False) -> asyncio.Protocol:
        slot = self._admit()
        if slot is None:
            return _Refuse()
        session = ProxySMTP(self, implicit_tls=tls, slot=slot)
        # A connection that never comes up (a failed TLS handshake on the SMTPS listener) gives its slot back.
        asyncio.get_running_loop().call_later(35.0, session.release_if_unopened)
        return session

    def register(self, session: ProxySMTP) -> None:
        """A session's connection is up (after the TLS handshake on the SMTPS listener: a failed
        handshake never makes a session)."""
        self.sessions.add(session)
        session.closed.add_done_callback(lambda _: self.sessions.discard(session))

    async def drain(self, grace: float) -> int:
        """Stop listening and close sessions as they become idle: a session in the middle of a
        command or a mail transaction finishes it first (its client gets the upstream's reply
        for the message), then gets ``421`` and is closed. After ``grace`` seconds the rest are
        cut. Returns how many had to be cut."""
        self.stop_listening()
        self.draining = True
        for session in list(self.sessions):
            session.close_when_idle()
        sessions = [s.closed for s in self.sessions]
        if sessions:
            await asyncio.wait(sessions, timeout=grace)
        left = len(self.sessions)
        await self.close()
        return left

    async def close(self) -> None:
        """Stop listening, tell open sessions the proxy is going away, and close them."""
        self.stop_listening()
        sessions = list(self.sessions)
        for session in sessions:
            session.shutdown()
        if sessions:
            await asyncio.wait([s.closed for s in sessions], timeout=2)
        for session in sessions:
            if session.transport is not None:
                session.transport.abort()
        await self.extensions.close()


class _Refuse(asyncio.Protocol):
    """Over the connection limit: answer 421 and close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(TOO_MANY + b"\r\n")  # type: ignore
        transport.close()


def local_hostname() -> str:
    """This computer's name for the greeting and the upstream EHLO (no DNS lookup, which can hang)."""
    name = socket.gethostname()
    return name if re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", name or "") else "localhost"

