"""IMAP command framing and argument tokenizing, without I/O.

:class:`CommandReader` cuts a client's byte stream into complete commands. A command is a
line ending in CRLF (a bare LF is accepted too); a line that ends with a literal marker
``{n}`` (synchronizing) or ``{n+}`` (non-synchronizing, RFC 7888) is followed by exactly
*n* bytes of literal data and then by the next line segment of the same command. All sizes
are bounded: a line segment, a literal, and the command as a whole.

A command comes out as ``parts``: text segments (line terminators and literal markers
removed) alternating with literal payloads, so ``parts[0::2]`` are text and ``parts[1::2]``
literals. :class:`Arguments` reads IMAP tokens (atoms, quoted strings, literals) from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..lines import LineReader, LineTooLong

# ATOM-CHAR: any CHAR except atom-specials "(" ")" "{" SP CTL "%" "*" DQUOTE "\" "]".
ATOM_CHARS = frozenset(set(range(0x21, 0x7F)) - set(b'(){%*"\\]'))
ASTRING_CHARS = ATOM_CHARS | {ord("]")}
TAG_CHARS = ASTRING_CHARS - {ord("+")}

_MARKER = re.compile(rb"\{([0-9]+)(\+?)\}\Z")
_MAX_DIGITS = 18  # more digits than that is "too large" whatever the limits are


@dataclass(frozen=True)
class Command:
    """A complete command: text segments alternating with literals."""

    parts: tuple[bytes, ...]


@dataclass(frozen=True)
class LiteralStart:
    """A synchronizing literal was announced and accepted: send a continuation request.

    ``head`` is the command's first text segment; the caller may call
    :meth:`CommandReader.abandon` instead (e.g. when the tag is invalid).
    """

    head: bytes


@dataclass(frozen=True)
class Rejected:
    """A limit was exceeded. If not ``fatal`` the reader has already dropped the command and
    is in sync again (``head`` is the command's first text segment, to find its tag); if
    ``fatal`` the stream cannot be resynchronized (close it)."""

    head: bytes
    reason: str
    fatal: bool


ReaderEvent = Command | LiteralStart | Rejected


class CommandReader(LineReader):
    """Incremental framing of IMAP commands; see the module docstring."""

    def __init__(self, *, max_line: int, max_literal: int, max_command: int) -> None:
        super().__init__(max_line=max_line)
        self.max_literal = max_literal
        self.max_command = max_command
        self._parts: list[bytes] = []  # the command so far
        self._size = 0                # bytes of the command so far (markers, CRLFs included)
        self._literal: bytearray | None = None  # literal being received, if any
        self._literal_left = 0

    @property
    def buffered(self) -> int:
        """Bytes held: unparsed input plus the partial command."""
        return len(self._buf) + self._size + (len(self._literal) if self._literal else 0)

    def abandon(self) -> None:
        """Forget the command being read (e.g. after answering a rejected literal)."""
        self._parts, self._size, self._literal, self._literal_left = [], 0, None, 0

    def next_event(self) -> ReaderEvent | None:
        """Return the next framing event, or None if more data is needed."""
        while True:
            if self._literal is not None:
                if not self._read_literal():
                    return None
                continue
            line = self._read_line()
            if line is None:
                return None
            if isinstance(line, Rejected):
                return line
            event = self._end_segment(line)
            if event is not None:
                return event

    def read_line(self) -> bytes | Rejected | None:
        """Return one raw line (terminator removed, no literal handling), or None."""
        return self._read_line()

    # -- internals ------------------------------------------------------------------------
    def _read_line(self) -> bytes | Rejected | None:
        try:
            return self.next_line()
        except LineTooLong:
            return Rejected(b"", "Line too long", True)

    def _end_segment(self, line: bytes) -> ReaderEvent | None:
        """Handle a complete line segment: finish the command or start a literal.

        Returns None when a non-synchronizing literal follows (keep reading)."""
        marker = literal_marker(line)
        text = line if marker is None else line[:marker[0]]
        head = text if not self._parts else self._parts[0]
        size = self._size + len(line) + 2  # markers and terminators count too
        if marker is None:
            if size > self.max_command:
                self.abandon()
                return Rejected(head, "Command too long", False)
            parts = tuple(self._parts) + (text,)
            self.abandon()
            return Command(parts)
        _, length, sync = marker
        if length > self.max_literal or size + length > self.max_command:
            self.abandon()
            return Rejected(head, "Literal too large", not sync)
        self._parts.append(text)
        self._size = size
        self._literal, self._literal_left = bytearray(), length
        return LiteralStart(head) if sync else None

    def _read_literal(self) -> bool:
        """Move literal bytes from the input; True once the literal is complete."""
        assert self._literal is not None
        take = min(self._literal_left, len(self._buf))
        if take:
            self._literal += self._buf[:take]
            del self._buf[:take]
            self._literal_left -= take
        if self._literal_left:
            return False
        self._parts.append(bytes(self._literal))
        self._size += len(self._literal)
        self._literal = None
        return True


def literal_marker(line: bytes) -> tuple[int, int, bool] | None:
    """If ``line`` ends with a literal marker outside a quoted string, return
    ``(marker_start, length, synchronizing)``; a length with too many digits becomes huge."""
    if not line.endswith(b"}"):
        return None
    match = _MARKER.search(line)
    if match is None or _inside_quotes(line, match.start()):
        return None
    digits = match.group(1)
    length = int(digits) if len(digits) <= _MAX_DIGITS else 10 ** _MAX_DIGITS
    return match.start(), length, not match.group(2)


def tag_of(head: bytes) -> str | None:
    """The tag at the start of a command's first segment, if it is valid and followed by SP."""
    args = Arguments((head,))
    try:
        tag = args.token(TAG_CHARS, "a tag").decode("ascii")
        args.space()
    except ParseError:
        return None
    return tag


def _inside_quotes(line: bytes, end: int) -> bool:
    """True if position ``end`` of ``line`` is inside an unterminated quoted string."""
    quoted = escaped = False
    for byte in line[:end]:
        if escaped:
            escaped = False
        elif quoted and byte == 0x5C:  # backslash
            escaped = True
        elif byte == 0x22:  # DQUOTE
            quoted = not quoted
    return quoted


class ParseError(ValueError):
    """The command's arguments do not follow the grammar. The message holds no data."""


class Arguments:
    """A cursor over a command's parts that reads IMAP tokens."""

    def __init__(self, parts: tuple[bytes, ...]) -> None:
        self._parts = parts
        self._index = 0   # even: a text part
        self._pos = 0

    @property
    def _text(self) -> bytes:
        return self._parts[self._index]

    def _literal_next(self) -> bool:
        return self._pos == len(self._text) and self._index + 1 < len(self._parts)

    def at_end(self) -> bool:
        """True when every byte of the command has been consumed."""
        return self._pos == len(self._text) and self._index + 1 >= len(self._parts)

    def peek(self) -> int | None:
        """The next byte of text, or None at the end of a text part (literal or end)."""
        return self._text[self._pos] if self._pos < len(self._text) else None

    def space(self) -> None:
        """Consume exactly one SP."""
        if self.peek() != 0x20:
            raise ParseError("expected a space")
        self._pos += 1

    def end(self) -> None:
        """Require the end of the command."""
        if not self.at_end():
            raise ParseError("unexpected arguments")

    def token(self, allowed: frozenset[int], what: str = "atom") -> bytes:
        """Read 1 or more bytes from ``allowed`` (e.g. an atom or a tag)."""
        text, start = self._text, self._pos
        end = start
        while end < len(text) and text[end] in allowed:
            end += 1
        if end == start:
            raise ParseError(f"expected {what}")
        self._pos = end
        return text[start:end]

    def expect(self, char: bytes) -> None:
        """Consume one given byte."""
        if self.peek() != char[0]:
            raise ParseError("unexpected character")
        self._pos += 1

    def quoted(self) -> bytes:
        """Read a quoted string; only ``\\\\`` and ``\\"`` escapes, no CR, LF or NUL."""
        self.expect(b'"')
        text, out = self._text, bytearray()
        pos = self._pos
        while pos < len(text):
            byte = text[pos]
            pos += 1
            if byte == 0x22:
                self._pos = pos
                return bytes(out)
            if byte == 0x5C:
                if pos >= len(text) or text[pos] not in (0x22, 0x5C):
                    raise ParseError("bad escape in quoted string")
                byte = text[pos]
                pos += 1
            elif byte in (0x00, 0x0D, 0x0A):
                raise ParseError("bad character in quoted string")
            out.append(byte)
        raise ParseError("unterminated quoted string")

    def literal(self) -> bytes:
        """Read a literal (the marker has already been removed by the reader)."""
        if not self._literal_next():
            raise ParseError("expected a literal")
        data = self._parts[self._index + 1]
        self._index += 2
        self._pos = 0
        return data

    def string(self) -> bytes:
        """Read a quoted string or a literal."""
        return self.literal() if self._literal_next() else self.quoted()

    def astring(self) -> bytes:
        """Read an atom (of ASTRING-CHARs), a quoted string or a literal."""
        if self._literal_next() or self.peek() == 0x22:
            return self.string()
        return self.token(ASTRING_CHARS, "a string")

    def nstring(self) -> bytes | None:
        """Read a string or NIL (None)."""
        if not self._literal_next() and self.peek() not in (0x22, None):
            if self.token(ATOM_CHARS).upper() == b"NIL":
                return None
            raise ParseError("expected a string or NIL")
        return self.string()
