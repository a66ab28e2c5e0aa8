"""SMTP wire pieces that do no I/O: replies, EHLO keywords, size limits, dot-stuffing, failure replies.

Everything here is pure so it can be tested on its own; :mod:`proxy.smtp.upstream` and
:mod:`proxy.smtp.session` do the talking.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ..login import LoginFailed

#: Largest message the proxy buffers, whatever the upstream allows (aiosmtpd keeps a message in
#: memory until it is relayed). 150 MiB is what Microsoft 365 advertises as its SIZE.
MAX_MESSAGE_SIZE = 150 * 1024 * 1024
#: Longest reply line kept from the upstream (longer ones are cut, see proxy.smtp.upstream), and
#: most lines in one reply.
MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100
#: Longest reply line sent to a client, CRLF included (RFC 5321 4.5.3.1.5): longer upstream lines
#: (Microsoft's SendAsDenied is about 2 kB) are cut, keeping code and enhanced code.
MAX_CLIENT_REPLY_LINE = 512
#: EHLO keywords passed on to the client when the upstream offers them. They only add MAIL/RCPT
#: parameters (relayed verbatim) or reply details; nothing the proxy has to implement itself.
#: CHUNKING/BINARYMIME (BDAT), STARTTLS and the upstream's AUTH are deliberately not offered.
PASSTHROUGH_EXTENSIONS = ("8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES")
#: Assumed when the upstream could not be asked yet: 8BITMIME is universal among submission servers.
DEFAULT_EXTENSIONS: Mapping[str, str] = {"8BITMIME": ""}

AUTH_REQUIRED = "530 5.7.0 Authentication required"
CREDENTIALS_INVALID = "535 5.7.8 Authentication credentials invalid"
_MAX_TEXT = 480  # keeps our own reply lines under RFC 5321's 512 octets
_REPLY_LINE = re.compile(rb"\A([2-5][0-9][0-9])([ -]|(?=\r?\n\Z))(.*?)\r?\n\Z", re.DOTALL)
_UNPRINTABLE = re.compile(rb"[^\x20-\x7e]")
_ENHANCED = re.compile(r"\A([245])\.(\d{1,3})\.(\d{1,3})(?!\S)")
_SEND_AS_DENIED = {"5.2.252", "5.7.60"}


@dataclass(frozen=True)
class Reply:
    """A complete (possibly multi-line) SMTP reply: the code and each line's text."""

    code: int
    lines: tuple[bytes, ...] = (b"",)

    @classmethod
    def of(cls, text: str) -> Reply:
        """A single-line reply written by the proxy itself, e.g. ``Reply.of("451 4.4.2 ...")``."""
        code, _, rest = text.partition(" ")
        return cls(int(code), (rest.encode("ascii", "replace"),))

    @property
    def text(self) -> str:
        """All lines' text on one printable line (for logs and messages shown to people)."""
        joined = b" ".join(line.strip() for line in self.lines).strip()
        return one_line(joined.decode("ascii", "replace"))

    def wire(self) -> bytes:
        """The reply as sent to a client, without the final CRLF (aiosmtpd's ``push`` adds it).

        Each line's text is reduced to printable ASCII: an upstream cannot smuggle a line
        break or a terminal escape sequence to the client through the proxy. Lines are cut to
        :data:`MAX_CLIENT_REPLY_LINE` octets; the code (permanent or temporary) never changes.
        """
        out = []
        room = MAX_CLIENT_REPLY_LINE - 6  # "NNN " + text + CRLF
        for index, line in enumerate(self.lines):
            clean = _UNPRINTABLE.sub(b"?", line)
            if len(clean) > room:
                clean = clean[:room - 3] + b"..."
            last = index == len(self.lines) - 1
            out.append(b"%d%s%s" % (self.code, b" " if last else b"-", clean) if clean or not last
                       else b"%d" % self.code)
        return b"\r\n".join(out)


def enhanced_code(reply: Reply) -> str | None:
    """The enhanced status code (RFC 3463) at the start of the reply's text, e.g. ``"5.7.139"``."""
    found = _ENHANCED.match(reply.lines[0].decode("ascii", "replace").strip()) if reply.lines else None
    return ".".join(found.groups()) if found else None


def send_as_denied(reply: Reply) -> bool:
    """Exchange refused the message because the sender may not send as its MAIL FROM address:
    ``554 5.2.252 SendAsDenied`` (at the end of DATA) or the older ``550 5.7.60``."""
    return reply.code // 100 == 5 and (enhanced_code(reply) in _SEND_AS_DENIED
                                       or b"SendAsDenied" in b"".join(reply.lines))


def with_advice(reply: Reply, advice: str) -> Reply:
    """``reply`` (same code, so a permanent failure stays permanent) with one more line: ``advice``."""
    code = enhanced_code(reply)
    text = (f"{code} " if code else "") + one_line(advice)
    return Reply(reply.code, (*reply.lines, text.encode("ascii", "replace")))


def parse_reply_line(line: bytes) -> tuple[int, bool, bytes]:
    """Split one reply line into (code, is_last_line, text). Raises ValueError if malformed."""
    match = _REPLY_LINE.match(line)
    if match is None:
        raise ValueError("malformed SMTP reply line")
    return int(match.group(1)), match.group(2) != b"-", match.group(3)


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """The EHLO keywords of a 250 reply (upper case) mapped to their parameters."""
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.decode("ascii", "replace").strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions


def advertised_size(extensions: Mapping[str, str]) -> int:
    """The SIZE to offer the client: the upstream's own limit, capped at :data:`MAX_MESSAGE_SIZE`.

    ``SIZE`` without a number (or ``SIZE 0``) means the upstream declares no fixed limit.
    """
    value = extensions.get("SIZE", "").split()
    if value and value[0].isdigit() and int(value[0]) > 0:
        return min(int(value[0]), MAX_MESSAGE_SIZE)
    return MAX_MESSAGE_SIZE


def data_size_limit(advertised: int) -> int:
    """aiosmtpd's ``data_size_limit`` for an advertised SIZE.

    aiosmtpd counts the dot-stuffed bytes; the margin keeps a borderline message for the
    upstream to judge (with its own 552) rather than refusing it locally.
    """
    return advertised + advertised // 32 + 1024


def local_extensions(upstream: Mapping[str, str]) -> list[str]:
    """The EHLO lines (after the greeting line) the proxy offers, given the upstream's keywords."""
    lines = [f"SIZE {advertised_size(upstream)}"]
    lines += [name for name in PASSTHROUGH_EXTENSIONS if name in upstream]
    lines += ["PIPELINING", "AUTH LOGIN PLAIN"]  # aiosmtpd handles pipelined commands in order
    return lines


def dot_stuff(content: bytes, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """The DATA payload for a message as aiosmtpd stored it, including the final ``.CRLF``.

    aiosmtpd splits the data at CRLF and removes the first dot of each line that starts with
    one; this is the exact inverse: a dot is added at the start of the content and after
    every CRLF that is followed by a dot. (``\\r\\n.`` cannot overlap itself, so one
    ``replace`` per piece finds every line start.) Pieces end right after a CRLF, so each
    piece also starts a line. Nothing else is touched: bare CR or LF, 8-bit bytes and long
    lines pass unchanged.
    """
    view = memoryview(content)
    start = 0
    while start < len(content):
        end = content.find(b"\r\n", start + chunk)
        end = len(content) if end < 0 else end + 2
        piece = bytes(view[start:end])
        yield (b"." if piece.startswith(b".") else b"") + piece.replace(b"\r\n.", b"\r\n..")
        start = end
    if content and not content.endswith(b"\r\n"):  # aiosmtpd never stores such data
        yield b"\r\n"
    yield b".\r\n"


def login_failure_reply(failure: LoginFailed) -> str:
    """The reply to a failed AUTH (RFC 4954 codes); never contains a secret. A long text (a
    refusal with its advice) goes on several lines of RFC 5321 size rather than being cut."""
    if failure.kind == LoginFailed.CREDENTIALS:
        return CREDENTIALS_INVALID
    if failure.kind == LoginFailed.UNAVAILABLE:
        return multiline_reply("454 4.7.0", failure.text)
    return multiline_reply("535 5.7.8", failure.text)  # REAUTHORIZE, REJECTED: the text names what to do


def multiline_reply(code: str, text: str, max_lines: int = 4) -> str:
    """``code`` (``"535 5.7.8"``) and ``text`` as one reply of up to ``max_lines`` lines, broken at spaces."""
    basic, _, enhanced = code.partition(" ")
    words = " ".join("".join(c if c.isprintable() else " " for c in text).split()).split(" ")
    lines, line = [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > _MAX_TEXT:
            lines.append(line)
            line = ""
        line = f"{line} {word}" if line else word
    lines.append(line)
    lines = [one_line(part) for part in lines[:max_lines]]
    return "\r\n".join(f"{basic}{' ' if i == len(lines) - 1 else '-'}{enhanced} {part}" for i, part in enumerate(lines))


def one_line(text: str) -> str:
    """``text`` as one line of printable characters, short enough for an SMTP reply."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT - 3] + "..."
