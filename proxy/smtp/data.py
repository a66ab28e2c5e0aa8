"""The DATA payload read in bulk and passed on as it arrives: a pure, incremental reader (no I/O).

The client sends a message dot-stuffed and ends it with ``CRLF . CRLF``; :class:`DataStream`
takes those bytes in chunks of any size and returns, chunk by chunk, what goes to the upstream
server: the same bytes, except that a line the client started with one dot that is not a
stuffing dot (``.x``, which the receiver drops) loses it, so the upstream gets exactly what
aiosmtpd's line reader followed by :func:`~proxy.smtp.wire.dot_stuff` used to send (the
message is not changed by the proxy; a client that stuffs correctly gets its bytes relayed
unchanged). It also keeps aiosmtpd's limits and the proxy's own check:

- ``size``: the payload's bytes as aiosmtpd counted them (stuffing dots included, the final
  dot line not); when its complete lines pass ``size_limit`` the message is refused (``552``);
- a line longer than ``line_limit`` refuses the message (``500``);
- a bare CR or LF followed by a dot (:func:`has_lone_dot`) refuses it (``550``): servers that
  also end lines at a bare LF (Dovecot does) would take the dot for the end of the message
  ("SMTP smuggling"). The chunk that contains it is never returned, so an upstream that got
  the chunks before can be dropped without ever having seen an end of data.

Once a refusal is known nothing more is returned; the rest of the payload is still read to
its end so the session stays in step with the client. Bytes after the end (pipelined commands)
are left in :attr:`rest`.
"""

from __future__ import annotations

import re

#: A dot after a bare LF or CR (the regular expression; :func:`has_lone_dot` is the fast equivalent).
LONE_DOT = re.compile(rb"(?<!\r)\n\.|\r\.")
_END = b"\r\n.\r\n"
_KEEP = len(_END) - 1  # bytes held back at the end of a chunk: a marker may straddle two chunks

OK, TOO_BIG, LINE_TOO_LONG, LONE_DOT_FOUND = "ok", "too big", "line too long", "lone dot"


def has_lone_dot(content: bytes | bytearray | memoryview) -> bool:
    """``LONE_DOT.search(content)``, but with substring searches: 6× faster on a 10 MB message."""
    return b"\r." in content or (b"\n." in content and content.count(b"\n.") != content.count(b"\r\n."))


def _lone_dot_from(data: bytes, first: int) -> bool:
    """:func:`has_lone_dot` for the dots at ``data[first:]`` (the bytes before are context)."""
    return (data.find(b"\r.", first - 1) >= 0
            or data.count(b"\n.", first - 1) != data.count(b"\r\n.", max(0, first - 2)))


class DataStream:
    """Feed the client's bytes after ``354`` to :meth:`feed` until :attr:`done`."""

    def __init__(self, size_limit: int | None, line_limit: int):
        self.size_limit = size_limit
        self.line_limit = line_limit
        self.size = 0            # payload bytes as aiosmtpd counts them
        self.content_size = 0    # the message's bytes (without stuffing dots)
        self.verdict = OK
        self.done = False
        self.rest = b""
        # Two bytes of context before the unread data (the message starts as if after a CRLF),
        # then whatever was held back from the last chunk.
        self._tail = b"\r\n"
        self._line = 0           # length of the line in progress so far
        self._sent_tail = b"\r\n"  # the last three bytes returned (for the checks across chunks)

    def feed(self, chunk: bytes) -> bytes:
        """Take the next bytes from the client; returns what to send upstream now (maybe b"")."""
        if self.done:
            raise ValueError("the payload has ended")
        work = self._tail + chunk
        # The usual chunk (base64, ordinary text) has neither "\n." nor "\r.", context included: no
        # end of data, no dot to unstuff or count, no dot after a bare line break. A chunk without
        # any dot (base64: attachments) is found by one memchr; CPython searches two-byte needles
        # a byte at a time (~1 GB/s: 140 µs for two scans of 64 KiB, a quarter of the proxy's CPU
        # for a 10 MB message).
        plain = b"." not in work or (b"\n." not in work and b"\r." not in work)
        end = -1 if plain else work.find(_END)
        if end >= 0:
            stop = end + 2                     # the CRLF that ends the last line belongs to the message
            self.done, self.rest = True, work[end + len(_END):]
        else:
            stop = max(2, len(work) - _KEEP)
            self._tail = work[stop - 2:]
        if stop == 2:
            return b""
        self._count(work, stop)
        if self.verdict != OK:
            return b""
        if plain:
            out = work[2:stop]
            self.content_size += len(out)
            self._sent_tail = (self._sent_tail + out[-3:])[-3:]
            return out
        out = _unstuff_strays(work, stop)
        joined = self._sent_tail + out  # 3 bytes returned before, for patterns across chunks
        if _lone_dot_from(joined, 3):
            self.verdict = LONE_DOT_FOUND
            return b""
        self.content_size += len(out) - joined.count(b"\r\n..")  # one stuffing dot per such line
        # (a "\r\n.." wholly in the 3 tail bytes is impossible, so none is counted twice)
        self._sent_tail = joined[-3:]
        return out

    def _count(self, work: bytes, stop: int) -> None:
        """Size and line-length limits over ``work[2:stop]`` (``work[:2]`` is context).

        As in aiosmtpd, the size counts complete lines only, so an endless line is refused for
        its length (``500``) rather than for the size (``552``)."""
        self.size += stop - 2
        if self.verdict != OK:
            return
        first = work.find(b"\r\n", 1, stop)  # (a CRLF may start in the context's last byte)
        if first < 0:
            self._line += stop - 2
        else:
            longest = self._line + first  # (the new bytes of the line that ends here: first + 2 - 2)
            last = work.rfind(b"\r\n", 1, stop)
            if last > first and last - first > self.line_limit:  # a line wholly inside this chunk could be too long
                longest = max(longest, _longest_line(work, first, last))
            self._line = stop - (last + 2)
            if longest > self.line_limit:
                self.verdict = LINE_TOO_LONG
                return
        if self._line > self.line_limit:
            self.verdict = LINE_TOO_LONG
        elif self.size_limit and self.size - self._line > self.size_limit:
            self.verdict = TOO_BIG


def _longest_line(work: bytes, first: int, last: int) -> int:
    """The longest line between the CRLFs at ``first`` and ``last`` (only when it could matter)."""
    longest, start = 0, first + 2
    while start <= last:
        end = work.find(b"\r\n", start, last + 2)
        longest = max(longest, end + 2 - start)
        start = end + 2
    return longest


def _unstuff_strays(work: bytes, stop: int) -> bytes:
    """``work[2:stop]`` with the dot removed from each line that starts with a single dot.

    (aiosmtpd removed the first dot of every line and ``dot_stuff`` put one back before every
    line that then started with a dot: a line ``..x`` stays, a line ``.x`` becomes ``x``.)
    """
    if work.count(b"\r\n.", 0, stop) == work.count(b"\r\n..", 0, stop + 1):
        return work[2:stop]
    out = bytearray()
    start = 2
    at = work.find(b"\r\n.", 0, stop)
    while at >= 0:
        dot = at + 2
        if dot >= start and dot < stop and work[dot + 1:dot + 2] != b".":
            out += work[start:dot]
            start = dot + 1
        at = work.find(b"\r\n.", at + 1, stop)
    out += work[start:stop]
    return bytes(out)
