"""The events a pure pre-login core hands to its asyncio shell.

The cores (:mod:`proxy.imap.core`, :mod:`proxy.pop3.core`) do no I/O: they take the bytes a
client sent and return these events; the shell (:mod:`proxy.front`) writes, starts TLS, closes,
or runs the login and tells the core how it went.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Send:
    """Bytes to write to the client (always one complete reply)."""

    data: bytes


@dataclass(frozen=True)
class Login:
    """The client asked to log in; the shell answers with the core's login_succeeded/login_failed.

    ``tag`` is the IMAP command's tag (empty for POP3, which has none)."""

    tag: str
    username: str
    password: str = field(repr=False)
    authzid: str = ""
    mechanism: str = "LOGIN"


@dataclass(frozen=True)
class StartTLS:
    """Start the TLS handshake now (the go-ahead has been sent), then call the core's tls_started()."""


@dataclass(frozen=True)
class Close:
    """Close the connection after writing the preceding Sends."""

    reason: str


Event = Send | Login | StartTLS | Close
