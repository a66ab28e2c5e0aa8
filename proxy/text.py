"""Text that crosses from one peer to another: reply texts the proxy writes to clients, and
server responses quoted in errors and logs. Pure functions; shared by the IMAP and POP3 sides."""

from __future__ import annotations

MAX_REPLY_TEXT = 1000


def printable(text: str) -> str:
    """``text`` as printable ASCII on one line (controls become spaces, others '?')."""
    text = "".join(c if " " <= c <= "~" else ("?" if c >= "\x80" else " ") for c in str(text))
    return " ".join(text.split())[:MAX_REPLY_TEXT]


def reply_text(text: str, default: str) -> str:
    """Reply text: printable, not starting with '[' (a fake response code), never empty."""
    return printable(text).lstrip("[ ") or default


def server_text(line: bytes) -> str:
    """Printable text of a server response, for logs and client messages."""
    text = line.decode("utf-8", "replace").strip()
    return "".join(c if c.isprintable() else "?" for c in text)[:300]
