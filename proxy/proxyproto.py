"""The PROXY protocol (HAProxy's ``send-proxy`` / ``send-proxy-v2``): a load balancer in front of the
proxy tells it the real client's address in a header before the client's first byte.

Trust is per listener section (``imap.proxy_protocol``, ``smtp.…``, ``pop3.…``): a list of the
balancers' addresses or networks. A connection **from a trusted address must** start with a valid
header (it is closed otherwise: without one the balancer's address would stand for every client
behind it); a connection from **any other address** is an ordinary client, whose bytes go to the
protocol unread, so a header from it is just bad input (an IMAP ``BAD``, an SMTP ``500``) and its
claimed address is never used. Never guessing whether a header is present is what the
specification asks (haproxy's doc/proxy-protocol.txt, section 2): otherwise anyone could claim any
address.

Two parts:

- :func:`parse_header`: pure and bounded (107 bytes for version 1, :data:`MAX_V2_LENGTH` for
  version 2), in the style of :mod:`proxy.imap.core`; fuzzed (tests/fuzz_targets.py).
- :class:`ProxyHeaderLayer`: an asyncio protocol put under each connection of a listener that has
  trusted balancers (:mod:`proxy.accept`), before the TLS layer of an implicit-TLS listener (the
  header comes before the TLS handshake). It reads the header within :data:`HEADER_TIMEOUT`
  seconds, *before* the protocol above greets (IMAP, POP3 and SMTP servers speak first), makes the
  client's address the transport's ``peername`` (so the log, the throttle of password guessing
  and everything else see the client), and then steps aside: the transport talks to the protocol
  above directly, so a session costs nothing more afterwards.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

from .metrics import METRICS

log = logging.getLogger("proxy")

V1_PREFIX = b"PROXY "
V1_MAX = 107                       # the longest version 1 line, CRLF included (the specification's bound)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V2_LENGTH = 1024               # address and TLV bytes after the 16-byte header we accept (ours, not the spec's)
MAX_HEADER = 16 + MAX_V2_LENGTH    # the most bytes a header can take
HEADER_TIMEOUT = 5.0               # seconds a trusted balancer has to send the header after connecting
LOG_INTERVAL = 60.0                # at most one warning per listener per this many seconds

_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
_V1_IPV4 = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_V1_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class HeaderError(ValueError):
    """Not a valid PROXY protocol header (the message says why; it never quotes the input)."""


@dataclass(frozen=True)
class ProxyHeader:
    """A complete header: ``length`` bytes of the input; ``source`` is the client's (address, port),
    or None where the connection's own addresses stand (v2 LOCAL: the balancer's health check;
    v1 UNKNOWN; families the proxy does not use: AF_UNIX, AF_UNSPEC, datagrams)."""

    length: int
    version: int
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def parse_header(data: bytes) -> ProxyHeader | None:
    """The PROXY header at the start of ``data``; None if ``data`` is a prefix of one (read more).

    Raises :class:`HeaderError` as soon as ``data`` cannot start a valid header. Looks at no more
    than :data:`MAX_HEADER` bytes; None only while fewer than that have arrived.
    """
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    if V2_SIGNATURE.startswith(data[:len(V2_SIGNATURE)]) or V1_PREFIX.startswith(data[:len(V1_PREFIX)]):
        return None  # (the empty input too)
    raise HeaderError("no PROXY protocol header (neither version 1 nor version 2)")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    head = data[:V1_MAX]
    match = re.search(rb"[\r\n]", head)  # (the line holds neither: the first one must start its CRLF)
    if match is None:
        if len(head) >= V1_MAX:
            raise HeaderError(f"version 1 header without CRLF in its first {V1_MAX} bytes")
        return None
    end = match.start()
    if head[end:end + 2] != b"\r\n":
        if head[end:] == b"\r" and len(head) < V1_MAX:
            return None  # (the LF may yet come)
        raise HeaderError("version 1 header ended by a bare CR or LF")
    try:
        line = head[:end].decode("ascii")
    except UnicodeDecodeError:
        raise HeaderError("version 1 header with bytes that are not ASCII") from None
    parts = line.split(" ")
    if parts[1:2] == ["UNKNOWN"]:  # the rest of the line is ignored (the specification says so)
        return ProxyHeader(end + 2, 1)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise HeaderError("version 1 header: expected PROXY TCP4|TCP6 <source> <destination> <port> <port>")
    family = parts[1]
    source = _v1_address(parts[2], family)
    destination = _v1_address(parts[3], family)
    ports = []
    for text in parts[4:6]:
        if not _V1_PORT.fullmatch(text) or int(text) > 65535:
            raise HeaderError("version 1 header with an invalid port")
        ports.append(int(text))
    return ProxyHeader(end + 2, 1, (source, ports[0]), (destination, ports[1]))


def _v1_address(text: str, family: str) -> str:
    """An address of a version 1 line in the canonical form it must have (no leading zeros, no
    zone, the family announced)."""
    try:
        if family == "TCP4":
            if not _V1_IPV4.fullmatch(text):
                raise ValueError
            return str(ipaddress.IPv4Address(text))
        if not _V1_IPV6.fullmatch(text):
            raise ValueError
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise HeaderError(f"version 1 header with an invalid {'IPv4' if family == 'TCP4' else 'IPv6'} address") \
            from None


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    family, transport = data[13] >> 4, data[13] & 0x0F
    (length,) = struct.unpack_from("!H", data, 14)
    if version != 2:
        raise HeaderError(f"version 2 header with version {version}")
    if command not in (0, 1):
        raise HeaderError(f"version 2 header with an unknown command {command}")
    if family > 3 or transport > 2:
        raise HeaderError("version 2 header with an unknown address family or transport")
    if length > MAX_V2_LENGTH:
        raise HeaderError(f"version 2 header of {length} bytes after its first 16 (at most {MAX_V2_LENGTH})")
    if len(data) < 16 + length:
        return None
    body = data[16:16 + length]
    if command == 0 or transport != 1 or family not in (1, 2):
        # LOCAL (the balancer's own connection, e.g. a health check), or what a TCP listener
        # cannot use (UNSPEC, AF_UNIX, datagrams): the connection's own addresses stand, and
        # the address block and any TLVs are skipped.
        return ProxyHeader(16 + length, 2)
    size = 4 if family == 1 else 16
    if length < 2 * size + 4:
        raise HeaderError(f"version 2 header: {length} bytes are too few for two "
                          f"{'IPv4' if family == 1 else 'IPv6'} addresses and ports")
    make = ipaddress.IPv4Address if family == 1 else ipaddress.IPv6Address
    source, destination = make(body[:size]), make(body[size:2 * size])
    source_port, destination_port = struct.unpack_from("!HH", body, 2 * size)
    # (What follows, up to ``length``, are TLVs: skipped, nothing in them is used.)
    return ProxyHeader(16 + length, 2, (str(source), source_port), (str(destination), destination_port))


# ------------------------------------------------------------------------------ trust
def trusted(peer: Any, networks: Sequence[Network]) -> bool:
    """Whether ``peer`` (a transport's ``peername``) is one of the balancers in ``networks``."""
    if not networks or not isinstance(peer, tuple) or not peer:
        return False
    try:
        address = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def peername(source: tuple[str, int]) -> tuple:
    """``source`` in the shape a socket's getpeername() has for its family."""
    host, port = source
    return (host, port, 0, 0) if ":" in host else (host, port)


# ------------------------------------------------------------------------------ the layer
class Rejections:
    """Connections from a trusted balancer closed for a missing or invalid header: counted, and
    logged at most once per :data:`LOG_INTERVAL` per listener (a balancer sending no header at all
    would otherwise write a line per connection)."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic):
        self.name, self.clock = name, clock
        self.total = 0
        self._since_log = 0
        self._logged_at: float | None = None

    def note(self, peer: Any, reason: str) -> None:
        self.total += 1
        METRICS.proxy_protocol_refused.labels(self.name.lower()).inc()
        self._since_log += 1
        now = self.clock()
        if self._logged_at is None or now - self._logged_at >= LOG_INTERVAL:
            first = self._logged_at is None
            self._logged_at = now
            count, self._since_log = self._since_log, 0
            host = peer[0] if isinstance(peer, tuple) and peer else "?"
            log.warning("%s: connection from %s (a trusted load balancer: proxy_protocol) closed: %s; %d such "
                        "connection(s) %s. Does the balancer send the PROXY protocol (HAProxy: send-proxy-v2 "
                        "on each server line)?", self.name, host, reason, count,
                        "so far" if first else f"in the last {LOG_INTERVAL:.0f} s")


class ProxyHeaderLayer(asyncio.Protocol):
    """Under ``app`` on one accepted connection: from a trusted balancer (in ``networks``), read
    the PROXY header, then connect ``app``; from anyone else, connect ``app`` at once.

    ``app`` is only connected (``connection_made``) once the header was read: nothing is sent to
    the client before (no greeting, no TLS handshake), and a connection closed before never
    reaches ``app``. The client's address replaces the transport's ``peername``; bytes that came
    with the header go to ``app`` as its first data.
    """

    def __init__(self, app: asyncio.BaseProtocol, networks: Sequence[Network],
                 rejections: Rejections, timeout: float | None = None):
        self.app = app
        self._networks = networks
        self._rejections = rejections
        self._timeout = HEADER_TIMEOUT if timeout is None else timeout
        self._buffer = b""
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._peer: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._peer = transport.get_extra_info("peername")
        if not trusted(self._peer, self._networks):
            self._hand_over(b"")  # an ordinary client: whatever it sends is the protocol's input
            return
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expired)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            header = parse_header(self._buffer)
        except HeaderError as exc:
            self._reject(str(exc))
            return
        if header is None:
            return
        rest, self._buffer = self._buffer[header.length:], b""
        if header.source is not None and not _set_peername(self._transport, peername(header.source)):
            self._reject("the event loop's transports cannot take the client's address")
            return
        self._hand_over(rest)

    def eof_received(self) -> bool:
        if self._buffer:
            self._reject("the connection ended in the middle of a PROXY protocol header")
        else:  # (a balancer's TCP health check connects and closes: nothing to report)
            self._cancel_timer()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()  # (``app`` was never connected: it hears nothing)

    def _expired(self) -> None:
        self._timer = None
        self._reject(f"no PROXY protocol header within {self._timeout:g} s")

    def _reject(self, reason: str) -> None:
        self._cancel_timer()
        self._buffer = b""
        if self._transport is not None and not self._transport.is_closing():
            self._rejections.note(self._peer, reason)
            self._transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _hand_over(self, rest: bytes) -> None:
        self._cancel_timer()
        transport, app = self._transport, self.app
        transport.set_protocol(app)  # from now on the transport calls ``app`` directly
        app.connection_made(transport)
        if rest and not transport.is_closing():
            feed(app, rest)


def _set_peername(transport: Any, peer: tuple) -> bool:
    """Make ``peer`` the transport's ``peername`` (asyncio's selector and proactor transports
    keep their extra information in ``_extra``; a transport without it cannot take it: the
    connection is then refused, never served under the balancer's address)."""
    extra = getattr(transport, "_extra", None)
    if not isinstance(extra, dict):
        return False
    extra["peername"] = peer
    return True


def feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Deliver ``data`` to ``protocol`` as its transport would (buffered protocols included)."""
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buffer = protocol.get_buffer(len(view))
            n = min(len(buffer), len(view))
            if not n:
                raise RuntimeError("get_buffer() returned an empty buffer")
            buffer[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
    else:
        protocol.data_received(data)  # type: ignore[attr-defined]
