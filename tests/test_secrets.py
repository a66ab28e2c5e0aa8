"""No secret in any output: access tokens, refresh tokens, the client secret and local passwords (right or
wrong, as such or base64-encoded as in AUTH PLAIN/LOGIN, POP3 PASS and XOAUTH2) never appear in the proxy's log
at DEBUG, in what `proxy authorize` prints, in any reply a client gets, in a crash report (a logged
traceback), or in clear in a token file.

The fault scenarios of tests/test_faults.py are checked the same way after each test (their
``beds`` fixture); here one proxy with a confidential app registration (so a client secret is
sent on every refresh) goes through the ordinary and the unusual: logins over all three protocols,
wrong and malformed credentials, refreshes, throttling, a provider error, a revoked
authorization and a new sign-in, a corrupt token file, and a stop."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import secrets
import time
import uuid

import pytest

from proxy.config import parse_config
from proxy.imap.server import ImapProxy
from proxy.pop3.server import Pop3Proxy
from proxy.logs import register_secret, setup_logging
from proxy.tls import client_context
from tests import fuzz_targets
from tests.faultbed import Bed, leaks
from tests.harness import free_port, pop3_section


def b64(text: str | bytes) -> bytes:
    return base64.b64encode(text.encode() if isinstance(text, str) else text)


def test_no_secret_in_any_output_through_everything(tmp_path, idp_reset, pki, dovecot, sink):
    sink.reset()
    client_secret = "client-secret-" + secrets.token_urlsafe(24)
    client_id = f"secrets-app-{uuid.uuid4().hex[:6]}"
    port = free_port()
    idp_reset.register_client(client_id, secret=client_secret, redirect_uris=[f"http://localhost:{port}"])
    kim, lou = (f"{name}-{uuid.uuid4().hex[:8]}@example.com" for name in ("kim", "lou"))
    kim_password, lou_password = "Kanzlei-Passwort " + secrets.token_hex(4), "lou's p@ss " + secrets.token_hex(4)
    bed = Bed(tmp_path / "bed", idp_reset, pki, dovecot, [kim, lou],
              identity={"client_id": client_id, "client_secret": client_secret},
              limits={"login_timeout": 4, "shutdown_grace": 1}, pop3=pop3_section(dovecot, pki))
    try:
        bed.authorize(kim, kim_password, extra_args=("--port", str(port)))
        idp_reset.set_access_token_lifetime(3)          # lou's tokens are refreshed every ~2 s
        bed.authorize(lou, lou_password, extra_args=("--port", str(port)))
        dovecot.deliver(kim, b"Subject: hello\r\n\r\nbody\r\n")
        bed.start()

        # ordinary use, both protocols, every mechanism
        imap = bed.client("imap")
        imap.line()
        imap.send(f'a LOGIN {kim} "{kim_password}"\r\nb SELECT INBOX\r\nc FETCH 1 (BODY.PEEK[])\r\nd LOGOUT\r\n'
                  .encode())
        imap.until(b"d OK")
        imap = bed.client("imap")
        imap.line()
        imap.send(b"a AUTHENTICATE PLAIN " + b64(f"\0{lou}\0{lou_password}") + b"\r\nb AUTHENTICATE PLAIN\r\n")
        imap.until(b"a OK")
        smtp = bed.client("smtp")
        smtp.line()
        smtp.send(b"EHLO c\r\nAUTH LOGIN\r\n")
        smtp.until(b"334 ")
        smtp.send(b64(kim) + b"\r\n")
        smtp.until(b"334 ")
        smtp.send(b64(kim_password) + b"\r\nMAIL FROM:<" + kim.encode() + b">\r\nRCPT TO:<x@example.org>\r\n"
                  b"DATA\r\n")
        smtp.until(b"354 ")
        smtp.send(b"Subject: sent\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        smtp.until(b"221 ")
        assert len(sink.wait_for_messages(1)) == 1
        pop = bed.client("pop3")
        pop.line()
        pop.send(f"USER {kim}\r\nPASS {kim_password}\r\nSTAT\r\nRETR 1\r\nQUIT\r\n".encode())
        pop.until(b"+OK Logging out")
        pop = bed.client("pop3")
        pop.line()
        pop.send(b"AUTH PLAIN " + b64(f"\0{lou}\0{lou_password}") + b"\r\nQUIT\r\n")
        pop.until(b"+OK Logging out")

        # wrong and malformed credentials, the password in odd places
        for password in (kim_password + "x", kim_password[:-1], "Kanzlei-Passwort"):
            assert "AUTHENTICATIONFAILED" in bed.imap_login(kim, password)
        hostile = bed.client("imap")
        hostile.line()
        hostile.send(f'a LOGIN {kim} "{kim_password}" extra\r\nb LOGIN "{kim_password}"\r\n'
                     f'c AUTHENTICATE PLAIN {b64(kim_password).decode()}!\r\nd AUTHENTICATE XOAUTH2 '
                     f'{b64("user=" + kim + chr(1) + "auth=Bearer " + kim_password).decode()}\r\ne LOGOUT\r\n'.encode())
        hostile.until(b"e OK")
        hostile = bed.client("smtp")
        hostile.line()
        hostile.send(b"EHLO c\r\nAUTH PLAIN " + b64(f"\0{kim}\0{kim_password}") + b" extra\r\nAUTH LOGIN "
                     + b64(kim) + b"\r\n" + b64(kim_password) + b"!!\r\nAUTH PLAIN " + b64(f"{lou}\0{kim}\0x")
                     + b"\r\nAUTH PLAIN " + b64(f"\0{kim}\0{kim_password}\0") + b"\r\nQUIT\r\n")
        hostile.until(b"221 ")
        assert bed.smtp_login(lou, lou_password + " ")[0] == 535
        assert bed.pop3_login(kim, kim_password + "x").startswith("-ERR [AUTH]")
        hostile = bed.client("pop3")
        hostile.line()
        hostile.send(f"PASS {kim_password}\r\nUSER {kim_password}\r\nAPOP {kim} {kim_password}\r\n{kim_password}\r\n"
                     f"AUTH PLAIN {b64(chr(0) + kim + chr(0) + kim_password).decode()}!\r\nAUTH PLAIN\r\n"
                     f"{b64(kim_password).decode()}\r\nUSER {kim}\r\nPASS {kim_password}\x00\r\nQUIT\r\n".encode())
        hostile.until(b"+OK Bye")

        # refreshes with the client secret, throttled once, then a provider error
        assert bed.imap_login(lou, lou_password) == "OK"   # unlocked: refreshed in the background now
        idp_reset.set_fault("429", count=1, retry_after=1)
        time.sleep(5)
        assert bed.imap_login(lou, lou_password) == "OK"
        assert idp_reset.count("token:refresh_token") >= 2

        # a revoked authorization, then a new sign-in
        idp_reset.set_access_token_lifetime(3600)
        idp_reset.revoke(kim)
        idp_reset.expire_access_tokens()
        assert "proxy authorize" in bed.imap_login(kim, kim_password)
        assert "proxy authorize" in bed.pop3_login(kim, kim_password)
        assert bed.smtp_login(kim, kim_password)[0] == 535
        bed.authorize(kim, kim_password, extra_args=("--port", str(port)))
        open_session = bed.client("imap")             # stays open until the proxy stops
        open_session.line()
        open_session.send(f'a LOGIN {kim} "{kim_password}"\r\n'.encode())
        assert open_session.until(b"a ")[-1].startswith(b"a OK")

        # the provider fails outright (500) for a login that needs a refresh
        idp_reset.expire_access_tokens()
        idp_reset.set_fault("500")
        assert "UNAVAILABLE" in bed.imap_login(lou, lou_password)
        assert bed.pop3_login(lou, lou_password).startswith("-ERR [SYS/TEMP]")
        idp_reset.clear_faults()

        # a corrupt token file, then a stop (SIGTERM) with a session open
        bed.token_file(lou).write_bytes(bed.token_file(lou).read_bytes()[:-40] + b"garbage")
        assert "AUTHENTICATIONFAILED" in bed.imap_login(lou, lou_password)
    finally:
        bed.stop()
    log = bed.log()
    assert "--log-level" in bed.proxy.process.args and "DEBUG" in bed.proxy.process.args  # the most verbose
    assert "access token refreshed" in log and "refresh token rejected" in log and "shutting down" in log
    found = leaks(bed.texts(), {*bed.secrets(), client_secret, kim_password, lou_password})
    assert not found, found


# ------------------------------------------------------------------ crash reports
@pytest.fixture
def debug_log():
    """The proxy's own logging set-up (redacting filter) at DEBUG, into a string."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    setup_logging("DEBUG", stream=stream)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


class _BuggyBroker(fuzz_targets._FakeBroker):
    """A broker with a bug whose exception carries secrets (as a careless library might)."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    async def authenticate(self, username: str, password: str):
        raise RuntimeError(f"unexpected state for token {self.token}: Authorization: Bearer {self.token}")


def test_smtp_crash_report_is_redacted(debug_log) -> None:
    token = "EwB" + secrets.token_urlsafe(60)
    register_secret(token)
    plain = b64(f"\0{fuzz_targets.SMTP_USER}\0{fuzz_targets.SMTP_PASSWORD}")
    run = asyncio.run(fuzz_targets.smtp_session([b"EHLO c\r\n", b"AUTH PLAIN " + plain + b"\r\n", b"QUIT\r\n"],
                                                broker=_BuggyBroker(token), internal_errors=True))
    output = debug_log.getvalue()
    assert "internal error" in output and "Traceback" in output and "RuntimeError" in output
    assert token not in output and "[redacted]" in output
    assert [code for code, _ in run.replies()] == [220, 250, 451, 221] and token.encode() not in run.output


@pytest.mark.parametrize("front", [ImapProxy, Pop3Proxy])
def test_imap_and_pop3_crash_reports_are_redacted(debug_log, tmp_path, front) -> None:
    token = "EwB" + secrets.token_urlsafe(60)
    register_secret(token)
    config = parse_config({"identity": {"authority": "https://127.0.0.1:1/t", "client_id": "c"},
                           "imap": {"listen": f"127.0.0.1:{free_port()}", "upstream": "127.0.0.1:1"},
                           "smtp": {"listen": f"127.0.0.1:{free_port()}", "upstream": "127.0.0.1:2"},
                           "pop3": {"listen": f"127.0.0.1:{free_port()}", "upstream": "127.0.0.1:3"},
                           "accounts": [{"username": fuzz_targets.SMTP_USER}]}, base_dir=tmp_path)
    login = (f'a LOGIN {fuzz_targets.SMTP_USER} "{fuzz_targets.SMTP_PASSWORD}"\r\n' if front is ImapProxy else
             f"USER {fuzz_targets.SMTP_USER}\r\nPASS {fuzz_targets.SMTP_PASSWORD}\r\n")

    async def scenario() -> bytes:
        proxy = front(config, _BuggyBroker(token), upstream_tls=client_context())
        await proxy.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.settings.listen.port)
            writer.write(login.encode())
            received = await asyncio.wait_for(reader.read(), 10)   # the session fails: the connection closes
            writer.close()
            return received
        finally:
            await proxy.close()

    received = asyncio.run(scenario())
    output = debug_log.getvalue()
    assert "session failed" in output and "Traceback" in output and "RuntimeError" in output
    assert token not in output and "[redacted]" in output
    assert received.startswith(b"* OK" if front is ImapProxy else b"+OK") and token.encode() not in received
    assert fuzz_targets.SMTP_PASSWORD not in output


def test_the_leak_finder_sees_secrets_as_such_and_inside_base64() -> None:
    token, password = "EwB" + secrets.token_urlsafe(40), "my local password"
    xoauth2 = b64(f"user=a@example.com\x01auth=Bearer {token}\x01\x01").decode()
    for text in (f"x {token} y", f"AUTH PLAIN {b64(chr(0) + 'a' + chr(0) + password).decode()}",
                 f"line {xoauth2}\r\n", f"334 {b64(password).decode()}", f"a{b64('xy' + password).decode()}"):
        assert leaks([("text", text)], {token, password}), text
    assert not leaks([("text", "nothing here " + b64("harmless words").decode())], {token, password})
