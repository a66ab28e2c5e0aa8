"""Issue 4: the browser sign-in in a real browser. `proxy authorize` opens Debian's headless
Chromium (through $BROWSER, as a user's system browser would be opened), which shows the
identity provider's sign-in page, gets "Sign in" clicked, runs the identity provider's
auto-submitting form_post page and so reaches the proxy's localhost listener. Chromium and
chromedriver come from apt (tests/run.sh); the test fails, rather than skips, without them."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sys
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.harness import ROOT, ProxyProcess, authorize, proxy_env, write_config
from tests.test_accounts import PASSWORD, imap_login, user


def spki_pin(cert_file) -> str:
    """Chromium's --ignore-certificate-errors-spki-list value for a server certificate."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def test_browser_sign_in_in_headless_chromium(tmp_path, idp_reset, pki, dovecot):
    assert shutil.which("chromium") and shutil.which("chromedriver"), \
        "install Debian's chromium and chromium-driver (bash tests/run.sh does)"
    hanna = user("hanna")
    config = write_config(tmp_path, idp=idp_reset, pki=pki, dovecot=dovecot, accounts=[hanna])
    log = tmp_path / "chromium.log"
    env = proxy_env(pki, BROWSER=f"{sys.executable} {ROOT / 'tests' / 'chromium_browser.py'} %s",
                    CHROMIUM_SPKI=spki_pin(pki.cert_file), CHROMIUM_LOG=str(log))
    result = authorize(config, hanna, PASSWORD, pki, timeout=60, env=env)
    deadline = time.monotonic() + 20                    # the browser script finishes after the redirect
    while time.monotonic() < deadline and not any(
            line.startswith(("text ", "error ")) for line in (log.read_text() if log.exists() else "").splitlines()):
        time.sleep(0.2)
    pages = log.read_text()
    assert result.returncode == 0, result.stderr + pages
    assert f"page {idp_reset.url}/test-tenant/oauth2/v2.0/authorize | Sign in to your account" in pages
    assert "page http://localhost:" in pages and "| Sign-in complete" in pages
    assert "text Sign-in complete" in pages and "error" not in pages
    assert idp_reset.count("login") == 1 and idp_reset.count("token:authorization_code") == 1
    meta = json.loads((tmp_path / "tokens" / f"{hanna}.tokens").read_text())["meta"]
    assert meta["signed_in_as"] == hanna and meta["has_refresh_token"] is True
    proxy = ProxyProcess(config, pki)
    try:
        imap_login(proxy.imap_port, hanna).logout()
    finally:
        proxy.stop()
