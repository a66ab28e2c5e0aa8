"""Log in to the upstream POP3 server with SASL XOAUTH2 (RFC 5034; Microsoft's documented exchange).

The exchange itself is :class:`XOAuth2Exchange`, a pure state machine over response lines, so
each way a server answers is a unit-test row:

- Microsoft 365 (outlook.office365.com:995, implicit TLS): ``AUTH XOAUTH2``, ``+ ``, the base64
  response on a line of its own, then ``+OK`` or a direct ``-ERR``. The response is never sent
  on the AUTH line: Microsoft answers a protocol error to a one-line initial response once the
  token is longer than about 4 kB (MailKit #1948).
- Dovecot and Google first send a ``+ <base64 JSON>`` error challenge, which is answered with an
  empty line; the ``-ERR`` follows. The challenge's JSON is kept as the refusal's details.
- ``-ERR`` to ``AUTH XOAUTH2`` itself (before any token): the server does not take XOAUTH2.
- ``-ERR [SYS/TEMP]``, ``[SYS/PERM]``, ``[IN-USE]`` or ``[LOGIN-DELAY]`` (RFC 2449, 3206) after
  the token: the server's trouble, not the token's, so no new token is fetched for it.

The thin asyncio part connects with verified TLS through the low-memory TLS endpoint
(:mod:`proxy.tlsendpoint`), reads the greeting, and runs the exchange.
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
MAX_CAPA_LINES = 100
_RESPONSE_CODE = re.compile(rb"^-ERR \[([A-Za-z0-9/-]+)\]", re.IGNORECASE)
# Response codes after which the same token may well work later: not the token's fault.
_NOT_THE_TOKEN = frozenset({"SYS/TEMP", "SYS/PERM", "IN-USE", "LOGIN-DELAY"})


def check_greeting(line: bytes, address: Address | str) -> str:
    """The text of a ``+OK`` greeting; UpstreamError for ``-ERR`` or anything else."""
    if line.startswith(b"+OK"):
        return server_text(line[3:])
    if line.startswith(b"-ERR"):
        raise UpstreamError(f"{address} refused the connection: {server_text(line)}")
    raise UpstreamError(f"{address} sent an unexpected greeting: {server_text(line)[:100]}")


class XOAuth2Exchange:
    """``AUTH XOAUTH2`` as the client, over lines, without I/O.

    ``start()`` gives the command to send; each server line goes to ``receive()``, which returns
    the next line to send, or None once logged in (then ``text`` holds the server's ``+OK``
    text). It raises TokenRejected when the server refuses the token and UpstreamError for
    anything else.
    """

    def __init__(self, user: str, token: str):
        self._response = xoauth2_initial_response(user, token)
        self._sent = False
        self._challenged = False
        self.details: dict | None = None
        self.text = ""

    def start(self) -> bytes:
        return b"AUTH XOAUTH2\r\n"

    def receive(self, line: bytes) -> bytes | None:
        if not self._sent:
            if line.startswith(b"+") and not line.startswith(b"+OK"):  # "+ " (or a bare "+")
                self._sent = True
                return self._response + b"\r\n"
            if line.startswith(b"-ERR"):
                raise UpstreamError(f"the server does not accept AUTH XOAUTH2: {server_text(line)}")
            raise UpstreamError(f"unexpected response to AUTH XOAUTH2: {server_text(line)[:100]}")
        if line.startswith(b"+OK"):
            self.text = server_text(line[3:])
            return None
        if line.startswith(b"+"):
            if self._challenged:
                raise UpstreamError("the server sent a second XOAUTH2 challenge")
            self._challenged = True  # the error challenge: an empty response, then the -ERR
            self.details = parse_xoauth2_error(line[1:].strip())
            return b"\r\n"
        if line.startswith(b"-ERR"):
            code = _RESPONSE_CODE.match(line)
            if code is not None and code.group(1).decode().upper() in _NOT_THE_TOKEN:
                raise UpstreamError(f"the server refused the login for now: {server_text(line)}")
            raise TokenRejected(server_text(line[4:]), self.details)
        raise UpstreamError(f"unexpected response during login: {server_text(line)[:100]}")


def parse_capa(lines: list[bytes]) -> dict[str, list[str]]:
    """The CAPA list (the lines between ``+OK`` and ``.``) as {NAME: [arguments]}."""
    caps: dict[str, list[str]] = {}
    for line in lines:
        words = line.decode("ascii", "replace").split()
        if words:
            caps[words[0].upper()] = words[1:]
    return caps


@dataclass
class Connection:
    endpoint: Endpoint
    greeting: str

    def close(self) -> None:
        self.endpoint.close()


async def connect(address: Address, context: ssl.SSLContext, *, via: WebProxy | None = None) -> Connection:
    """Open the TLS connection (certificate and host name verified; through the web proxy ``via``,
    if given) and read the greeting."""
    endpoint = await connect_tls(address, context, via=via)
    try:
        return Connection(endpoint, check_greeting(await read_line(endpoint), address))
    except BaseException:
        endpoint.abort()
        raise


async def authenticate(conn: Connection, user: str, token: str) -> str:
    """AUTH XOAUTH2 for ``user``'s mailbox; returns the server's ``+OK`` text.

    Raises TokenRejected when the server refuses the token, UpstreamError on anything else.
    """
    exchange = XOAuth2Exchange(user, token)
    conn.endpoint.write(exchange.start())
    while (reply := exchange.receive(await read_line(conn.endpoint))) is not None:
        conn.endpoint.write(reply)
    return exchange.text


async def capabilities(conn: Connection) -> dict[str, list[str]]:
    """CAPA (for `proxy check`); an empty dict if the server does not know it."""
    conn.endpoint.write(b"CAPA\r\n")
    if not (await read_line(conn.endpoint)).startswith(b"+OK"):
        return {}
    lines = []
    while (line := (await read_line(conn.endpoint)).rstrip(b"\r\n")) != b".":
        if len(lines) >= MAX_CAPA_LINES:
            raise UpstreamError("CAPA answer too long")
        lines.append(line)
    return parse_capa(lines)


async def read_line(ep: Endpoint) -> bytes:
    """One response line (bounded)."""
    try:
        return await ep.readline(MAX_RESPONSE)
    except ConnectionClosed:
        raise UpstreamError("the upstream server closed the connection") from None
    except LineTooLong:
        raise UpstreamError("upstream response too large") from None
