"""The PROXY protocol (proxy/proxyproto.py): the header parser as unit-test rows, the trust rules,
the config key, and the layer under real listeners (proxy/accept.py) on loopback, in process.

End to end with a real HAProxy in front of `proxy serve`: tests/test_proxy_protocol_haproxy.py."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
import ssl
import struct
from pathlib import Path

import pytest

from proxy import proxyproto
from proxy.accept import listen
from proxy.config import ConfigError, parse_config
from proxy.proxyproto import HeaderError, ProxyHeader, parse_header, trusted

SIG = proxyproto.V2_SIGNATURE
ALL = -1  # (a header that is the whole input)


def v2(command: int = 1, family: int = 1, transport: int = 1, body: bytes = b"", length: int | None = None,
       version: int = 2) -> bytes:
    return SIG + bytes([version << 4 | command, family << 4 | transport]) + struct.pack(
        "!H", len(body) if length is None else length) + body


def v4_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)


def v6_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
            + struct.pack("!HH", sport, dport))


# ------------------------------------------------------------------ parsing: valid headers
@pytest.mark.parametrize("data, expected", [
    (b"PROXY TCP4 198.51.100.7 10.0.0.2 56324 1143\r\n",
     ProxyHeader(ALL, 1, ("198.51.100.7", 56324), ("10.0.0.2", 1143))),
    (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
     ProxyHeader(ALL, 1, ("255.255.255.255", 65535), ("255.255.255.255", 65535))),
    (b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n", ProxyHeader(ALL, 1, ("0.0.0.0", 0), ("0.0.0.0", 0))),
    (b"PROXY TCP6 2001:DB8::7 2001:db8::1 40000 993\r\n",
     ProxyHeader(ALL, 1, ("2001:db8::7", 40000), ("2001:db8::1", 993))),
    (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
     ProxyHeader(ALL, 1, ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                 ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535))),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(ALL, 1)),
    (b"PROXY UNKNOWN" + b" " * 92 + b"\r\n", ProxyHeader(ALL, 1)),  # 107 bytes: the longest line
    (b"PROXY UNKNOWN ffff:f...f:ffff whatever 1 2\r\n", ProxyHeader(ALL, 1)),  # the rest is ignored
    # the client's first bytes may come with the header: only the header is taken
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\na1 LOGIN x y\r\n", ProxyHeader(32, 1, ("1.2.3.4", 1), ("5.6.7.8", 2))),
    (v2(body=v4_block("198.51.100.7", "10.0.0.2", 56324, 1143)),
     ProxyHeader(28, 2, ("198.51.100.7", 56324), ("10.0.0.2", 1143))),
    (v2(family=2, body=v6_block("2001:db8::7", "2001:db8::1", 40000, 993)),
     ProxyHeader(52, 2, ("2001:db8::7", 40000), ("2001:db8::1", 993))),
    # TLVs after the addresses (HAProxy's unique id, SSL information ...) are skipped
    (v2(body=v4_block("1.2.3.4", "5.6.7.8", 1, 2) + b"\x05\x00\x03abc\x20\x00\x01\x00") + b"\x16\x03\x01",
     ProxyHeader(16 + 12 + 6 + 4, 2, ("1.2.3.4", 1), ("5.6.7.8", 2))),
    # LOCAL (the balancer's own health check): the connection's own addresses; the block is skipped
    (v2(command=0, family=0, transport=0), ProxyHeader(16, 2)),
    (v2(command=0, body=v4_block("1.2.3.4", "5.6.7.8", 1, 2)), ProxyHeader(28, 2)),
    # families and transports a TCP listener cannot use fall back to the connection's addresses
    (v2(family=0, transport=0, body=b"x" * 5), ProxyHeader(21, 2)),
    (v2(family=3, transport=1, body=b"\0" * 216), ProxyHeader(232, 2)),
    (v2(family=1, transport=2, body=v4_block("1.2.3.4", "5.6.7.8", 1, 2)), ProxyHeader(28, 2)),
])
def test_valid_headers(data: bytes, expected: ProxyHeader) -> None:
    if expected.length == ALL:
        expected = dataclasses.replace(expected, length=len(data))
    assert parse_header(data) == expected
    # any shorter prefix asks for more (never an early error, never a header too soon)
    for end in range(expected.length):
        assert parse_header(data[:end]) is None, end


# ------------------------------------------------------------------ parsing: invalid headers
@pytest.mark.parametrize("data", [
    b"a1 LOGIN alice secret\r\n",                     # an ordinary client's first line
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",            # case matters
    b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",           # exactly one space
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n",           # no leading zeros (octal confusion)
    b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n",        # the family announced
    b"PROXY TCP6 1.2.3.4 2001:db8::1 1 2\r\n",
    b"PROXY TCP6 fe80::1%eth0 2001:db8::1 1 2\r\n",   # no zone
    b"PROXY TCP6 2001:db8:::1 2001:db8::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",              # a bare LF
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",             # a bare CR
    b"PROXY TCP4 1.2.3.4\n5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xd9\xa1\r\n",     # not ASCII (an Arabic-Indic digit)
    b"PROXY UNKNOWN" + b" " * 93 + b"\r\n",           # 108 bytes: the CRLF ends past 107
    b"PROXY " + b"x" * 200,                           # no CRLF within 107 bytes
    v2(version=1, body=v4_block("1.2.3.4", "5.6.7.8", 1, 2)),
    v2(command=2, body=v4_block("1.2.3.4", "5.6.7.8", 1, 2)),
    v2(family=4, body=v4_block("1.2.3.4", "5.6.7.8", 1, 2)),
    v2(transport=3, body=v4_block("1.2.3.4", "5.6.7.8", 1, 2)),
    v2(body=v4_block("1.2.3.4", "5.6.7.8", 1, 2)[:11]),         # too short for two addresses and ports
    v2(family=2, body=v4_block("1.2.3.4", "5.6.7.8", 1, 2)),    # IPv6 needs 36 bytes
    v2(length=proxyproto.MAX_V2_LENGTH + 1),                     # over our bound: refused before it arrives
    SIG[:11] + b"X",
])
def test_invalid_headers(data: bytes) -> None:
    with pytest.raises(HeaderError):
        parse_header(data)


def test_error_messages_do_not_quote_the_input() -> None:
    for data in (b"a1 LOGIN alice secret\r\n", b"PROXY TCP4 secret 5.6.7.8 1 2\r\n"):
        with pytest.raises(HeaderError) as error:
            parse_header(data)
        assert b"secret" not in str(error.value).encode()


def test_incomplete_input_is_bounded() -> None:
    """None (read more) only while fewer bytes than the longest header have come."""
    assert parse_header(b"") is None and parse_header(b"PRO") is None and parse_header(SIG[:5]) is None
    assert parse_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r") is None
    assert parse_header(v2(length=proxyproto.MAX_V2_LENGTH) + b"x" * (proxyproto.MAX_V2_LENGTH - 1)) is None
    assert parse_header(v2(length=proxyproto.MAX_V2_LENGTH) + b"x" * proxyproto.MAX_V2_LENGTH).length \
        == proxyproto.MAX_HEADER


# ------------------------------------------------------------------ trust
@pytest.mark.parametrize("peer, networks, expected", [
    (("10.1.2.3", 5000), ["10.0.0.0/8"], True),
    (("11.1.2.3", 5000), ["10.0.0.0/8"], False),
    (("127.0.0.1", 5000), ["127.0.0.1"], True),
    (("127.0.0.2", 5000), ["127.0.0.1"], False),       # one loopback address is not all of them
    (("::ffff:10.1.2.3", 5000, 0, 0), ["10.0.0.0/8"], True),
    (("2001:db8::5", 5000, 0, 0), ["2001:db8::/64"], True),
    (("fe80::5%eth0", 5000, 0, 2), ["fe80::/64"], True),
    (("10.1.2.3", 5000), [], False),
    (None, ["10.0.0.0/8"], False),
    (("not an address", 1), ["10.0.0.0/8"], False),
])
def test_trusted(peer, networks, expected) -> None:
    assert trusted(peer, [ipaddress.ip_network(n) for n in networks]) is expected


# ------------------------------------------------------------------ config
BASE = {"identity": {"authority": "https://login.microsoftonline.com/organizations",
                     "client_id": "00000000-0000-0000-0000-000000000000"}, "accounts": [{"username": "a@b.de"}]}


def parse(**sections):
    return parse_config({**BASE, **sections}, base_dir=Path("."))


def test_config_off_by_default_and_per_section() -> None:
    config = parse(imap={"proxy_protocol": ["10.0.0.0/8", "127.0.0.1", "2001:db8::/64", "127.0.0.1"]},
                   pop3={"proxy_protocol": "10.0.0.5, 10.0.0.6"})
    assert config.imap.proxy_protocol == tuple(map(ipaddress.ip_network,
                                                   ["10.0.0.0/8", "127.0.0.1/32", "2001:db8::/64"]))
    assert config.smtp.proxy_protocol == ()
    assert config.pop3.proxy_protocol == (ipaddress.ip_network("10.0.0.5"), ipaddress.ip_network("10.0.0.6"))
    assert parse(smtp={"proxy_protocol": []}).smtp.proxy_protocol == ()


def test_config_from_the_environment(tmp_path: Path) -> None:
    from proxy.config import load_config
    path = tmp_path / "config.yaml"
    import yaml
    path.write_text(yaml.safe_dump(BASE))
    config = load_config(path, environ={"PROXY_SMTP_PROXY_PROTOCOL": "10.0.0.0/24,10.0.1.0/24"})
    assert config.smtp.proxy_protocol == (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("10.0.1.0/24"))


@pytest.mark.parametrize("value, message", [
    (True, "imap.proxy_protocol: expected a list of the load balancers' addresses or networks"),
    (5, "imap.proxy_protocol: expected a list"),
    ({"a": 1}, "imap.proxy_protocol: expected a list"),
    (["10.0.0.1/8"], "imap.proxy_protocol: 10.0.0.1/8 has bits set after its prefix length (did you mean "
                     "10.0.0.0/8, or the single address 10.0.0.1?)"),
    (["lb.example.net"], "give addresses, not host names"),
    ([None], "imap.proxy_protocol: expected addresses or networks"),
    (["0.0.0.0/0"], "would trust every address"),
    (["::/0"], "would trust every address"),
])
def test_config_errors_name_the_key(value, message) -> None:
    with pytest.raises(ConfigError) as error:
        parse(imap={"proxy_protocol": value})
    assert message in str(error.value)


def test_config_misspelt_key_gets_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"smtp\.proxy_protocl: unknown key \(did you mean proxy_protocol\?\)"):
        parse(smtp={"proxy_protocl": ["10.0.0.5"]})


# ------------------------------------------------------------------ the layer under real listeners
class Greeter(asyncio.Protocol):
    """A server that speaks first, like IMAP: greets with the peer it sees, then echoes."""

    made: list["Greeter"] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        Greeter.made.append(self)
        transport.write(f"* OK {self.peer[0]} {self.peer[1]}\r\n".encode())

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"echo " + data)


async def _read_line(reader: asyncio.StreamReader, timeout: float = 5) -> bytes:
    return await asyncio.wait_for(reader.readline(), timeout)


async def _connect(port: int, source: str = "127.0.0.1", ssl_context=None):
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, ssl=ssl_context, server_hostname="localhost"
                                         if ssl_context else None)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def greeter_trusting(network: str):
    """A plain listener of Greeters that trusts ``network``: (listener, port)."""
    Greeter.made = []
    server = await listen("IMAP", "127.0.0.1", 0, Greeter, proxy_protocol=lambda: (ipaddress.ip_network(network),))
    return server, server.sockets[0].getsockname()[1]


def test_trusted_balancer_header_gives_the_client_address_before_the_greeting() -> None:
    async def main():
        server, port = await greeter_trusting("127.0.0.1")
        try:
            # v1, with the client's first command in the same segment
            reader, writer = await _connect(port)
            await asyncio.sleep(0.2)
            assert not Greeter.made  # nothing greets before the header
            writer.write(b"PROXY TCP4 198.51.100.7 10.0.0.2 56324 1143\r\na1 NOOP\r\n")
            assert await _read_line(reader) == b"* OK 198.51.100.7 56324\r\n"
            assert await _read_line(reader) == b"echo a1 NOOP\r\n"
            writer.close()
            # v2, IPv6 client, byte by byte
            reader, writer = await _connect(port)
            for byte in v2(family=2, body=v6_block("2001:db8::7", "2001:db8::1", 40000, 993)):
                writer.write(bytes([byte]))
                await writer.drain()
            assert await _read_line(reader) == b"* OK 2001:db8::7 40000\r\n"
            assert Greeter.made[-1].transport.get_extra_info("peername") == ("2001:db8::7", 40000, 0, 0)
            writer.close()
            # v2 LOCAL (a health check): the balancer's own address
            reader, writer = await _connect(port)
            writer.write(v2(command=0, family=0, transport=0))
            line = await _read_line(reader)
            assert line.startswith(b"* OK 127.0.0.1 ") and line != b"* OK 127.0.0.1 56324\r\n"
            writer.close()
        finally:
            server.close()
    run(main())


def test_untrusted_address_header_is_ordinary_input_and_trusted_without_header_is_closed(monkeypatch) -> None:
    monkeypatch.setattr(proxyproto, "HEADER_TIMEOUT", 0.5)

    async def main():
        server, port = await greeter_trusting("127.0.0.1")
        try:
            # from 127.0.0.2 (not trusted): greeted at once with its own address; a header is data
            reader, writer = await _connect(port, source="127.0.0.2")
            line = await _read_line(reader)
            assert line.startswith(b"* OK 127.0.0.2 "), line
            writer.write(b"PROXY TCP4 198.51.100.7 10.0.0.2 56324 1143\r\n")
            assert await _read_line(reader) == b"echo PROXY TCP4 198.51.100.7 10.0.0.2 56324 1143\r\n"
            assert Greeter.made[-1].peer[0] == "127.0.0.2"
            writer.close()
            made = len(Greeter.made)
            # from 127.0.0.1 (trusted) without a header: closed, never greeted
            reader, writer = await _connect(port)
            writer.write(b"a1 LOGIN alice secret\r\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            # ... and silent: closed after the header timeout
            reader, writer = await _connect(port)
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert 0.4 < loop.time() - started < 3
            assert len(Greeter.made) == made
            assert server.rejections.total == 2
        finally:
            server.close()
    run(main())


def test_header_comes_before_the_tls_handshake(pki) -> None:
    """On an implicit-TLS listener the balancer passes TLS through: the header is in clear, first."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert_file, pki.key_file)
    client = ssl.create_default_context(cafile=str(pki.ca_file))

    async def main():
        server = await listen("IMAPS", "127.0.0.1", 0, Greeter, ssl=context, ssl_handshake_timeout=5,
                              proxy_protocol=lambda: (ipaddress.ip_network("127.0.0.0/8"),))
        port = server.sockets[0].getsockname()[1]
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(v2(body=v4_block("203.0.113.9", "10.0.0.2", 4242, 993)))
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock, ssl=client, server_hostname="localhost")
            assert await _read_line(reader) == b"* OK 203.0.113.9 4242\r\n"
            writer.close()
        finally:
            server.close()
    run(main())
