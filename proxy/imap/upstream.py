"""The proxy as a client of the upstream IMAP server: connect, read the greeting, log in.

The exchanges themselves are sans-I/O state machines in :mod:`proxy.imap.xoauth2` (each
server behaviour is a unit-test row there); this module only opens the TLS connection, writes
what a machine returns and feeds it each response (a line with its literals) until an outcome
comes out, which it turns into the login sequence's exceptions (:mod:`proxy.login`):
``TokenRejected`` (the token was refused), ``UpstreamRefused`` (Exchange's "authenticated but
not connected"), ``UpstreamError`` (anything else; the connection is then unusable).
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass

from ..config import Address
from ..login import UpstreamError, connect_tls, login_result
from ..relay import ConnectionClosed, Endpoint, LineTooLong
from ..webproxy import WebProxy
from . import xoauth2

MAX_RESPONSE = 64 * 1024
_LITERAL = re.compile(rb"\{(\d{1,6})\+?\}\r?\n$")


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
        greeting = xoauth2.greeting(await read_response(endpoint))
        if isinstance(greeting, xoauth2.Failed):
            raise UpstreamError(f"{address} {greeting.text}")
        conn.capabilities = greeting.names if greeting is not None else await capability(conn)
    except BaseException:
        endpoint.abort()
        raise
    return conn


async def capability(conn: Connection) -> list[str]:
    fetch = xoauth2.CapabilityFetch(conn.next_tag())
    outcome = await _exchange(conn, fetch.start(), fetch)
    if not isinstance(outcome, xoauth2.Capabilities):
        raise UpstreamError(outcome.text)
    return outcome.names


async def authenticate(conn: Connection, user: str, token: str) -> str | None:
    """AUTHENTICATE XOAUTH2 and the post-login probe. Returns the capabilities after login (or None).

    Raises TokenRejected when the server refuses the token, UpstreamRefused when it accepts it
    but does not open the mailbox, UpstreamError on anything else.
    """
    login = xoauth2.Xoauth2Login(conn.capabilities, user, token, conn.next_tag)
    first, outcome = login.start()
    if outcome is None:
        outcome = await _exchange(conn, first, login)
    return login_result(outcome)


async def _exchange(conn: Connection, first: bytes, machine):
    """Send ``first``, then feed ``machine`` the responses and send what it says, until it is done."""
    conn.endpoint.write(first)
    while True:
        send, outcome = machine.receive(await read_response(conn.endpoint))
        if send:
            conn.endpoint.write(send)
        if outcome is not None:
            return outcome


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
