"""The listeners of one protocol: the plain one (with STARTTLS if configured) and, if
``tls_listen`` is set, one with implicit TLS (IMAPS, SMTPS). Shared by the IMAP and SMTP fronts."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from .config import STARTTLS_OFF, STARTTLS_REQUIRED, ListenerConfig

HANDSHAKE_TIMEOUT = 30.0  # seconds for a client's TLS handshake
_STARTTLS_NOTES = {STARTTLS_OFF: "", STARTTLS_REQUIRED: " (STARTTLS required)"}


class Listeners:
    """Mixed into a front: ``server`` and ``tls_server``, opened by :meth:`_listen`."""

    server: asyncio.AbstractServer | None = None
    tls_server: asyncio.AbstractServer | None = None

    async def _listen(self, log: logging.Logger, name: str, settings: ListenerConfig,
                      plain: Callable[[], asyncio.BaseProtocol], tls: Callable[[], asyncio.BaseProtocol],
                      server_tls: ssl.SSLContext | None, upstream_note: str = "") -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(plain, settings.listen.host, settings.listen.port, backlog=1024)
        log.info("%s listening on %s%s, upstream %s%s", name, _socknames(self.server),
                 _STARTTLS_NOTES.get(settings.starttls, " (STARTTLS offered)"), settings.upstream, upstream_note)
        if settings.tls_listen is not None:
            address = settings.tls_listen
            self.tls_server = await loop.create_server(tls, address.host, address.port, backlog=1024,
                                                       ssl=server_tls, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
            log.info("%sS (implicit TLS) listening on %s", name, _socknames(self.tls_server))
        return self.server

    @property
    def listening(self) -> bool:
        """All configured listeners are bound and accepting."""
        return self.server is not None and all(s.is_serving() for s in (self.server, self.tls_server) if s)

    def stop_listening(self) -> None:
        for server in (self.server, self.tls_server):
            if server is not None:
                server.close()


def _socknames(server: asyncio.AbstractServer) -> str:
    return ", ".join(f"{name[0]}:{name[1]}" for name in (s.getsockname() for s in server.sockets))
