"""contrib/oauth2-mail-proxy.service: systemd accepts every line of it (`systemd-analyze verify`,
which runs without a booted systemd), its hardening is there, and its exposure score stays low.

`verify` checks that ExecStart's program exists, so the test points it at this installation's
`proxy` script (the unit's /opt/oauth2-mail-proxy/bin/proxy is where the README installs it).
It reports unknown keys and bad values as warnings with exit status 0, so the test wants no
output at all, and shows on a broken copy that such a line would be caught."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "oauth2-mail-proxy.service"
INSTALLED = "/opt/oauth2-mail-proxy/bin/proxy"


def analyze(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: install Debian's systemd package (tests/run.sh does)")
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120)


def local_copy(tmp_path: Path, text: str | None = None) -> Path:
    text = UNIT.read_text() if text is None else text
    assert f"ExecStart={INSTALLED} " in text
    script = Path(sys.executable).parent / "proxy"
    assert script.exists(), script
    path = tmp_path / UNIT.name
    path.write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={script} "))
    return path


def test_systemd_accepts_the_unit(tmp_path):
    result = analyze("verify", str(local_copy(tmp_path)))
    assert result.returncode == 0 and (result.stdout + result.stderr).strip() == "", result.stdout + result.stderr


def test_verify_would_catch_a_bad_line(tmp_path):
    broken = UNIT.read_text().replace("LimitCORE=0", "LimitCORE=zero").replace("ProtectSystem=strict",
                                                                                 "ProtectSytem=strict")
    result = analyze("verify", str(local_copy(tmp_path, broken)))
    output = result.stdout + result.stderr
    assert "Failed to parse resource value" in output and "Unknown key 'ProtectSytem'" in output


def test_hardening_and_reload():
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    expected = {"User": "oauth2-mail-proxy", "LimitCORE": "0", "NoNewPrivileges": "yes",
                "ProtectSystem": "strict", "StateDirectory": "oauth2-mail-proxy", "StateDirectoryMode": "0700",
                "ProtectHome": "yes", "PrivateTmp": "yes", "KillSignal": "SIGTERM", "UMask": "0077"}
    for key, value in expected.items():
        assert settings.get(key) == [value], key
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]           # `systemctl reload` = SIGHUP
    assert re.fullmatch(rf"{INSTALLED} -c /etc/oauth2-mail-proxy/config\.yaml serve", settings["ExecStart"][0])
    # the grace period (limits.shutdown_grace, 30 s) fits before systemd kills
    assert int(settings["TimeoutStopSec"][0]) > 30


def test_exposure_score_is_low(tmp_path):
    # systemd's own rating of the sandbox; 2.0 of 10 ("OK"); the unit scores about 1.4.
    result = analyze("security", "--offline=true", "--threshold=20", str(local_copy(tmp_path)))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
