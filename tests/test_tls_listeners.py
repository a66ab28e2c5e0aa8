"""Local TLS: `proxy certs`, then the IMAP and SMTP listeners with implicit TLS and STARTTLS,
used by curl and Python's imaplib/smtplib trusting the generated CA (and failing without it)."""

from __future__ import annotations

import imaplib
import logging
import smtplib
import socket
import ssl
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from proxy.config import ConfigError, parse_config
from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.harness import ROOT, ProxyProcess, wait_port
from tests.opsbed import PROXY, copy_config, make_certs, port_of, tls_sections, wait_for

CURL = ["curl", "-sS", "--noproxy", "*", "--max-time", "30"]


def message(subject: str) -> bytes:
    return (f"From: {SMTP_USER}\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@example.com>\r\n\r\nHello over TLS.\r\n").encode()


# ------------------------------------------------------------------ proxy certs
def test_certs_command_creates_a_constrained_ca_and_never_overwrites(tmp_path: Path) -> None:
    config = tmp_path / "site" / "config.yaml"  # need not exist
    run = lambda *args: subprocess.run([*PROXY, "-c", str(config), "certs", *args], capture_output=True,  # noqa: E731
                                       text=True, timeout=60, cwd=ROOT)
    result = run("--name", "mail.kanzlei.local", "--name", "192.0.2.7")
    assert result.returncode == 0, result.stderr
    certs = tmp_path / "site" / "certs"                          # default: certs/ beside the config
    assert sorted(p.name for p in certs.iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]
    for key in ("ca.key", "server.key"):
        assert (certs / key).stat().st_mode & 0o777 == 0o600
    assert "certutil" in result.stdout and "update-ca-certificates" in result.stdout   # how to trust the CA
    assert str(certs / "server.pem") in result.stdout

    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "mail.kanzlei.local"}
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "192.0.2.7"}
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    constraints = ca.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    assert x509.DNSName("mail.kanzlei.local") in constraints.value.permitted_subtrees

    before = {p.name: p.read_bytes() for p in certs.iterdir()}
    again = run()
    assert again.returncode == 1 and "--force" in again.stderr
    assert {p.name: p.read_bytes() for p in certs.iterdir()} == before   # untouched
    forced = run("--force")
    assert forced.returncode == 0, forced.stderr
    assert (certs / "ca.pem").read_bytes() != before["ca.pem"]
    bad = run("--dir", str(tmp_path / "other"), "--name", "not a name")
    assert bad.returncode == 2 and not (tmp_path / "other" / "ca.pem").exists()


# ------------------------------------------------------------------ config rules
def _config(tmp_path: Path, **sections) -> dict:
    data = {"identity": {"authority": "https://login.example.com/tenant", "client_id": "app"},
            "accounts": [{"username": "alice@firm.de"}]}
    data.update(sections)
    return data


def test_config_requires_tls_for_non_loopback_listeners(tmp_path: Path) -> None:
    from proxy.certs import create_local_certs
    certs, _ = create_local_certs(tmp_path / "certs")
    tls = {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)}
    with pytest.raises(ConfigError, match=r"imap\.listen: 0\.0\.0\.0:1143 is not a loopback address"):
        parse_config(_config(tmp_path, imap={"listen": "0.0.0.0:1143"}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"imap\.listen"):   # STARTTLS merely offered: still plaintext
        parse_config(_config(tmp_path, imap={"listen": "0.0.0.0:1143", "starttls": True}, tls=tls), base_dir=tmp_path)
    config = parse_config(_config(tmp_path, imap={"listen": "0.0.0.0:1143", "starttls": "required"}, tls=tls,
                                  smtp={"tls_listen": "0.0.0.0:1465"}), base_dir=tmp_path)
    assert config.imap.starttls == "required" and not config.imap.plaintext_exposed
    assert config.smtp.tls_listen is not None and config.smtp.tls_listen.port == 1465
    opted = parse_config(_config(tmp_path, smtp={"listen": "0.0.0.0:1587", "allow_plaintext": True}),
                         base_dir=tmp_path)
    assert opted.smtp.plaintext_exposed
    with pytest.raises(ConfigError, match=r"^tls: imap offers TLS"):
        parse_config(_config(tmp_path, imap={"starttls": True}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"imap\.starttls: expected true, false or required"):
        parse_config(_config(tmp_path, imap={"starttls": "maybe"}, tls=tls), base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"tls\.cert_file: file not found"):
        parse_config(_config(tmp_path, tls={"cert_file": "missing.pem", "key_file": str(certs.key_file)}),
                     base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"smtp\.tls_listen: 127\.0\.0\.1:1993 is already imap\.tls_listen"):
        parse_config(_config(tmp_path, tls=tls, imap={"tls_listen": "127.0.0.1:1993"},
                             smtp={"tls_listen": "127.0.0.1:1993"}), base_dir=tmp_path)
    relative = parse_config(_config(tmp_path, tls={"cert_file": "certs/server.pem", "key_file": "certs/server.key"}),
                            base_dir=tmp_path)
    assert relative.tls.cert_file == tmp_path / "certs" / "server.pem"   # relative to the config's folder


def test_plaintext_opt_in_logs_a_warning(tmp_path: Path, caplog) -> None:
    import asyncio

    from proxy.service import Runtime
    config = parse_config(_config(tmp_path, smtp={"listen": "0.0.0.0:1587", "allow_plaintext": True}),
                          base_dir=tmp_path)
    runtime = Runtime(config, store=None, broker=None, imap=None, smtp=None, server_tls=None)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="proxy"):
        asyncio.run(runtime.start(watch_interval=0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("smtp.listen is 0.0.0.0:1587" in w and "in clear" in w for w in warnings), warnings
    assert not any(w.startswith("imap.listen") for w in warnings)


def test_environment_overrides(tmp_path: Path) -> None:
    from proxy.config import load_config
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, imap={"listen": "127.0.0.1:1143"})))
    config = load_config(path, {"PROXY_IMAP_LISTEN": "127.0.0.1:2143", "PROXY_TOKENS_PATH": "/var/lib/tokens",
                                "PROXY_ADMIN_LISTEN": "127.0.0.1:9090", "PROXY_LIMITS_SHUTDOWN_GRACE": "5",
                                "PROXY_SMTP_ALLOW_PLAINTEXT": "true", "PROXY_LOG_FORMAT": "json",
                                "OTHER_IMAP_LISTEN": "x"})
    assert config.imap.listen.port == 2143 and str(config.token_path) == "/var/lib/tokens"
    assert config.admin.listen.port == 9090 and config.limits.shutdown_grace == 5
    assert config.smtp.allow_plaintext is True
    assert load_config(path, {}).admin is None
    with pytest.raises(ConfigError, match=r"imap\.lisen \(from environment variable PROXY_IMAP_LISEN\): unknown key "
                                          r"\(did you mean PROXY_IMAP_LISTEN\?\)"):
        load_config(path, {"PROXY_IMAP_LISEN": "127.0.0.1:1"})


# ------------------------------------------------------------------ the listeners, end to end
@pytest.fixture
def tls_proxy(smtp_authorized: Path, tmp_path: Path, pki, sink, dovecot):
    directory = tmp_path / "site"
    copy_config(smtp_authorized, directory)
    certs = make_certs(directory)
    sections = tls_sections(certs, starttls=True)
    config_path = copy_config(directory, tmp_path / "run", **sections)
    config = yaml.safe_load(config_path.read_text())
    proxy = ProxyProcess(config_path, pki)
    ports = {"imaps": port_of(config["imap"]["tls_listen"]), "smtps": port_of(config["smtp"]["tls_listen"]),
             "imap": proxy.imap_port, "smtp": proxy.smtp_port}
    for port in ports.values():
        wait_port("127.0.0.1", port, process=proxy.process)
    sink.reset()
    yield proxy, ports, certs / "ca.pem"
    assert proxy.stop() == 0
    log = proxy.log_path.read_text()
    assert SMTP_PASSWORD not in log


def _trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def test_imaplib_over_implicit_tls_and_starttls(tls_proxy, dovecot) -> None:
    proxy, ports, ca = tls_proxy
    stored = message("imaplib over TLS")
    dovecot.deliver(SMTP_USER, stored)
    for host in ("127.0.0.1", "localhost"):
        imap = imaplib.IMAP4_SSL(host, ports["imaps"], ssl_context=_trusting(ca), timeout=30)
        assert imap.login(SMTP_USER, SMTP_PASSWORD)[0] == "OK"
        typ, count = imap.select("INBOX")
        assert typ == "OK"
        typ, data = imap.fetch(count[0], "(BODY.PEEK[])")
        assert typ == "OK" and data[0][1] == stored
        imap.logout()

    imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
    assert "STARTTLS" in imap.capabilities
    assert imap.starttls(ssl_context=_trusting(ca))[0] == "OK"
    assert "STARTTLS" not in imap.capabilities                  # asked again after the handshake
    assert imap.login(SMTP_USER, SMTP_PASSWORD)[0] == "OK"
    assert imap.select("INBOX")[0] == "OK"
    imap.logout()

    with pytest.raises(ssl.SSLCertVerificationError):            # not trusted without the generated CA
        imaplib.IMAP4_SSL("127.0.0.1", ports["imaps"], ssl_context=ssl.create_default_context(), timeout=30)
    imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
    with pytest.raises(ssl.SSLCertVerificationError):
        imap.starttls(ssl_context=ssl.create_default_context())
    wait_for(lambda: "STARTTLS failed" in proxy.log_text(), message="the failed handshake in the log")
    assert "session start (TLS)" in proxy.log_text()


def test_curl_over_imaps_smtps_and_starttls(tls_proxy, dovecot, sink, tmp_path: Path) -> None:
    proxy, ports, ca = tls_proxy
    stored = message("curl over TLS")
    dovecot.deliver(SMTP_USER, stored)
    user = ["--user", f"{SMTP_USER}:{SMTP_PASSWORD}"]
    for url, extra in ((f"imaps://127.0.0.1:{ports['imaps']}/INBOX", []),
                       (f"imap://127.0.0.1:{ports['imap']}/INBOX", ["--ssl-reqd"])):
        listed = subprocess.run([*CURL, "--cacert", str(ca), *extra, *user, "-X", "EXAMINE INBOX", url],
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert "EXISTS" in listed.stdout
        fetched = subprocess.run([*CURL, "--cacert", str(ca), *extra, *user, url + ";UID=1"],
                                 capture_output=True, timeout=60)
        assert fetched.returncode == 0, fetched.stderr
        assert fetched.stdout.startswith(b"From: ")
        untrusted = subprocess.run([*CURL, *extra, *user, url], capture_output=True, text=True, timeout=60)
        assert untrusted.returncode == 60, untrusted.stderr      # SSL certificate problem

    sent = []
    for url, extra in ((f"smtps://127.0.0.1:{ports['smtps']}/client.test", []),
                       (f"smtp://127.0.0.1:{ports['smtp']}/client.test", ["--ssl-reqd"])):
        data = message(f"curl {url.split(':')[0]}")
        (tmp_path / "message.eml").write_bytes(data)
        result = subprocess.run([*CURL, "--cacert", str(ca), *extra, *user, "--mail-from", SMTP_USER,
                                 "--mail-rcpt", "bob@example.org", "--upload-file", str(tmp_path / "message.eml"),
                                 url], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        sent.append(data)
        untrusted = subprocess.run([*CURL, *extra, *user, "--mail-from", SMTP_USER, "--mail-rcpt", "bob@example.org",
                                    "--upload-file", str(tmp_path / "message.eml"), url],
                                   capture_output=True, text=True, timeout=60)
        assert untrusted.returncode == 60, untrusted.stderr
    assert [m.data_after_received() for m in sink.wait_for_messages(2)] == sent


def test_smtplib_over_smtps_and_starttls(tls_proxy, sink) -> None:
    proxy, ports, ca = tls_proxy
    with smtplib.SMTP_SSL("127.0.0.1", ports["smtps"], context=_trusting(ca), timeout=30) as client:
        client.ehlo("client.test")
        assert "starttls" not in client.esmtp_features and "auth" in client.esmtp_features
        client.login(SMTP_USER, SMTP_PASSWORD)
        assert client.sendmail(SMTP_USER, ["bob@example.org"], message("smtps")) == {}
    with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as client:
        client.ehlo("client.test")
        assert "starttls" in client.esmtp_features
        client.starttls(context=_trusting(ca))
        client.ehlo("client.test")
        assert "starttls" not in client.esmtp_features
        client.login(SMTP_USER, SMTP_PASSWORD)
        assert client.sendmail(SMTP_USER, ["bob@example.org"], message("starttls")) == {}
    assert len(sink.wait_for_messages(2)) == 2


def test_starttls_required_refuses_passwords_in_clear(smtp_authorized: Path, tmp_path: Path, pki, sink) -> None:
    directory = tmp_path / "site"
    copy_config(smtp_authorized, directory)
    certs = make_certs(directory)
    config_path = copy_config(directory, tmp_path / "run", **tls_sections(certs, starttls="required", implicit=False))
    proxy = ProxyProcess(config_path, pki)
    ca = certs / "ca.pem"
    sink.reset()
    try:
        wait_port("127.0.0.1", proxy.smtp_port, process=proxy.process)
        with socket.create_connection(("127.0.0.1", proxy.imap_port), timeout=30) as sock:
            replies = sock.makefile("rb")
            greeting = replies.readline()
            assert b"STARTTLS" in greeting and b"LOGINDISABLED" in greeting and b"AUTH=PLAIN" not in greeting
            sock.sendall(f'a LOGIN "{SMTP_USER}" "{SMTP_PASSWORD}"\r\n'.encode())
            assert replies.readline().startswith(b"a NO [PRIVACYREQUIRED]")
        imap = imaplib.IMAP4("127.0.0.1", proxy.imap_port, timeout=30)
        imap.starttls(ssl_context=_trusting(ca))
        assert "LOGINDISABLED" not in imap.capabilities and "AUTH=PLAIN" in imap.capabilities
        assert imap.login(SMTP_USER, SMTP_PASSWORD)[0] == "OK"
        imap.logout()

        with smtplib.SMTP("127.0.0.1", proxy.smtp_port, timeout=30) as client:
            client.ehlo("client.test")
            assert "auth" not in client.esmtp_features and "starttls" in client.esmtp_features
            code, text = client.docmd("AUTH", "PLAIN")
            assert code == 538, text                              # encryption required
            client.starttls(context=_trusting(ca))
            client.ehlo("client.test")
            assert "auth" in client.esmtp_features
            client.login(SMTP_USER, SMTP_PASSWORD)
            assert client.sendmail(SMTP_USER, ["bob@example.org"], message("required")) == {}
        assert len(sink.wait_for_messages(1)) == 1
    finally:
        assert proxy.stop() == 0
    assert SMTP_PASSWORD not in proxy.log_path.read_text()
