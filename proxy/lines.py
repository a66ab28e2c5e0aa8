"""Bounded line framing without I/O, for the pre-login cores (IMAP's command reader, POP3).

A line ends in CRLF; a bare LF is accepted too. A line longer than ``max_line`` bytes (without
its terminator) raises :class:`LineTooLong` as soon as that is certain, so a client that never
sends a line end cannot make the buffer grow past ``max_line`` plus one read.
"""

from __future__ import annotations


class LineTooLong(ValueError):
    """A line exceeded the reader's limit; the stream cannot be resynchronized. Holds no data."""


class LineReader:
    """Incremental framing of CRLF- (or LF-) terminated lines of at most ``max_line`` bytes."""

    def __init__(self, *, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already known to hold no LF

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buf += data

    def take_rest(self) -> bytes:
        """Return and forget the unparsed input."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._scanned = 0
        return rest

    def next_line(self) -> bytes | None:
        """The next complete line without its terminator, or None if more data is needed.

        Raises LineTooLong when the line is (or is sure to become) longer than ``max_line``."""
        end = self._buf.find(b"\n", self._scanned)
        if end < 0:
            pending = len(self._buf) - (1 if self._buf.endswith(b"\r") else 0)
            if pending > self.max_line:
                raise LineTooLong("line too long")
            self._scanned = len(self._buf)
            return None
        stop = end - 1 if end > 0 and self._buf[end - 1] == 0x0D else end
        if stop > self.max_line:
            raise LineTooLong("line too long")
        line = bytes(self._buf[:stop])
        del self._buf[:end + 1]
        self._scanned = 0
        return line
