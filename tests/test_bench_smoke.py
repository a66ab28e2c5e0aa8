"""The benchmark (bench/) runs end to end at tiny sizes and prints its whole table.

This keeps `python -m bench` from rotting; it checks that every row is there and measured, not
the figures: timed targets are the benchmark's business at full size (see bench/README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Every row the table must have (by the start of its name), and whether it has a direct figure.
EXPECTED = [
    ("FETCH 5 × 50 kB", True), ("proxy CPU during FETCH 5 × 50 kB", False),
    ("FETCH 1 × 1 MB", True), ("proxy CPU during FETCH 1 × 1 MB", False),
    ("LOGIN → OK, p50", True), ("LOGIN → OK, p99", True), ("connect → logged in, p50", True),
    ("logins/s", True), ("proxy CPU during those logins", False),
    ("burst of 10: greeted", True), ("burst of 10: logged in", True), ("burst of 10: until", True),
    ("IDLE sessions held", True), ("proxy resident memory per IDLE session", False),
    ("stalled reader: proxy CPU", False), ("stalled reader: proxy RSS growth", False),
    ("stalled reader: proxy RSS above", False), ("stalled reader: bytes not yet read", False),
    ("SMTP messages/s", True), ("SMTP 0.5 MB message", True),
    ("POP3 RETR 5 × 50 kB", True), ("proxy CPU during POP3 RETR 5 × 50 kB", False),
]


def test_benchmark_smoke_run_prints_every_row(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--json", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "proxy÷direct" in result.stdout and "direct min / median / max" in result.stdout
    data = json.loads(out.read_text())
    assert data["failed"] is None
    rows = [row for row in data["rows"]]
    names = [row["name"].strip() for row in rows]
    assert len(rows) == len(EXPECTED), names
    for row, (prefix, has_direct) in zip(rows, EXPECTED):
        name = row["name"].strip()
        assert name.startswith(prefix), (name, prefix)
        assert name in result.stdout
        assert len(row["proxy"]) >= 1, name
        assert bool(row["direct"]) == has_direct, name
    by_name = {row["name"].strip(): row for row in rows}
    # Correctness, not speed: every client of the small burst and every idle session was served.
    assert min(by_name["burst of 10: logged in"]["proxy"]) == 10
    assert min(by_name["IDLE sessions held (of 20)"]["proxy"]) == 20
