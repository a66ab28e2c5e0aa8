"""Listening sockets with the proxy's own accept loop, and the open-file limit of ``proxy serve``.

Why not ``loop.create_server``: when the process runs out of file descriptors, asyncio's accept
loop (CPython 3.11, ``BaseSelectorEventLoop._accept_connection``) logs a traceback for *every*
failed ``accept()``, up to the backlog (1,024) per event-loop tick, and keeps going; a proxy
held at its limit filled 650 MB of log in six minutes. Here:

- **Before the limit** (POSIX): ``accept()`` returns the lowest free descriptor number, so a
  new connection whose number comes within :data:`RESERVE` of the soft limit proves that the
  process is nearly out of descriptors. It is answered with the protocol's own refusal (IMAP
  ``* BYE``, SMTP ``421``) and closed, keeping the reserve for the upstream connections of
  sessions already open, for token files and for the identity provider.
- **At the limit** (``EMFILE``/``ENFILE``/``ENOBUFS``/``ENOMEM`` from ``accept()``): the
  listener stops reading its socket for :data:`RETRY_DELAY` seconds (new connections wait in
  the kernel's backlog) and then tries again, by itself, for as long as it takes.
- Either way one warning per :data:`LOG_INTERVAL` seconds says how many connections were
  refused or delayed; a last line says when accepting is back to normal. Open sessions are
  never touched.

:func:`raise_open_file_limit` lifts the soft limit to the hard one at start (each session holds
two descriptors; the common soft default of 1,024 would cap the proxy near 500 sessions).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

from .proxyproto import Network, ProxyHeaderLayer, Rejections
from .tlsendpoint import TlsLayer

log = logging.getLogger("proxy")

RESERVE = 64             # descriptors kept free for upstream connections, files and the identity provider
RETRY_DELAY = 0.5        # seconds without accepting after accept() ran out of a resource
LOG_INTERVAL = 60.0      # at most one warning per listener per this many seconds
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def raise_open_file_limit(log_to: logging.Logger = log) -> int | None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit and log the result.

    Returns the soft limit in force afterwards (None where there is no such limit: Windows).
    """
    try:
        import resource
    except ImportError:  # Windows: sockets are handles, there is no per-process descriptor limit
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _target_limit(soft, hard, resource.RLIM_INFINITY)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log_to.warning("open-file limit %d: could not raise it to %d (%s)", soft, target, exc)
            target = soft
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    sessions = max(0, (limit - RESERVE) // 2)
    log_to.info("open-file limit %d%s: room for about %d sessions", limit,
                f" (raised from {soft})" if limit > soft else "", sessions)
    if limit < 2 * 1000 + RESERVE:
        log_to.warning("open-file limit %d is low: raise the hard limit (`ulimit -Hn`, systemd LimitNOFILE=) "
                       "to serve more than %d sessions", limit, sessions)
    return limit


def _target_limit(soft: int, hard: int, infinity: int) -> int:
    """The soft limit to ask for: the hard one (capped where the hard limit is "unlimited",
    which macOS refuses as a soft value)."""
    if hard == infinity:
        return max(soft, 1 << 20) if soft != infinity else soft
    return max(soft, hard)


def _soft_limit() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


class _Throttled:
    """Counts refused or delayed connections and logs them at most once per interval."""

    def __init__(self, name: str, interval: float, clock: Callable[[], float]):
        self.name, self.interval, self.clock = name, interval, clock
        self.refused = self.delayed = 0
        self._logged_at: float | None = None
        self._since_log = 0

    def note(self, what: str, limit: int | None) -> None:
        if what == "refused":
            self.refused += 1
        else:
            self.delayed += 1
        self._since_log += 1
        now = self.clock()
        if self._logged_at is None or now - self._logged_at >= self.interval:
            first = self._logged_at is None
            self._logged_at = now
            count, self._since_log = self._since_log, 0
            limit_text = f" (open-file limit {limit})" if limit else ""
            action = ("refusing new connections" if what == "refused"
                      else f"new connections wait in the backlog, retrying every {RETRY_DELAY:g} s")
            log.warning("%s: out of file descriptors%s: %s; %d %s%s; open sessions are not affected",
                        self.name, limit_text, action, count,
                        "connection(s) so far" if first else f"in the last {self.interval:.0f} s",
                        "" if first else " (next report in a minute at the earliest)")

    def recovered(self) -> None:
        if self._logged_at is not None:
            log.warning("%s: accepting connections again (%d refused, %d delayed while out of descriptors)",
                        self.name, self.refused, self.delayed)
            self._logged_at = None
            self._since_log = self.refused = self.delayed = 0


class Listener:
    """A bound listening socket set served by :meth:`start`; quacks like ``asyncio.Server``
    where the proxy uses one (``sockets``, ``close``, ``is_serving``, ``wait_closed``).

    ``refusal`` is written to a connection refused for lack of descriptors; ``ssl`` (with
    ``ssl_handshake_timeout``) makes it an implicit-TLS listener (:class:`~proxy.tlsendpoint.TlsLayer`
    under each connection's protocol); ``proxy_protocol`` returns the trusted load balancers
    whose connections start with a PROXY protocol header (:class:`~proxy.proxyproto.ProxyHeaderLayer`
    under everything else, read per connection so a reloaded config applies to new ones).
    """

    def __init__(self, name: str, sockets: list[socket.socket], factory: Callable[[], asyncio.BaseProtocol], *,
                 refusal: bytes = b"", ssl: ssl.SSLContext | None = None, ssl_handshake_timeout: float | None = None,
                 proxy_protocol: Callable[[], Sequence[Network]] | None = None,
                 backlog: int = 1024, reserve: int = RESERVE, log_interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self._sockets = sockets
        self._refusal = refusal
        self._ssl = ssl
        self.rejections = Rejections(name)
        self._factory = layered(factory, ssl=ssl, ssl_handshake_timeout=ssl_handshake_timeout,
                                proxy_protocol=proxy_protocol, rejections=self.rejections)
        self._backlog = backlog
        self._reserve = reserve
        self._loop = asyncio.get_running_loop()
        self._serving = False
        self._paused = False
        self._retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self.pressure = _Throttled(name, log_interval, clock)

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._sockets)

    def is_serving(self) -> bool:
        return self._serving

    def start(self) -> None:
        self._serving = True
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        if not self._sockets:
            return
        self._serving = False
        if self._retry is not None:
            self._retry.cancel()
        for sock in self._sockets:
            if not self._paused:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets = []

    async def wait_closed(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- accepting --------------------------------------------------------------------------
    def _accept(self, sock: socket.socket) -> None:
        limit = _soft_limit()
        for _ in range(self._backlog):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    self.pressure.note("delayed", limit)
                    self._pause()
                else:  # not expected from accept(); never a traceback per connection
                    log.warning("%s: accept() failed: %s", self.name, exc.strerror or exc)
                return
            if limit is not None and conn.fileno() >= limit - self._reserve:
                self._refuse(conn, limit)
                continue
            self.pressure.recovered()
            conn.setblocking(False)
            task = self._loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _refuse(self, conn: socket.socket, limit: int) -> None:
        self.pressure.note("refused", limit)
        try:
            conn.setblocking(False)
            if self._refusal and self._ssl is None:  # (a TLS client could not read it in clear text)
                conn.send(self._refusal)
        except OSError:
            pass
        conn.close()

    def _pause(self) -> None:
        """Stop accepting for a moment: the kernel keeps new connections in the backlog."""
        if self._paused:
            return
        self._paused = True
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
        self._retry = self._loop.call_later(RETRY_DELAY, self._resume)

    def _resume(self) -> None:
        self._paused = False
        self._retry = None
        if self._serving:
            for sock in self._sockets:
                self._loop.add_reader(sock.fileno(), self._accept, sock)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError):
            conn.close()  # a failed TLS handshake or a client gone: nothing to log per connection
        except Exception:  # noqa: BLE001 - a bug in a protocol factory must not stop the listener
            log.exception("%s: setting up a connection failed", self.name)
            conn.close()


def layered(factory: Callable[[], asyncio.BaseProtocol], *, ssl: ssl.SSLContext | None = None,
            ssl_handshake_timeout: float | None = None, proxy_protocol: Callable[[], Sequence[Network]] | None = None,
            rejections: Rejections | None = None) -> Callable[[], asyncio.BaseProtocol]:
    """``factory`` with what each accepted connection needs under its protocol: TLS for an
    implicit-TLS listener (without asyncio's 256 KiB per connection), and under that the PROXY
    protocol header from a trusted load balancer (it comes before the TLS handshake)."""
    if ssl is not None:
        plain, context, timeout = factory, ssl, ssl_handshake_timeout or 30.0
        factory = lambda: TlsLayer(plain(), context, handshake_timeout=timeout)  # noqa: E731
    if proxy_protocol is not None:
        inner, tally = factory, rejections or Rejections("listener")

        def factory() -> asyncio.BaseProtocol:
            networks = proxy_protocol()
            return ProxyHeaderLayer(inner(), networks, tally) if networks else inner()
    return factory


async def listen(name: str, host: str, port: int, factory: Callable[[], asyncio.BaseProtocol], *,
                 backlog: int = 1024, **options: Any) -> Listener:
    """Bind ``host:port`` (every address it resolves to, as ``loop.create_server`` does) and start
    accepting. Raises OSError if an address cannot be bound."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if hasattr(socket, "SO_REUSEADDR") and not _windows():
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"error while attempting to bind on address {address!r}: "
                                         f"{(exc.strerror or '').lower()}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not _has_readers(loop):
        return await _AsyncioListener.serve(name, sockets, factory, loop, backlog=backlog, **options)
    listener = Listener(name, sockets, factory, backlog=backlog, **options)
    listener.start()
    return listener


def _has_readers(loop: asyncio.AbstractEventLoop) -> bool:
    """The loop can watch a socket for readiness: selector loops (and uvloop) can, Windows' default
    Proactor loop cannot (its accept() completes asynchronously; asyncio's own accept loop is used)."""
    proactor = getattr(asyncio, "ProactorEventLoop", None)  # only exists on Windows
    return not (proactor is not None and isinstance(loop, proactor))


class _AsyncioListener:
    """Where the loop cannot watch sockets (Windows' Proactor loop): asyncio's servers on the
    already bound sockets. Windows has no per-process descriptor limit (sockets are handles), so
    what :class:`Listener` guards against does not arise there; the TLS layer is the same."""

    def __init__(self, name: str, servers: list[asyncio.AbstractServer]):
        self.name, self._servers = name, servers

    @classmethod
    async def serve(cls, name: str, sockets: list[socket.socket], factory: Callable[[], asyncio.BaseProtocol],
                    loop: asyncio.AbstractEventLoop, *, backlog: int = 1024, ssl: ssl.SSLContext | None = None,
                    ssl_handshake_timeout: float | None = None,
                    proxy_protocol: Callable[[], Sequence[Network]] | None = None, **_: Any) -> "_AsyncioListener":
        factory = layered(factory, ssl=ssl, ssl_handshake_timeout=ssl_handshake_timeout,
                          proxy_protocol=proxy_protocol, rejections=Rejections(name))
        servers = [await loop.create_server(factory, sock=sock, backlog=backlog) for sock in sockets]
        return cls(name, servers)

    @property
    def sockets(self) -> list[socket.socket]:
        return [sock for server in self._servers for sock in server.sockets]

    def is_serving(self) -> bool:
        return any(server.is_serving() for server in self._servers)

    def close(self) -> None:
        for server in self._servers:
            server.close()

    async def wait_closed(self) -> None:
        for server in self._servers:
            await server.wait_closed()


def _windows() -> bool:
    import sys
    return sys.platform == "win32"
