"""Issue 4, end to end: every way to get a token (device code, app-only with a secret or a
certificate) and shared/archive mailboxes, through the real CLI against the local identity
provider and Dovecot (whose Lua passdb plays Exchange's mailbox permissions)."""

from __future__ import annotations

import datetime
import imaplib
import json
import re
import signal
import smtplib
import subprocess
import sys
import time
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.harness import ROOT, ProxyProcess, authorize, proxy_env, write_config

PASSWORD = "local password 4"


def user(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}@example.com"


def proxy_cli(config, *args, stdin: str | None = None, env: dict | None = None, timeout: float = 60):
    return subprocess.run([sys.executable, "-m", "proxy", "-c", str(config), *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


def no_display_env(pki) -> dict[str, str]:
    """An environment like a container's: no BROWSER, no DISPLAY, no WAYLAND_DISPLAY."""
    env = proxy_env(pki)
    for name in ("BROWSER", "DISPLAY", "WAYLAND_DISPLAY"):
        env.pop(name, None)
    return env


class DeviceSignIn:
    """`proxy authorize USER` running in the background until it prints the device code."""

    def __init__(self, config, name: str, pki, *args: str, env: dict | None = None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "-c", str(config), "authorize", name, "--password-stdin", *args],
            stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT,
            env=env or proxy_env(pki))
        self.process.stdin.write(PASSWORD + "\n")
        self.process.stdin.close()
        self.lines: list[str] = []
        for line in self.process.stderr:
            self.lines.append(line)
            if "2. enter" in line:
                break
        text = "".join(self.lines)
        self.url = re.search(r"1\. open\s+(\S+)", text).group(1)
        self.code = re.search(r"2\. enter\s+(\S+)", text).group(1)

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        rest = self.process.stderr.read()
        return self.process.wait(timeout), "".join(self.lines) + rest


def imap_login(port: int, name: str, password: str = PASSWORD) -> imaplib.IMAP4:
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    try:
        imap.login(name, password)
    except BaseException:
        imap.shutdown()
        raise
    return imap


def message(subject: str) -> bytes:
    return (f"From: sender@example.com\r\nTo: box@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@example.com>\r\n\r\nBody of {subject}.\r\n").encode()


# ---------------------------------------------------------------------------------- device code
def test_device_code_flow_stores_tokens_that_the_proxy_uses(tmp_path, idp_reset, pki, dovecot):
    dana = user("dana")
    config = write_config(tmp_path, idp=idp_reset, pki=pki, dovecot=dovecot, accounts=[dana])
    sign_in = DeviceSignIn(config, dana, pki, "--device")
    assert sign_in.url == f"{idp_reset.url}/devicelogin"
    assert "Sign in as " + dana in "".join(sign_in.lines)
    time.sleep(1.5)                                         # msal polls: authorization_pending meanwhile
    assert not (tmp_path / "tokens" / f"{dana}.tokens").exists()   # (the folder was checked before the sign-in)
    idp_reset.approve_device(sign_in.code, dana)
    status, text = sign_in.finish()
    assert status == 0, text
    assert f"Authorized {dana}" in text
    assert idp_reset.count("devicecode") == 1 and idp_reset.count("token:device_code") >= 2
    meta = json.loads((tmp_path / "tokens" / f"{dana}.tokens").read_text())["meta"]
    assert meta["has_refresh_token"] is True and meta["flow"] == "delegated"
    dovecot.deliver(dana, message("device"))
    proxy = ProxyProcess(config, pki)
    try:
        imap = imap_login(proxy.imap_port, dana)
        assert imap.select("INBOX") == ("OK", [b"1"])
        imap.logout()
    finally:
        proxy.stop()


def test_device_code_is_the_default_without_a_display_and_gives_up_at_the_timeout(tmp_path, idp_reset, pki,
                                                                                   dovecot):
    erik = user("erik")
    config = write_config(tmp_path, idp=idp_reset, pki=pki, dovecot=dovecot, accounts=[erik])
    started = time.monotonic()
    result = proxy_cli(config, "authorize", erik, "--password-stdin", "--timeout", "3", stdin=PASSWORD + "\n",
                       env=no_display_env(pki))
    assert result.returncode == 1
    assert time.monotonic() - started < 15
    assert "Using the device code flow: no graphical display here" in result.stderr
    assert f"1. open   {idp_reset.url}/devicelogin" in result.stderr
    assert "No sign-in arrived within 3 s" in result.stderr
    assert idp_reset.count("authorize") == 0                 # no browser flow was started
    assert not (tmp_path / "tokens").exists()
    # a declined sign-in is reported, nothing stored
    sign_in = DeviceSignIn(config, erik, pki, env=no_display_env(pki))
    idp_reset.decline_device(sign_in.code)
    status, text = sign_in.finish()
    assert status == 1 and "the sign-in was declined" in text
    assert not (tmp_path / "tokens").exists()


def test_device_code_wait_ends_on_ctrl_c(tmp_path, idp_reset, pki, dovecot):
    fred = user("fred")
    config = write_config(tmp_path, idp=idp_reset, pki=pki, dovecot=dovecot, accounts=[fred])
    sign_in = DeviceSignIn(config, fred, pki, "--device")
    sign_in.process.send_signal(signal.SIGINT)
    status, text = sign_in.finish(timeout=10)
    assert status == 130 and "sign-in cancelled; nothing was stored" in text
    assert not (tmp_path / "tokens").exists()


# ---------------------------------------------------------------------------------- app-only
def test_client_credentials_account_is_served_with_tokens_the_proxy_fetches_itself(tmp_path, idp_reset, pki,
                                                                                     dovecot, sink):
    robot, box = user("robot"), user("akten")
    (tmp_path / "app-secret.txt").write_text(idp_reset.client_secret + "\n")
    config = write_config(tmp_path, idp=idp_reset, pki=pki, dovecot=dovecot,
                          accounts=[{"username": robot, "mailbox": box, "flow": "client_credentials"}],
                          identity={"app_only": {"client_id": "test-app", "client_secret_file": "app-secret.txt"}})
    idp_reset.set_access_token_lifetime(4)
    result = proxy_cli(config, "authorize", robot, "--password-stdin", stdin=PASSWORD + "\n",
                       env=no_display_env(pki))
    assert result.returncode == 0, result.stderr
    assert "uses app-only access" in result.stderr and "device code" not in result.stderr
    assert idp_reset.count("token:client_credentials") == 1 and idp_reset.count("authorize") == 0
    meta = json.loads((tmp_path / "tokens" / f"{robot}.tokens").read_text())["meta"]
    assert meta["flow"] == "client_credentials" and meta["has_refresh_token"] is False
    idp_reset.allow_delegation("test-app", box)              # Exchange: the app's mailbox permission
    dovecot.deliver(box, message("app-only"))
    sink.reset()
    proxy = ProxyProcess(config, pki)
    try:
        imap = imap_login(proxy.imap_port, robot)
        assert imap.select("INBOX") == ("OK", [b"1"])       # the mailbox named by mailbox:, not robot's
        imap.logout()
        fetched = idp_reset.count("token:client_credentials")
        time.sleep(5)                                        # past the 4 s lifetime
        imap = imap_login(proxy.imap_port, robot)
        imap.logout()
        assert idp_reset.count("token:client_credentials") > fetched   # fetched again by the proxy itself
        assert idp_reset.count("token:refresh_token") == 0
        with smtplib.SMTP("127.0.0.1", proxy.smtp_port, timeout=30) as smtp:
            smtp.login(robot, PASSWORD)
            smtp.sendmail(box, ["someone@example.org"], message("sent app-only"))
        assert sink.wait_for_messages(1)[0].mail_from == box
        with pytest.raises(imaplib.IMAP4.error) as info:
            imap_login(proxy.imap_port, robot, "not the password")
        assert "AUTHENTICATIONFAILED" in str(info.value)
        log = proxy.log_text()
    finally:
        proxy.stop()
    for secret in [*idp_reset.issued_tokens(), idp_reset.client_secret, PASSWORD]:
        assert secret not in log


def make_certificate(name: str) -> str:
    """A self-signed certificate and its key, as one PEM text (what an admin uploads to the app)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM).decode()
            + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode())


def test_client_credentials_with_a_certificate(tmp_path, idp_reset, pki, dovecot):
    robot = user("certbot")
    registered = make_certificate("proxy app")
    idp_reset.register_client("cert-app", certificate=registered.split("-----BEGIN PRIVATE KEY")[0],
                              public_flows=False)
    (tmp_path / "app.pem").write_text(registered)
    (tmp_path / "other.pem").write_text(make_certificate("someone else"))
    accounts = [{"username": robot, "flow": "client_credentials"}]
    config = write_config(tmp_path, idp=idp_reset, pki=pki, dovecot=dovecot, accounts=accounts,
                          identity={"app_only": {"client_id": "cert-app", "certificate_file": "app.pem"}})
    result = proxy_cli(config, "authorize", robot, "--password-stdin", stdin=PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    assert idp_reset.count("token:client_credentials") == 1
    idp_reset.allow_delegation("cert-app", robot)
    check = proxy_cli(config, "check", robot)                 # app-only: no password needed
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"ok    IMAP login to {robot}: accepted" in check.stdout
    assert f"ok    SMTP login to {robot}: accepted" in check.stdout

    wrong = write_config(tmp_path / "wrong", idp=idp_reset, pki=pki, dovecot=dovecot, accounts=accounts,
                         identity={"app_only": {"client_id": "cert-app", "certificate_file": str(tmp_path / "other.pem")}})
    result = proxy_cli(wrong, "authorize", robot, "--password-stdin", stdin=PASSWORD + "\n")
    assert result.returncode == 1
    assert "AADSTS700027" in result.stderr and "Certificates & secrets" in result.stderr
    assert not (tmp_path / "wrong" / "tokens").exists()


# ---------------------------------------------------------------------------------- shared mailboxes
def test_shared_and_archive_mailboxes_use_the_owners_tokens(tmp_path, idp_reset, pki, dovecot, sink):
    alice, archive, team = user("alice"), user("archiv"), user("team")
    team_box = user("team-box")
    config = write_config(tmp_path, idp=idp_reset, pki=pki, dovecot=dovecot, accounts=[
        alice, {"username": archive, "token": alice}, {"username": team, "mailbox": team_box, "token": alice}])
    # authorizing the archive account signs in its owner, once, for all three
    result = authorize(config, archive, PASSWORD, pki)
    assert result.returncode == 0, result.stderr
    assert f"opens {archive} with the tokens of {alice}" in result.stderr
    assert idp_reset.count("token:authorization_code") == 1
    assert sorted(p.name for p in (tmp_path / "tokens").glob("*.tokens")) == [f"{alice}.tokens"]
    idp_reset.allow_delegation(alice, archive)
    dovecot.deliver(archive, message("archived 1"))
    dovecot.deliver(archive, message("archived 2"))
    sink.reset()
    proxy = ProxyProcess(config, pki)
    try:
        imap = imap_login(proxy.imap_port, archive)            # the owner's local password
        assert imap.select("INBOX") == ("OK", [b"2"])          # the archive's mailbox, not alice's
        imap.logout()
        imap = imap_login(proxy.imap_port, alice)
        assert imap.select("INBOX") == ("OK", [b"0"])
        imap.logout()
        # alice may not open the team mailbox: a clear NO naming the owner, the mailbox and the fix
        with pytest.raises(imaplib.IMAP4.error) as info:
            imap_login(proxy.imap_port, team)
        refusal = str(info.value)
        assert f"refused to open the mailbox {team_box} with the token of {alice}" in refusal
        assert "Add-MailboxPermission" in refusal
        # SMTP logs in as alice herself (Exchange refuses a shared address as the SMTP identity);
        # sending as the team mailbox is Exchange's Send As check (tests/test_exchange.py)
        with smtplib.SMTP("127.0.0.1", proxy.smtp_port, timeout=30) as smtp:
            smtp.login(team, PASSWORD)
        idp_reset.allow_delegation(alice, team_box)
        time.sleep(0.1)
        imap = imap_login(proxy.imap_port, team)
        assert imap.select("INBOX")[0] == "OK"
        imap.logout()
        with smtplib.SMTP("127.0.0.1", proxy.smtp_port, timeout=30) as smtp:
            smtp.login(archive, PASSWORD)
            smtp.sendmail(archive, ["court@example.org"], message("from the archive"))
        assert sink.wait_for_messages(1)[0].mail_from == archive
        with pytest.raises(imaplib.IMAP4.error):
            imap_login(proxy.imap_port, archive, "the archive's own password?")
        log = proxy.log_text()
    finally:
        proxy.stop()
    assert log.count(f"account {alice} unlocked") == 1         # one key derivation for all three
    for secret in [*idp_reset.issued_tokens(), PASSWORD]:
        assert secret not in log
