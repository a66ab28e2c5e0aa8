"""Helpers for the operations tests (TLS listeners, admin listener, reload, shutdown, container).

They start from the session's authorized SMTP configuration (``smtp_authorized`` in conftest:
one account, ``SMTP_USER``, authorized through the real `proxy authorize`, upstreams pointing at
the test Dovecot) and copy it, so each test has its own config file and token store.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import ROOT, free_port

PROXY = [sys.executable, "-m", "proxy"]


def copy_config(authorized_dir: Path, target: Path, **sections: Any) -> Path:
    """A private copy of an authorized config folder, with ``sections`` merged into config.yaml
    (a value of None removes the key)."""
    directory = Path(shutil.copytree(authorized_dir, target))
    path = directory / "config.yaml"
    update_config(path, **sections)
    return path


def update_config(path: Path, **sections: Any) -> dict:
    data = yaml.safe_load(path.read_text())
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            merged = {**data[key], **value}
            data[key] = {k: v for k, v in merged.items() if v is not None}
        elif value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return data


def make_certs(directory: Path, *names: str) -> Path:
    """Run the real `proxy certs`; returns the folder (ca.pem, server.pem, server.key)."""
    result = subprocess.run([*PROXY, "-c", str(directory / "config.yaml"), "certs", "--dir", str(directory / "certs"),
                             *[arg for name in names for arg in ("--name", name)]],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return directory / "certs"


def tls_sections(certs: Path, *, starttls: Any = True, implicit: bool = True) -> dict:
    """Config sections for TLS listeners on free loopback ports."""
    sections: dict[str, Any] = {"tls": {"cert_file": str(certs / "server.pem"), "key_file": str(certs / "server.key")}}
    for protocol in ("imap", "smtp"):
        sections[protocol] = {"starttls": starttls}
        if implicit:
            sections[protocol]["tls_listen"] = f"127.0.0.1:{free_port()}"
    return sections


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def http_get(port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed by prometheus_client's own parser: {(sample name, labels): value}."""
    status, text = http_get(port, "/metrics")
    assert status == 200, text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def json_lines(text: str) -> list[dict]:
    """The JSON log records in a log (every line must be one)."""
    records = []
    for line in text.splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(interval)
