"""How an upstream XOAUTH2 login can end: the outcomes of the sans-I/O login machines in
:mod:`proxy.imap.xoauth2` and :mod:`proxy.smtp.xoauth2`. Pure data; :func:`proxy.login.login_result`
turns them into the login sequence's exceptions. No text here ever contains a token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True)
class Accepted:
    """Logged in; ``capabilities``: the IMAP server's capabilities after login (None if unknown)."""

    capabilities: str | None = None


@dataclass(frozen=True)
class TokenRefused:
    """The server refused the token; ``details``: its decoded XOAUTH2 error challenge, if any."""

    text: str
    details: dict[str, Any] | None = None


@dataclass(frozen=True)
class Refused:
    """The server refused the login for a reason that is not the token (``kind``): a new token
    does not help, so there is no refresh and no "refresh and retry"."""

    NOT_CONNECTED = "not connected"            # IMAP: "User is authenticated but not connected." (rights)
    SMTP_AUTH_DISABLED = "smtp auth disabled"  # SMTP: 535 5.7.139 (tenant, mailbox, policy)

    kind: str
    text: str


@dataclass(frozen=True)
class Failed:
    """The server misbehaved, is busy or refused something else; the connection is unusable."""

    text: str


Outcome = Union[Accepted, TokenRefused, Refused, Failed]
