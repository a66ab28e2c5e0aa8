"""TLS done with ``ssl.MemoryBIO`` on a plain TCP transport, for both sides of the relay.

asyncio's own TLS (``create_connection(ssl=...)``, ``create_server(ssl=...)``, ``start_tls``)
gives every connection a 256 KiB receive buffer that is allocated and zero-filled up front
(``asyncio.sslproto.SSLProtocol.max_size``; uvloop does the same): with thousands of idle IMAP
sessions that alone is ~260 kB of resident memory per session. Here the same OpenSSL object
(``SSLContext.wrap_bio``, certificate and host name checks unchanged) runs over memory BIOs and
reads go through per-thread scratch buffers, so an idle session costs a few kilobytes, and
relayed bytes pass one Python layer fewer.

- :class:`TlsEndpoint` (:func:`open_tls`): the upstream side, an :class:`~proxy.relay.Endpoint`
  that is its own TLS client;
- :class:`TlsLayer`: the client-facing side, a server-side TLS layer in front of any protocol
  (the IMAP front's endpoint, aiosmtpd's SMTP protocol): the implicit-TLS listeners put it
  under each accepted connection, :func:`start_tls` under a connection after STARTTLS.

Either way the protocol above sees a ``transport`` that is a small adapter encrypting its
writes; flow control is the TCP transport's own (its write buffer holds ciphertext, which is as
large as the plaintext give or take 1 %).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from typing import Any, Callable

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


class _TlsCore:
    """The TLS machinery both ends share: the SSL object over memory BIOs, the handshake, reads
    through the scratch buffers. Subclasses say where plaintext goes (:meth:`_plain`, :meth:`_plain_eof`)."""

    ssl_object: ssl.SSLObject
    handshake: asyncio.Future
    _raw: asyncio.Transport | None

    def _tls_setup(self, context: ssl.SSLContext, server_side: bool, server_hostname: str | None) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                           server_hostname=server_hostname)
        self.handshake = asyncio.get_running_loop().create_future()
        self._raw = None

    def _plain(self, data: bytes) -> None:
        raise NotImplementedError

    def _plain_eof(self) -> None:
        raise NotImplementedError

    def _handshake_done(self) -> None:
        """Called once the handshake succeeded."""

    # -- the TCP transport's callbacks ----------------------------------------------------
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
            except ssl.SSLZeroReturnError:  # close_notify: the peer ended the TLS session
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
                self._plain(bytes(out[:total]))
                total = 0
            if not self._incoming.pending and not self.ssl_object.pending():
                break  # nothing left to decrypt: spare the read that would raise SSLWantReadError
        self._flush()  # post-handshake messages (key updates, session tickets) may need sending
        if total:
            self._plain(bytes(out[:total]))
        if eof:
            self._plain_eof()

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
        self._handshake_done()

    def _flush(self) -> None:
        if self._outgoing.pending:
            data = self._outgoing.read()
            if not self._raw.is_closing():
                self._raw.write(data)


class TlsEndpoint(_TlsCore, Endpoint, asyncio.BufferedProtocol):
    """A client-side TLS connection; await :attr:`handshake` before using it."""

    def __init__(self, context: ssl.SSLContext, server_hostname: str | None, **kwargs: Any):
        super().__init__(**kwargs)
        self._tls_setup(context, False, server_hostname)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]
        Endpoint.connection_made(self, _TlsTransport(self, transport))  # type: ignore[arg-type]
        self._handshake_step()

    def _plain(self, data: bytes) -> None:
        Endpoint.data_received(self, data)

    def _plain_eof(self) -> None:
        Endpoint.eof_received(self)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(exc or ConnectionResetError("connection closed during the TLS handshake"))
            self.handshake.exception()  # retrieved: the connector may have given up already
        super().connection_lost(exc)


class TlsLayer(_TlsCore, asyncio.BufferedProtocol):
    """TLS under ``app`` (any asyncio protocol): server side on an accepted TCP connection, or
    either side on a connection that switches to TLS (STARTTLS, :func:`start_tls`).

    With ``connect_app`` (implicit TLS) ``app.connection_made`` is called once the handshake
    succeeded, with the adapter as its transport; a failed or timed-out handshake just closes
    the connection (nothing reaches ``app``). Without it (STARTTLS, see :func:`start_tls`) the
    caller hands the adapter over itself.
    """

    def __init__(self, app: asyncio.BaseProtocol, context: ssl.SSLContext, *, handshake_timeout: float = 30.0,
                 connect_app: bool = True, server_side: bool = True, server_hostname: str | None = None,
                 on_ready: Callable[["_TlsTransport"], None] | None = None):
        self._tls_setup(context, server_side, server_hostname)
        self.app = app
        self._on_ready = on_ready
        self._connect_app = connect_app
        self._app_connected = False
        self._timeout = handshake_timeout
        self._timer: asyncio.TimerHandle | None = None
        self.transport: _TlsTransport | None = None

    @property
    def _extra(self) -> dict[str, Any]:
        """What aiosmtpd reads of an asyncio TLS protocol after STARTTLS (``session.ssl``)."""
        return {name: self.transport.get_extra_info(name) for name in ("ssl_object", "peercert", "cipher")}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]
        self.transport = _TlsTransport(self, transport)  # type: ignore[arg-type]
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._handshake_expired)
        self._handshake_step()

    def _handshake_expired(self) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(asyncio.TimeoutError("TLS handshake timed out"))
            self.handshake.exception()
            self._raw.abort()

    def _handshake_done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None  # (nothing per idle session that is not needed any more)
        self._on_ready, on_ready = None, self._on_ready
        if self._connect_app:
            self._app_connected = True
            self.app.connection_made(self.transport)
        elif on_ready is not None:  # before any application data reaches ``app``
            on_ready(self.transport)

    def _plain(self, data: bytes) -> None:
        self.app.data_received(data)

    def _plain_eof(self) -> None:
        keep_open = self.app.eof_received() if self._app_connected or not self._connect_app else False
        if not keep_open:
            self.transport.close()

    def eof_received(self) -> bool:
        if self.handshake.done() and self.handshake.exception() is None:
            self._plain_eof()  # the TCP connection ended without close_notify
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.handshake.done():
            self.handshake.set_exception(exc or ConnectionResetError("connection closed during the TLS handshake"))
            self.handshake.exception()
        if self._app_connected or not self._connect_app:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()


async def start_tls(transport: asyncio.Transport, app: asyncio.BaseProtocol, context: ssl.SSLContext, *,
                    timeout: float, server_side: bool = True, server_hostname: str | None = None,
                    on_ready: Callable[["_TlsTransport"], None] | None = None) -> "_TlsTransport":
    """STARTTLS on an open connection whose protocol is ``app`` (the server side by default; the
    client side checks ``server_hostname``'s certificate as the context says): returns the
    transport ``app`` must use from now on. Raises ssl.SSLError (ssl.SSLCertVerificationError),
    asyncio.TimeoutError or ConnectionError (the connection is then closed). ``on_ready`` is
    called with the new transport when the handshake is done, before ``app`` receives any data
    that came with it."""
    layer = TlsLayer(app, context, handshake_timeout=timeout, connect_app=False, server_side=server_side,
                     server_hostname=server_hostname, on_ready=on_ready)
    transport.set_protocol(layer)
    layer.connection_made(transport)
    transport.resume_reading()
    await layer.handshake
    return layer.transport


class _TlsTransport(asyncio.Transport):
    """What the protocol above (and a relay peer) sees as the transport: writes are encrypted."""

    __slots__ = ("_endpoint", "_raw")

    def __init__(self, endpoint: _TlsCore, raw: asyncio.Transport):
        super().__init__()
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

    def writelines(self, list_of_data) -> None:  # noqa: ANN001
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def abort(self) -> None:
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._raw.is_closing()

    def is_reading(self) -> bool:
        return self._raw.is_reading()

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
        if name == "sslcontext":
            return self._endpoint.ssl_object.context
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
