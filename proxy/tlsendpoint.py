"""TLS for the upstream side of the relay, done with ``ssl.MemoryBIO`` on a plain TCP transport.

asyncio's own TLS (``create_connection(ssl=...)``) gives every connection a 256 KiB receive
buffer that is allocated and zero-filled up front (``asyncio.sslproto.SSLProtocol.max_size``;
uvloop does the same): with thousands of idle IMAP sessions that alone is ~260 kB of resident
memory per session. :class:`TlsEndpoint` runs the same OpenSSL object (``SSLContext.wrap_bio``)
itself and allocates only what a read returns, so an idle session costs a few kilobytes, and
relayed bytes pass one Python layer fewer.

It is an :class:`~proxy.relay.Endpoint` whose ``transport`` is a small adapter that encrypts
writes; flow control is the TCP transport's own (its write buffer holds ciphertext, which is
as large as the plaintext give or take 1 %).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from typing import Any

from .relay import Endpoint
from .webproxy import WebProxy, open_connection

# Reads go into per-thread scratch buffers, not per-connection ones: a read is consumed before
# the event loop runs anything else, and what is passed on is a fresh bytes object.
RECV_SIZE = 256 * 1024    # ciphertext per read from the socket
PLAIN_SIZE = 320 * 1024   # plaintext decrypted from one read (plus TLS records still in the BIO)
_MAX_RECORD = 16 * 1024 + 256
_scratch = threading.local()


def _buffers() -> tuple[memoryview, memoryview]:
    try:
        return _scratch.buffers
    except AttributeError:
        _scratch.buffers = (memoryview(bytearray(RECV_SIZE)), memoryview(bytearray(PLAIN_SIZE)))
        return _scratch.buffers


class TlsEndpoint(Endpoint, asyncio.BufferedProtocol):
    """A client-side TLS connection; await :attr:`handshake` before using it."""

    def __init__(self, context: ssl.SSLContext, server_hostname: str | None, **kwargs: Any):
        super().__init__(**kwargs)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing, server_side=False,
                                           server_hostname=server_hostname)
        self.handshake: asyncio.Future = asyncio.get_running_loop().create_future()
        self._raw: asyncio.Transport | None = None

    # -- the TCP transport's callbacks ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]
        super().connection_made(_TlsTransport(self, transport))  # type: ignore[arg-type]
        self._handshake_step()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _buffers()[0]

    def buffer_updated(self, nbytes: int) -> None:
        self._incoming.write(_buffers()[0][:nbytes])
        self._decrypt()

    def data_received(self, data: bytes) -> None:  # transports that do not use get_buffer()
        self._incoming.write(data)
        self._decrypt()

    def _decrypt(self) -> None:
        if not self.handshake.done():
            self._handshake_step()
            if not self.handshake.done() or self.handshake.exception() is not None:
                return
        out = _buffers()[1]
        total = 0
        eof = False
        while True:
            try:
                n = self.ssl_object.read(PLAIN_SIZE - total, out[total:])
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the server ended the TLS session
                eof = True
                break
            except ssl.SSLError:
                self._raw.abort()
                return
            if not n:
                eof = True
                break
            total += n
            if PLAIN_SIZE - total < _MAX_RECORD:
                Endpoint.data_received(self, bytes(out[:total]))
                total = 0
        self._flush()  # post-handshake messages (key updates) may need an answer
        if total:
            Endpoint.data_received(self, bytes(out[:total]))
        if eof:
            Endpoint.eof_received(self)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(exc or ConnectionResetError("connection closed during the TLS handshake"))
            self.handshake.exception()  # retrieved: the connector may have given up already
        super().connection_lost(exc)

    # -- internals ------------------------------------------------------------------------
    def _handshake_step(self) -> None:
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ssl.CertificateError) as exc:
            self._flush()
            self.handshake.set_exception(exc)
            self.handshake.exception()
            self._raw.abort()
            return
        self._flush()
        self.handshake.set_result(None)

    def _flush(self) -> None:
        if self._outgoing.pending:
            data = self._outgoing.read()
            if not self._raw.is_closing():
                self._raw.write(data)


class _TlsTransport:
    """What :class:`~proxy.relay.Endpoint` and its peer see as the transport: writes are encrypted."""

    def __init__(self, endpoint: TlsEndpoint, raw: asyncio.Transport):
        self._endpoint = endpoint
        self._raw = raw

    def write(self, data: bytes) -> None:
        if self._raw.is_closing():
            return
        try:
            self._endpoint.ssl_object.write(data)
        except ssl.SSLError:  # the TLS session is over (for example after the server's close_notify)
            self._raw.abort()
            return
        self._endpoint._flush()

    def close(self) -> None:
        if self._raw.is_closing():
            return
        if self._endpoint.handshake.done() and self._endpoint.handshake.exception() is None:
            try:
                self._endpoint.ssl_object.unwrap()  # queue our close_notify
            except (ssl.SSLError, ValueError):
                pass
            self._endpoint._flush()
        self._raw.close()

    def abort(self) -> None:
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._raw.is_closing()

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._endpoint.ssl_object
        if name == "peercert":
            return self._endpoint.ssl_object.getpeercert()
        if name == "cipher":
            return self._endpoint.ssl_object.cipher()
        return self._raw.get_extra_info(name, default)


async def open_tls(host: str, port: int, context: ssl.SSLContext, server_hostname: str | None = None,
                   via: WebProxy | None = None, **kwargs: Any) -> TlsEndpoint:
    """Connect (through the web proxy ``via`` with HTTP CONNECT, if given) and complete the TLS
    handshake; raises OSError or ssl.SSLError (UpstreamError for a web proxy's refusal).

    (No session resumption: CPython copies a session through DER both when reading and when
    setting it, 0.4 ms in all, about what a resumed handshake saves.)
    """
    name = server_hostname if server_hostname is not None else host
    transport, endpoint = await open_connection(lambda: TlsEndpoint(context, name, **kwargs), host, port, via)
    try:
        await endpoint.handshake
    except BaseException:
        transport.abort()
        raise
    return endpoint
