"""proxy/tlsendpoint.py: the upstream side's TLS over memory BIOs, against asyncio's own TLS server."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl

import pytest

from proxy.relay import Endpoint, pipe
from proxy.tls import client_context
from proxy.tlsendpoint import PLAIN_SIZE, RECV_SIZE, TlsEndpoint, open_tls
from tests.pki import make_test_pki


@pytest.fixture(scope="module")
def test_pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("tlspki"))


def _server_context(pki) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert_file, pki.key_file)
    return context


async def _serve(pki, handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=_server_context(pki))
    return server, server.sockets[0].getsockname()[1]


def test_relays_large_data_both_ways_and_sees_close_notify(test_pki):
    """More than the scratch buffers hold, byte for byte, through pipe() to a plain endpoint."""
    payload = os.urandom(3 * (RECV_SIZE + PLAIN_SIZE) + 12345)

    async def main():
        received_upstream = bytearray()

        async def handler(reader, writer):
            writer.write(b"* OK hello\r\n" + payload)
            await writer.drain()
            received_upstream.extend(await reader.readexactly(len(payload)))
            writer.close()  # close_notify, then FIN
            await writer.wait_closed()

        server, port = await _serve(test_pki, handler)
        async with server:
            upstream = await open_tls("127.0.0.1", port, client_context(test_pki.ca_file))
            assert upstream.transport.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
            assert await upstream.readline(100) == b"* OK hello\r\n"
            # the client side: a plain socket pair, one end wrapped in an Endpoint
            loop = asyncio.get_running_loop()
            client_sock, proxy_sock = socket.socketpair()
            _, client = await loop.connect_accepted_socket(Endpoint, proxy_sock)
            reader, writer = await asyncio.open_connection(sock=client_sock)
            pipe(client, upstream)
            writer.write(payload)
            got = await reader.readexactly(len(payload))
            assert got == payload
            assert await reader.read() == b""            # the server's close reached the client
            await asyncio.wait_for(upstream.closed, 5)
            assert bytes(received_upstream) == payload
            writer.close()

    asyncio.run(main())


def test_untrusted_certificate_and_not_tls_fail_the_handshake(test_pki, tmp_path):
    other = make_test_pki(tmp_path / "other")

    async def main():
        server, port = await _serve(test_pki, lambda r, w: w.close())
        async with server:
            with pytest.raises(ssl.SSLCertVerificationError):
                await open_tls("127.0.0.1", port, client_context(other.ca_file))
            with pytest.raises(ssl.SSLCertVerificationError):  # right CA, wrong name
                await open_tls("127.0.0.1", port, client_context(test_pki.ca_file), server_hostname="mail.example.org")

        async def garbage(reader, writer):
            writer.write(b"* OK this is not TLS\r\n" * 10)
            await writer.drain()
            writer.close()

        plain = await asyncio.start_server(garbage, "127.0.0.1", 0)
        async with plain:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await open_tls("127.0.0.1", plain.sockets[0].getsockname()[1], client_context(test_pki.ca_file))

    asyncio.run(main())


def test_an_idle_connection_keeps_no_large_buffer(test_pki):
    """asyncio's TLS keeps a 256 KiB buffer per connection; TlsEndpoint shares per-thread scratch ones."""

    async def main():
        async def handler(reader, writer):
            writer.write(b"* OK hello\r\n")
            await reader.read()

        server, port = await _serve(test_pki, handler)
        async with server:
            endpoints = [await open_tls("127.0.0.1", port, client_context(test_pki.ca_file)) for _ in range(3)]
            for endpoint in endpoints:
                assert await endpoint.readline(100) == b"* OK hello\r\n"
                assert isinstance(endpoint, TlsEndpoint)
                large = [name for name, value in vars(endpoint).items()
                         if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > 4096]
                assert not large
                endpoint.close()
            await asyncio.wait([e.closed for e in endpoints], timeout=5)

    asyncio.run(main())


def test_server_side_layer_under_any_protocol_relays_both_ways_and_keeps_no_large_buffer(test_pki):
    """proxy.accept's implicit-TLS listener puts a TlsLayer under the protocol: an echo protocol
    gets plaintext, the client's asyncio TLS sees a normal server, no per-connection 256 KiB buffer."""
    from proxy.accept import listen
    from proxy.tlsendpoint import TlsLayer

    payload = os.urandom(2 * RECV_SIZE + 777)
    layers = []

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            layers.append(transport._endpoint)

        def data_received(self, data):
            self.transport.write(data)

    async def main():
        listener = await listen("TEST", "127.0.0.1", 0, Echo, ssl=_server_context(test_pki), ssl_handshake_timeout=5)
        port = listener.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(test_pki.ca_file),
                                                       server_hostname="127.0.0.1")
        writer.write(payload)
        assert await reader.readexactly(len(payload)) == payload
        layer = layers[0]
        assert isinstance(layer, TlsLayer) and layer.ssl_object.version() in ("TLSv1.2", "TLSv1.3")
        assert not [name for name, value in vars(layer).items()
                    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > 4096]
        writer.close()
        listener.close()

    asyncio.run(main())
