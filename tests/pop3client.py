"""A raw POP3 client that keeps every byte as the server sent it (for the byte-identity tests
and the POP3 benchmark; Python's poplib splits lines and limits them to 2,048 bytes)."""

from __future__ import annotations

import base64
import socket
import ssl

TERMINATOR = b"\r\n.\r\n"


class Pop3Error(Exception):
    """The server answered -ERR (the reply line is the message)."""


class Pop3Client:
    def __init__(self, host: str, port: int, *, context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, timeout: float = 60):
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=server_hostname or host)
        self.sock = sock
        self._buf = bytearray()
        self.received = 0
        self.greeting = self.status_line()

    # -- reading ---------------------------------------------------------------------------
    def _fill(self) -> None:
        data = self.sock.recv(1 << 18)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.received += len(data)
        self._buf += data

    def line(self) -> bytes:
        """One line including its CRLF."""
        start = 0
        while (end := self._buf.find(b"\n", start)) < 0:
            start = len(self._buf)
            self._fill()
        line = bytes(self._buf[:end + 1])
        del self._buf[:end + 1]
        return line

    def status_line(self) -> bytes:
        line = self.line()
        if not line.startswith(b"+"):
            raise Pop3Error(line.decode("utf-8", "replace").strip())
        return line

    def body(self) -> bytes:
        """A multi-line answer's data, raw (dot-stuffed), up to and including the final ``.`` line."""
        if self._buf.startswith(b".\r\n"):
            del self._buf[:3]
            return b".\r\n"
        scanned = 0
        while (end := self._buf.find(TERMINATOR, scanned)) < 0:
            scanned = max(0, len(self._buf) - 4)
            self._fill()
        data = bytes(self._buf[:end + 5])
        del self._buf[:end + 5]
        return data

    # -- commands --------------------------------------------------------------------------
    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\r\n")

    def command(self, line: bytes) -> bytes:
        """Send one command; returns its +OK line (raises Pop3Error on -ERR)."""
        self.send(line)
        return self.status_line()

    def multiline(self, line: bytes) -> bytes:
        """Send a command with a multi-line answer (RETR, TOP, LIST, UIDL, CAPA); returns the raw data."""
        self.command(line)
        return self.body()

    def login(self, user: str, password: str) -> bytes:
        self.command(b"USER " + user.encode())
        return self.command(b"PASS " + password.encode())

    def login_xoauth2(self, user: str, token: str) -> bytes:
        """Microsoft's documented exchange: AUTH XOAUTH2, ``+``, then the response on its own line."""
        self.send(b"AUTH XOAUTH2")
        if not self.line().startswith(b"+ "):
            raise Pop3Error("no continuation for AUTH XOAUTH2")
        return self.command(base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()))

    def stat(self) -> tuple[int, int]:
        count, size = self.command(b"STAT").split()[1:3]
        return int(count), int(size)

    def retr(self, number: int) -> bytes:
        return self.multiline(b"RETR %d" % number)

    def quit(self) -> bytes:
        try:
            return self.command(b"QUIT")
        finally:
            self.close()

    def close(self) -> None:
        self.sock.close()


def unstuff(raw: bytes) -> bytes:
    """The message in a RETR answer's raw data: the final ``.`` line removed, dot-stuffing undone."""
    assert raw.endswith(b".\r\n")
    lines = raw[:-3].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
