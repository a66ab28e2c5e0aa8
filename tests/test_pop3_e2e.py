"""POP3 end to end (issue 16): `proxy authorize` and `proxy serve` for real, Dovecot's POP3 service
(implicit TLS, the oauth2 and Lua passdbs, so shared mailboxes and app-only work, and a token without
the POP permission is refused as Exchange refuses it) as the upstream, and real clients: Python's
poplib, fetchmail (over STLS, certificate checked), getmail6 (over the implicit-TLS listener) and
curl. Every message must arrive byte-identical to the server's copy, and to what the same client
gets directly from the server."""

from __future__ import annotations

import os
import poplib
import random
import re
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.harness import (ROOT, ProxyProcess, TcpForwarder, authorize, free_port, pop3_section, proxy_env,
                           write_config)
from tests.opsbed import http_get, make_certs, sample, scrape
from tests.pop3client import Pop3Client, Pop3Error, unstuff

PASSWORD = "local POP password"
POP_SCOPE = "https://outlook.office.com/POP.AccessAsUser.All"
CURL = ["curl", "-sS", "--noproxy", "*", "--max-time", "60"]


def user(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}@example.com"


def headers(subject: str, extra: str = "") -> bytes:
    return (f"From: Kanzlei <sender@example.com>\r\nTo: box@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@example.com>\r\nMIME-Version: 1.0\r\n{extra}").encode()


def build_messages() -> list[bytes]:
    """What an archiver meets: 8-bit text, very long lines, a 5 MB attachment, lines of dots."""
    attachment = random.Random(16).randbytes(5_000_000)
    encoded = __import__("base64").encodebytes(attachment).replace(b"\n", b"\r\n")
    return [
        headers("8-bit", "Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n")
        + b"\r\nGr\xfc\xdfe aus der Kanzlei, \xe4\xf6\xfc\r\n" + bytes(range(0x80, 0x100)) + b"\r\n",
        headers("long lines") + b"\r\n" + b"L" * 20_000 + b"\r\n" + b"word " * 4_000 + b"\r\nshort\r\n",
        headers("5 MB attachment", 'Content-Type: multipart/mixed; boundary="b1"\r\n')
        + b"\r\n--b1\r\nContent-Type: text/plain\r\n\r\nSee attachment.\r\n--b1\r\nContent-Type: "
        b"application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n" + encoded + b"--b1--\r\n",
        headers("dots") + b"\r\nA line that is a single dot follows:\r\n.\r\n..\r\n.hidden\r\n. \r\n...\r\n"
        b"and a last line\r\n",
    ]


TEST_MESSAGES = None  # built once (5 MB of random bytes)


def messages() -> list[bytes]:
    global TEST_MESSAGES
    if TEST_MESSAGES is None:
        TEST_MESSAGES = build_messages()
    return TEST_MESSAGES


class PopBed:
    """One running proxy with a pop3 section (plain with STLS, and POP3S), for a delegated account,
    a shared mailbox opened with its tokens, and an app-only account. The identity provider is
    reached through a forwarder that a test can cut (Dovecot keeps reaching it directly)."""

    def __init__(self, directory: Path, idp, pki, dovecot):
        self.directory, self.idp, self.pki, self.dovecot = directory, idp, pki, dovecot
        self.owner, self.shared = user("pop"), user("pop-shared")
        self.robot, self.box = user("pop-robot"), user("akten")
        self.link = TcpForwarder(idp.host, idp.port)
        directory.mkdir(parents=True)
        self.certs = make_certs(directory)
        self.tls_port, self.admin_port = free_port(), free_port()
        (directory / "app-secret.txt").write_text(idp.client_secret + "\n")
        self.config = write_config(
            directory, idp=idp, pki=pki, dovecot=dovecot,
            accounts=[self.owner, {"username": self.shared, "token": self.owner},
                      {"username": self.robot, "mailbox": self.box, "flow": "client_credentials"}],
            identity={"authority": f"https://127.0.0.1:{self.link.port}/test-tenant",
                      "app_only": {"client_id": "test-app", "client_secret_file": "app-secret.txt",
                                   "authority": f"https://127.0.0.1:{self.link.port}/test-tenant"}},
            pop3=pop3_section(dovecot, pki, starttls=True, tls_listen=f"127.0.0.1:{self.tls_port}"),
            tls={"cert_file": str(self.certs / "server.pem"), "key_file": str(self.certs / "server.key")},
            admin={"listen": f"127.0.0.1:{self.admin_port}"})
        for name in (self.owner, self.robot):
            result = authorize(self.config, name, PASSWORD, pki)
            assert result.returncode == 0, result.stderr
        idp.allow_delegation(self.owner, self.shared)      # Exchange: Full Access on the shared mailbox
        idp.allow_delegation("test-app", self.box)         # and the app's mailbox permission
        self.proxy = ProxyProcess(self.config, pki)
        self.port = self.proxy.pop3_port

    def client(self) -> Pop3Client:
        return Pop3Client("127.0.0.1", self.port)

    def direct(self, name: str) -> Pop3Client:
        """Straight to Dovecot's POP3S with an access token of our own (what Microsoft 365 would serve)."""
        client = Pop3Client(self.dovecot.pop3_host, self.dovecot.pop3_port,
                            context=ssl.create_default_context(cafile=str(self.pki.ca_file)))
        client.login_xoauth2(name, self.idp.mint_access_token(name, scope=POP_SCOPE))
        return client

    def stop(self) -> None:
        self.proxy.stop()
        self.link.stop()


@pytest.fixture(scope="module")
def bed(tmp_path_factory, idp, pki, dovecot):
    idp.start()
    idp.reset()
    bed = PopBed(tmp_path_factory.mktemp("pop3") / "bed", idp, pki, dovecot)
    for message in messages():
        dovecot.deliver(bed.owner, message)
    yield bed
    bed.stop()


# ------------------------------------------------------------------ every byte, every client
def test_every_message_arrives_byte_identical_and_as_direct(bed, monkeypatch):
    proxied, direct = bed.client(), bed.direct(bed.owner)
    assert proxied.greeting == b"+OK POP3 proxy ready\r\n"
    assert proxied.login(bed.owner, PASSWORD).startswith(b"+OK")
    count = len(messages())
    assert proxied.stat() == direct.stat() and proxied.stat()[0] == count
    for command in (b"LIST", b"UIDL", b"LIST 3", b"UIDL 4", b"NOOP"):
        if command in (b"LIST", b"UIDL"):
            assert proxied.multiline(command) == direct.multiline(command)
        else:
            assert proxied.command(command) == direct.command(command)
    for number, message in enumerate(messages(), 1):
        raw = proxied.retr(number)
        assert raw == direct.retr(number)                     # the same bytes as straight from the server
        assert unstuff(raw) == message                        # and exactly the message as stored
        assert proxied.multiline(b"TOP %d 3" % number) == direct.multiline(b"TOP %d 3" % number)
    assert b"\r\n..\r\n...\r\n" in proxied.retr(4)             # the dot line is stuffed on the wire
    proxied.quit()
    direct.quit()

    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)           # poplib's own limit is 2,048 bytes a line
    client = poplib.POP3("127.0.0.1", bed.port, timeout=60)
    client.user(bed.owner)
    client.pass_(PASSWORD)
    for number, message in enumerate(messages(), 1):
        _, lines, octets = client.retr(number)
        assert b"\r\n".join(lines) + b"\r\n" == message and octets >= len(message)
    client.quit()

    for number, message in enumerate(messages(), 1):           # curl, plain and over POP3S
        url = (f"pop3://127.0.0.1:{bed.port}/{number}" if number % 2 else
               f"pop3s://localhost:{bed.tls_port}/{number}")
        result = subprocess.run([*CURL, "--cacert", str(bed.certs / "ca.pem"), "-u", f"{bed.owner}:{PASSWORD}",
                                 url], capture_output=True, timeout=90)
        assert result.returncode == 0, result.stderr
        assert result.stdout == message


def _normalized(message: bytes) -> bytes:
    return message.replace(b"\r\n", b"\n")


def _delivered(folder: Path) -> list[bytes]:
    return sorted(path.read_bytes() for path in folder.iterdir())


def test_fetchmail_over_stls_and_getmail6_over_pop3s(bed, tmp_path):
    home, fetched, got = tmp_path / "home", tmp_path / "fetchmail", tmp_path / "getmail"
    for folder in (home, fetched, got):
        folder.mkdir()
    rc = home / ".fetchmailrc"
    rc.write_text(f'set no syslog\npoll localhost port {bed.port} protocol pop3 user "{bed.owner}" password '
                  f'"{PASSWORD}" keep no rewrite sslproto tls1.2+ sslcertck sslcertfile "{bed.certs}/ca.pem" '
                  f'mda "cat > $(mktemp -p {fetched} msg.XXXXXX)"\n')
    rc.chmod(0o600)
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    result = subprocess.run(["fetchmail", "-f", str(rc), "-v", "-N"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "POP3> STLS" in result.stdout and "+OK Begin TLS negotiation now" in result.stdout
    received = _delivered(fetched)
    assert len(received) == len(messages())
    for message in messages():  # fetchmail adds its Received: header and hands the MDA LF line ends
        if max(map(len, message.split(b"\r\n"))) > 8191:
            # fetchmail 6.4 itself mangles lines longer than its 8 KiB buffer (it writes two stray bytes
            # and a line break after every 8,191); poplib, curl and the raw client got them whole above.
            continue
        assert sum(r.endswith(b"\n" + _normalized(message)) and r.startswith(b"Received: from localhost")
                   for r in received) == 1, message[:80]

    (got / "rc").write_text(f"""[retriever]
type = SimplePOP3SSLRetriever
server = 127.0.0.1
port = {bed.tls_port}
username = {bed.owner}
password = {PASSWORD}
ca_certs = {bed.certs}/ca.pem

[destination]
type = MDA_external
path = /bin/sh
arguments = ("-c", "cat > $(mktemp -p {got} msg.XXXXXX)")
allow_root_commands = true
unixfrom = false

[options]
delete = false
read_all = true
delivered_to = false
received = false
""")
    result = subprocess.run(["getmail", "--getmaildir", str(got), "--rcfile", "rc"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    received = [r for r in _delivered(got) if r.startswith(b"Return-Path:")]
    assert len(received) == len(messages())
    for message in messages():  # getmail adds Return-Path: and hands the MDA LF line ends
        assert sum(r.endswith(b"\n" + _normalized(message)) for r in received) == 1, message[:80]


# ------------------------------------------------------------------ deleting, shared and app-only mailboxes
def test_dele_quit_deletes_rset_undoes_and_a_dropped_session_deletes_nothing(bed):
    """In the shared mailbox, logging in with the owner's tokens (and password)."""
    notes = [headers(f"note {i}") + f"\r\nNote {i}.\r\n".encode() for i in range(3)]
    for note in notes:
        bed.dovecot.deliver(bed.shared, note)
    client = bed.client()
    client.login(bed.shared, PASSWORD)
    assert client.stat()[0] == 3
    client.command(b"DELE 1")
    with pytest.raises(Pop3Error, match="-ERR"):
        client.retr(1)                                   # marked deleted
    client.command(b"RSET")
    assert unstuff(client.retr(1)) == notes[0]           # RSET undid it
    client.quit()
    client = bed.client()
    client.login(bed.shared, PASSWORD)
    client.command(b"DELE 1")
    client.close()                                       # no QUIT: the server must not delete
    client = bed.direct(bed.shared)
    assert client.stat()[0] == 3
    client.quit()
    client = bed.client()
    client.login(bed.shared, PASSWORD)
    client.command(b"DELE 1")
    client.command(b"DELE 2")
    client.quit()                                        # DELE + QUIT: deleted
    client = bed.direct(bed.shared)
    assert client.stat()[0] == 1 and unstuff(client.retr(1)) == notes[2]
    client.quit()


def test_app_only_account_reads_its_mailbox(bed):
    note = headers("for the app") + b"\r\nApp-only.\r\n"
    bed.dovecot.deliver(bed.box, note)
    client = bed.client()
    client.login(bed.robot, PASSWORD)                    # the mailbox named by mailbox:, with the app's token
    assert client.stat()[0] == 1 and unstuff(client.retr(1)) == note
    client.quit()


# ------------------------------------------------------------------ logging in
def test_wrong_password_unknown_user_auth_plain_and_stls(bed):
    replies, durations = [], []
    for name, password in ((bed.owner, "wrong password"), (user("nobody"), PASSWORD)):
        client = bed.client()
        client.command(b"USER " + name.encode())
        started = time.monotonic()
        with pytest.raises(Pop3Error) as info:
            client.command(b"PASS " + password.encode())
        durations.append(time.monotonic() - started)
        replies.append(str(info.value))
        assert b"USER" in client.multiline(b"CAPA")       # the session goes on
        client.quit()
    assert replies == ["-ERR [AUTH] Unknown user or wrong password"] * 2   # no hint which one
    assert durations[0] >= 0.45 and durations[1] >= 0.95  # the shared throttle: 0.5 s, then 1 s (per source)
    client = poplib.POP3("127.0.0.1", bed.port, timeout=30)
    client.stls(ssl.create_default_context(cafile=str(bed.certs / "ca.pem")))
    assert "STLS" not in client.capa() and "USER" in client.capa()
    assert client._shortcmd("AUTH PLAIN " + __import__("base64").b64encode(
        f"\0{bed.owner}\0{PASSWORD}".encode()).decode()).startswith(b"+OK")
    assert client.stat()[0] == len(messages())
    client.quit()
    client = poplib.POP3_SSL("localhost", bed.tls_port, timeout=30,
                             context=ssl.create_default_context(cafile=str(bed.certs / "ca.pem")))
    client._putcmd("AUTH PLAIN")
    assert client._getline()[0] == b"+ "
    assert client._shortcmd(__import__("base64").b64encode(f"\0{bed.owner}\0{PASSWORD}".encode()).decode()) \
        .startswith(b"+OK")
    client.quit()
    with pytest.raises(ssl.SSLCertVerificationError):    # the local CA is needed to trust the listener
        poplib.POP3_SSL("localhost", bed.tls_port, timeout=30, context=ssl.create_default_context())


def test_expired_token_is_refreshed_and_the_login_retried(bed, idp_reset):
    client = bed.client()
    client.login(bed.owner, PASSWORD)                    # the proxy holds a token now
    client.quit()
    idp_reset.expire_access_tokens()                     # ... which the server refuses from now on
    refreshes = idp_reset.count("token:refresh_token")
    client = bed.client()
    assert client.login(bed.owner, PASSWORD).startswith(b"+OK")
    assert client.stat()[0] == len(messages())
    client.quit()
    assert idp_reset.count("token:refresh_token") == refreshes + 1
    assert "refreshing once and retrying" in bed.proxy.log_text()


def test_identity_provider_down_with_a_cached_token_still_works(bed):
    client = bed.client()
    client.login(bed.owner, PASSWORD)
    client.quit()
    bed.link.stop()                                      # connection refused, for the proxy only
    try:
        for _ in range(2):
            client = bed.client()
            assert client.login(bed.owner, PASSWORD).startswith(b"+OK")
            assert client.stat()[0] == len(messages())
            client.quit()
    finally:
        bed.link.start()


def test_metrics_and_logs_carry_protocol_pop3(bed):
    client = bed.client()
    client.login(bed.owner, PASSWORD)
    client.retr(3)
    client.quit()
    samples = scrape(bed.admin_port)
    assert sample(samples, "proxy_logins_total", protocol="pop3", result="ok") >= 1
    assert sample(samples, "proxy_logins_total", protocol="pop3", result="credentials") >= 1
    assert sample(samples, "proxy_relayed_bytes_total", protocol="pop3", direction="to_client") > 5_000_000
    assert sample(samples, "proxy_sessions_total", protocol="pop3") >= 3
    status, body = http_get(bed.admin_port, "/healthz")
    assert status == 200 and '"pop3": true' in body
    log = bed.proxy.log_text()
    assert re.search(rf"proxy\.pop3: pop3 127\.0\.0\.1:\d+ login {re.escape(bed.owner)} ok", log)
    assert re.search(r"proxy\.pop3: pop3 127\.0\.0\.1:\d+ session end: user .*, ok, .* bytes to client", log)
    assert "POP3S (implicit TLS) listening on" in log
    for secret in [*bed.idp.issued_tokens(), PASSWORD]:
        assert secret not in log


def test_proxy_check_probes_pop3(bed):
    result = subprocess.run([sys.executable, "-m", "proxy", "-c", str(bed.config), "check", bed.owner,
                             "--password-stdin"], input=PASSWORD + "\n", capture_output=True, text=True,
                            timeout=90, cwd=ROOT, env=proxy_env(bed.pki))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"ok    POP3 127\.0\.0\.1:\d+: TLS certificate verified; offers SASL XOAUTH2", result.stdout)
    assert f"ok    POP3 login to {bed.owner}: accepted" in result.stdout
    assert "POP.AccessAsUser.All" in result.stdout        # the token's permissions, listed


# ------------------------------------------------------------------ an authorization from before POP3
def test_authorization_from_before_pop3_keeps_imap_and_smtp_and_check_says_to_reauthorize(tmp_path, idp_reset,
                                                                                           pki, dovecot):
    import imaplib

    name = user("before-pop")
    config = write_config(tmp_path, idp=idp_reset, pki=pki, dovecot=dovecot, accounts=[name])
    assert authorize(config, name, PASSWORD, pki).returncode == 0       # IMAP + SMTP only
    data = yaml.safe_load(config.read_text())
    data["pop3"] = pop3_section(dovecot, pki)                         # POP3 added later
    config.write_text(yaml.safe_dump(data))
    dovecot.deliver(name, headers("hello") + b"\r\nHello.\r\n")
    idp_reset.expire_access_tokens()
    proxy = ProxyProcess(config, pki)
    try:
        imap = imaplib.IMAP4("127.0.0.1", proxy.imap_port, timeout=30)
        assert imap.login(name, PASSWORD)[0] == "OK"                 # refreshed without POP: still works
        imap.logout()
        client = Pop3Client("127.0.0.1", proxy.pop3_port)
        client.command(b"USER " + name.encode())
        with pytest.raises(Pop3Error) as info:
            client.command(b"PASS " + PASSWORD.encode())
        reply = str(info.value)
        assert reply.startswith("-ERR [AUTH] The mail server refused the access token")
        assert "does not include POP.AccessAsUser.All" in reply and f"`proxy authorize {name}`" in reply
        client.quit()
        log = proxy.log_text()
        assert f"account {name}: not authorized for {POP_SCOPE} yet (no consent): IMAP and SMTP go on" in log

        check = subprocess.run([sys.executable, "-m", "proxy", "-c", str(config), "check", name, "--password-stdin"],
                               input=PASSWORD + "\n", capture_output=True, text=True, timeout=90, cwd=ROOT,
                               env=proxy_env(pki))
        assert check.returncode == 1, check.stdout
        assert (f"FAIL  token for {name}: POP3 permission: the token carries none of POP.AccessAsUser.All"
                in check.stdout)
        assert f"run `proxy authorize {name}` again: the authorization was probably given before POP3" in check.stdout
        assert "FAIL  token for" not in check.stdout.replace(f"FAIL  token for {name}: POP3 permission", "")
        assert re.search(r"ok    IMAP login to .*: accepted", check.stdout)

        assert authorize(config, name, PASSWORD, pki).returncode == 0   # adds POP (no restart needed)
        client = Pop3Client("127.0.0.1", proxy.pop3_port)
        assert client.login(name, PASSWORD).startswith(b"+OK")
        assert client.stat()[0] == 1
        client.quit()
    finally:
        proxy.stop()


def test_config_without_pop3_runs_no_pop3_listener(tmp_path, idp, pki, dovecot):
    config = write_config(tmp_path, idp=idp, pki=pki, dovecot=dovecot, accounts=[user("no-pop")])
    assert "pop3" not in yaml.safe_load(config.read_text())
    proxy = ProxyProcess(config, pki)
    try:
        assert proxy.pop3_port is None
        time.sleep(0.2)
        assert "POP3" not in proxy.log_text()
    finally:
        proxy.stop()
