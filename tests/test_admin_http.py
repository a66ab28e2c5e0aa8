"""The admin listener (/healthz, /readyz, /metrics), `proxy health`, and the per-session JSON log lines,
against a real `proxy serve` with real clients."""

from __future__ import annotations

import imaplib
import json
import smtplib
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.harness import ROOT, ProxyProcess, authorize, free_port, proxy_env, wait_port
from tests.opsbed import PROXY, copy_config, http_get, json_lines, sample, scrape, wait_for

OTHER_PASSWORD = "other local password"


def message(subject: str, size: int = 2000) -> bytes:
    return (f"From: {SMTP_USER}\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@example.com>\r\n\r\n").encode() + b"x" * size + b"\r\n"


def test_health_readiness_metrics_and_session_logs(smtp_authorized: Path, tmp_path: Path, pki, idp_reset,
                                                  dovecot, sink) -> None:
    other = f"other-{uuid.uuid4().hex[:8]}@example.com"
    admin_port = free_port()
    config_path = copy_config(smtp_authorized, tmp_path / "site", admin={"listen": f"127.0.0.1:{admin_port}"},
                              accounts=[{"username": SMTP_USER}, {"username": other}])
    stored = message("fetched through the proxy", 5000)
    dovecot.deliver(SMTP_USER, stored)
    sink.reset()
    proxy = ProxyProcess(config_path, pki, log_level="INFO", args=("--log-format", "json"))
    try:
        wait_port("127.0.0.1", admin_port, process=proxy.process)   # it opens after the IMAP listener
        status, body = http_get(admin_port, "/healthz")
        assert status == 200, body
        assert json.loads(body)["listeners"] == {"imap": True, "smtp": True}
        status, body = http_get(admin_port, "/readyz")
        assert status == 200, body          # this proxy can serve, though `other` was never authorized
        ready = json.loads(body)
        assert ready["store"] == {"kind": "folder", "read": True, "available": True}
        assert ready["accounts"][SMTP_USER]["usable"] is True
        assert ready["accounts"][other]["state"] == "not_authorized"
        assert "proxy authorize" in ready["accounts"][other]["reason"]
        assert http_get(admin_port, "/nothing")[0] == 404
        health = subprocess.run([*PROXY, "-c", str(config_path), "health"], capture_output=True, text=True,
                                timeout=30, cwd=ROOT)
        assert health.returncode == 0 and '"status": "ok"' in health.stdout, health.stderr
        ready = subprocess.run([*PROXY, "-c", str(config_path), "health", "--ready"], capture_output=True,
                               text=True, timeout=30, cwd=ROOT)
        assert ready.returncode == 0 and other in ready.stdout

        before = scrape(admin_port)
        assert sample(before, "proxy_account_needs_authorization", account=other) == 1   # shown here instead
        assert sample(before, "proxy_account_needs_authorization", account=SMTP_USER) == 0
        assert sample(before, "proxy_token_store_up") == 1
        assert sample(before, "proxy_logins_total", protocol="imap", result="ok") == 0
        assert ("proxy_token_expiry_timestamp_seconds", (("account", SMTP_USER),)) in before   # from the file

        imap = imaplib.IMAP4("127.0.0.1", proxy.imap_port, timeout=30)
        imap.login(SMTP_USER, SMTP_PASSWORD)
        typ, count = imap.select("INBOX")
        typ, data = imap.fetch(count[0], "(BODY.PEEK[])")
        assert data[0][1] == stored
        during = scrape(admin_port)                               # the session is still open
        assert sample(during, "proxy_sessions_open", protocol="imap") == 1
        assert sample(during, "proxy_relayed_bytes_total", protocol="imap", direction="to_client") > len(stored)
        imap.logout()
        with pytest.raises(imaplib.IMAP4.error):
            bad = imaplib.IMAP4("127.0.0.1", proxy.imap_port, timeout=30)
            try:
                bad.login(SMTP_USER, "Guess-4711-xyz")
            finally:
                bad.shutdown()
        sent = message("sent through the proxy", 7000)
        with smtplib.SMTP("127.0.0.1", proxy.smtp_port, timeout=30) as client:
            client.login(SMTP_USER, SMTP_PASSWORD)
            assert client.sendmail(SMTP_USER, ["bob@example.org"], sent) == {}
        assert len(sink.wait_for_messages(1)) == 1

        wait_for(lambda: sample(scrape(admin_port), "proxy_sessions_open", protocol="smtp") == 0 and
                 sample(scrape(admin_port), "proxy_sessions_open", protocol="imap") == 0, message="sessions closed")
        after = scrape(admin_port)
        delta = lambda name, **labels: sample(after, name, **labels) - sample(before, name, **labels)  # noqa: E731
        assert delta("proxy_logins_total", protocol="imap", result="ok") == 1
        assert delta("proxy_logins_total", protocol="imap", result="credentials") == 1
        assert delta("proxy_logins_total", protocol="smtp", result="ok") == 1
        assert delta("proxy_sessions_total", protocol="imap") == 2
        assert delta("proxy_sessions_total", protocol="smtp") == 1
        assert delta("proxy_login_duration_seconds_count", protocol="imap") == 2
        assert delta("proxy_relayed_bytes_total", protocol="imap", direction="to_client") > len(stored)
        assert delta("proxy_relayed_bytes_total", protocol="imap", direction="to_server") > 0
        assert delta("proxy_relayed_bytes_total", protocol="smtp", direction="to_server") == len(sent)
        expiry = sample(after, "proxy_token_expiry_timestamp_seconds", account=SMTP_USER)
        assert time.time() + 60 < expiry < time.time() + 7200

        # `other` gets authorized while the proxy runs, with short-lived tokens: shown at once,
        # and refreshed in the background after its first login.
        idp_reset.set_access_token_lifetime(4)
        result = authorize(config_path, other, OTHER_PASSWORD, pki)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: sample(scrape(admin_port), "proxy_account_needs_authorization", account=other) == 0,
                 timeout=10, message="the new authorization in /metrics")
        status, body = http_get(admin_port, "/readyz")
        assert status == 200 and json.loads(body)["accounts"][other]["state"] == "ok", body
        imap = imaplib.IMAP4("127.0.0.1", proxy.imap_port, timeout=30)
        imap.login(other, OTHER_PASSWORD)
        imap.logout()
        then = scrape(admin_port)
        first = sample(then, "proxy_token_expiry_timestamp_seconds", account=other)
        refreshes = sample(then, "proxy_token_refreshes_total", result="ok")
        wait_for(lambda: sample(scrape(admin_port), "proxy_token_refreshes_total", result="ok") > refreshes,
                 timeout=15, message="a background token refresh")
        assert sample(scrape(admin_port), "proxy_token_expiry_timestamp_seconds", account=other) > first
    finally:
        assert proxy.stop() == 0

    records = json_lines(proxy.log_path.read_text())             # every line is JSON
    events = [r for r in records if "event" in r]
    for protocol in ("imap", "smtp"):
        mine = [r for r in events if r["protocol"] == protocol and r.get("account") == SMTP_USER]
        kinds = {r["event"] for r in mine}
        assert {"login", "session_end"} <= kinds, mine
        end = next(r for r in mine if r["event"] == "session_end" and r["result"] == "ok")
        assert end["duration_s"] >= 0 and end["bytes_from_client"] > 0
        assert any(r["event"] == "session_start" and r["protocol"] == protocol for r in events)
        login = next(r for r in mine if r["event"] == "login" and r["result"] == "ok")
        assert login["duration_s"] >= 0
    imap_end = next(r for r in events if r["event"] == "session_end" and r["protocol"] == "imap"
                    and r.get("account") == SMTP_USER and r["result"] == "ok")
    assert imap_end["bytes_to_client"] > len(stored)
    assert any(r["event"] == "login" and r["result"] == "credentials" for r in events)
    text = proxy.log_path.read_text()
    for secret in [SMTP_PASSWORD, OTHER_PASSWORD, "Guess-4711-xyz", *idp_reset.issued_tokens()]:
        assert secret not in text


def status_of(port: int, path: str) -> int:
    """The HTTP status, 0 while nothing listens (the admin listener opens after IMAP and SMTP)."""
    try:
        return http_get(port, path)[0]
    except OSError:
        return 0


def test_admin_listener_is_off_by_default_and_bounded(smtp_authorized: Path, tmp_path: Path, pki) -> None:
    admin_port = free_port()
    config_path = copy_config(smtp_authorized, tmp_path / "off")
    proxy = ProxyProcess(config_path, pki)
    try:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", admin_port), timeout=2).close()
        result = subprocess.run([*PROXY, "-c", str(config_path), "health"], capture_output=True, text=True,
                                timeout=30, cwd=ROOT)
        assert result.returncode == 2 and "admin.listen" in result.stderr
    finally:
        assert proxy.stop() == 0
    config_path = copy_config(smtp_authorized, tmp_path / "on", admin={"listen": f"127.0.0.1:{admin_port}"})
    proxy = ProxyProcess(config_path, pki)
    try:
        wait_for(lambda: status_of(admin_port, "/healthz") == 200, message="the admin listener")
        with socket.create_connection(("127.0.0.1", admin_port), timeout=10) as sock:   # junk: answered, closed
            sock.sendall(b"\x16\x03\x01 not http\r\n\r\n")
            assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 400")
        with socket.create_connection(("127.0.0.1", admin_port), timeout=10) as sock:
            sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 405")
        result = subprocess.run([*PROXY, "-c", str(config_path), "health"], capture_output=True, text=True,
                                timeout=30, cwd=ROOT, env=proxy_env(pki))
        assert result.returncode == 0, result.stderr
    finally:
        assert proxy.stop() == 0
    result = subprocess.run([*PROXY, "-c", str(config_path), "health"], capture_output=True, text=True,
                            timeout=30, cwd=ROOT)
    assert result.returncode == 1                                # nobody answers any more
