"""Connection endpoints and the byte relay.

An :class:`Endpoint` is the asyncio protocol on one socket (client side or upstream side).
During login the proxy reads from it like a small stream (``read``, ``readline``) and writes
replies. Once both sides are authenticated, :func:`pipe` links two endpoints: from then on
every byte received on one side is written to the other, unparsed, directly from the event
loop's callbacks (no task, no copy beyond the kernel's). Backpressure is the transports' own:
when one side's write buffer passes its high-water mark, the other side stops reading from
its socket, so a client that stops reading costs neither memory nor CPU.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Callable

# Flow-control high-water mark for a side's write buffer; the low-water mark is a quarter.
WRITE_HIGH_WATER = 256 * 1024
# Abort a closing connection whose peer never drains its write buffer.
CLOSE_GRACE = 30.0


class ConnectionClosed(Exception):
    """The peer closed the connection (or it broke) while we were reading."""


class LineTooLong(Exception):
    """A line exceeded the reader's limit."""


class Endpoint(asyncio.Protocol):
    """One side of a proxied connection: a bounded reader during login, then a pipe."""

    def __init__(self, *, limit: int = 64 * 1024,
                 on_connect: Callable[["Endpoint"], None] | None = None):
        self.transport: asyncio.Transport | None = None
        self.peer: Endpoint | None = None
        self.bytes_received = 0
        self._limit = limit
        self._on_connect = on_connect
        self._buffer = bytearray()
        self._eof = False
        self._read_paused = False
        self._write_paused = False
        self._waiter: asyncio.Future | None = None
        self._drain_waiter: asyncio.Future | None = None
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol callbacks -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self._on_connect is not None:
            self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if self.peer is not None:
            self.peer.transport.write(data)
            return
        self._buffer += data
        self._wake()
        if len(self._buffer) > self._limit and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # let the transport close itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if not self.closed.done():
            self.closed.set_result(exc)
        if self.peer is not None:
            self.peer.close()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.peer is not None and self.peer.transport is not None and not self.peer.is_closing:
            self.peer.transport.resume_reading()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- login-phase API --------------------------------------------------------------
    @property
    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    @property
    def writing_paused(self) -> bool:
        """The transport's write buffer is above its high-water mark (see :meth:`drain`)."""
        return self._write_paused

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    async def read(self) -> bytes:
        """Return what has arrived (waiting for something); b"" at end of stream."""
        while not self._buffer and not self._eof:
            await self._wait()
        return self.take_buffer()

    async def readline(self, limit: int) -> bytes:
        """Return one line including its LF; raise ConnectionClosed or LineTooLong."""
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end >= 0:
                if end + 1 > limit:
                    raise LineTooLong(f"line longer than {limit} bytes")
                line = bytes(self._buffer[:end + 1])
                del self._buffer[:end + 1]
                self._maybe_resume()
                return line
            if len(self._buffer) > limit:
                raise LineTooLong(f"line longer than {limit} bytes")
            if self._eof:
                raise ConnectionClosed("connection closed")
            start = len(self._buffer)
            await self._wait()

    async def readline_cut(self, keep: int, limit: int) -> bytes:
        """Like :meth:`readline`, but a line longer than ``keep`` bytes is cut to its first ``keep``
        bytes plus CRLF, the rest read and dropped; LineTooLong only beyond ``limit`` bytes."""
        head: bytes | None = None
        dropped = 0
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                if dropped + end + 1 > limit:
                    raise LineTooLong(f"line longer than {limit} bytes")
                line = bytes(self._buffer[:end + 1])
                del self._buffer[:end + 1]
                self._maybe_resume()
                if head is None and len(line) <= keep:
                    return line
                return (head if head is not None else line[:keep]) + b"\r\n"
            if head is None and len(self._buffer) > keep:
                head = bytes(self._buffer[:keep])
            if head is not None:
                dropped += len(self._buffer)
                self._buffer.clear()
                self._maybe_resume()
                if dropped > limit:
                    raise LineTooLong(f"line longer than {limit} bytes")
            if self._eof:
                raise ConnectionClosed("connection closed")
            await self._wait()

    async def readexactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if self._eof:
                raise ConnectionClosed("connection closed")
            await self._wait()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        self._maybe_resume()
        return data

    def take_buffer(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        self._maybe_resume()
        return data

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        while self._write_paused and not self.is_closing:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter

    def close(self) -> None:
        """Close after the pending output is flushed; abort if it never drains."""
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.close()
        if self.transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(CLOSE_GRACE, self.abort)

    def abort(self) -> None:
        if self.transport is not None and not self.closed.done():
            self.transport.abort()

    def interrupt(self, error: BaseException) -> bool:
        """Make the read in progress raise ``error`` (a deadline passed); False if none is waiting."""
        if self._waiter is None or self._waiter.done():
            return False
        self._waiter.set_exception(error)
        return True

    # -- internals ------------------------------------------------------------------------
    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _maybe_resume(self) -> None:
        if self._read_paused and len(self._buffer) <= self._limit and self.peer is None:
            self._read_paused = False
            if not self.is_closing:
                self.transport.resume_reading()


def pipe(a: Endpoint, b: Endpoint, a_to_b: bytes = b"", b_to_a: bytes = b"") -> None:
    """Link two endpoints so each forwards what it receives to the other.

    ``a_to_b`` / ``b_to_a`` are bytes already read from one side during login that still
    belong to the other side; anything left unread in the endpoints' buffers follows them.
    """
    a_to_b += a.take_buffer()
    b_to_a += b.take_buffer()
    a.peer, b.peer = b, a
    for src, dst, pending in ((a, b, a_to_b), (b, a, b_to_a)):
        if pending:
            dst.write(pending)
    for src, dst in ((a, b), (b, a)):
        if src.is_closing or src._eof:
            dst.close()
            continue
        # Hand reading over to the flow control of the other side's write buffer.
        if dst._write_paused:
            src.transport.pause_reading()
            src._read_paused = True
        elif src._read_paused:
            src._read_paused = False
            src.transport.resume_reading()
