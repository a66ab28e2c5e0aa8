"""The proxy as a client of the upstream submission server (RFC 5321, STARTTLS RFC 3207, AUTH RFC 4954).

:func:`connect` opens a verified TLS session (STARTTLS on 587, or implicit TLS on 465) and
learns the server's EHLO keywords; :func:`authenticate` runs the SASL XOAUTH2 login, a
sans-I/O state machine in :mod:`proxy.smtp.xoauth2` (always two steps; how each of
Microsoft's replies is read is a unit-test row there), and turns its outcome into the login
sequence's exceptions. Reply lines longer than :data:`~proxy.smtp.wire.MAX_REPLY_LINE` are
cut, not refused: Microsoft's ``554 5.2.252 SendAsDenied`` is one line of about 2 kB, and a
permanent refusal must reach the client as one, never become a temporary failure. Nothing
here logs; no exception text contains a token.

Any :class:`~proxy.login.UpstreamError` leaves the connection unusable: the caller aborts it.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

from ..config import Address
from ..login import UpstreamError, login_result
from ..relay import WRITE_HIGH_WATER, ConnectionClosed, Endpoint, LineTooLong
from ..tls import describe_tls_error
from ..tlsendpoint import open_tls, start_tls
from ..webproxy import WebProxy, open_connection
from . import xoauth2
from .wire import MAX_REPLY_LINE, MAX_REPLY_LINES, Reply, parse_ehlo, parse_reply_line


STARTTLS_TIMEOUT = 30.0  # (the caller's login or probe deadline is shorter)

#: A reply line longer than this is refused as invalid (it is cut at MAX_REPLY_LINE up to here).
MAX_LONG_REPLY_LINE = 1024 * 1024


@dataclass
class Connection:
    """An open upstream session and the EHLO keywords it announced (after TLS)."""

    endpoint: Endpoint
    address: Address
    extensions: dict[str, str] = field(default_factory=dict)
    # The deadline of the reply being read, watched by one timer per connection (see _read_reply).
    _deadline: float | None = field(default=None, init=False, repr=False)
    _watchdog: asyncio.TimerHandle | None = field(default=None, init=False, repr=False)

    @property
    def is_closed(self) -> bool:
        return self.endpoint.is_closing or self.endpoint.at_eof

    async def command(self, line: bytes, timeout: float | None) -> Reply:
        """Send one command line and return the reply (UpstreamError if none within ``timeout``)."""
        self.endpoint.write(line + b"\r\n")
        return await self.reply(timeout)

    def send_command(self, line: bytes) -> None:
        """Send one command line without waiting; read its reply with :meth:`reply` later."""
        self.endpoint.write(line + b"\r\n")

    async def reply(self, timeout: float | None) -> Reply:
        try:
            return await self._read_reply(timeout)
        except asyncio.TimeoutError:
            raise UpstreamError(f"no answer from {self.address} within {timeout:.0f} s") from None

    # -- a message's payload, streamed after the upstream's 354 (see proxy.smtp.data) ---------
    def send_data(self, data: bytes) -> None:
        """Pass on the next dot-stuffed bytes of a message (never its final dot)."""
        self.endpoint.write(data)

    @property
    def backlogged(self) -> bool:
        """The server is not taking data as fast as it comes: wait for :meth:`drain_data`."""
        return self.endpoint.writing_paused

    async def drain_data(self, timeout: float) -> None:
        """Wait until the server takes data again (UpstreamError if it has not within ``timeout``)."""
        try:
            await asyncio.wait_for(self.endpoint.drain(), timeout)
        except asyncio.TimeoutError:
            raise UpstreamError(f"{self.address} did not take the message within {timeout:.0f} s") from None

    async def finish_message(self, timeout: float, data: bytes = b"") -> Reply:
        """Send the payload's last ``data`` and the final dot; return the server's reply to the message."""
        if self.is_closed:
            raise UpstreamError(f"{self.address} closed the connection during the message")
        self.endpoint.write(data + b".\r\n")
        try:
            return await self._read_reply(timeout)
        except asyncio.TimeoutError:
            raise UpstreamError(f"{self.address} did not accept the message within {timeout:.0f} s") from None

    def quit(self, grace: float = 2.0) -> None:
        """End the session politely without waiting: the server answers 221 and closes the
        connection itself; if it has not within ``grace`` seconds, it is dropped."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.endpoint.is_closing:
            return
        self.endpoint.write(b"QUIT\r\n")
        asyncio.get_running_loop().call_later(grace, self.endpoint.abort)

    def abort(self) -> None:
        """Drop the connection at once (an unfinished message is discarded by the server)."""
        self.endpoint.abort()
        if self._watchdog is not None:
            self._watchdog.cancel()

    async def _read_reply(self, timeout: float | None) -> Reply:
        """:func:`read_reply` within ``timeout`` seconds (asyncio.TimeoutError).

        Replies come in milliseconds and the deadlines are minutes, so instead of a timer per
        reply (``asyncio.timeout``: ~20 µs each, a tenth of the proxy's CPU per small message)
        one timer per connection watches the deadline of the reply being read; it is set again
        only when it would fire too late, and when it fires early it sleeps until the deadline."""
        if timeout is None:
            return await read_reply(self.endpoint)
        loop = asyncio.get_running_loop()
        self._deadline = deadline = loop.time() + timeout
        if self._watchdog is None or self._watchdog.when() > deadline:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._watchdog = loop.call_at(deadline, self._watch)
        try:
            return await read_reply(self.endpoint)
        finally:
            self._deadline = None

    def _watch(self) -> None:
        self._watchdog = None
        if self._deadline is None:
            return  # no reply is awaited: the next one sets the timer again
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._watchdog = loop.call_at(self._deadline, self._watch)
        elif not self.endpoint.interrupt(asyncio.TimeoutError()):
            # the reader has just been woken by data: look again once it has run
            self._watchdog = loop.call_at(loop.time() + 0.01, self._watch)




async def connect(address: Address, tls_mode: str, context: ssl.SSLContext, local_name: str, *,
                  via: WebProxy | None = None) -> Connection:
    """TCP (through the web proxy ``via`` with HTTP CONNECT, if given), greeting, EHLO, STARTTLS
    (certificate and host name verified), EHLO again.

    With ``tls_mode == "implicit"`` TLS starts right away (port 465). Never falls back to
    plain text. Bounded by the caller's deadline (login or probe).
    """
    loop = asyncio.get_running_loop()
    implicit = tls_mode == "implicit"
    try:
        if via is not None:
            _, endpoint = await open_connection(Endpoint, address.host, address.port, via)
        elif implicit:  # TLS through memory BIOs: asyncio's own costs 256 KiB per connection (tlsendpoint.py)
            endpoint = await open_tls(address.host, address.port, context)
        else:
            _, endpoint = await loop.create_connection(Endpoint, address.host, address.port)
    except ssl.SSLError as exc:
        raise UpstreamError(f"TLS handshake with {address} failed: {describe_tls_error(exc)}") from None
    except OSError as exc:
        raise UpstreamError(f"cannot connect to {address} ({exc.strerror or exc.__class__.__name__})") from None
    conn = Connection(endpoint, address)
    if via is not None and implicit:  # TLS inside the tunnel, end to end with the mail server
        try:
            await _start_tls(conn, context)
        except BaseException:
            endpoint.abort()
            raise
    try:
        greeting = await conn.reply(None)
        if greeting.code != 220:
            raise UpstreamError(f"{address} refused the connection: {greeting.code} {greeting.text}")
        conn.extensions = await _ehlo(conn, local_name)
        if not implicit:
            await _starttls(conn, context)
            conn.extensions = await _ehlo(conn, local_name)
    except BaseException:
        endpoint.abort()
        raise
    return conn


async def authenticate(conn: Connection, user: str, token: str) -> dict[str, str]:
    """AUTH XOAUTH2 as ``user``. Returns the EHLO keywords.

    Raises TokenRejected when the server refused the token, UpstreamRefused when SMTP AUTH is
    disabled (``535 5.7.139``), UpstreamError otherwise (a 4xx such as ``432 4.3.2`` too many
    connections included).
    """
    login = xoauth2.Xoauth2Login(conn.extensions, user, token)
    send, outcome = login.start()
    while outcome is None:
        send, outcome = login.receive(await conn.command(send, None))
    login_result(outcome)
    return conn.extensions


async def probe(address: Address, tls_mode: str, context: ssl.SSLContext, local_name: str, *,
                via: WebProxy | None = None) -> dict[str, str]:
    """Connect without logging in, to learn the EHLO keywords; then QUIT."""
    conn = await connect(address, tls_mode, context, local_name, via=via)
    conn.quit()
    return conn.extensions


async def read_reply(endpoint: Endpoint) -> Reply:
    """One complete reply (all its lines), bounded in size."""
    lines: list[bytes] = []
    code = 0
    try:
        while True:
            line_code, last, text = parse_reply_line(await endpoint.readline_cut(MAX_REPLY_LINE, MAX_LONG_REPLY_LINE))
            if lines and line_code != code:
                raise ValueError("reply code changed within a multi-line reply")
            code = line_code
            lines.append(text)
            if last:
                return Reply(code, tuple(lines))
            if len(lines) >= MAX_REPLY_LINES:
                raise ValueError("reply has too many lines")
    except ConnectionClosed:
        raise UpstreamError("the mail server closed the connection") from None
    except (LineTooLong, ValueError) as exc:
        raise UpstreamError(f"the mail server sent an invalid reply ({exc})") from None


async def _ehlo(conn: Connection, local_name: str) -> dict[str, str]:
    reply = await conn.command(b"EHLO " + local_name.encode("ascii"), None)
    if reply.code != 250:
        raise UpstreamError(f"{conn.address} refused EHLO: {reply.code} {reply.text}")
    return parse_ehlo(reply)


async def _starttls(conn: Connection, context: ssl.SSLContext) -> None:
    if "STARTTLS" not in conn.extensions:
        raise UpstreamError(f"{conn.address} does not offer STARTTLS (the proxy never logs in without TLS)")
    reply = await conn.command(b"STARTTLS", None)
    if reply.code != 220:
        raise UpstreamError(f"{conn.address} refused STARTTLS: {reply.code} {reply.text}")
    if conn.endpoint.take_buffer():  # bytes sent before TLS must not be read as if they came after it
        raise UpstreamError(f"{conn.address} sent unexpected data after STARTTLS")
    await _start_tls(conn, context)


async def _start_tls(conn: Connection, context: ssl.SSLContext) -> None:
    """Turn the connection's transport into a verified TLS one (STARTTLS, or implicit TLS in a tunnel)."""
    endpoint = conn.endpoint
    try:
        transport = await start_tls(endpoint.transport, endpoint, context, timeout=STARTTLS_TIMEOUT, server_side=False,
                                    server_hostname=conn.address.host)
    except ssl.SSLError as exc:
        raise UpstreamError(f"TLS handshake with {conn.address} failed: {describe_tls_error(exc)}") from None
    except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
        raise UpstreamError(f"TLS handshake with {conn.address} failed ({exc.__class__.__name__})") from None
    if transport is None:
        raise UpstreamError(f"{conn.address} closed the connection during the TLS handshake")
    transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
    endpoint.transport = transport
