"""A web proxy in the way: the identity provider through HTTPS_PROXY/NO_PROXY or identity.http_proxy
(the config wins), and the IMAP and SMTP upstreams through HTTP CONNECT when via_http_proxy is
true, against a real tinyproxy from Debian on loopback (tests/webproxy.py): authorize, refresh,
IMAP and SMTP logins through it, and clear errors when it refuses (403) or wants a password (407)."""

from __future__ import annotations

import asyncio
import imaplib
import poplib
import smtplib
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from proxy.config import ConfigError, parse_config
from proxy.tokens.identity import HttpSession
from proxy.webproxy import ProxyUrlError, _Connect, parse_proxy_url, proxy_from
from tests.harness import ROOT, ProxyProcess, authorize, free_port, pop3_section, proxy_env, write_config
from tests.webproxy import TinyProxy

PROXY_USER, PROXY_SECRET = "kanzlei", "Pr0xy-s3cret-word"
PASSWORD = "local password 7"
GUID = "1b2c3d4e-0000-4000-8000-00000000abcd"


def user(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}@example.com"


# ------------------------------------------------------------------ settings (no network)
def test_proxy_urls_and_where_the_setting_comes_from():
    proxy = parse_proxy_url("http://ich%40kanzlei:p%3Ass@proxy.kanzlei.local:3128/", "identity.http_proxy")
    assert (proxy.host, proxy.port, proxy.username, proxy.password) == ("proxy.kanzlei.local", 3128, "ich@kanzlei",
                                                                        "p:ss")
    assert str(proxy) == "proxy.kanzlei.local:3128" and "p:ss" not in repr(proxy) and "p%3Ass" not in repr(proxy)
    assert proxy.url == "http://ich%40kanzlei:p%3Ass@proxy.kanzlei.local:3128"
    assert b"Proxy-Authorization: Basic aWNoQGthbnpsZWk6cDpzcw==\r\n" in proxy.connect_request("h", 993)
    assert parse_proxy_url("10.0.0.1:8080", "x").port == 8080
    assert b"Proxy-Authorization" not in parse_proxy_url("10.0.0.1:8080", "x").connect_request("h", 1)
    for bad in ("https://proxy:3128", "socks5://proxy:1080", "http://proxy", "http://proxy:3128/path",
                "http://:3128", "http://proxy:99999"):
        with pytest.raises(ProxyUrlError) as info:
            parse_proxy_url(bad, "x")
        assert "http://host:port" in str(info.value) or "only http://" in str(info.value)

    env = {"HTTPS_PROXY": "http://env-proxy:3128", "NO_PROXY": "localhost,.kanzlei.local,10.0.0.0/8"}
    assert proxy_from("http://config-proxy:8080", env).host == "config-proxy"      # the config wins
    assert proxy_from(False, env) is None                                           # false: not even the env
    from_env = proxy_from(None, env)
    assert (from_env.host, from_env.source) == ("env-proxy", "HTTPS_PROXY")
    assert from_env.bypass("mail.kanzlei.local") and from_env.bypass("localhost")
    assert not from_env.bypass("login.microsoftonline.com")
    assert proxy_from(None, {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"}).host == "lower"
    assert proxy_from(None, {}) is None
    assert not proxy_from("http://config-proxy:8080", env).bypass("localhost")       # NO_PROXY is the env's


def test_config_keys_for_the_web_proxy():
    base = {"identity": {"authority": "https://login.microsoftonline.com/organizations", "client_id": GUID},
            "accounts": [{"username": "a@firm.de"}]}

    def parse(environ=None, **sections):
        data = {**base, **{k: {**base.get(k, {}), **v} for k, v in sections.items()}}
        return parse_config(data, base_dir=Path("."), environ=environ or {})

    config = parse(identity={"http_proxy": f"http://{PROXY_USER}:{PROXY_SECRET}@10.1.1.1:3128"},
                   imap={"via_http_proxy": True})
    assert str(config.identity.http_proxy) == "10.1.1.1:3128"
    assert config.imap.upstream_proxy == config.identity.http_proxy and config.smtp.upstream_proxy is None
    assert PROXY_SECRET not in repr(config)
    env = {"HTTPS_PROXY": "http://10.2.2.2:8080", "NO_PROXY": "smtp.office365.com"}
    config = parse(env, imap={"via_http_proxy": True}, smtp={"via_http_proxy": True})
    assert str(config.imap.upstream_proxy) == "10.2.2.2:8080"
    assert config.smtp.via_http_proxy and config.smtp.upstream_proxy is None      # NO_PROXY names it
    for kwargs, message in (
            ({"imap": {"via_http_proxy": True}}, "imap.via_http_proxy: true, but no web proxy is set"),
            ({"identity": {"http_proxy": f"https://{PROXY_USER}:{PROXY_SECRET}@p:1"}},
             "identity.http_proxy: only http:// web proxies"),
            ({"identity": {"http_proxy": 3128}}, "identity.http_proxy: expected http://host:port or false"),
            ({"smtp": {"via_http_proxy": "yes"}}, "smtp.via_http_proxy: expected true or false")):
        with pytest.raises(ConfigError) as info:
            parse(**kwargs)
        assert str(info.value).startswith(message) and PROXY_SECRET not in str(info.value)
    with pytest.raises(ConfigError, match=r"^identity\.http_proxy \(from environment variable HTTPS_PROXY\): "):
        parse({"HTTPS_PROXY": f"http://{PROXY_USER}:{PROXY_SECRET}@proxy"})
    assert parse({"HTTPS_PROXY": "http://10.2.2.2:8080"}, identity={"http_proxy": False}).identity.http_proxy is None


def test_the_identity_session_takes_only_the_proxy_from_the_environment():
    proxy = proxy_from(None, {"HTTPS_PROXY": f"http://{PROXY_USER}:{PROXY_SECRET}@10.2.2.2:8080",
                              "NO_PROXY": "127.0.0.1"})
    session = HttpSession(5, "/ca.pem", proxy)
    assert session.trust_env is False and session.verify == "/ca.pem"       # REQUESTS_CA_BUNDLE cannot override
    assert session.proxies_for("https://login.microsoftonline.com/x") == {"https": proxy.url, "http": proxy.url}
    assert session.proxies_for("https://127.0.0.1:8443/t") == {}
    assert HttpSession(5, True).proxies_for("https://login.microsoftonline.com/x") == {}


def test_connect_answers_are_read_exactly():
    async def feed(*chunks: bytes):
        handshake = _Connect(b"")
        for chunk in chunks:
            handshake.data_received(chunk)
        try:
            return await asyncio.wait_for(handshake.answer, 1), bytes(handshake.extra)
        except Exception as exc:  # noqa: BLE001
            return str(exc), b""
    assert asyncio.run(feed(b"HTTP/1.1 200 Connection established\r\nX: y\r\n\r\n* OK hi")) == \
        ((200, "Connection established"), b"* OK hi")
    assert asyncio.run(feed(b"HTTP/1.0 407 Proxy Auth", b"entication Required\r\n\r\n"))[0] == \
        (407, "Proxy Authentication Required")
    assert asyncio.run(feed(b"SSH-2.0-OpenSSH\r\n\r\n"))[0] == "the web proxy's answer to CONNECT is not HTTP"
    assert "oversized" in asyncio.run(feed(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 5000))[0]


# ------------------------------------------------------------------ through a real tinyproxy
@pytest.fixture(scope="module")
def web_proxies(tmp_path_factory):
    """An open proxy that wants a user name and password, and one that refuses every CONNECT (403)."""
    base = tmp_path_factory.mktemp("webproxy")
    with TinyProxy(base / "auth", auth=(PROXY_USER, PROXY_SECRET)) as auth, \
            TinyProxy(base / "refusing", connect_ports=[1]) as refusing:
        yield auth, refusing


def run_proxy(config: Path, *args: str, stdin: str | None = None, env: dict | None = None, pki=None):
    return subprocess.run([sys.executable, "-m", "proxy", "-c", str(config), *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, timeout=120, env=env or proxy_env(pki))


def clean_env(pki, **extra: str) -> dict[str, str]:
    env = proxy_env(pki, **extra)
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        if name not in extra:
            env.pop(name, None)
    return env


def test_authorize_refresh_imap_and_smtp_through_the_web_proxy(tmp_path, web_proxies, idp_reset, pki, dovecot, sink):
    auth, _ = web_proxies
    name = user("proxied")
    idp_host, idp_port = "127.0.0.1", int(idp_reset.url.rsplit(":", 1)[1])
    config = write_config(tmp_path, idp=idp_reset, pki=pki, dovecot=dovecot, accounts=[name],
                          identity={"http_proxy": f"http://{PROXY_USER}:{PROXY_SECRET}@{auth.address}"},
                          imap={"via_http_proxy": True}, smtp={"via_http_proxy": True},
                          pop3=pop3_section(dovecot, pki, via_http_proxy=True))
    result = authorize(config, name, PASSWORD, pki, env=clean_env(pki, FAKE_BROWSER_LOG=str(tmp_path / "b.log")))
    assert result.returncode == 0, result.stderr
    assert auth.requests_for(idp_host, idp_port) >= 1            # discovery and redemption (one kept-alive tunnel)
    imap_before = auth.requests_for("127.0.0.1", dovecot.imap_port)
    smtp_before = auth.requests_for(dovecot.submission_host, dovecot.submission_port)
    pop3_before = auth.requests_for(dovecot.pop3_host, dovecot.pop3_port)
    # refresh (check forces one) and IMAP + SMTP logins with the proxy's own upstream code
    check = run_proxy(config, "check", name, "--password-stdin", stdin=PASSWORD + "\n", env=clean_env(pki))
    assert check.returncode == 0 and "Everything works." in check.stdout, check.stdout + check.stderr
    assert auth.requests_for("127.0.0.1", dovecot.imap_port) > imap_before
    assert auth.requests_for(dovecot.submission_host, dovecot.submission_port) > smtp_before
    assert auth.requests_for(dovecot.pop3_host, dovecot.pop3_port) > pop3_before
    # and a mail client through the listeners
    dovecot.deliver(name, b"Subject: through the proxy\r\n\r\nhello\r\n")
    proxy = ProxyProcess(config, pki)
    try:
        imap_seen = auth.requests_for("127.0.0.1", dovecot.imap_port)
        imap = imaplib.IMAP4("127.0.0.1", proxy.imap_port, timeout=30)
        imap.login(name, PASSWORD)
        assert imap.select("INBOX")[0] == "OK"
        imap.logout()
        assert auth.requests_for("127.0.0.1", dovecot.imap_port) == imap_seen + 1
        smtp_seen = auth.requests_for(dovecot.submission_host, dovecot.submission_port)
        with smtplib.SMTP("127.0.0.1", proxy.smtp_port, timeout=30) as smtp:
            smtp.login(name, PASSWORD)
            smtp.sendmail(name, ["bob@example.org"], f"From: {name}\r\nSubject: via\r\n\r\nx\r\n")
        assert auth.requests_for(dovecot.submission_host, dovecot.submission_port) > smtp_seen
        pop3_seen = auth.requests_for(dovecot.pop3_host, dovecot.pop3_port)
        pop = poplib.POP3("127.0.0.1", proxy.pop3_port, timeout=30)
        pop.user(name)
        pop.pass_(PASSWORD)
        assert pop.stat()[0] == 1
        pop.quit()
        assert auth.requests_for(dovecot.pop3_host, dovecot.pop3_port) == pop3_seen + 1
    finally:
        proxy.stop()
    for text in (result.stderr, check.stdout, check.stderr, proxy.log_path.read_text(errors="replace")):
        assert PROXY_SECRET not in text


def test_https_proxy_and_no_proxy_from_the_environment(tmp_path, web_proxies, idp_reset, pki, dovecot):
    auth, _ = web_proxies
    config = write_config(tmp_path, idp=idp_reset, pki=pki, dovecot=dovecot, accounts=[user("env")])
    idp_port = int(idp_reset.url.rsplit(":", 1)[1])
    before = auth.requests_for("127.0.0.1", idp_port)
    url = f"http://{PROXY_USER}:{PROXY_SECRET}@{auth.address}"
    via_env = run_proxy(config, "check", env=clean_env(pki, HTTPS_PROXY=url))
    assert "ok    identity provider" in via_env.stdout, via_env.stdout
    assert auth.requests_for("127.0.0.1", idp_port) == before + 1
    bypassed = run_proxy(config, "check", env=clean_env(pki, HTTPS_PROXY=url, NO_PROXY="localhost,127.0.0.1"))
    assert "ok    identity provider" in bypassed.stdout
    assert auth.requests_for("127.0.0.1", idp_port) == before + 1            # went direct
    # identity.http_proxy wins over the environment: a dead HTTPS_PROXY does not matter then
    config = write_config(tmp_path / "wins", idp=idp_reset, pki=pki, dovecot=dovecot, accounts=[user("cfg")],
                          identity={"http_proxy": url})
    wins = run_proxy(config, "check", env=clean_env(pki, HTTPS_PROXY=f"http://127.0.0.1:{free_port()}"))
    assert "ok    identity provider" in wins.stdout and auth.requests_for("127.0.0.1", idp_port) == before + 2


def test_refusals_and_missing_credentials_are_explained(tmp_path, web_proxies, idp_reset, pki, dovecot):
    auth, refusing = web_proxies
    name = user("refused")
    cases = {
        "no-credentials": (f"http://{auth.address}", "needs a user name and password (407"),
        "wrong-credentials": (f"http://{PROXY_USER}:wrong-{PROXY_SECRET}@{auth.address}",
                              "refused the user name and password in identity.http_proxy (40"),
        "refusing": (f"http://{refusing.address}", "does not allow a tunnel to 127.0.0."),
        "not-running": (f"http://127.0.0.1:{free_port()}", "web proxy"),
    }
    for label, (url, message) in cases.items():
        config = write_config(tmp_path / label, idp=idp_reset, pki=pki, dovecot=dovecot, accounts=[name],
                              identity={"http_proxy": url}, imap={"via_http_proxy": True},
                              smtp={"via_http_proxy": True})
        signed = authorize(config, name, PASSWORD, pki, timeout=10, env=clean_env(pki))
        assert signed.returncode == 1, (label, signed.stderr)
        assert "cannot reach the identity provider" in signed.stderr and message in signed.stderr, (label, signed.stderr)
        assert "What to do:" in signed.stderr and "Traceback" not in signed.stderr
        check = run_proxy(config, "check", env=clean_env(pki))
        assert check.returncode == 1, (label, check.stdout)
        lines = check.stdout.splitlines()
        for what in ("identity provider", "IMAP", "SMTP"):
            line = next(line for line in lines if line.startswith(f"FAIL  {what}"))
            assert message in line or (label == "not-running" and "web proxy" in line), (label, what, check.stdout)
        assert "Traceback" not in check.stdout + check.stderr
        for text in (signed.stderr, check.stdout, check.stderr):
            assert PROXY_SECRET not in text
    assert idp_reset.count("authorize") == 0 and idp_reset.count("token") == 0


def test_a_mail_client_hears_why_when_the_proxy_refuses_the_tunnel(tmp_path, web_proxies, idp_reset, pki, dovecot):
    """The listeners' logins through a refusing web proxy: an answer at once that names the proxy and
    what it refused (IMAP NO [UNAVAILABLE], SMTP 454), well within the client's 30 s."""
    auth, refusing = web_proxies
    name = user("client")
    good = write_config(tmp_path, idp=idp_reset, pki=pki, dovecot=dovecot, accounts=[name],
                        identity={"http_proxy": f"http://{PROXY_USER}:{PROXY_SECRET}@{auth.address}"})
    assert authorize(good, name, PASSWORD, pki, env=clean_env(pki)).returncode == 0   # a fresh token to use
    bad = write_config(tmp_path, idp=idp_reset, pki=pki, dovecot=dovecot, accounts=[name],
                       identity={"http_proxy": f"http://{refusing.address}"}, imap={"via_http_proxy": True},
                       smtp={"via_http_proxy": True}, tokens={"path": str(tmp_path / "tokens")})
    proxy = ProxyProcess(bad, pki)
    try:
        started = time.monotonic()
        imap = imaplib.IMAP4("127.0.0.1", proxy.imap_port, timeout=30)
        with pytest.raises(imaplib.IMAP4.error) as refused:
            imap.login(name, PASSWORD)
        imap.shutdown()
        text = str(refused.value)
        assert "UNAVAILABLE" in text and f"the web proxy {refusing.address} does not allow a tunnel" in text, text
        with smtplib.SMTP("127.0.0.1", proxy.smtp_port, timeout=30) as smtp:
            with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
                smtp.login(name, PASSWORD)
        assert failed.value.smtp_code == 454 and b"does not allow a tunnel" in failed.value.smtp_error
        assert time.monotonic() - started < 25
    finally:
        proxy.stop()
