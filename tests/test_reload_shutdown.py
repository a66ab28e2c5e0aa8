"""Config reload (SIGHUP and a changed file) without dropping the sessions of accounts that stay
(those of removed accounts are closed), and graceful shutdown on SIGTERM (exit status 0), against
a real `proxy serve`."""

from __future__ import annotations

import base64
import imaplib
import re
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.harness import ProxyProcess, authorize, free_port
from tests.opsbed import copy_config, sample, scrape, update_config, wait_for

B_PASSWORD = "second local password"


def message(subject: str) -> bytes:
    return (f"From: {SMTP_USER}\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@example.com>\r\n\r\nBody line.\r\n").encode()


def imap_login(port: int, user: str, password: str) -> imaplib.IMAP4:
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    imap.login(user, password)
    return imap


def login_fails(port: int, user: str, password: str) -> bool:
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    try:
        imap.login(user, password)
    except imaplib.IMAP4.error:
        return True
    finally:
        imap.shutdown()
    return False


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def test_reload_applies_to_new_logins_and_keeps_open_sessions(smtp_authorized: Path, tmp_path: Path, pki, dovecot,
                                                              idp) -> None:
    second = f"second-{uuid.uuid4().hex[:8]}@example.com"
    admin_port = free_port()
    config_path = copy_config(smtp_authorized, tmp_path / "site", admin={"listen": f"127.0.0.1:{admin_port}"})
    # `second` is authorized into the same token store through a config that lists it.
    other_config = copy_config(smtp_authorized, tmp_path / "other", accounts=[{"username": second}],
                               tokens={"path": str(tmp_path / "site" / "tokens")})
    assert authorize(other_config, second, B_PASSWORD, pki).returncode == 0
    original = config_path.read_text()
    dovecot.deliver(SMTP_USER, message("kept open across reloads"))
    proxy = ProxyProcess(config_path, pki)
    try:
        port = proxy.imap_port
        kept = imap_login(port, SMTP_USER, SMTP_PASSWORD)
        typ, count = kept.select("INBOX")                         # (the mailbox is shared with other tests)
        assert typ == "OK"
        assert login_fails(port, second, B_PASSWORD)              # not configured yet

        # SIGHUP: `second` is added; the open session of SMTP_USER goes on.
        update_config(config_path, accounts=[{"username": SMTP_USER}, {"username": second}],
                      limits={"login_timeout": 20})
        proxy.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded (SIGHUP)" in proxy.log_text(), message="the SIGHUP reload")
        assert f"added {second}" in proxy.log_text()
        imap_login(port, second, B_PASSWORD).logout()              # new account: works for new logins
        assert kept.noop()[0] == "OK"                              # an unchanged account's session goes on
        typ, data = kept.fetch(count[0].decode(), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK" and b"kept open across reloads" in data[0][1]

        # SIGHUP: SMTP_USER is removed: no new logins, and its open session is closed (issue 12).
        update_config(config_path, accounts=[{"username": second}], limits={"login_timeout": 20})
        proxy.process.send_signal(signal.SIGHUP)
        wait_for(lambda: f"removed {SMTP_USER}" in proxy.log_text(), message="the second SIGHUP reload")
        assert login_fails(port, SMTP_USER, SMTP_PASSWORD)
        wait_for(lambda: _closed(kept), message="the removed account's session closed")
        assert sample(scrape(admin_port), "proxy_config_reloads_total", result="ok") >= 2

        # An invalid config is refused with the error; the running one stays.
        config_path.write_text(original.replace("accounts:", "accounts: [[[", 1))
        proxy.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "refused, the running config stays" in proxy.log_text(), message="the refusal")
        assert "not valid YAML" in proxy.log_text()
        update_config_text = config_path.read_text()
        assert "[[[" in update_config_text
        imap_login(port, second, B_PASSWORD).logout()
        assert sample(scrape(admin_port), "proxy_config_reloads_total", result="refused") >= 1
        assert proxy.process.poll() is None

        # No signal at all: the changed file is noticed by itself (how Windows reloads).
        config_path.write_text(original.replace("accounts:", f"accounts:\n- username: {second}", 1))
        wait_for(lambda: "config reloaded (config file changed)" in proxy.log_text(), timeout=15,
                 message="the file watcher's reload")
        imap_login(port, SMTP_USER, SMTP_PASSWORD).logout()
        imap_login(port, second, B_PASSWORD).logout()

        # Listener addresses are bound at start: a change is reported, the old listener stays.
        update_config(config_path, imap={"listen": f"127.0.0.1:{free_port()}"})
        proxy.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "imap.listen changed" in proxy.log_text(), message="the restart warning")
        imap_login(port, second, B_PASSWORD).logout()
    finally:
        assert proxy.stop() == 0
    for secret in [SMTP_PASSWORD, B_PASSWORD, *idp.issued_tokens()]:
        assert secret not in proxy.log_path.read_text()


def _closed(imap) -> bool:
    try:
        imap.noop()
        return False
    except (imaplib.IMAP4.abort, OSError):
        return True


def _smtp(port: int) -> tuple[socket.socket, object]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    replies = sock.makefile("rb")
    assert replies.readline().startswith(b"220 ")
    plain = base64.b64encode(f"\0{SMTP_USER}\0{SMTP_PASSWORD}".encode()).decode()
    sock.sendall(f"EHLO client.test\r\nAUTH PLAIN {plain}\r\n".encode())
    while not (line := replies.readline()).startswith(b"250 "):
        assert line.startswith(b"250-"), line
    assert replies.readline().startswith(b"235 ")
    return sock, replies


def test_sigterm_lets_sessions_finish_then_exits_zero(smtp_authorized: Path, tmp_path: Path, pki, sink) -> None:
    config_path = copy_config(smtp_authorized, tmp_path / "site", limits={"shutdown_grace": 20})
    sink.reset()
    proxy = ProxyProcess(config_path, pki)
    try:
        logged_in = imap_login(proxy.imap_port, SMTP_USER, SMTP_PASSWORD)
        assert logged_in.select("INBOX")[0] == "OK"
        waiting = socket.create_connection(("127.0.0.1", proxy.imap_port), timeout=30)   # never logs in
        waiting_replies = waiting.makefile("rb")
        assert waiting_replies.readline().startswith(b"* OK")
        idle, idle_replies = _smtp(proxy.smtp_port)
        busy, busy_replies = _smtp(proxy.smtp_port)
        busy.sendall(b"MAIL FROM:<%s>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n" % SMTP_USER.encode())
        assert [busy_replies.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        body = message("in flight during shutdown")
        busy.sendall(body[:40])                                    # the message is half sent ...

        started = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        wait_for(lambda: refused(proxy.imap_port) and refused(proxy.smtp_port), message="listeners closed")
        assert waiting_replies.readline().startswith(b"* BYE")     # nothing in progress: ended at once
        assert idle_replies.readline().startswith(b"421 4.3.2")
        assert logged_in.noop()[0] == "OK"                         # a logged-in IMAP session goes on
        busy.sendall(body[40:] + b".\r\n")                         # ... and is finished: 250, then 421
        assert busy_replies.readline().startswith(b"250 ")
        assert busy_replies.readline().startswith(b"421 4.3.2")
        assert busy_replies.readline() == b""
        assert [m.data_after_received() for m in sink.wait_for_messages(1)] == [body]
        assert proxy.process.poll() is None                        # still waiting for the IMAP session
        logged_in.logout()
        assert proxy.process.wait(10) == 0                         # exits 0 once all are done
        assert time.monotonic() - started < 10
        for sock in (waiting, idle, busy):
            sock.close()
    finally:
        proxy.stop()
    log = proxy.log_path.read_text()
    assert re.search(r"waiting up to 20 s for \d IMAP and 2 SMTP session\(s\)", log), log
    assert log.rstrip().endswith("stopped")


def test_grace_period_ends_and_a_second_signal_cuts_short(smtp_authorized: Path, tmp_path: Path, pki) -> None:
    config_path = copy_config(smtp_authorized, tmp_path / "site", limits={"shutdown_grace": 1.5})
    proxy = ProxyProcess(config_path, pki)
    try:
        stuck = imap_login(proxy.imap_port, SMTP_USER, SMTP_PASSWORD)
        started = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(15) == 0
        assert 1.3 < time.monotonic() - started < 6
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            stuck.noop()
    finally:
        proxy.stop()
    assert "1 IMAP and 0 SMTP session(s) were still open after the grace period" in proxy.log_path.read_text()

    config_path = copy_config(smtp_authorized, tmp_path / "second", limits={"shutdown_grace": 60})
    proxy = ProxyProcess(config_path, pki)
    try:
        stuck = imap_login(proxy.imap_port, SMTP_USER, SMTP_PASSWORD)
        started = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "waiting up to 60 s" in proxy.log_text(), message="the drain")
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(15) == 0
        assert time.monotonic() - started < 6
        stuck.shutdown()
    finally:
        proxy.stop()
    assert "second signal" in proxy.log_path.read_text()
