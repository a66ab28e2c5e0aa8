"""`proxy authorize` edge cases, through the real CLI against the local identity provider."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

from tests.fake_browser import browse
from tests.harness import ROOT, authorize, proxy_env, write_config


def config_for(tmp_path, idp, pki, dovecot, user="zoe@example.com"):
    return write_config(tmp_path, idp=idp, pki=pki, dovecot=dovecot, accounts=[user])


def test_timeout_says_what_to_do_next(tmp_path, idp_reset, pki, dovecot):
    config = config_for(tmp_path, idp_reset, pki, dovecot)
    started = time.monotonic()
    result = authorize(config, "zoe@example.com", "password 123", pki, timeout=2,
                       env=proxy_env(pki, BROWSER="true"))        # a browser that never signs in
    assert result.returncode == 1
    assert time.monotonic() - started < 15
    assert "No sign-in arrived within 2 s" in result.stderr and "--timeout" in result.stderr
    assert "s left" in result.stderr                                   # the countdown was shown
    assert not (tmp_path / "tokens").exists()


def test_no_browser_prints_the_address_to_open(tmp_path, idp_reset, pki, dovecot):
    config = config_for(tmp_path, idp_reset, pki, dovecot)
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "-c", str(config), "authorize", "zoe@example.com", "--no-browser",
         "--password-stdin", "--timeout", "20"],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=proxy_env(pki, BROWSER="false"))
    process.stdin.write("password 123\n")
    process.stdin.close()
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "/oauth2/v2.0/authorize?" in line:
            break
    url = re.search(r"https://\S+", lines[-1]).group(0)
    assert "code_challenge_method=S256" in url and "login_hint=zoe%40example.com" in url
    threading.Thread(target=browse, args=(url, str(pki.ca_file)), daemon=True).start()  # the user opens it
    rest = process.stderr.read()
    assert process.wait(30) == 0, rest
    assert "Authorized zoe@example.com" in rest
    assert (tmp_path / "tokens" / "zoe@example.com.tokens").exists()


def test_denied_sign_in_is_reported(tmp_path, idp_reset, pki, dovecot):
    config = config_for(tmp_path, idp_reset, pki, dovecot)
    idp_reset.deny_next()
    result = authorize(config, "zoe@example.com", "password 123", pki, timeout=15)
    assert result.returncode == 1
    assert "refused the sign-in: access_denied" in result.stderr


def test_bad_local_passwords_and_unknown_accounts(tmp_path, idp_reset, pki, dovecot):
    config = config_for(tmp_path, idp_reset, pki, dovecot)
    short = authorize(config, "zoe@example.com", "short", pki, timeout=5)
    assert short.returncode != 0 and "at least 8 characters" in short.stderr
    unknown = authorize(config, "nobody@example.com", "password 123", pki, timeout=5)
    assert unknown.returncode != 0 and "not in the config's accounts" in unknown.stderr
    assert idp_reset.count("authorize") == 0


def test_help_teaches_the_commands():
    out = subprocess.run([sys.executable, "-m", "proxy", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    for word in ("authorize", "serve", "127.0.0.1:1143", "--config"):
        assert word in out.stdout
    auth = subprocess.run([sys.executable, "-m", "proxy", "authorize", "--help"], capture_output=True,
                          text=True, cwd=ROOT)
    for word in ("--timeout", "--no-browser", "--password-stdin", "default 30"):
        assert word in auth.stdout


def test_config_errors_name_the_key_and_exit_2(tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_text("identity:\n  authority: http://insecure\n  client_id: x\naccounts: [{username: a@b}]\n")
    out = subprocess.run([sys.executable, "-m", "proxy", "-c", str(bad), "serve"], capture_output=True,
                         text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 2 and "identity.authority" in out.stderr
