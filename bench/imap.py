"""A minimal IMAP client for the benchmarks: the same code talks to Dovecot directly (implicit TLS,
AUTHENTICATE XOAUTH2 with SASL-IR) and to the proxy (plain, LOGIN with the local password).

It parses only what it must: response lines and the sizes of literals, which it skips without
copying, so the client is as cheap as a client can be and the figures show the server side.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import ssl
import time
from dataclasses import dataclass

from proxy.sasl import xoauth2_initial_response

_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
CHUNK = 1 << 20


class ImapError(Exception):
    pass


@dataclass
class Target:
    """Where and how to log in: ``direct`` (TLS + XOAUTH2 token) or ``proxy`` (plain + password)."""

    name: str
    host: str
    port: int
    user: str
    secret: str                       # the access token (direct) or the local password (proxy)
    tls: ssl.SSLContext | None = None
    xoauth2: bool | None = None       # default: with TLS (direct to Dovecot)

    @property
    def login_command(self) -> bytes:
        if self.xoauth2 or (self.xoauth2 is None and self.tls is not None):
            return b"AUTHENTICATE XOAUTH2 " + xoauth2_initial_response(self.user, self.secret)
        return b"LOGIN " + quote(self.user) + b" " + quote(self.secret)


def quote(text: str) -> bytes:
    return b'"' + text.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class SyncImap:
    """A blocking client: for throughput and latency measured from one stream."""

    def __init__(self, target: Target, timeout: float = 120.0):
        self.target = target
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if target.tls is not None:
            sock = target.tls.wrap_socket(sock, server_hostname=target.host)
        self.sock = sock
        self._buf = bytearray(CHUNK)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._tag = 0
        self.received = 0  # bytes taken from the socket
        self.greeting = self.readline()
        if not self.greeting.startswith(b"* OK"):
            raise ImapError(f"greeting: {self.greeting[:100]!r}")

    # -- reading -------------------------------------------------------------------------
    def _fill(self) -> int:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            if self._start == 0:  # a line longer than the buffer
                self._buf.extend(bytes(len(self._buf)))
                self._view = memoryview(self._buf)
            else:
                remaining = self._end - self._start
                self._buf[:remaining] = self._buf[self._start:self._end]
                self._start, self._end = 0, remaining
        n = self.sock.recv_into(self._view[self._end:])
        if n == 0:
            raise ImapError("connection closed")
        self.received += n
        self._end += n
        return n

    def readline(self) -> bytes:
        while True:
            nl = self._buf.find(b"\n", self._start, self._end)
            if nl >= 0:
                line = bytes(self._buf[self._start:nl + 1])
                self._start = nl + 1
                return line
            self._fill()

    def skip(self, n: int) -> None:
        """Discard the next ``n`` bytes (a literal's contents) without copying them."""
        take = min(n, self._end - self._start)
        self._start += take
        n -= take
        while n > 0:  # the buffer is empty: read straight into it
            self._start = self._end = 0
            got = self.sock.recv_into(self._view)
            if got == 0:
                raise ImapError("connection closed")
            self.received += got
            if got <= n:
                n -= got
            else:
                self._start, self._end, n = n, got, 0

    # -- commands ------------------------------------------------------------------------
    def send(self, command: bytes) -> bytes:
        self._tag += 1
        tag = b"b%d" % self._tag
        self.sock.sendall(tag + b" " + command + b"\r\n")
        return tag

    def response(self, tag: bytes) -> tuple[bytes, int]:
        """Read until the tagged response; returns it and the literal bytes seen on the way."""
        literal_bytes = 0
        prefix = tag + b" "
        while True:
            line = self.readline()
            if line.startswith(prefix):
                return line, literal_bytes
            found = _LITERAL.search(line)
            if found:
                size = int(found.group(1))
                literal_bytes += size
                self.skip(size)

    def command(self, command: bytes, expect: bytes = b"OK") -> tuple[bytes, int]:
        line, literal_bytes = self.response(self.send(command))
        if line.split(b" ", 2)[1:2] != [expect]:
            raise ImapError(f"{command.split(b' ')[0]!r} failed: {line[:200]!r}")
        return line, literal_bytes

    def login(self) -> float:
        """Log in; returns the seconds from sending the command to the tagged OK."""
        started = time.perf_counter()
        self.command(self.target.login_command)
        return time.perf_counter() - started

    def append(self, mailbox: bytes, message: bytes) -> None:
        """APPEND with a non-synchronizing literal (LITERAL+, which Dovecot offers)."""
        self._tag += 1
        tag = b"b%d" % self._tag
        self.sock.sendall(tag + b" APPEND " + mailbox + b" (\\Seen) {%d+}\r\n" % len(message))
        self.sock.sendall(message)
        self.sock.sendall(b"\r\n")
        line, _ = self.response(tag)
        if not line[len(tag) + 1:].startswith(b"OK"):
            raise ImapError(f"APPEND failed: {line[:200]!r}")

    def close(self) -> None:
        try:
            self.sock.sendall(b"z LOGOUT\r\n")
        except OSError:
            pass
        self.sock.close()


class AsyncImap:
    """An asyncio client for many concurrent sessions (logins per second, bursts, idle sessions)."""

    def __init__(self, target: Target):
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._tag = 0

    async def connect(self) -> bytes:
        t = self.target
        self.reader, self.writer = await asyncio.open_connection(
            t.host, t.port, ssl=t.tls, server_hostname=t.host if t.tls else None, limit=1 << 20)
        greeting = await self.reader.readline()
        if not greeting.startswith(b"* OK"):
            raise ImapError(f"greeting: {greeting[:100]!r}")
        return greeting

    async def command(self, command: bytes, expect: bytes = b"OK") -> bytes:
        self._tag += 1
        tag = b"a%d " % self._tag
        self.writer.write(tag + command + b"\r\n")
        while True:
            line = await self.reader.readline()
            if not line:
                raise ImapError("connection closed")
            if line.startswith(tag):
                if line[len(tag):len(tag) + len(expect)] != expect:
                    raise ImapError(f"{command.split(b' ')[0]!r} failed: {line[:200]!r}")
                return line
            found = _LITERAL.search(line)
            if found:
                await self.reader.readexactly(int(found.group(1)))

    async def login(self) -> None:
        await self.command(self.target.login_command)

    async def idle(self) -> None:
        """SELECT INBOX and enter IDLE (returns once the server said ``+``)."""
        await self.command(b"SELECT INBOX")
        self._tag += 1
        self._idle_tag = b"a%d " % self._tag
        self.writer.write(self._idle_tag + b"IDLE\r\n")
        while True:
            line = await self.reader.readline()
            if not line:
                raise ImapError("connection closed")
            if line.startswith(b"+"):
                return
            if line.startswith(self._idle_tag):
                raise ImapError(f"IDLE refused: {line[:200]!r}")

    async def done(self) -> None:
        """Leave IDLE (the session must still be alive)."""
        self.writer.write(b"DONE\r\n")
        while True:
            line = await self.reader.readline()
            if not line:
                raise ImapError("connection closed")
            if line.startswith(self._idle_tag):
                if not line[len(self._idle_tag):].startswith(b"OK"):
                    raise ImapError(f"IDLE ended with {line[:200]!r}")
                return

    async def logout(self) -> None:
        try:
            self.writer.write(b"z LOGOUT\r\n")
            await self.writer.drain()
        except (OSError, ConnectionError):
            pass
        self.abort()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()


def make_message(size: int, n: int = 0) -> bytes:
    """An RFC 5322 message of about ``size`` bytes: headers and a body of 76-character lines."""
    import hashlib
    head = (f"From: sender@example.com\r\nTo: bench@example.com\r\nSubject: benchmark message {n}\r\n"
            f"Message-ID: <bench-{n}-{size}@example.com>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n").encode()
    seed = hashlib.sha256(b"%d" % n).digest()
    block = base64.b64encode(hashlib.shake_256(seed).digest(57 * 1024))  # 76 chars per 57 bytes
    lines = [block[i:i + 76] for i in range(0, len(block), 76)]
    body = b"\r\n".join(lines) + b"\r\n"
    out = bytearray(head)
    while len(out) < size:
        out += body
    del out[out.rfind(b"\r\n", 0, size - 1) + 2:]
    pad = size - len(out) - 2
    if pad > 0:
        out += b"=" * pad + b"\r\n"
    return bytes(out)
