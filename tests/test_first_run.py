"""First run: `proxy init`, -c after the command, --help, and `proxy authorize` refusing early and
clearly (no terminal, a token folder it cannot write) instead of after the sign-in or with a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from proxy.config import example_config_text, load_config
from tests.harness import ROOT, authorize, proxy_env, write_config

PROXY = (sys.executable, "-m", "proxy")


def run(*args: str, cwd: Path = ROOT, env: dict | None = None, stdin: str | None = None,
        **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*PROXY, *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env=env or dict(os.environ), input=stdin, **kwargs)


def test_the_example_config_has_one_source():
    """proxy/config.example.yaml (shipped in the package, written by `proxy init`) is the source;
    the top-level copy is for people reading the repository and must stay the same text."""
    packaged = (ROOT / "proxy" / "config.example.yaml").read_text(encoding="utf-8")
    top = (ROOT / "config.example.yaml").read_text(encoding="utf-8")
    assert top == packaged, ("config.example.yaml differs from proxy/config.example.yaml (the source): "
                             "edit proxy/config.example.yaml, then cp proxy/config.example.yaml config.example.yaml")
    assert example_config_text() == packaged


def test_init_writes_the_example_refuses_to_overwrite_and_says_what_next(tmp_path):
    target = tmp_path / "new folder" / "config.yaml"
    first = run("init", str(target))
    assert first.returncode == 0, first.stderr
    assert target.read_text(encoding="utf-8") == example_config_text()
    assert target.stat().st_mode & 0o777 == 0o600
    for step in (str(target), "client_id", "authorize alice@firm.de", "serve", "1143", "1587",
                 "contrib/oauth2-mail-proxy.service", "docs/windows.md", f'-c "{target}"'):
        assert step in first.stderr, step
    target.write_text("mine\n")
    again = run("init", str(target))
    assert again.returncode == 1 and "already exists; nothing was written" in again.stderr
    assert target.read_text() == "mine\n"
    # without PATH: the -c path (before or after the command), then $PROXY_CONFIG
    assert run("init", "-c", str(tmp_path / "via-c.yaml")).returncode == 0
    assert run("-c", str(tmp_path / "before.yaml"), "init").returncode == 0
    env = {**os.environ, "PROXY_CONFIG": str(tmp_path / "from-env.yaml")}
    assert run("init", env=env).returncode == 0
    assert all((tmp_path / n).read_text() == example_config_text() for n in ("via-c.yaml", "before.yaml",
                                                                              "from-env.yaml"))
    # a folder as PATH gets config.yaml inside it; a place it cannot write is named
    assert run("init", str(tmp_path)).returncode == 0 and (tmp_path / "config.yaml").exists()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    bad = run("init", str(blocked / "config.yaml"))
    assert bad.returncode == 1 and "cannot create" in bad.stderr and "Traceback" not in bad.stderr


def test_the_written_example_loads_once_the_placeholder_is_filled(tmp_path):
    path = tmp_path / "config.yaml"
    assert run("init", str(path)).returncode == 0
    unfilled = run("-c", str(path), "status")
    assert unfilled.returncode == 2
    assert "identity.client_id: still contains the placeholder <app registration id>" in unfilled.stderr
    path.write_text(path.read_text().replace("<app registration id>", "1b2c3d4e-0000-4000-8000-00000000abcd"))
    config = load_config(path, {})
    assert config.token_path == tmp_path / "tokens" and config.accounts[0].username == "alice@firm.de"


def test_config_option_after_the_command(tmp_path):
    path = tmp_path / "site.yaml"
    data = {"identity": {"authority": "https://login.microsoftonline.com/organizations",
                         "client_id": "1b2c3d4e-0000-4000-8000-00000000abcd"},
            "accounts": [{"username": "alice@firm.de"}]}
    path.write_text(yaml.safe_dump(data))
    for args in (("status", "-c", str(path)), ("status", "--config", str(path), "--json"),
                 ("-c", "elsewhere.yaml", "status", "-c", str(path)),      # the later one wins
                 ("status", "--log-level", "debug", "-c", str(path))):
        out = run(*args, cwd=tmp_path)
        assert out.returncode == 0 and "alice@firm.de" in out.stdout, (args, out.stderr)
    missing = run("status", cwd=tmp_path)          # ./config.yaml does not exist there
    assert missing.returncode == 2 and "cannot read the config file" in missing.stderr
    assert "proxy init config.yaml" in missing.stderr


def test_help_names_imap_and_smtp_with_their_ports():
    out = run("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for words in ("IMAP and SMTP", "127.0.0.1:1143", "127.0.0.1:1587", "proxy init", "after the command"):
        assert words in text, words
    serve = " ".join(run("serve", "--help").stdout.split())
    assert "IMAP on 127.0.0.1:1143" in " ".join(run("--help").stdout.split()) and "--log-file" in serve
    assert "-c CONFIG" in run("check", "--help").stdout


def test_authorize_without_a_terminal_says_how_and_exits_2(tmp_path, idp_reset, pki, dovecot):
    config = write_config(tmp_path, idp=idp_reset, pki=pki, dovecot=dovecot, accounts=["zoe@example.com"])
    piped = run("-c", str(config), "authorize", "zoe@example.com", "--no-browser", stdin="",
                env=proxy_env(pki, BROWSER="false"))
    assert piped.returncode == 2, piped.stderr
    assert "standard input is not a terminal" in piped.stderr and "--password-stdin" in piped.stderr
    empty = run("-c", str(config), "authorize", "zoe@example.com", "--password-stdin", stdin="",
                env=proxy_env(pki, BROWSER="false"))
    assert empty.returncode == 2 and "standard input is empty" in empty.stderr
    assert "Traceback" not in piped.stderr + empty.stderr
    assert idp_reset.count("authorize") == 0 and not (tmp_path / "tokens").exists()


def test_authorize_refuses_an_unwritable_token_folder_before_the_sign_in(tmp_path, idp_reset, pki, dovecot):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    config = write_config(tmp_path, idp=idp_reset, pki=pki, dovecot=dovecot, accounts=["zoe@example.com"],
                          tokens={"path": str(blocker / "tokens")})
    result = authorize(config, "zoe@example.com", "password 123", pki, timeout=10)
    assert result.returncode == 1, result.stderr
    from proxy.system import current_user
    assert f"the token folder {blocker / 'tokens'} cannot be written by user {current_user()}" in result.stderr
    assert "nothing was signed in" in result.stderr and "Traceback" not in result.stderr
    assert idp_reset.count("authorize") == 0 and idp_reset.count("token") == 0     # nobody signed in
    # a folder that does not exist yet is created, private, and authorize goes on
    fine = write_config(tmp_path / "ok", idp=idp_reset, pki=pki, dovecot=dovecot, accounts=["zoe@example.com"],
                        tokens={"path": str(tmp_path / "ok" / "deep" / "tokens")})
    assert authorize(fine, "zoe@example.com", "password 123", pki).returncode == 0
    assert (tmp_path / "ok" / "deep" / "tokens").stat().st_mode & 0o777 == 0o700
