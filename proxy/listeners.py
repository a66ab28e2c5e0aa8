"""The listeners of one protocol: the plain one (with STARTTLS if configured) and, if
``tls_listen`` is set, one with implicit TLS (IMAPS, SMTPS). Shared by the IMAP and SMTP fronts.
They accept with :mod:`proxy.accept` (bounded by the open-file limit, never a log flood)."""

from __future__ import annotations

import asyncio
import logging
import select
import ssl
import time
from collections.abc import Callable

from .accept import Listener, listen
from .admission import Admission, Slot
from .config import STARTTLS_OFF, STARTTLS_REQUIRED, AccountConfig, Config, ListenerConfig

HANDSHAKE_TIMEOUT = 30.0  # seconds for a client's TLS handshake
_STARTTLS_NOTES = {STARTTLS_OFF: "", STARTTLS_REQUIRED: " (STARTTLS required)"}


class Listeners:
    """Mixed into a front: ``server`` and ``tls_server``, opened by :meth:`_listen`, and the
    admission of new connections (:meth:`_admit`) under ``limits``."""

    server: Listener | None = None
    tls_server: Listener | None = None
    config: Config
    admission: Admission
    _log: logging.Logger
    _crowded_since: float | None = None

    _logins: dict[object, tuple[AccountConfig, Callable[[str], None]]] | None = None

    @property
    def settings(self) -> ListenerConfig:
        """The protocol's config section as it is now (after a reload, the new one)."""
        raise NotImplementedError

    def track_session(self, key: object, account: AccountConfig, close: Callable[[str], None]) -> None:
        """A client logged in as ``account``; ``close(reason)`` ends its session (see :meth:`close_sessions`)."""
        if self._logins is None:
            self._logins = {}
        self._logins[key] = (account, close)

    def untrack_session(self, key: object) -> None:
        if self._logins is not None:
            self._logins.pop(key, None)

    def close_sessions(self, which: Callable[[AccountConfig], bool], reason: str) -> int:
        """End the logged-in sessions whose login account ``which`` selects (removed from the config,
        or its token owner's tokens deleted); returns how many."""
        chosen = [(key, close) for key, (account, close) in (self._logins or {}).items() if which(account)]
        for key, close in chosen:
            self.untrack_session(key)
            close(reason)
        return len(chosen)

    def _admit(self) -> Slot | None:
        """A slot for a new connection, or None to refuse it; closes the connections dropped to make room."""
        limits = self.config.limits
        slot, victims = self.admission.admit(max_connections=limits.max_connections,
                                             max_prelogin=limits.max_prelogin_connections)
        for victim in victims:
            if victim.on_evict is not None:
                victim.on_evict()
        if victims or slot is None:
            self._note_crowding()
        return slot

    def _note_crowding(self) -> None:
        """One log line a minute while connections are being dropped or refused (not one per connection)."""
        now = time.monotonic()
        if self._crowded_since is None or now - self._crowded_since >= 60:
            self._crowded_since = now
            limits = self.config.limits
            self._log.warning("too many connections that do not log in (limits.max_prelogin_connections %d, "
                              "max_connections %d): %d dropped (oldest idle first) and %d refused so far",
                              limits.max_prelogin_connections, limits.max_connections, self.admission.evicted,
                              self.admission.refused)

    async def _listen(self, log: logging.Logger, name: str, settings: ListenerConfig,
                      plain: Callable[[], asyncio.BaseProtocol], tls: Callable[[], asyncio.BaseProtocol],
                      server_tls: ssl.SSLContext | None, upstream_note: str = "", *,
                      refusal: bytes = b"") -> Listener:
        """``refusal``: the protocol's "too many connections" line, for connections refused when
        the process is nearly out of file descriptors. Both listeners take the PROXY protocol
        header from the load balancers in the section's ``proxy_protocol`` (read per connection:
        a reload applies it to new connections)."""
        def trusted() -> tuple:
            return self.settings.proxy_protocol
        self.server = await listen(name, settings.listen.host, settings.listen.port, plain, refusal=refusal,
                                   proxy_protocol=trusted)
        balancers = (f"; PROXY protocol header required from {', '.join(map(str, settings.proxy_protocol))}"
                     if settings.proxy_protocol else "")
        log.info("%s listening on %s%s, upstream %s%s%s", name, _socknames(self.server),
                 _STARTTLS_NOTES.get(settings.starttls, " (STARTTLS offered)"), settings.upstream, upstream_note,
                 balancers)
        if settings.tls_listen is not None:
            address = settings.tls_listen
            self.tls_server = await listen(f"{name}S", address.host, address.port, tls, ssl=server_tls,
                                           ssl_handshake_timeout=HANDSHAKE_TIMEOUT, proxy_protocol=trusted)
            log.info("%sS (implicit TLS) listening on %s%s", name, _socknames(self.tls_server), balancers)
        return self.server

    @property
    def listening(self) -> bool:
        """All configured listeners are bound and accepting."""
        return self.server is not None and all(s.is_serving() for s in (self.server, self.tls_server) if s)

    def stop_listening(self) -> None:
        for server in (self.server, self.tls_server):
            if server is not None:
                server.close()


def unread_input(transport: asyncio.BaseTransport | None) -> bool:
    """Whether the client sent bytes that are still waiting in the socket (not read by the proxy yet).

    For :attr:`proxy.admission.Slot.has_input`: a connection the proxy is too busy to read is not idle.
    """
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([sock.fileno()], [], [], 0)[0])  # (Windows: sockets only, no fd limit)
    except (OSError, ValueError):
        return False


def _socknames(server: Listener) -> str:
    return ", ".join(f"{name[0]}:{name[1]}" for name in (s.getsockname() for s in server.sockets))
