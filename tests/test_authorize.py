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


def authorize_no_browser(config, pki, timeout: int = 20) -> tuple[subprocess.Popen, str]:
    """`proxy authorize zoe@example.com --no-browser` running; returns it and the address it printed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "-c", str(config), "authorize", "zoe@example.com", "--no-browser",
         "--password-stdin", "--timeout", str(timeout)],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=proxy_env(pki, BROWSER="false"))
    process.stdin.write("password 123\n")
    process.stdin.close()
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "/oauth2/v2.0/authorize?" in line:
            break
    return process, re.search(r"https://\S+", lines[-1]).group(0)


def test_no_browser_prints_the_address_to_open(tmp_path, idp_reset, pki, dovecot):
    config = config_for(tmp_path, idp_reset, pki, dovecot)
    process, url = authorize_no_browser(config, pki)
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


# ------------------------------------------------------------------ attacks on the sign-in (issue 12)
def test_a_sign_in_as_someone_else_is_refused_and_nothing_is_stored(tmp_path, idp_reset, pki, dovecot):
    """Another local process reads the sign-in address, signs in as a different user and delivers
    that code: before, the account silently stored that user's tokens (exit 0, with a note)."""
    config = write_config(tmp_path, idp=idp_reset, pki=pki, dovecot=dovecot,
                          accounts=["zoe@example.com", {"username": "archive@example.com", "token": "zoe@example.com"}])
    idp_reset.set_next_user("mallory@example.com")
    result = authorize(config, "zoe@example.com", "password 123", pki, timeout=15)
    assert result.returncode == 1, result.stderr
    assert "signed in as mallory@example.com, but this authorizes zoe@example.com" in result.stderr
    assert "nothing was stored" in result.stderr and "Authorized" not in result.stderr
    assert not (tmp_path / "tokens" / "zoe@example.com.tokens").exists()
    idp_reset.set_next_user("archive@example.com")         # token sharing: the owner must sign in
    result = authorize(config, "archive@example.com", "password 123", pki, timeout=15)
    assert result.returncode == 1 and "signed in as archive@example.com" in result.stderr
    assert not (tmp_path / "tokens").exists() or not any((tmp_path / "tokens").iterdir())
    result = authorize(config, "archive@example.com", "password 123", pki, timeout=15)   # as zoe: fine
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tokens" / "zoe@example.com.tokens").exists()


def test_a_device_sign_in_as_someone_else_is_refused(tmp_path, idp_reset, pki, dovecot):
    from tests.test_accounts import DeviceSignIn

    config = config_for(tmp_path, idp_reset, pki, dovecot)
    sign_in = DeviceSignIn(config, "zoe@example.com", pki, "--device")
    idp_reset.approve_device(sign_in.code, "mallory@example.com")
    status, text = sign_in.finish()
    assert status == 1 and "signed in as mallory@example.com" in text, text
    assert not (tmp_path / "tokens").exists()


def test_forged_answers_and_a_half_open_connection_do_not_stop_the_sign_in(tmp_path, idp_reset, pki, dovecot):
    """The redirect listener served one connection at a time without a deadline: a local process
    that connected and said nothing blocked the real redirect until `proxy authorize` gave up."""
    import socket
    import urllib.error
    import urllib.request

    config = config_for(tmp_path, idp_reset, pki, dovecot)
    process, url = authorize_no_browser(config, pki, timeout=25)
    port = int(re.search(r"redirect_uri=http%3A%2F%2Flocalhost%3A(\d+)", url).group(1))
    half_open = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    half_open[0].sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\nerror=")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for forged in (b"error=access_denied&error_description=forged", b"error=access_denied&state=guessed",
                   b"code=stolen&state=guessed"):
        try:
            opener.open(f"http://127.0.0.1:{port}/", data=forged, timeout=10)
            raise AssertionError("a forged answer was taken")
        except urllib.error.HTTPError as exc:
            assert exc.code == 400
    threading.Thread(target=browse, args=(url, str(pki.ca_file)), daemon=True).start()
    rest = process.stderr.read()
    for sock in half_open:
        sock.close()
    assert process.wait(30) == 0, rest
    assert "Authorized zoe@example.com" in rest
