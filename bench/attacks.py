"""``python -m bench.attacks``: the attack figures of docs/security.md, measured on the benchmark's test bed.

What a local attacker gets and what the real user still gets (issue 12), with the default
``limits`` (max_connections 1,000 and max_prelogin_connections 100 per protocol):

1. guesses per second at one account, by 300 guessers that wait for each answer (IMAP and SMTP);
2. the same by 300 guessers that hang up as soon as no success came back within 0.2 s (the
   worst case: they never wait out a delay themselves);
3. the real user's first login (IMAP) right after a start, under 300 guessers going through a
   list of 5 or 20 common passwords, and under 300 guessers that never repeat a password (a
   dictionary split between them: each guess costs a key derivation until the real password
   is known);
4. the real user's login (IMAP, then SMTP) right after 2,000 silent connections per protocol
   were opened, and while a flood keeps opening new ones (connecting again when refused or
   dropped, as mail clients do; the time counts from the first attempt).

Guesses are counted in the proxy's own log (one ``login … failed`` line per checked guess), so
a guess counts only once the proxy checked it. Needs what `python -m bench` needs (root on
Debian 12: `bash tests/run.sh -q tests/test_bench_smoke.py` installs it). Takes about 5 minutes.
"""

from __future__ import annotations

import argparse
import imaplib
import json
import os
import smtplib
import socket
import threading
import time
from datetime import datetime

import yaml

from bench.bed import Bed
from tests.attackers import Guessers, silent_connections


def _login_time(bed: Bed, protocol: str) -> float:
    user, password = bed.account.user, bed.account.password
    started = time.monotonic()
    if protocol == "imap":
        imap = imaplib.IMAP4(*bed.imap_proxy, timeout=60)
        imap.login(user, password)
        took = time.monotonic() - started
        imap.logout()
    else:
        smtp = smtplib.SMTP(*bed.smtp_proxy, timeout=60)
        smtp.login(user, password)
        took = time.monotonic() - started
        smtp.quit()
    return took


def _login_time_retrying(bed: Bed, protocol: str, within: float = 30.0) -> str:
    """Seconds until a login worked, connecting again when dropped (as mail clients do), and the attempts."""
    started, attempts = time.monotonic(), 0
    while True:
        attempts += 1
        try:
            _login_time(bed, protocol)
            return f"{time.monotonic() - started:.2f} s ({attempts} attempt{'s' if attempts > 1 else ''})"
        except (imaplib.IMAP4.error, smtplib.SMTPException, OSError) as exc:
            if time.monotonic() - started > within:
                return f"no login within {within:.0f} s ({attempts} attempts; last: {exc})"
            time.sleep(0.2)


def _failures_between(log: str, user: str, start: float, end: float) -> int:
    """``login USER failed`` lines logged between two wall-clock times."""
    count = 0
    for line in log.splitlines():
        if f"login {user} failed" not in line:
            continue
        stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        count += start <= stamp <= end
    return count


def guess_rate(bed: Bed, *, hang_up_after: float | None, seconds: float, warm_up: float = 10.0) -> float:
    """Checked guesses per second at the account, after ``warm_up`` seconds of the attack."""
    bed.start_proxy()
    _login_time(bed, "imap")  # (the account is unlocked: every guess is checked at full speed)
    guessers = Guessers(bed.account.user, bed.proxy.imap_port, bed.proxy.smtp_port, count=300,
                        hang_up_after=hang_up_after).start()
    try:
        time.sleep(warm_up)
        start = time.time()
        time.sleep(seconds)
        end = time.time()
    finally:
        guessers.stop()
    return _failures_between(bed.proxy.log_text(), bed.account.user, start, end) / (end - start)


def first_login_under_guessers(bed: Bed, *, passwords: int | None) -> float | str:
    """Seconds to the real user's first IMAP login (or the refusal) under 300 guessers going through
    a list of ``passwords`` common passwords (None: every guess a new password)."""
    bed.start_proxy()  # right after a start: the password is not known yet
    guessers = Guessers(bed.account.user, bed.proxy.imap_port, bed.proxy.smtp_port, count=300,
                        passwords=[f"common password {i}" for i in range(passwords)] if passwords else None).start()
    try:
        deadline = time.monotonic() + 15
        while guessers.sent < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            return _login_time(bed, "imap")
        except imaplib.IMAP4.error as exc:
            return f"refused: {exc}"
    finally:
        guessers.stop()


def login_under_silent_connections(bed: Bed, *, churn: bool) -> tuple[str, str]:
    bed.start_proxy()
    _login_time(bed, "imap")
    sockets: list[socket.socket] = []
    stop = threading.Event()
    try:
        for _, port in (bed.imap_proxy, bed.smtp_proxy):
            sockets += silent_connections(port, 2000)
        if churn:
            def flood(port: int) -> None:
                while not stop.is_set():
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=5).close()
                    except OSError:
                        time.sleep(0.01)
            for _, port in (bed.imap_proxy, bed.smtp_proxy):
                for _ in range(2):
                    threading.Thread(target=flood, args=(port,), daemon=True).start()
            time.sleep(2)
        return _login_time_retrying(bed, "imap"), _login_time_retrying(bed, "smtp")
    finally:
        stop.set()
        for sock in sockets:
            sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attacks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each login-time figure (default 3)")
    parser.add_argument("--seconds", type=float, default=30, help="length of each guess-rate measurement")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--only", help="comma-separated: rate, first, flood (default: all)")
    args = parser.parse_args(argv)
    figures: dict[str, object] = {}
    with Bed(max_sessions=200, keep=args.keep) as bed:
        data = yaml.safe_load(bed.config_path.read_text())
        data.pop("limits", None)  # the defaults, as shipped
        bed.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        only = set((args.only or "rate,first,flood").split(","))
        print(f"load average at the start: {os.getloadavg()[0]:.1f}")
        if "rate" in only:
            figures["guesses_per_second_waiting"] = round(guess_rate(bed, hang_up_after=None, seconds=args.seconds), 1)
            print("guesses/s at one account, 300 guessers waiting for answers:", figures["guesses_per_second_waiting"])
            figures["guesses_per_second_hanging_up"] = round(guess_rate(bed, hang_up_after=0.2, seconds=args.seconds), 1)
            print("guesses/s at one account, 300 guessers hanging up:", figures["guesses_per_second_hanging_up"])
        for passwords in ((5, 20, None) if "first" in only else ()):
            times = [first_login_under_guessers(bed, passwords=passwords) for _ in range(args.runs)]
            key = f"first_login_s_under_300_guessers_{f'list_of_{passwords}' if passwords else 'never_repeating'}"
            figures[key] = [round(t, 2) if isinstance(t, float) else t for t in times]
            print(f"{key}: {figures[key]}")
        for churn in ((False, True) if "flood" in only else ()):
            pairs = [login_under_silent_connections(bed, churn=churn) for _ in range(args.runs)]
            key = f"login_s_with_2000_silent_per_protocol{'_and_a_flood' if churn else ''}"
            figures[key] = {"imap": [p[0] for p in pairs], "smtp": [p[1] for p in pairs]}
            print(f"{key}: {figures[key]}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
