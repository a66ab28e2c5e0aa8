"""The SMTP side end to end: real clients (smtplib, swaks, curl) submit through the proxy, which logs
in to Dovecot's submission service (STARTTLS, XOAUTH2 checked against the identity provider);
Dovecot relays to the sink, which keeps the exact bytes. Delivered bytes are compared after the
one ``Received:`` header Dovecot adds."""

from __future__ import annotations

import base64
import contextlib
import smtplib
import socket
import subprocess
import time
import uuid
from dataclasses import replace

import pytest

from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.harness import ProxyProcess, wait_port

TRICKY_BODY = (b".\r\n..\r\n.leading dot\r\n...\r\ncaf\xc3\xa9 8-bit \xe2\x82\xac \xff\r\n" + b"L" * 20000 +
               b"\r\ntrailing spaces   \r\nbare\rCR inside a line\r\n\r\n")


def message(subject: str, body: bytes = b"Hello.\r\n") -> bytes:
    return (f"From: {SMTP_USER}\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@example.com>\r\n\r\n").encode() + body


def connect(proxy) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", proxy.port, timeout=30)
    client.ehlo("client.test")
    return client


def delivered(sink, count: int) -> list[bytes]:
    return [m.data_after_received() for m in sink.wait_for_messages(count)]


# ------------------------------------------------------------------ clients and exact bytes
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN with initial response", "LOGIN"])
def test_smtplib_sends_several_messages_byte_for_byte(smtp_proxy, sink, mechanism: str) -> None:
    proxy = smtp_proxy()
    client = connect(proxy)
    assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
    assert {"size", "8bitmime", "pipelining"} <= set(client.esmtp_features) and "starttls" not in client.esmtp_features
    client.user, client.password = SMTP_USER, SMTP_PASSWORD
    name = mechanism.split()[0]
    code, _ = client.auth(name, getattr(client, f"auth_{name.lower()}"),
                          initial_response_ok=mechanism != "LOGIN")
    assert code == 235
    first, second = message("first", TRICKY_BODY), message("second")
    assert client.sendmail(SMTP_USER, ["bob@example.org", "carol@example.org"], first, ["BODY=8BITMIME"]) == {}
    assert client.mail(SMTP_USER)[0] == 250 and client.rcpt("dave@example.org")[0] == 250
    assert client.rset()[0] == 250                       # relayed: the upstream forgets dave too
    assert client.noop()[0] == 250
    assert client.sendmail(SMTP_USER, ["erin@example.org"], second) == {}
    assert client.quit()[0] == 221
    assert delivered(sink, 2) == [first, second]
    assert [m.rcpt_tos for m in sink.messages] == [["bob@example.org", "carol@example.org"], ["erin@example.org"]]
    assert "BODY=8BITMIME" in sink.messages[0].mail_options


@pytest.mark.parametrize("auth", ["PLAIN", "LOGIN"])
def test_swaks_with_pipelining(smtp_proxy, sink, tmp_path, auth: str) -> None:
    proxy = smtp_proxy()
    data = message(f"swaks {auth}", TRICKY_BODY.replace(b"\r", b"").replace(b"\n", b"\r\n"))
    (tmp_path / "message.eml").write_bytes(data)
    result = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(proxy.port), "--ehlo", "client.test", "--from", SMTP_USER,
         "--to", "bob@example.org", "--auth", auth, "--auth-user", SMTP_USER, "--auth-password", SMTP_PASSWORD,
         "--pipeline", "--data", f"@{tmp_path / 'message.eml'}", "--timeout", "30"],
        capture_output=True, timeout=60)
    output = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, output[-3000:]
    assert "235 2.7.0 Authentication successful" in output
    assert delivered(sink, 1) == [data + b"\r\n"]  # swaks ends the data with one more CRLF (it does so direct too)


@pytest.mark.parametrize("auth", ["PLAIN", "LOGIN"])
def test_curl(smtp_proxy, sink, tmp_path, auth: str) -> None:
    proxy = smtp_proxy()
    data = message(f"curl {auth}", TRICKY_BODY.replace(b"\r", b"").replace(b"\n", b"\r\n"))
    (tmp_path / "message.eml").write_bytes(data)
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "30", f"smtp://127.0.0.1:{proxy.port}/client.test", "--mail-from", SMTP_USER,
         "--mail-rcpt", "bob@example.org", "--user", f"{SMTP_USER}:{SMTP_PASSWORD}", "--login-options",
         f"AUTH={auth}", "--upload-file", str(tmp_path / "message.eml")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert delivered(sink, 1) == [data]


def test_raw_pipelining_with_a_refused_recipient_and_rset(smtp_proxy, sink) -> None:
    proxy = smtp_proxy()
    sink.refuse_recipient("nobody@example.org")
    body = message("pipelined", TRICKY_BODY)
    with logged_in_socket(proxy) as (sock, replies):
        sock.sendall(f"MAIL FROM:<{SMTP_USER}>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<nobody@example.org>\r\n"
                     f"DATA\r\n".encode())
        assert read_codes(replies, 4) == [250, 250, 550, 354]
        stuffed = body.replace(b"\r\n.", b"\r\n..")  # (the body starts with "From:", not a dot)
        again = (f"MAIL FROM:<{SMTP_USER}>\r\nRCPT TO:<carol@example.org>\r\nRSET\r\n"
                 f"MAIL FROM:<{SMTP_USER}>\r\nRCPT TO:<dave@example.org>\r\nDATA\r\n")
        sock.sendall(stuffed + b".\r\n" + again.encode())  # end of data, then the next transaction at once
        assert read_codes(replies, 7) == [250, 250, 250, 250, 250, 250, 354]
        sock.sendall(b"Subject: second\r\n\r\n.\r\nQUIT\r\n")
        assert read_codes(replies, 2) == [250, 221]
    assert delivered(sink, 2) == [body, b"Subject: second\r\n\r\n"]
    assert [m.rcpt_tos for m in sink.messages] == [["bob@example.org"], ["dave@example.org"]]


def test_after_auth_the_sessions_own_loop_and_aiosmtpd_answer_in_the_order_of_the_commands(smtp_proxy, sink) -> None:
    """After AUTH the session runs MAIL/RCPT/DATA/RSET/NOOP itself and leaves every other line to
    aiosmtpd; pipelined together, the replies still come in the order of the commands."""
    proxy = smtp_proxy()
    with logged_in_socket(proxy) as (sock, replies):
        sock.sendall(f"NOOP\r\nVRFY bob\r\nMAIL FROM:<{SMTP_USER}>\r\nHELP\r\nRCPT TO:<bob@example.org>\r\n"
                     f"EHLO again.test\r\nRCPT TO:<bob@example.org>\r\nMAIL FROM:<{SMTP_USER}>\r\nBOGUS\r\n"
                     f"RCPT TO:<{'x' * 3000}@example.org>\r\nRCPT TO:<carol@example.org>\r\nDATA\r\n".encode())
        # EHLO ends the transaction (503 for the RCPT after it); an over-long RCPT gets aiosmtpd's 500
        assert read_codes(replies, 12) == [250, 252, 250, 250, 250, 250, 503, 250, 500, 500, 250, 354]
        sock.sendall(b"Subject: mixed\r\n\r\n.\r\nRSET\r\nQUIT\r\n")
        assert read_codes(replies, 3) == [250, 250, 221]
    assert delivered(sink, 1) == [b"Subject: mixed\r\n\r\n"]
    assert sink.messages[0].rcpt_tos == ["carol@example.org"]


@contextlib.contextmanager
def logged_in_socket(proxy):
    """A raw connection to the proxy after EHLO and AUTH PLAIN: (socket, its replies as a file)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        replies = sock.makefile("rb")
        plain = base64.b64encode(f"\0{SMTP_USER}\0{SMTP_PASSWORD}".encode()).decode()
        sock.sendall(f"EHLO client.test\r\nAUTH PLAIN {plain}\r\n".encode())
        assert read_codes(replies, 3) == [220, 250, 235]
        yield sock, replies


def read_codes(replies, count: int) -> list[int]:
    codes = []
    while len(codes) < count:
        line = replies.readline()
        assert line, f"connection closed after {codes}"
        if line[3:4] != b"-":
            codes.append(int(line[:3]))
    return codes


# ------------------------------------------------------------------ the upstream's own refusals
def test_upstream_refusals_reach_the_client_unchanged(smtp_proxy, sink) -> None:
    proxy = smtp_proxy()
    sink.refuse_recipient("nobody@example.org")
    client = connect(proxy)
    client.login(SMTP_USER, SMTP_PASSWORD)
    assert client.mail(SMTP_USER, ["SIZE=100000000"]) == (552, b"5.2.3 Message size exceeds administrative limit")
    assert client.mail(SMTP_USER)[0] == 250
    code, text = client.rcpt("nobody@example.org")
    assert code == 550 and b"Recipient address rejected: User unknown" in text  # the sink's words, via Dovecot
    assert client.rcpt("bob@example.org")[0] == 250
    sink.refuse_messages()
    assert client.data(message("refused"))[0] == 554
    sink.refuse_messages(False)
    assert client.sendmail(SMTP_USER, ["bob@example.org"], message("accepted")) == {}  # same session goes on
    client.quit()
    assert len(sink.wait_for_messages(1)) == 1 and b"accepted" in sink.messages[0].data


# ------------------------------------------------------------------ AUTH
def test_commands_before_auth_and_malformed_auth(smtp_proxy, sink) -> None:
    client = connect(smtp_proxy())
    for command in ("MAIL FROM:<a@example.org>", "RCPT TO:<b@example.org>", "DATA", "HELP"):
        assert client.docmd(command) == (530, b"5.7.0 Authentication required")
    assert client.docmd("AUTH PLAIN not-base64!")[0] == 501
    assert client.docmd("AUTH LOGIN") == (334, base64.b64encode(b"Username:"))
    assert client.docmd("*")[0] == 501
    other = base64.b64encode(f"boss@example.com\0{SMTP_USER}\0{SMTP_PASSWORD}".encode()).decode()
    assert client.docmd("AUTH PLAIN " + other)[0] == 535
    mine = base64.b64encode(f"\0{SMTP_USER}\0{SMTP_PASSWORD}".encode()).decode()
    assert client.docmd("auth plain " + mine)[0] == 235  # mechanism names are case-insensitive
    assert client.docmd("AUTH PLAIN " + mine)[0] == 503
    client.quit()


def test_wrong_password_is_slowed_and_never_touches_tokens(smtp_proxy, smtp_config, idp_reset) -> None:
    token_file = next(smtp_config.token_path.iterdir())
    before = token_file.read_bytes()
    client = connect(smtp_proxy())
    for client.user in (SMTP_USER, "stranger@example.com"):
        client.password, started = "wrong password", time.monotonic()
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth("PLAIN", client.auth_plain)
        assert (refused.value.smtp_code, refused.value.smtp_error) == (535, b"5.7.8 Authentication credentials invalid")
        assert time.monotonic() - started >= 0.4  # FailureThrottle: 0.5 s, then more
    assert client.docmd("MAIL FROM:<a@example.org>")[0] == 530
    assert token_file.read_bytes() == before and idp_reset.count("token") == 0
    client.login(SMTP_USER, SMTP_PASSWORD)  # the right one still works at once
    client.quit()


def test_identity_provider_hanging_or_down_gives_454_within_the_deadline(smtp_proxy, smtp_config, idp_reset) -> None:
    proxy = smtp_proxy(replace(smtp_config, limits=replace(smtp_config.limits, login_timeout=3)))
    idp_reset.expire_access_tokens()  # the stored token is refused upstream: a refresh is needed
    idp_reset.set_fault("hang", "token")
    for fault in ("hang", "down"):
        client = connect(proxy)
        started = time.monotonic()
        client.user, client.password = SMTP_USER, SMTP_PASSWORD
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.auth("PLAIN", client.auth_plain)  # (login() would try LOGIN next and wait again)
        assert failed.value.smtp_code == 454 and failed.value.smtp_error.startswith(b"4.7.0 "), fault
        assert time.monotonic() - started < 3 + 1, fault
        client.close()
        idp_reset.stop()


def test_access_token_longer_than_4096_characters(smtp_proxy, sink, idp_reset) -> None:
    proxy = smtp_proxy()
    idp_reset.set_access_token_length(6000)
    idp_reset.expire_access_tokens()  # refused upstream, so the proxy refreshes and gets a long one
    client = connect(proxy)
    client.login(SMTP_USER, SMTP_PASSWORD)
    assert client.sendmail(SMTP_USER, ["bob@example.org"], message("long token")) == {}
    client.quit()
    assert len(proxy.access_token()) == 6000
    assert len(delivered(sink, 1)) == 1


def test_connection_limit_and_login_deadline(smtp_proxy, smtp_config) -> None:
    proxy = smtp_proxy(replace(smtp_config, limits=replace(smtp_config.limits, max_connections=1,
                                                           preauth_timeout=3)))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as first:
        assert first.makefile("rb").readline().startswith(b"220 ")
        time.sleep(1.1)                                     # idle for more than a second (see proxy/admission.py)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as second:
            replies = second.makefile("rb")
            assert replies.readline().startswith(b"220 ")  # the new one is taken, the oldest idle one dropped
            assert first.makefile("rb").readline().startswith(b"421 4.7.0 Too many connections waiting to log in")
            started = time.monotonic()
            assert replies.readline() == b"421 4.4.2 No authentication within the time allowed; closing\r\n"
            assert replies.readline() == b"" and time.monotonic() - started < 4


# ------------------------------------------------------------------ `proxy serve` and its log
def test_proxy_serve_runs_the_smtp_listener_and_logs_no_secrets(smtp_config, sink, pki, idp) -> None:
    sink.reset()
    proxy = ProxyProcess(smtp_config.source, pki)
    try:
        wait_port("127.0.0.1", proxy.smtp_port, process=proxy.process)
        client = smtplib.SMTP("127.0.0.1", proxy.smtp_port, timeout=30)
        client.login(SMTP_USER, SMTP_PASSWORD)
        secret_subject = f"content-{uuid.uuid4()}"
        sent = message(secret_subject)
        assert client.sendmail(SMTP_USER, ["bob@example.org", "carol@example.org"], sent) == {}
        client.quit()
        assert len(delivered(sink, 1)) == 1
        deadline = time.monotonic() + 5
        while "session end" not in proxy.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proxy.stop()
    log = proxy.log_path.read_text(encoding="utf-8", errors="replace")
    assert f"user {SMTP_USER} message: {len(sent)} bytes, 2 recipient(s), upstream reply 250" in log
    assert f"session end: user {SMTP_USER}, 1 message(s) sent, 0 failed" in log
    for secret in [SMTP_PASSWORD, secret_subject, *idp.issued_tokens()]:
        assert secret not in log
