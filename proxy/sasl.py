"""SASL helpers: pure functions that encode and decode the few mechanisms the proxy speaks.

Towards clients the proxy accepts PLAIN (RFC 4616) and, for SMTP, the LOGIN mechanism;
towards the mail server it sends XOAUTH2. Nothing here does I/O.

Error messages are short fixed strings: they never contain the decoded data, so a password
can never end up in a log line or a reply through an exception.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any

#: Largest decoded client response accepted (bytes).
MAX_RESPONSE = 4096
#: Largest base64 text that can decode to at most MAX_RESPONSE bytes.
_MAX_ENCODED = (MAX_RESPONSE + 2) // 3 * 4
#: Largest server challenge parse_xoauth2_error() looks at.
_MAX_CHALLENGE = 64 * 1024

_BASE64 = re.compile(rb"\A(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LINE_BREAK_OR_NUL = re.compile(r"[\x00\r\n]")


class SaslError(ValueError):
    """A client's SASL response is unacceptable. The message never contains the data."""


class SaslSyntaxError(SaslError):
    """The response is not valid base64 (an IMAP server answers BAD rather than NO)."""


@dataclass(frozen=True)
class PlainCredentials:
    """The three fields of a PLAIN response; the password is left out of ``repr``."""

    authzid: str
    authcid: str
    password: str = field(repr=False)


def validate_username(name: str) -> str:
    """Return ``name`` if it is a usable user name (non-empty, no control characters)."""
    if not name:
        raise SaslError("empty user name")
    if _CONTROL.search(name):
        raise SaslError("invalid characters in user name")
    return name


def validate_password(password: str) -> str:
    """Return ``password`` if it is usable (non-empty, no NUL, CR or LF)."""
    if not password:
        raise SaslError("empty password")
    if _LINE_BREAK_OR_NUL.search(password):
        raise SaslError("invalid characters in password")
    return password


def xoauth2_initial_response(user: str, access_token: str) -> bytes:
    """Base64 of the XOAUTH2 client response ``user=U^Aauth=Bearer T^A^A`` (no newline)."""
    if not user or _CONTROL.search(user):
        raise SaslError("invalid user name for XOAUTH2")
    if not access_token or _CONTROL.search(access_token) or " " in access_token:
        raise SaslError("invalid access token for XOAUTH2")
    message = f"user={user}\x01auth=Bearer {access_token}\x01\x01"
    return base64.b64encode(message.encode("utf-8"))


def decode_plain(data: bytes) -> PlainCredentials:
    """Decode an RFC 4616 PLAIN response given in base64 (``authzid NUL authcid NUL passwd``).

    Surrounding whitespace (such as a line terminator) is ignored; anything else must be
    canonical base64. ``=`` (the SASL-IR spelling of an empty response) is rejected like any
    empty response. The user names must not contain control characters, nor the password
    NUL, CR or LF.
    """
    raw = _decode_response(data)
    fields = raw.split(b"\x00")
    if len(fields) != 3:
        raise SaslError("malformed PLAIN response")
    authzid, authcid, password = (_utf8(item) for item in fields)
    if authzid and _CONTROL.search(authzid):
        raise SaslError("invalid characters in authorization identity")
    return PlainCredentials(authzid, validate_username(authcid), validate_password(password))


def decode_login_step(data: bytes) -> str:
    """Decode one base64 step of the LOGIN mechanism (a user name or a password)."""
    return validate_password(_utf8(_decode_response(data)))


def encode_login_prompt(text: str) -> bytes:
    """Base64 of a LOGIN mechanism prompt such as ``Username:`` or ``Password:``."""
    return base64.b64encode(text.encode("utf-8"))


def parse_xoauth2_error(challenge: bytes) -> dict[str, Any] | None:
    """Decode a server's base64 JSON XOAUTH2 error challenge; None if it is not one.

    Example result: ``{"status": "401", "schemes": "bearer", "scope": "..."}``. Never raises.
    """
    try:
        if isinstance(challenge, str):
            challenge = challenge.encode("ascii")
        challenge = bytes(challenge).strip()
        if not challenge or len(challenge) > _MAX_CHALLENGE:
            return None
        decoded = base64.b64decode(challenge + b"=" * (-len(challenge) % 4), validate=True)
        value = json.loads(decoded.decode("utf-8"))
    except Exception:  # noqa: BLE001 - any malformed challenge simply is not an error report
        return None
    return value if isinstance(value, dict) else None


def _decode_response(data: bytes) -> bytes:
    """Strictly decode a client's base64 response into at most MAX_RESPONSE bytes."""
    data = bytes(data).strip(b" \t\r\n")
    if len(data) > _MAX_ENCODED:
        raise SaslError("response too long")
    if data in (b"", b"="):
        raise SaslError("empty response")
    if not _BASE64.match(data):
        raise SaslSyntaxError("invalid base64")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SaslSyntaxError("invalid base64") from None
    if base64.b64encode(raw) != data:  # non-zero padding bits: not canonical
        raise SaslSyntaxError("invalid base64")
    if not raw:
        raise SaslError("empty response")
    if len(raw) > MAX_RESPONSE:
        raise SaslError("response too long")
    return raw


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError("invalid UTF-8") from None
