"""Nothing a user can type produces a Python traceback: every command, run the way people get it
wrong (no config, broken YAML, binary junk, an unknown user, no terminal, a token folder that
cannot be written, an identity provider that does not answer, nonsense arguments), ends with a
message and an exit status, never "Traceback"."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.harness import ROOT

GOOD = {"identity": {"authority": "https://127.0.0.1:1/tenant", "client_id": "test-client", "timeout": 2},
        "imap": {"upstream": "127.0.0.1:1"}, "smtp": {"upstream": "127.0.0.1:2"},
        "accounts": [{"username": "alice@firm.de"}]}
USER_COMMANDS = ("authorize", "check", "forget", "revoke")
ALL_COMMANDS = ("serve", "status", "health", *USER_COMMANDS)


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("configs")
    files = {"missing": base / "missing.yaml", "folder": base}
    for name, text in (("bad-yaml", "identity: [\n  authority: x\n"), ("not-a-mapping", "- a\n- b\n"),
                       ("empty", ""), ("wrong-types", "identity: 3\naccounts: alice\n")):
        files[name] = base / f"{name}.yaml"
        files[name].write_text(text)
    files["binary"] = base / "binary.yaml"
    files["binary"].write_bytes(b"\xff\xfe\x00\x81junk\x00" * 20)
    files["good"] = base / "good.yaml"
    files["good"].write_text(yaml.safe_dump(GOOD))
    blocker = base / "a-file"
    blocker.write_text("")
    files["unwritable-tokens"] = base / "unwritable.yaml"
    files["unwritable-tokens"].write_text(yaml.safe_dump({**GOOD, "tokens": {"path": str(blocker / "tokens")}}))
    files["admin"] = base / "admin.yaml"
    files["admin"].write_text(yaml.safe_dump({**GOOD, "admin": {"listen": "127.0.0.1:1"}}))
    return files


def run(*args: str, stdin: str | None = "", env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    environment.update({"BROWSER": "false", "PYTHONUNBUFFERED": "1"}, **(env or {}))
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=90,
                          cwd=ROOT, env=environment, input=stdin)


def assert_clean(result: subprocess.CompletedProcess, *statuses: int) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "Error:" not in output.replace("error:", ""), output
    assert result.returncode in (statuses or (1, 2)), (result.returncode, output)
    assert output.strip(), "a failure must say something"


@pytest.mark.parametrize("config", ["missing", "folder", "bad-yaml", "not-a-mapping", "empty", "wrong-types",
                                    "binary"])
@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_broken_config_files(configs, config, command):
    args = [command] + (["alice@firm.de"] if command in USER_COMMANDS else [])
    result = run("-c", str(configs[config]), *args)
    assert_clean(result, 2)
    assert "configuration error" in result.stderr


@pytest.mark.parametrize("command", USER_COMMANDS)
def test_unknown_user(configs, command):
    assert_clean(run("-c", str(configs["good"]), command, "nobody@firm.de"), 1, 2)


def test_no_terminal_and_empty_stdin(configs):
    result = subprocess.run([sys.executable, "-m", "proxy", "-c", str(configs["good"]), "authorize", "alice@firm.de",
                             "--no-browser"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                            cwd=ROOT)
    assert_clean(result, 2)
    assert_clean(run("-c", str(configs["good"]), "authorize", "alice@firm.de", "--password-stdin", stdin=""), 2)
    assert_clean(run("-c", str(configs["good"]), "authorize", "alice@firm.de", "--password-stdin", stdin="short\n"))
    assert_clean(run("-c", str(configs["good"]), "check", "alice@firm.de", "--password-stdin", stdin=""), 1)


def test_unwritable_token_folder(configs):
    assert_clean(run("-c", str(configs["unwritable-tokens"]), "authorize", "alice@firm.de", "--password-stdin",
                     stdin="long enough password\n"), 1)
    for command in ("status", "forget", "check"):
        args = [command] + (["alice@firm.de"] if command == "forget" else [])
        result = run("-c", str(configs["unwritable-tokens"]), *args)
        assert "Traceback" not in result.stdout + result.stderr, (command, result.stdout + result.stderr)


def test_unreachable_identity_provider_and_servers(configs):
    authorize = run("-c", str(configs["good"]), "authorize", "alice@firm.de", "--no-browser", "--password-stdin",
                    stdin="long enough password\n")
    assert_clean(authorize, 1)
    assert "cannot reach the identity provider" in authorize.stderr and "What to do:" in authorize.stderr
    device = run("-c", str(configs["good"]), "authorize", "alice@firm.de", "--device", "--password-stdin",
                 stdin="long enough password\n")
    assert_clean(device, 1)
    check = run("-c", str(configs["good"]), "check")
    assert_clean(check, 1)
    assert "FAIL  identity provider" in check.stdout and "FAIL  IMAP" in check.stdout
    assert_clean(run("-c", str(configs["admin"]), "health"), 1)


def test_nonsense_arguments(configs, tmp_path):
    good = str(configs["good"])
    for args in ((), ("frobnicate",), ("-c", good, "authorize"), ("-c", good, "authorize", "a@b", "--port", "99999"),
                 ("-c", good, "authorize", "a@b", "--timeout", "nan"), ("-c", good, "authorize", "a@b", "--timeout",
                                                                         "soon"),
                 ("-c", good, "health", "--timeout", "0"), ("certs", "--days", "-1", "--dir", str(tmp_path / "c")),
                 ("certs", "--name", "not a name", "--dir", str(tmp_path / "d")),
                 ("certs", "--dir", "/proc/no-such-folder"), ("--log-level", "chatty", "status"),
                 ("-c", good, "serve", "--log-file", str(tmp_path / "no" / "such" / "dir" / "proxy.log")),
                 ("init", str(configs["good"])), ("init", "/proc/no-such-folder/config.yaml")):
        assert_clean(run(*args), 1, 2)
    assert_clean(run("status", env={"PROXY_LOG_LEVEL": "chatty"}), 2)
    assert_clean(run("-c", good, "status", env={"PROXY_IMAP_LISTEN": "nowhere"}), 2)
    assert_clean(run("-c", good, "status", env={"PROXY_IDENTTY_CLIENT_ID": "x"}), 2)


def test_serve_on_a_port_in_use(configs, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "busy.yaml"
        config.write_text(yaml.safe_dump({**GOOD, "imap": {**GOOD["imap"], "listen": f"127.0.0.1:{port}"},
                                          "tokens": {"path": str(tmp_path / "tokens")}}))
        result = run("-c", str(config), "serve")
    assert_clean(result, 1)
    assert "cannot start" in result.stderr
