"""``python -m bench``: start the test bed, fill a mailbox, measure direct vs through the proxy, print the table.

See bench/README.md. Exit status: 0, or 1 with ``--check`` when a target is missed (2: the
benchmark itself failed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback

from bench.bed import Bed
from bench.bed import PROXY_NOFILE
from bench.scenarios import OPTIONAL_SCENARIOS, SCENARIOS, Context, Row, Sizes, fill

FULL = Sizes()


def _fmt(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 100 or value == int(value):
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _triple(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return _fmt(values[0])
    return f"{_fmt(min(values))} / {_fmt(statistics.median(values))} / {_fmt(max(values))}"


def table(rows: list[Row]) -> str:
    header = ["figure", "unit", "direct min / median / max", "proxy min / median / max",
              "emailproxy min / median / max", "proxy÷direct", "emailproxy÷direct", "target", "result"]
    lines = []
    for row in rows:
        result = {True: "PASS", False: "FAIL", None: ""}[row.passed]
        ratios = [row.ratio_of(side) for side in ("proxy", "emailproxy")]
        lines.append([row.name, row.unit, _triple(row.direct), _triple(row.proxy), _triple(row.emailproxy),
                      *(f"{r:.2f}" if r is not None else "" for r in ratios), row.target, result])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths)),
           "-+-".join("-" * w for w in widths)]
    for line in lines:
        out.append(" | ".join(str(c).ljust(w) for c, w in zip(line, widths)))
    notes = [f"- {row.name.strip()}: {row.note}" for row in rows if row.note]
    return "\n".join(out + ([""] + notes if notes else []))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds): checks that the benchmark runs")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated scenarios to run (default: all of {','.join(SCENARIOS)}; "
                             f"on request: {','.join(OPTIONAL_SCENARIOS)})")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    parser.add_argument("--no-emailproxy", dest="emailproxy", action="store_false",
                        help="leave out the second baseline, emailproxy (installed into bench/.venv-emailproxy)")
    parser.add_argument("--uvloop", action="store_true",
                        help="run the proxy on uvloop's event loop (pip install uvloop; not on Windows)")
    for f in dataclasses.fields(Sizes):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                            help=f"(full size: {f.default})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = Sizes.smoke() if args.smoke else Sizes()
    for f in dataclasses.fields(Sizes):
        value = getattr(args, f.name)
        if value is not None:
            setattr(sizes, f.name, value)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    scenarios = {**SCENARIOS, **OPTIONAL_SCENARIOS}
    unknown = [name for name in chosen if name not in scenarios]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}", file=sys.stderr)
        return 2

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    started = time.monotonic()
    bed = Bed(max_sessions=max(sizes.idle, sizes.burst, sizes.tls_idle) + 100, keep=args.keep, log=log,
              emailproxy=args.emailproxy)
    rows: list[Row] = []
    failed = None
    try:
        bed.start(uvloop=args.uvloop)
        ctx = Context(bed, sizes, log)
        rows.append(fd_limit(ctx))
        fill(ctx)
        for name in chosen:
            try:
                rows += scenarios[name](ctx)
            except Exception:
                failed = failed or name
                log(f"scenario {name} failed:\n{traceback.format_exc()}")
    except Exception:
        failed = "setup"
        log(f"the test bed failed:\n{traceback.format_exc()}")
    finally:
        bed.stop()
    reduced = [f.name for f in dataclasses.fields(Sizes)
               if f.name not in ("runs", "idle_runs") and getattr(sizes, f.name) < getattr(FULL, f.name)]
    print(f"\noauth2-mail-proxy benchmark: {os.cpu_count()} cores, {platform.python_implementation()} "
          f"{platform.python_version()}{', proxy on uvloop' if args.uvloop else ''}, "
          f"{sizes.runs} runs per figure (idle: {sizes.idle_runs}), interleaved; "
          f"{time.monotonic() - started:.0f} s in all"
          + (f"; emailproxy {bed.emailproxy_version}" if bed.emailproxy_version else ""))
    if reduced:
        print(f"reduced sizes ({', '.join(reduced)}): the issue's targets apply to the full sizes only")
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"sizes": dataclasses.asdict(sizes), "failed": failed,
                       "emailproxy": bed.emailproxy_version or None,
                       "rows": [{"name": r.name, "unit": r.unit, "direct": r.direct, "proxy": r.proxy,
                                 "emailproxy": r.emailproxy, "ratio": r.ratio,
                                 "emailproxy_ratio": r.ratio_of("emailproxy"), "target": r.target,
                                 "passed": r.passed, "note": r.note}
                                for r in rows]}, fh, indent=2)
    if failed:
        print(f"\nthe benchmark failed in: {failed}", file=sys.stderr)
        return 2
    missed = [r.name.strip() for r in rows if r.passed is False]
    if missed:
        print(f"\ntargets missed: {'; '.join(missed)}")
    return 1 if args.check and missed else 0


def fd_limit(ctx: Context) -> Row:
    """``proxy serve`` was started at a soft open-file limit of 1,024: it must have raised it itself."""
    soft, hard = PROXY_NOFILE
    return Row(f"proxy open-file limit (started at soft {soft:,}, hard {hard:,})", "files",
               proxy=[ctx.bed.proxy.open_file_limit()], target=f"raised to {hard:,}",
               check=lambda r: min(r.proxy) >= hard)


if __name__ == "__main__":
    sys.exit(main())
