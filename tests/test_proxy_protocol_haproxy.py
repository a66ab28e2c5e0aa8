"""The PROXY protocol end to end: Debian's HAProxy (``send-proxy-v2`` and ``send-proxy``) in front of a
real `proxy serve` (tests/replicas.py's bed, one replica) with the test Dovecot and identity provider.

The proxy trusts 127.0.0.1 only (``proxy_protocol: [127.0.0.1]``), the address HAProxy connects
from. Clients bind their sockets to 127.0.0.2 and 127.0.0.3, which HAProxy reports in its header;
the log must then name each client by its own address *and port* (which only the header carries).

The per-source slow-down of password guessing counts every loopback address as one source (a
local attacker must not get a fresh counter by binding to 127.0.0.2), so loopback clients cannot
show that two clients are told apart. Two frontends therefore make HAProxy itself claim other
client addresses (``tcp-request connection set-src``: 198.51.100.7 over version 2, 2001:db8::8
over version 1), exactly as it would report real clients on a network; the proxy only sees the
headers. Without the PROXY protocol every one of them would be HAProxy's 127.0.0.1, one source.

The unit rows of the parser and the layer are in tests/test_proxyproto.py.
"""

from __future__ import annotations

import poplib
import smtplib
import socket
import ssl
import struct
import time
import uuid
from pathlib import Path

import pytest

from tests.harness import free_port, pop3_section
from tests.opsbed import sample, scrape
from tests.replicas import HAProxy, Replicas, Route

PASSWORD = "proxied password 1"
TRUSTED = ["127.0.0.1"]
GUESSER, COLLEAGUE = "198.51.100.7", "2001:db8::8"
ROUTES = (
    Route("imap_v2", "imap", "send-proxy-v2"),
    Route("imap_v1", "imap", "send-proxy"),
    Route("imaps_v2", "imaps", "send-proxy-v2"),
    Route("smtp_v2", "smtp", "send-proxy-v2"),
    Route("pop3_v1", "pop3", "send-proxy"),
    Route("guesser", "imap", "send-proxy-v2", (f"tcp-request connection set-src ipv4({GUESSER})",)),
    Route("colleague", "imap", "send-proxy", (f"tcp-request connection set-src ipv6({COLLEAGUE})",)),
)


class Bed:
    def __init__(self, replicas: Replicas, haproxy: HAProxy, account: str, imaps: int):
        self.replicas, self.haproxy, self.account, self.imaps = replicas, haproxy, account, imaps

    @property
    def direct(self) -> dict[str, int]:
        return {**self.replicas.ports(0), "imaps": self.imaps}

    def log(self) -> str:
        return "\n".join(text for _, text in self.replicas.log_texts())


@pytest.fixture(scope="module")
def bed(tmp_path_factory, idp, pki, dovecot):
    directory: Path = tmp_path_factory.mktemp("proxyproto")
    account = f"proxied-{uuid.uuid4().hex[:6]}@example.com"
    imaps = free_port()
    replicas = Replicas(directory / "replicas", idp=idp, pki=pki, dovecot=dovecot, accounts=[account], count=1,
                        tokens={"path": "tokens"}, log_level="INFO",
                        tls={"cert_file": str(pki.cert_file), "key_file": str(pki.key_file)},
                        imap={"tls_listen": f"127.0.0.1:{imaps}", "proxy_protocol": TRUSTED},
                        smtp={"proxy_protocol": TRUSTED},
                        pop3=pop3_section(dovecot, pki, proxy_protocol=TRUSTED))
    replicas.authorize(account, PASSWORD)
    replicas.start()
    haproxy = None
    try:
        haproxy = HAProxy(directory / "haproxy", [{**replicas.ports(0), "imaps": imaps}], routes=ROUTES).start()
        yield Bed(replicas, haproxy, account, imaps)
    finally:
        if haproxy is not None:
            haproxy.stop()
        replicas.stop()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.settimeout(20)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


class Pop3From(poplib.POP3):
    """poplib's client, connecting from the ``source`` address (which HAProxy puts in its header)."""

    def __init__(self, port: int, source: str):
        self.source = source
        super().__init__("127.0.0.1", port, timeout=20)

    def _create_socket(self, timeout):  # noqa: ANN001, ANN202
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


def imap_login(sock: socket.socket | ssl.SSLSocket, user: str, password: str) -> bytes:
    """Greeting, LOGIN, and the tagged answer (LOGOUT after a success)."""
    with sock.makefile("rb") as reader:  # (closed, or it would keep the connection open)
        greeting = reader.readline()
        assert greeting.startswith(b"* OK"), greeting
        sock.sendall(f'a LOGIN {user} "{password}"\r\n'.encode())
        line = reader.readline()
        while line.startswith(b"* "):
            line = reader.readline()
        if line.startswith(b"a OK"):
            sock.sendall(b"b LOGOUT\r\n")
            while (more := reader.readline()) and not more.startswith(b"b OK"):
                pass
        return line


def wait_for_log(bed: Bed, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = bed.log()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the proxy's log:\n{bed.log()[-3000:]}")


def test_the_proxy_sees_each_clients_own_address_through_haproxy(bed: Bed, pki) -> None:
    ports = bed.haproxy.ports
    seen = []
    for route, source in (("imap_v2", "127.0.0.2"), ("imap_v1", "127.0.0.3")):
        with connect(ports[route], source) as sock:
            peer = f"{source}:{sock.getsockname()[1]}"
            assert imap_login(sock, bed.account, PASSWORD).startswith(b"a OK")
        seen.append(f"imap {peer} login {bed.account} ok")
    # implicit TLS: HAProxy passes TLS through; the header comes before the handshake
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    with connect(ports["imaps_v2"], "127.0.0.2") as raw:
        peer = f"127.0.0.2:{raw.getsockname()[1]}"
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            assert imap_login(sock, bed.account, PASSWORD).startswith(b"a OK")
    seen.append(f"imap {peer} session start (TLS)")
    seen.append(f"imap {peer} login {bed.account} ok")
    # SMTP: aiosmtpd greets in connection_made, which only comes after the header
    with smtplib.SMTP("127.0.0.1", ports["smtp_v2"], source_address=("127.0.0.3", 0), timeout=20) as smtp:
        peer = f"127.0.0.3:{smtp.sock.getsockname()[1]}"
        smtp.login(bed.account, PASSWORD)
    seen.append(f"smtp {peer} login {bed.account} ok")
    # POP3 (version 1 header): the same listener code, its own greeting after the header
    pop = Pop3From(ports["pop3_v1"], "127.0.0.2")
    peer = f"127.0.0.2:{pop.sock.getsockname()[1]}"
    pop.user(bed.account)
    assert pop.pass_(PASSWORD).startswith(b"+OK")
    pop.quit()
    seen.append(f"pop3 {peer} login {bed.account} ok")
    log = wait_for_log(bed, seen[-1])
    for line in seen:  # (HAProxy connects from 127.0.0.1, from ports of its own)
        assert line in log, line


def test_a_guesser_does_not_slow_down_another_clients_login(bed: Bed) -> None:
    ports = bed.haproxy.ports
    for attempt in range(3):  # the guesser's source counter: 0.5, 1, 2 s
        with connect(ports["guesser"]) as sock:
            assert imap_login(sock, f"guess{attempt}@example.com", "guess").startswith(b"a NO")
    log = wait_for_log(bed, "(answered after 2.0 s more)")
    guesses = [l for l in log.splitlines() if f"imap {GUESSER} login " in l and " failed: " in l]
    assert [l.rsplit("(answered after ", 1)[-1] for l in guesses] == ["0.5 s more)", "1.0 s more)", "2.0 s more)"]
    # The colleague (another address, behind the same balancer) mistypes its password: answered
    # after its own first delay (0.5 s), not the guesser's next one (4 s); then it logs in.
    with connect(ports["colleague"]) as sock:
        started = time.monotonic()
        assert imap_login(sock, bed.account, "mistyped").startswith(b"a NO")
        answered = time.monotonic() - started
    with connect(ports["colleague"]) as sock:
        started = time.monotonic()
        assert imap_login(sock, bed.account, PASSWORD).startswith(b"a OK")
        logged_in = time.monotonic() - started
    log = wait_for_log(bed, f"imap {COLLEAGUE}:")  # (failures name the source, sessions its port too)
    mistyped = [l for l in log.splitlines() if f"imap {COLLEAGUE} login " in l and " failed: " in l]
    assert len(mistyped) == 1 and mistyped[0].endswith("(answered after 0.5 s more)"), mistyped
    assert answered < 3.0 and logged_in < 3.0, (answered, logged_in)
    # and the guesser's next failure still waits its 4 s
    with connect(ports["guesser"]) as sock:
        started = time.monotonic()
        assert imap_login(sock, "guess3@example.com", "guess").startswith(b"a NO")
        assert time.monotonic() - started >= 3.5


def test_a_header_from_an_untrusted_address_is_only_bad_input(bed: Bed) -> None:
    """127.0.0.2 is not a trusted balancer: it is greeted at once, and its headers are commands."""
    claimed = "203.0.113.66"
    v1 = f"PROXY TCP4 {claimed} 127.0.0.1 4000 143\r\n".encode()
    v2 = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + socket.inet_aton(claimed) + socket.inet_aton("127.0.0.1")
          + struct.pack("!HH", 4000, 143))
    for header in (v1, v2):
        with connect(bed.direct["imap"], "127.0.0.2") as sock, sock.makefile("rb") as reader:
            own = f"127.0.0.2:{sock.getsockname()[1]}"
            assert reader.readline().startswith(b"* OK")  # greeted before sending anything
            sock.sendall(header + b'\r\na LOGIN nobody@example.com "wrong"\r\n')  # (CRLF: v2 is binary)
            line = reader.readline()
            while not line.startswith(b"a "):
                assert line, "closed"
                line = reader.readline()
            assert line.startswith(b"a NO")
        wait_for_log(bed, f"imap {own} session end")
    failures = [l for l in bed.log().splitlines() if " login <unknown user name" in l]
    assert [l.split(" login ", 1)[0].rsplit(" ", 2)[-2:] for l in failures[-2:]] == [["imap", "127.0.0.2"]] * 2
    with smtplib.SMTP("127.0.0.1", bed.direct["smtp"], source_address=("127.0.0.2", 0), timeout=20) as smtp:
        assert smtp.docmd(v1.decode().strip())[0] == 500
        assert smtp.noop()[0] == 250
    assert claimed not in bed.log()


def test_a_trusted_address_without_a_header_is_closed(bed: Bed) -> None:
    """From 127.0.0.1 (the balancer's address) a connection must start with a header: one that
    sends a command instead is closed at once, a silent one after 5 s; neither is ever greeted."""
    for listener in ("imap", "smtp", "imaps"):
        with connect(bed.direct[listener]) as sock:
            sock.sendall(b"a1 LOGIN alice secret\r\n" if listener != "imaps" else b"\x16\x03\x01\x00\x05hello")
            assert sock.recv(100) == b""
    with connect(bed.direct["imap"]) as sock:
        started = time.monotonic()
        assert sock.recv(100) == b""
        assert 4.5 <= time.monotonic() - started < 9
    log = wait_for_log(bed, "(a trusted load balancer: proxy_protocol) closed")
    assert "secret" not in log
    metrics = scrape(bed.direct["admin"])
    assert [sample(metrics, "proxy_proxy_protocol_refused_total", listener=name) for name in ("imap", "imaps", "smtp")] \
        == [2, 1, 1]
