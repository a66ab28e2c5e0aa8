"""Log in to the upstream IMAP server with SASL XOAUTH2 (RFC 3501 + Microsoft/Google XOAUTH2).

Handles both ways a server refuses a token: Microsoft answers a direct tagged ``NO``; Dovecot
and Google first send a ``+ <base64 JSON>`` error challenge that must be answered with an empty
line before the tagged ``NO`` comes. The challenge never reaches the mail client.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass

from ..config import Address
from ..login import TokenRejected, UpstreamError, connect_tls
from ..relay import ConnectionClosed, Endpoint, LineTooLong
from ..sasl import parse_xoauth2_error, xoauth2_initial_response
from ..text import server_text
from ..webproxy import WebProxy

MAX_RESPONSE = 64 * 1024
_LITERAL = re.compile(rb"\{(\d{1,6})\+?\}\r?\n$")
_CAPABILITY_CODE = re.compile(rb"\[CAPABILITY ([^\]\r\n]*)\]", re.IGNORECASE)


@dataclass
class Connection:
    endpoint: Endpoint
    capabilities: list[str]
    _tag: int = 0

    def next_tag(self) -> bytes:
        self._tag += 1
        return b"P%d" % self._tag

    def close(self) -> None:
        self.endpoint.close()


async def connect(address: Address, context: ssl.SSLContext, *, via: WebProxy | None = None) -> Connection:
    """Open the TLS connection (through the web proxy ``via``, if given) and read the greeting
    (and capabilities)."""
    endpoint = await connect_tls(address, context, via=via)
    conn = Connection(endpoint, [])
    try:
        greeting = await read_response(endpoint)
        upper = greeting.upper()
        if upper.startswith(b"* BYE"):
            raise UpstreamError(f"{address} refused the connection: {server_text(greeting)}")
        if not upper.startswith(b"* OK"):
            raise UpstreamError(f"{address} sent an unexpected greeting: {server_text(greeting)[:100]}")
        conn.capabilities = _capabilities(greeting) or await capability(conn)
    except BaseException:
        endpoint.abort()
        raise
    return conn


async def capability(conn: Connection) -> list[str]:
    tag = conn.next_tag()
    conn.endpoint.write(tag + b" CAPABILITY\r\n")
    caps: list[str] = []
    while True:
        response = await read_response(conn.endpoint)
        if response.upper().startswith(b"* CAPABILITY "):
            caps = response[13:].decode("ascii", "replace").split()
        elif response.startswith(tag + b" "):
            if not response[len(tag) + 1:].upper().startswith(b"OK"):
                raise UpstreamError(f"CAPABILITY failed upstream: {server_text(response)}")
            return caps


async def authenticate(conn: Connection, user: str, token: str) -> str | None:
    """AUTHENTICATE XOAUTH2. Returns the post-login CAPABILITY list as a string (or None).

    Raises TokenRejected when the server says NO, UpstreamError on anything else.
    """
    upper_caps = {c.upper() for c in conn.capabilities}
    if "AUTH=XOAUTH2" not in upper_caps:
        raise UpstreamError("the upstream server does not offer AUTH=XOAUTH2")
    response_b64 = xoauth2_initial_response(user, token)
    tag = conn.next_tag()
    ep = conn.endpoint
    if "SASL-IR" in upper_caps:
        ep.write(tag + b" AUTHENTICATE XOAUTH2 " + response_b64 + b"\r\n")
        sent = True
    else:
        ep.write(tag + b" AUTHENTICATE XOAUTH2\r\n")
        sent = False
    details: dict | None = None
    caps: str | None = None
    while True:
        response = await read_response(ep)
        if response.startswith(b"+"):
            if not sent:
                ep.write(response_b64 + b"\r\n")
                sent = True
            else:  # error challenge: answer with an empty response, the tagged NO follows
                details = parse_xoauth2_error(response[1:].strip())
                ep.write(b"\r\n")
            continue
        if response.upper().startswith(b"* CAPABILITY "):
            caps = response[13:].decode("ascii", "replace").strip()
            continue
        if response.startswith(b"*"):
            continue
        if not response.startswith(tag + b" "):
            raise UpstreamError(f"unexpected response during login: {server_text(response)[:100]}")
        status = response[len(tag) + 1:]
        if status.upper().startswith(b"OK"):
            found = _CAPABILITY_CODE.search(status)
            if found:
                caps = found.group(1).decode("ascii", "replace").strip()
            return caps
        if status.upper().startswith(b"NO"):
            raise TokenRejected(server_text(status[2:]), details)
        raise UpstreamError(f"upstream refused AUTHENTICATE: {server_text(status)}")


async def read_response(ep: Endpoint) -> bytes:
    """One response line, with any literals it announces (bounded)."""
    try:
        data = await ep.readline(MAX_RESPONSE)
        while (literal := _LITERAL.search(data)) is not None:
            size = int(literal.group(1))
            if len(data) + size > MAX_RESPONSE:
                raise UpstreamError("upstream response too large")
            data += await ep.readexactly(size)
            data += await ep.readline(MAX_RESPONSE - len(data))
    except ConnectionClosed:
        raise UpstreamError("the upstream server closed the connection") from None
    except LineTooLong:
        raise UpstreamError("upstream response too large") from None
    return data


def _capabilities(greeting: bytes) -> list[str]:
    found = _CAPABILITY_CODE.search(greeting)
    return found.group(1).decode("ascii", "replace").split() if found else []
