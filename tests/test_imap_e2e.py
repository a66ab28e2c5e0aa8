"""End to end, IMAP: `proxy authorize` through its real code path, then `proxy serve`, then
ordinary IMAP clients (imaplib, aioimaplib) logging in with a password, against a real Dovecot
that validates XOAUTH2 tokens with the local identity provider."""

from __future__ import annotations

import asyncio
import concurrent.futures
import imaplib
import json
import socket
import time
import uuid

import aioimaplib
import pytest
import yaml

from tests.harness import ProxyProcess, TcpForwarder, authorize, cpu_seconds, rss_kib, write_config

PASSWORD = "local password 1"
UTF8_PASSWORD = "Pässwörter für Kanzlei"


def message(subject: str, body: bytes = b"Hello from the test.\r\n") -> bytes:
    return (f"From: sender@example.com\r\nTo: someone@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@example.com>\r\n\r\n").encode() + body


class Bridge:
    """One configured, authorized, running proxy for the accounts of one test."""

    def __init__(self, tmp_path, idp, pki, dovecot, users, **sections):
        self.tmp_path, self.idp, self.pki, self.dovecot = tmp_path, idp, pki, dovecot
        self.users = users
        self.config = write_config(tmp_path, idp=idp, pki=pki, dovecot=dovecot, accounts=users, **sections)
        self.proxy: ProxyProcess | None = None

    def authorize(self, user: str, password: str = PASSWORD, **kw):
        result = authorize(self.config, user, password, self.pki, **kw)
        assert result.returncode == 0, result.stderr
        return result

    def start(self) -> "Bridge":
        self.proxy = ProxyProcess(self.config, self.pki)
        return self

    def restart(self) -> None:
        self.proxy.stop()
        self.start()

    def imap(self) -> imaplib.IMAP4:
        return imaplib.IMAP4("127.0.0.1", self.proxy.imap_port, timeout=40)

    def token_file(self, user: str):
        return self.tmp_path / "tokens" / f"{user}.tokens"


@pytest.fixture
def bridge_factory(tmp_path, idp_reset, pki, dovecot):
    bridges = []

    def make(*users, **sections):
        bridge = Bridge(tmp_path / f"b{len(bridges)}", idp_reset, pki, dovecot, list(users), **sections)
        bridges.append(bridge)
        return bridge

    yield make
    for bridge in bridges:
        if bridge.proxy:
            bridge.proxy.stop()


def user(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}@example.com"


def issued_secrets(idp) -> list[str]:
    return idp.issued_tokens()


def assert_no_secrets(text: str, idp, *passwords: str) -> None:
    for secret in [*issued_secrets(idp), *passwords]:
        assert secret not in text


# ---------------------------------------------------------------------------------- the README flow
def test_authorize_then_read_mail_with_imaplib(bridge_factory, dovecot, idp_reset):
    alice = user("alice")
    bridge = bridge_factory(alice)
    result = bridge.authorize(alice)
    browser_log = (bridge.config.parent / "browser.log").read_text()
    assert "/oauth2/v2.0/authorize 200" in browser_log          # the sign-in page was shown
    assert "POST http://localhost:" in browser_log                # the form_post reached our listener
    assert idp_reset.count("token:authorization_code") == 1
    assert "Authorized" in result.stderr
    raw = bridge.token_file(alice).read_bytes()
    assert_no_secrets(raw.decode(), idp_reset, PASSWORD)       # sealed at rest
    assert json.loads(raw)["meta"]["has_refresh_token"] is True

    stored = message("first", b"Line one\r\n.dot line\r\n\xc3\xa4 8-bit\r\n")
    dovecot.deliver(alice, stored)
    bridge.start()
    imap = bridge.imap()
    assert b"IMAP4rev1" in imap.welcome
    typ, data = imap.login(alice, PASSWORD)
    assert typ == "OK"
    assert data[0].startswith(b"[CAPABILITY IMAP4rev1") and b"IDLE" in data[0]   # upstream's own list
    assert "IDLE" in imap.capability()[1][0].decode()              # relayed to Dovecot from here on
    assert imap.select("INBOX") == ("OK", [b"1"])
    typ, data = imap.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK" and data[0][1] == stored                   # byte for byte
    assert imap.logout()[0] == "BYE"
    for _ in range(3):
        imap = bridge.imap()
        imap.login(alice, PASSWORD)
        imap.logout()
    log = bridge.proxy.log_text()
    assert log.count(f"login {alice} ok") == 4
    assert log.count(f"account {alice} unlocked") == 1           # the key is derived once per process
    assert_no_secrets(log, idp_reset, PASSWORD)


def test_aioimaplib_fetch_and_idle(bridge_factory, dovecot):
    bob = user("bob")
    bridge = bridge_factory(bob)
    bridge.authorize(bob)
    first = message("one")
    dovecot.deliver(bob, first)
    bridge.start()

    async def session():
        client = aioimaplib.IMAP4(host="127.0.0.1", port=bridge.proxy.imap_port, timeout=30)
        await client.wait_hello_from_server()
        assert (await client.login(bob, PASSWORD)).result == "OK"
        assert (await client.select("INBOX")).result == "OK"
        response = await client.fetch("1", "(BODY.PEEK[])")
        assert response.result == "OK"
        assert bytes(response.lines[1]) == first
        idle = await client.idle_start(timeout=20)
        await asyncio.get_running_loop().run_in_executor(None, dovecot.deliver, bob, message("two"))
        pushed = []
        for _ in range(5):
            pushed += await client.wait_server_push(timeout=15)
            if any(b"EXISTS" in (line if isinstance(line, bytes) else line.encode()) for line in pushed):
                break
        client.idle_done()
        assert (await asyncio.wait_for(idle, 15)).result == "OK"
        assert any(b"2 EXISTS" in (line if isinstance(line, bytes) else line.encode()) for line in pushed)
        assert (await client.logout()).result == "OK"

    asyncio.run(session())


def test_authenticate_plain_and_pipelined_commands(bridge_factory):
    carol, chris = user("carol"), user("chris")
    bridge = bridge_factory(carol, chris)
    bridge.authorize(carol)
    bridge.authorize(chris, UTF8_PASSWORD)
    bridge.start()
    imap = bridge.imap()
    assert imap.authenticate("PLAIN", lambda _: f"\0{chris}\0{UTF8_PASSWORD}".encode())[0] == "OK"
    imap.logout()
    # LOGIN followed at once by SELECT in the same packet: SELECT must reach the upstream after login.
    with socket.create_connection(("127.0.0.1", bridge.proxy.imap_port), timeout=20) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b'a LOGIN "%s" {%d+}\r\n%s\r\nb SELECT INBOX\r\nc LOGOUT\r\n' % (
            carol.encode(), len(PASSWORD.encode()), PASSWORD.encode()))
        lines = []
        while not lines or not lines[-1].startswith(b"c "):
            line = reader.readline()
            assert line, b"".join(lines)
            lines.append(line)
    tagged = [line.split(b" ")[:2] for line in lines if line[:2] in (b"a ", b"b ", b"c ")]
    assert tagged == [[b"a", b"OK"], [b"b", b"OK"], [b"c", b"OK"]]


# ---------------------------------------------------------------------------------- wrong input
def test_wrong_password_unknown_user_and_unauthorized_account(bridge_factory):
    dave, erin = user("dave"), user("erin")
    bridge = bridge_factory(dave, erin)
    bridge.authorize(dave)
    before = bridge.token_file(dave).read_bytes()
    bridge.start()
    for login, password, expected in ((dave, "Not-The-Password-42", "AUTHENTICATIONFAILED"),
                                      ("nobody@example.com", PASSWORD, "AUTHENTICATIONFAILED"),
                                      (erin, PASSWORD, "proxy authorize")):
        imap = bridge.imap()
        with pytest.raises(imaplib.IMAP4.error) as info:
            imap.login(login, password)
        assert expected in str(info.value)
        imap.shutdown()
    assert bridge.token_file(dave).read_bytes() == before       # never damaged by a wrong password
    imap = bridge.imap()
    assert imap.login(dave, PASSWORD)[0] == "OK"
    imap.logout()
    assert "Not-The-Password-42" not in bridge.proxy.log_text()


def test_repeated_wrong_passwords_are_slowed_down(bridge_factory):
    frank = user("frank")
    bridge = bridge_factory(frank)
    bridge.authorize(frank)
    bridge.start()
    durations = []
    imap = bridge.imap()
    for attempt in range(4):
        started = time.monotonic()
        with pytest.raises(imaplib.IMAP4.error):
            imap.login(frank, f"guess {attempt}")
        durations.append(time.monotonic() - started)
    imap.shutdown()
    assert durations[-1] > durations[0] + 1.0   # 0.5 s, 1 s, 2 s, 4 s
    imap = bridge.imap()
    assert imap.login(frank, PASSWORD)[0] == "OK"  # never locked out
    imap.logout()


# ---------------------------------------------------------------------------------- token refresh
def test_logins_keep_working_past_token_expiry(bridge_factory, idp_reset):
    idp_reset.set_access_token_lifetime(5)
    gina = user("gina")
    bridge = bridge_factory(gina)
    bridge.authorize(gina)
    bridge.start()
    imap = bridge.imap()
    imap.login(gina, PASSWORD)
    imap.logout()
    idp_reset.reset_counters()
    time.sleep(9)                                       # past the 5 s lifetime, twice
    assert idp_reset.count("token:refresh_token") >= 2  # refreshed ahead of expiry, in the background
    imap = bridge.imap()
    assert imap.login(gina, PASSWORD)[0] == "OK"
    imap.select("INBOX")
    imap.logout()
    assert_no_secrets(bridge.proxy.log_text(), idp_reset, PASSWORD)


def test_ten_simultaneous_logins_share_one_refresh(bridge_factory, idp_reset):
    idp_reset.set_access_token_lifetime(5)
    hank = user("hank")
    bridge = bridge_factory(hank)
    bridge.authorize(hank)
    time.sleep(6)                                       # the stored access token has expired
    bridge.start()
    idp_reset.reset_counters()

    def login_once(_):
        imap = bridge.imap()
        try:
            return imap.login(hank, PASSWORD)[0]
        finally:
            imap.shutdown()

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(login_once, range(10)))
    assert results == ["OK"] * 10
    assert idp_reset.count("token:refresh_token") == 1


def test_token_refused_upstream_is_refreshed_once_and_retried(bridge_factory, idp_reset):
    ivan = user("ivan")
    bridge = bridge_factory(ivan)
    bridge.authorize(ivan)
    bridge.start()
    imap = bridge.imap()
    imap.login(ivan, PASSWORD)
    imap.logout()
    idp_reset.expire_access_tokens()   # the broker still believes its token valid for an hour
    idp_reset.reset_counters()
    imap = bridge.imap()
    assert imap.login(ivan, PASSWORD)[0] == "OK"
    imap.logout()
    assert idp_reset.count("token:refresh_token") == 1
    assert idp_reset.count("introspect:inactive") >= 1


def test_revoked_authorization_names_proxy_authorize_without_retry_storm(bridge_factory, idp_reset):
    judy = user("judy")
    bridge = bridge_factory(judy)
    bridge.authorize(judy)
    bridge.start()
    imap = bridge.imap()
    imap.login(judy, PASSWORD)
    imap.logout()
    idp_reset.revoke(judy)
    idp_reset.reset_counters()
    for _ in range(3):
        imap = bridge.imap()
        with pytest.raises(imaplib.IMAP4.error) as info:
            imap.login(judy, PASSWORD)
        assert "AUTHENTICATIONFAILED" in str(info.value) and f"proxy authorize {judy}" in str(info.value)
        imap.shutdown()
    assert idp_reset.count("token:refresh_token") == 1          # marked dead, not retried
    meta = json.loads(bridge.token_file(judy).read_text())["meta"]
    assert meta["state"] == "needs_authorization"                # marked, not deleted
    bridge.authorize(judy)                                       # re-authorizing fixes it, no restart
    imap = bridge.imap()
    assert imap.login(judy, PASSWORD)[0] == "OK"
    imap.logout()


# ---------------------------------------------------------------------------------- faults and deadlines
def test_identity_provider_down_or_hanging(bridge_factory, idp_reset):
    kim, leo = user("kim"), user("leo")
    link = TcpForwarder(idp_reset.host, idp_reset.port)    # the proxy's only way to the provider
    bridge = bridge_factory(kim, leo, limits={"login_timeout": 6},
                            identity={"authority": f"https://127.0.0.1:{link.port}/test-tenant"})
    try:
        bridge.authorize(kim)
        idp_reset.set_access_token_lifetime(4)
        bridge.authorize(leo)
        time.sleep(5)                                # leo's access token has expired, kim's is valid
        bridge.start()
        link.stop()                                  # provider down: connection refused
        imap = bridge.imap()
        assert imap.login(kim, PASSWORD)[0] == "OK"    # a valid token needs no identity provider
        imap.logout()
        imap = bridge.imap()
        started = time.monotonic()
        with pytest.raises(imaplib.IMAP4.error) as info:
            imap.login(leo, PASSWORD)
        assert "UNAVAILABLE" in str(info.value) and time.monotonic() - started < 6.5
        imap.shutdown()
        link.start()
        idp_reset.set_fault("hang")                  # provider up but never answering
        time.sleep(3)                                # let the refresh backoff pass
        imap = bridge.imap()
        started = time.monotonic()
        with pytest.raises(imaplib.IMAP4.error) as info:
            imap.login(leo, PASSWORD)
        assert "UNAVAILABLE" in str(info.value)
        assert time.monotonic() - started < 6.5       # the login deadline, not the provider, decides
        imap.shutdown()
        imap = bridge.imap()
        assert imap.login(kim, PASSWORD)[0] == "OK"   # the proxy keeps serving meanwhile
        imap.logout()
        idp_reset.clear_faults()
        deadline = time.monotonic() + 30
        while True:                                    # recovers by itself
            imap = bridge.imap()
            try:
                if imap.login(leo, PASSWORD)[0] == "OK":
                    imap.logout()
                    break
            except imaplib.IMAP4.error:
                imap.shutdown()
                assert time.monotonic() < deadline
                time.sleep(1)
    finally:
        link.stop()


@pytest.mark.parametrize("fault, recovery", [("429", 30), ("503", 30),
                                             ("500", 80)])  # no Retry-After: msal pauses 60 s itself
def test_provider_errors_fail_fast_and_back_off(bridge_factory, idp_reset, fault, recovery):
    pat = user("pat")
    idp_reset.set_access_token_lifetime(3)
    bridge = bridge_factory(pat)
    bridge.authorize(pat)
    time.sleep(4)                                    # the stored token has expired
    bridge.start()
    idp_reset.set_fault(fault, retry_after=3)      # msal honours Retry-After itself
    idp_reset.reset_counters()
    for _ in range(8):                               # a client retrying in a loop
        imap = bridge.imap()
        started = time.monotonic()
        with pytest.raises(imaplib.IMAP4.error) as info:
            imap.login(pat, PASSWORD)
        assert "UNAVAILABLE" in str(info.value) and time.monotonic() - started < 5
        imap.shutdown()
        time.sleep(0.25)
    assert idp_reset.count("token:refresh_token") <= 3    # backed off, not one request per login (8 tried)
    idp_reset.clear_faults()
    deadline = time.monotonic() + recovery
    while True:                                      # comes back by itself
        imap = bridge.imap()
        try:
            imap.login(pat, PASSWORD)
            imap.logout()
            break
        except imaplib.IMAP4.error:
            imap.shutdown()
            assert time.monotonic() < deadline
            time.sleep(1)
    assert_no_secrets(bridge.proxy.log_text(), idp_reset, PASSWORD)


def test_upstream_that_never_answers_gets_unavailable_within_deadline(bridge_factory, tmp_path):
    mia = user("mia")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)                                # accepts TCP, never speaks TLS
    try:
        bridge = bridge_factory(mia, imap={"upstream": f"127.0.0.1:{silent.getsockname()[1]}"},
                                limits={"login_timeout": 3})
        bridge.authorize(mia)
        bridge.start()
        imap = bridge.imap()
        started = time.monotonic()
        with pytest.raises(imaplib.IMAP4.error) as info:
            imap.login(mia, PASSWORD)
        assert "UNAVAILABLE" in str(info.value) and time.monotonic() - started < 4
        imap.shutdown()
    finally:
        silent.close()


def test_upstream_certificate_not_trusted(bridge_factory, dovecot, pki, tmp_path):
    ned = user("ned")
    bridge = bridge_factory(ned)
    bridge.authorize(ned)
    data = yaml.safe_load(bridge.config.read_text())
    del data["imap"]["ca_file"]         # the IMAP upstream's CA is no longer trusted
    bridge.config.write_text(yaml.safe_dump(data))
    bridge.start()
    imap = bridge.imap()
    with pytest.raises(imaplib.IMAP4.error) as info:
        imap.login(ned, PASSWORD)
    assert "UNAVAILABLE" in str(info.value) and "certificate" in str(info.value)
    imap.shutdown()


# ---------------------------------------------------------------------------------- relay
def test_stalled_reader_costs_no_memory_or_cpu(bridge_factory, dovecot):
    olga = user("olga")
    big = message("big", (b"x" * 998 + b"\r\n") * 30_000)        # 30 MB
    dovecot.deliver(olga, big)
    bridge = bridge_factory(olga)
    bridge.authorize(olga)
    bridge.start()
    pid = bridge.proxy.pid
    with socket.create_connection(("127.0.0.1", bridge.proxy.imap_port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(f'a LOGIN {olga} "{PASSWORD}"\r\nb SELECT INBOX\r\n'.encode())
        while not reader.readline().startswith(b"b OK"):
            pass
        rss_before = rss_kib(pid)
        sock.sendall(b"c FETCH 1 (BODY.PEEK[])\r\n")
        time.sleep(2)                                    # the client reads nothing
        cpu_before, rss_stalled = cpu_seconds(pid), rss_kib(pid)
        time.sleep(3)
        cpu_stalled = cpu_seconds(pid) - cpu_before
        assert rss_kib(pid) - rss_before < 8 * 1024      # far less than the 30 MB in flight
        assert rss_kib(pid) - rss_stalled < 1024         # and not growing
        assert cpu_stalled < 0.3                          # no busy loop while stalled
        received = 0
        line = reader.readline()
        assert line.startswith(b"* 1 FETCH")
        size = int(line.rsplit(b"{", 1)[1].split(b"}")[0])
        while received < size:
            received += len(reader.read(min(1 << 20, size - received)))
        assert received == len(big)
