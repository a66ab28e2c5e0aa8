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

# Every row the table must have (by the start of its name), whether it has a direct figure and
# whether it has an emailproxy figure (the second baseline, installed by the benchmark itself).
EXPECTED = [
    ("proxy open-file limit", False, False),
    ("FETCH 5 × 50 kB", True, True), ("proxy CPU during FETCH 5 × 50 kB", False, False),
    ("FETCH 1 × 1 MB", True, True), ("proxy CPU during FETCH 1 × 1 MB", False, False),
    ("LOGIN → OK, p50", True, True), ("LOGIN → OK, p99", True, True), ("connect → logged in, p50", True, True),
    ("logins/s", True, True), ("proxy CPU during those logins", False, False),
    ("burst of 10: greeted", True, True), ("burst of 10: logged in", True, True), ("burst of 10: until", True, True),
    ("IDLE sessions held", True, True), ("resident memory per IDLE session", False, True),
    ("IDLE sessions over IMAPS held", False, False), ("proxy memory per IDLE session, TLS on both sides", False, False),
    ("stalled reader: CPU", False, True), ("stalled reader: RSS growth", False, True),
    ("stalled reader: RSS above", False, True), ("stalled reader: bytes not yet read", False, True),
    ("SMTP messages/s", True, True), ("SMTP 0.5 MB message", True, True), ("proxy peak RSS growth", False, False),
    ("POP3 RETR 5 × 50 kB", True, False), ("proxy CPU during POP3 RETR 5 × 50 kB", False, False),
]


def test_benchmark_smoke_run_prints_every_row(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--json", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "proxy÷direct" in result.stdout and "emailproxy÷direct" in result.stdout
    assert data_version(out) and "direct min / median / max" in result.stdout
    data = json.loads(out.read_text())
    assert data["failed"] is None
    rows = [row for row in data["rows"]]
    names = [row["name"].strip() for row in rows]
    assert len(rows) == len(EXPECTED), names
    for row, (prefix, has_direct, has_emailproxy) in zip(rows, EXPECTED):
        name = row["name"].strip()
        assert name.startswith(prefix), (name, prefix)
        assert name in result.stdout
        assert len(row["proxy"]) >= 1, name
        assert bool(row["direct"]) == has_direct, name
        assert bool(row["emailproxy"]) == has_emailproxy, name
    by_name = {row["name"].strip(): row for row in rows}
    # Correctness, not speed: every client of the small burst and every idle session was served.
    assert min(by_name["burst of 10: logged in"]["proxy"]) == 10
    assert min(by_name["IDLE sessions held (of 20)"]["proxy"]) == 20
    assert min(by_name["IDLE sessions over IMAPS held (of 10)"]["proxy"]) == 10
    assert min(by_name["burst of 10: logged in"]["emailproxy"]) == 10  # the baseline really ran
    assert by_name["proxy open-file limit (started at soft 1,024, hard 20,000)"]["proxy"] == [20000]


def data_version(path: Path) -> str:
    return json.loads(path.read_text())["emailproxy"] or ""


def test_floor_scenario_measures_direct_the_proxy_and_the_do_nothing_relay(tmp_path):
    """``--only floor`` (on request, bench/floor.py): both relays start, log in upstream with the
    bed's token and carry real logins and messages; every floor row has figures on both sides."""
    out = tmp_path / "floor.json"
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--only", "floor", "--no-emailproxy",
                             "--runs", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    assert data["failed"] is None
    floor = [row for row in data["rows"] if row["name"].startswith("floor: ")]
    assert [row["name"].rsplit(", ", 1)[1] for row in floor] == ["the proxy", "do-nothing relay"] * 3
    assert [row["name"].split(",")[0] for row in floor[::2]] == ["floor: LOGIN → OK", "floor: logins/s",
                                                                  "floor: SMTP messages/s (5 × 5 kB)"]
    for row in floor:
        assert len(row["direct"]) == 1 and len(row["proxy"]) == 1 and row["proxy"][0] > 0, row
    # The relays are measured, not skipped: a login and a message each went through them.
    assert "floor: " in result.stderr and "relay" in result.stderr
