"""The SMTP listener: mail clients submit with the same local password they use for IMAP.

One :class:`~proxy.smtp.session.ProxySMTP` (aiosmtpd's protocol) per client connection;
this module owns what they share: the token broker, the failure throttle, how to reach and
log in to the upstream server, the cache of its EHLO keywords, the deadlines, and the
connection limit.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from dataclasses import dataclass

from ..config import Config
from ..login import Upstream
from ..throttle import FailureThrottle
from ..tokens import TokenBroker
from . import upstream
from .capabilities import UpstreamExtensions
from .session import ProxySMTP

log = logging.getLogger("proxy.smtp")


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


class SmtpProxy:
    """``start()`` listens on ``config.smtp.listen``; ``close()`` ends every session."""

    def __init__(self, config: Config, broker: TokenBroker, *, upstream_tls: ssl.SSLContext,
                 throttle: FailureThrottle | None = None, timeouts: Timeouts = Timeouts()):
        self.config = config
        self.broker = broker
        self.throttle = throttle or FailureThrottle()
        self.timeouts = timeouts
        self.hostname = local_hostname()
        self.server: asyncio.AbstractServer | None = None
        self.sessions: set[ProxySMTP] = set()
        settings = config.smtp

        async def connect() -> upstream.Connection:
            return await upstream.connect(settings.upstream, settings.upstream_tls, upstream_tls, self.hostname)

        async def probe() -> dict[str, str]:
            return await upstream.probe(settings.upstream, settings.upstream_tls, upstream_tls, self.hostname)

        self.login_upstream: Upstream[upstream.Connection] = Upstream(
            connect=connect, authenticate=upstream.authenticate,
            is_closed=lambda conn: conn.is_closed, close=lambda conn: conn.abort())
        self.extensions = UpstreamExtensions(probe, timeout=timeouts.probe)

    async def start(self) -> asyncio.AbstractServer:
        # aiosmtpd logs every command (and message lines at DEBUG), and warns about its own
        # deprecated Session.login_data at each AUTH: keep it to real errors.
        logging.getLogger("mail.log").setLevel(logging.ERROR)
        listen = self.config.smtp.listen
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, listen.host, listen.port, backlog=1024)
        self.extensions.refresh()
        log.info("SMTP listening on %s, upstream %s (%s)",
                 ", ".join(_sockname(s) for s in self.server.sockets), self.config.smtp.upstream,
                 "STARTTLS" if self.config.smtp.upstream_tls == "starttls" else "implicit TLS")
        return self.server

    def _protocol(self) -> asyncio.Protocol:
        if len(self.sessions) >= self.config.limits.max_connections:
            return _Refuse()
        session = ProxySMTP(self)
        self.sessions.add(session)
        session.closed.add_done_callback(lambda _: self.sessions.discard(session))
        return session

    async def close(self) -> None:
        """Stop listening, tell open sessions the proxy is going away, and close them."""
        if self.server is not None:
            self.server.close()
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
        transport.write(b"421 4.7.0 Too many connections to the proxy; please try again later\r\n")  # type: ignore
        transport.close()


def local_hostname() -> str:
    """This computer's name for the greeting and the upstream EHLO (no DNS lookup, which can hang)."""
    name = socket.gethostname()
    return name if re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", name or "") else "localhost"


def _sockname(sock: socket.socket) -> str:
    name = sock.getsockname()
    return f"{name[0]}:{name[1]}"
