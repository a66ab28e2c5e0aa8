"""Issue 4, the admin commands through the real CLI: `proxy status`, `proxy check`, `proxy forget`
and `proxy revoke`, against the local identity provider and Dovecot (plus a fake Microsoft SMTP
server that answers 535 5.7.139, which Dovecot cannot)."""

from __future__ import annotations

import imaplib
import json
import re
import socket
import ssl
import subprocess
import sys
import threading

import pytest

from tests.harness import ROOT, ProxyProcess, authorize, free_port, write_config
from tests.test_accounts import PASSWORD, imap_login, proxy_cli, user

APP = {"app_only": {"client_id": "test-app", "client_secret": "test-secret"}}


class Accounts:
    """alice (authorized, browser), archive (alice's tokens), bob (not authorized), robot (app-only)."""

    def __init__(self, directory, idp, pki, dovecot, **sections):
        self.alice, self.archive, self.bob, self.robot = user("alice"), user("archiv"), user("bob"), user("robot")
        sections["identity"] = {**APP, **sections.get("identity", {})}
        self.config = write_config(directory, idp=idp, pki=pki, dovecot=dovecot, accounts=[
            self.alice, {"username": self.archive, "token": self.alice}, self.bob,
            {"username": self.robot, "flow": "client_credentials"}], **sections)
        self.idp, self.pki = idp, pki

    def authorize(self):
        result = authorize(self.config, self.alice, PASSWORD, self.pki)
        assert result.returncode == 0, result.stderr
        result = proxy_cli(self.config, "authorize", self.robot, "--password-stdin", stdin=PASSWORD + "\n")
        assert result.returncode == 0, result.stderr
        return self

    def cli(self, *args, stdin=None):
        return proxy_cli(self.config, *args, stdin=stdin)

    def status(self) -> dict[str, str]:
        result = self.cli("status")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 4
        return {line.split()[0]: line for line in lines}


def assert_no_secrets(text: str, idp) -> None:
    for secret in [*idp.issued_tokens(), PASSWORD, idp.client_secret]:
        assert secret not in text


# ---------------------------------------------------------------------------------- status
def test_status_shows_each_account_without_a_password_or_secret(tmp_path, idp_reset, pki, dovecot):
    accounts = Accounts(tmp_path, idp_reset, pki, dovecot).authorize()
    lines = accounts.status()
    alice = lines[accounts.alice]
    assert f"mailbox={accounts.alice}  owner={accounts.alice}  flow=delegated  state=ok" in alice
    assert re.search(r"valid_until=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\S* \(in (59|60) min\)", alice), alice
    assert "refresh_token=yes" in alice and "last_refresh=20" in alice and "last_error=-" in alice
    archive = lines[accounts.archive]
    assert f"mailbox={accounts.archive}  owner={accounts.alice}  flow=delegated  state=ok" in archive
    assert f"state=not-authorized (run `proxy authorize {accounts.bob}`)" in lines[accounts.bob]
    robot = lines[accounts.robot]
    assert "flow=client_credentials  state=ok" in robot and "refresh_token=not-needed (app-only)" in robot
    as_json = json.loads(accounts.cli("status", "--json").stdout)
    assert [row["account"] for row in as_json] == [accounts.alice, accounts.archive, accounts.bob, accounts.robot]
    assert as_json[0]["refresh_token"] is True and as_json[2]["state"] == "not_authorized"
    assert_no_secrets(json.dumps(as_json) + "".join(lines.values()), idp_reset)


# ---------------------------------------------------------------------------------- check
def test_check_passes_then_explains_each_failure(tmp_path, idp_reset, pki, dovecot):
    accounts = Accounts(tmp_path, idp_reset, pki, dovecot).authorize()
    good = accounts.cli("check", accounts.alice, "--password-stdin", stdin=PASSWORD + "\n")
    assert good.returncode == 0, good.stdout + good.stderr
    refreshes = idp_reset.count("token:refresh_token")
    assert refreshes == 1                                          # the token was obtained now, not reused
    for line in ("ok    config:", f"ok    identity provider {idp_reset.authority()}: answers",
                 f"ok    token for {accounts.alice}: obtained from the identity provider, valid 60 min; permissions:",
                 f"ok    IMAP 127.0.0.1:{dovecot.imap_port}: TLS certificate verified; offers AUTH=XOAUTH2",
                 f"ok    IMAP login to {accounts.alice}: accepted",
                 f"ok    SMTP {dovecot.submission_host}:{dovecot.submission_port}: STARTTLS certificate verified",
                 f"ok    SMTP login to {accounts.alice}: accepted", "Everything works."):
        assert line in good.stdout, good.stdout
    assert_no_secrets(good.stdout + good.stderr, idp_reset)

    # the archive: alice may not open it
    shared = accounts.cli("check", accounts.archive, "--password-stdin", stdin=PASSWORD + "\n")
    assert shared.returncode == 1
    assert f"FAIL  IMAP login to {accounts.archive} with the token of {accounts.alice}: refused" in shared.stdout
    assert (f"Add-MailboxPermission -Identity {accounts.archive} -User {accounts.alice} -AccessRights FullAccess"
            in shared.stdout)
    # SMTP logs in as alice herself: Exchange refuses a shared address as the SMTP identity
    assert (f"ok    SMTP login as {accounts.alice} (to send as {accounts.archive}, which needs Send As): accepted"
            in shared.stdout)
    idp_reset.allow_delegation(accounts.alice, accounts.archive)
    assert accounts.cli("check", accounts.archive, "--password-stdin", stdin=PASSWORD + "\n").returncode == 0

    wrong = accounts.cli("check", accounts.alice, "--password-stdin", stdin="wrong password\n")
    assert wrong.returncode == 1 and f"FAIL  token for {accounts.alice}: wrong local password" in wrong.stdout
    assert "skip  IMAP login" in wrong.stdout and "ok    IMAP 127.0.0.1" in wrong.stdout

    overview = accounts.cli("check")                               # no account: what needs no password
    assert overview.returncode == 1
    assert f"FAIL  tokens of {accounts.bob}: not authorized yet" in overview.stdout
    assert f"what to do: run `proxy authorize {accounts.bob}`" in overview.stdout
    assert f"ok    tokens of {accounts.alice}: stored" in overview.stdout

    idp_reset.revoke(accounts.alice)                               # e.g. a password change at Microsoft
    revoked = accounts.cli("check", accounts.alice, "--password-stdin", stdin=PASSWORD + "\n")
    assert revoked.returncode == 1
    assert "AADSTS50173" in revoked.stdout and "what to do:" in revoked.stdout
    assert f"run `proxy authorize {accounts.alice}`" in revoked.stdout
    assert "needs-authorization" in accounts.status()[accounts.alice]
    assert "AADSTS50173" in accounts.status()[accounts.archive]


def test_check_reports_unreachable_identity_provider_bad_app_secret_and_missing_scope(tmp_path, idp_reset, pki,
                                                                                       dovecot):
    dead = write_config(tmp_path / "dead", idp=idp_reset, pki=pki, dovecot=dovecot, accounts=["x@example.com"],
                        identity={"authority": f"https://127.0.0.1:{free_port()}/test-tenant"})
    result = proxy_cli(dead, "check", "x@example.com", "--password-stdin", stdin=PASSWORD + "\n")
    assert result.returncode == 1
    assert re.search(r"FAIL  identity provider https://127\.0\.0\.1:\d+/test-tenant: cannot connect", result.stdout)
    assert "what to do: check identity.authority" in result.stdout
    assert "skip  token for x@example.com: the identity provider is not reachable" in result.stdout

    robot = user("robot")
    bad = write_config(tmp_path / "bad", idp=idp_reset, pki=pki, dovecot=dovecot,
                       accounts=[{"username": robot, "flow": "client_credentials"}],
                       identity={"app_only": {"client_id": "test-app", "client_secret": "expired or wrong"}})
    result = proxy_cli(bad, "check", robot)
    assert result.returncode == 1
    assert f"FAIL  token for {robot}: the app's credentials were refused: invalid_client: AADSTS7000215" in result.stdout
    assert "the secret's Value (not its ID)" in result.stdout
    assert "expired or wrong" not in result.stdout + result.stderr

    carol = user("carol")
    imap_only = write_config(tmp_path / "scope", idp=idp_reset, pki=pki, dovecot=dovecot, accounts=[carol],
                             identity={"scopes": ["https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access"]})
    assert authorize(imap_only, carol, PASSWORD, pki).returncode == 0
    result = proxy_cli(imap_only, "check", carol, "--password-stdin", stdin=PASSWORD + "\n")
    assert result.returncode == 1
    assert f"FAIL  token for {carol}: SMTP permission: the token carries none of SMTP.Send, SMTP.SendAsApp" in result.stdout
    assert f"ok    IMAP login to {carol}: accepted" in result.stdout


class Microsoft535:
    """An SMTP server that behaves like smtp.office365.com for a mailbox with SMTP AUTH disabled."""

    REPLY = (b"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. "
             b"Visit https://aka.ms/smtp_auth_disabled for more information.\r\n")

    def __init__(self, pki):
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pki.cert_file, pki.key_file)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn):
        try:
            conn.sendall(b"220 fake.outlook.test Microsoft ESMTP MAIL Service ready\r\n")
            reader, secure = conn.makefile("rb"), False
            while line := reader.readline():
                verb = line.strip().upper()
                if verb.startswith(b"EHLO"):
                    extra = b"250-AUTH LOGIN XOAUTH2\r\n" if secure else b"250-STARTTLS\r\n"
                    conn.sendall(b"250-fake.outlook.test Hello\r\n250-SIZE 157286400\r\n" + extra + b"250 8BITMIME\r\n")
                elif verb == b"STARTTLS":
                    conn.sendall(b"220 2.0.0 SMTP server ready\r\n")
                    conn = self.context.wrap_socket(conn, server_side=True)
                    reader, secure = conn.makefile("rb"), True
                elif verb == b"AUTH XOAUTH2":
                    conn.sendall(b"334 \r\n")
                    reader.readline()
                    conn.sendall(self.REPLY)
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 Service closing transmission channel\r\n")
                    return
                else:
                    conn.sendall(b"500 5.3.3 Unrecognized command\r\n")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.listener.close()


def test_check_explains_smtp_auth_disabled(tmp_path, idp_reset, pki, dovecot):
    server = Microsoft535(pki)
    try:
        dora = user("dora")
        config = write_config(tmp_path, idp=idp_reset, pki=pki, dovecot=dovecot, accounts=[dora],
                              smtp={"upstream": f"127.0.0.1:{server.port}", "upstream_tls": "starttls"})
        assert authorize(config, dora, PASSWORD, pki).returncode == 0
        result = proxy_cli(config, "check", dora, "--password-stdin", stdin=PASSWORD + "\n")
    finally:
        server.close()
    assert result.returncode == 1
    assert f"ok    IMAP login to {dora}: accepted" in result.stdout
    assert f"FAIL  SMTP login to {dora}: refused: 535 5.7.139" in result.stdout
    assert f"Set-CASMailbox -Identity {dora} -SmtpClientAuthenticationDisabled $false" in result.stdout


# ---------------------------------------------------------------------------------- forget / revoke
def test_forget_and_revoke_delete_the_tokens_and_say_what_they_did(tmp_path, idp_reset, pki, dovecot):
    accounts = Accounts(tmp_path, idp_reset, pki, dovecot).authorize()
    token_file = tmp_path / "tokens" / f"{accounts.alice}.tokens"
    proxy = ProxyProcess(accounts.config, pki)
    try:
        imap_login(proxy.imap_port, accounts.alice).logout()
        not_owner = accounts.cli("forget", accounts.archive)
        assert not_owner.returncode == 1 and token_file.exists()
        assert f"with the tokens of {accounts.alice}" in not_owner.stderr
        assert f"`proxy forget {accounts.alice}`" in not_owner.stderr
        unknown = accounts.cli("revoke", "nobody@example.com")
        assert unknown.returncode == 2 and "not in the config's accounts" in unknown.stderr

        revoked = accounts.cli("revoke", accounts.alice)
        assert revoked.returncode == 0, revoked.stderr
        assert not token_file.exists()
        assert f"Deleted the stored tokens of {accounts.alice}: {token_file}" in revoked.stdout
        assert f"Logins through the proxy stop for: {accounts.alice}, {accounts.archive}." in revoked.stdout
        assert "Revoke sessions" in revoked.stdout and f"Revoke-MgUserSignInSession -UserId {accounts.alice}" in \
            revoked.stdout
        with pytest.raises(imaplib.IMAP4.error) as info:             # the running proxy notices at once
            imap_login(proxy.imap_port, accounts.alice)
        assert f"proxy authorize {accounts.alice}" in str(info.value)
    finally:
        proxy.stop()
    again = accounts.cli("forget", accounts.alice)
    assert again.returncode == 0 and "No tokens were stored" in again.stdout
    robot = accounts.cli("forget", accounts.robot)
    assert robot.returncode == 0 and "Deleted the stored tokens of " + accounts.robot in robot.stdout
    assert "`proxy revoke` shows how to end it there" in robot.stdout
    assert accounts.status()[accounts.robot].count("state=not-authorized") == 1


def test_help_lists_every_command_with_what_it_does():
    out = subprocess.run([sys.executable, "-m", "proxy", "--help"], capture_output=True, text=True, cwd=ROOT)
    for word in ("authorize", "status", "check", "forget", "revoke", "serve"):
        assert re.search(rf"^\s+{word}\s+\S", out.stdout, re.M), (word, out.stdout)
    auth = subprocess.run([sys.executable, "-m", "proxy", "authorize", "--help"], capture_output=True, text=True,
                          cwd=ROOT).stdout
    for word in ("--device", "--browser", "client_credentials", "token: OWNER", "15 min"):
        assert word in auth, word
