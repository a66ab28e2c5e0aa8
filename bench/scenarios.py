"""The measurements. Each scenario runs direct, through the proxy and through emailproxy in the same
run, in interleaved rounds (the order rotates each round), and returns :class:`Row` objects.

"direct": the benchmark client → Dovecot's IMAPS (TLS on the client) with AUTHENTICATE XOAUTH2
and an access token it holds; "proxy": the same client → the proxy on loopback without TLS,
LOGIN with the local password; the proxy holds the token in memory and talks IMAPS to Dovecot;
"emailproxy": the same client → emailproxy (bench/emailproxy.py) on loopback, LOGIN with the
password it decrypts its cached tokens with; it talks IMAPS to the same Dovecot.
SMTP and POP3 likewise (submission with STARTTLS, POP3S; AUTH XOAUTH2 direct); emailproxy is not
set up for POP3.
"""

from __future__ import annotations

import asyncio
import gc
import os
import smtplib
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.bed import Bed
from bench.imap import AsyncImap, ImapError, SyncImap, Target, make_message
from tests.harness import cpu_seconds, rss_kib
from tests.pop3client import Pop3Client


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM")


@dataclass
class Sizes:
    runs: int = 5
    messages: int = 200
    message_size: int = 500_000
    big_size: int = 30_000_000
    logins: int = 200            # sequential logins per run (latency)
    login_clients: int = 50
    logins_concurrent: int = 1500  # logins per run with login_clients clients
    burst: int = 500
    idle: int = 9000
    idle_runs: int = 2
    tls_idle: int = 2000          # idle sessions over the proxy's IMAPS listener (TLS on both sides)
    peer_seconds: float = 60.0    # time budget per run for emailproxy where it cannot finish (idle, logins/s)
    stall_seconds: float = 5.0
    smtp_messages: int = 200
    smtp_message_size: int = 5_000
    smtp_big_size: int = 10_000_000
    smtp_huge_size: int = 100_000_000  # proxy memory while relaying one message this large

    @classmethod
    def smoke(cls) -> "Sizes":
        return cls(runs=2, messages=5, message_size=50_000, big_size=1_000_000, logins=10, login_clients=5,
                   logins_concurrent=20, burst=10, idle=20, idle_runs=1, tls_idle=10, peer_seconds=6.0,
                   stall_seconds=1.0, smtp_messages=5, smtp_big_size=500_000, smtp_huge_size=2_000_000)


SIDES = ("direct", "proxy", "emailproxy")


@dataclass
class Row:
    """One line of the table. ``direct``/``proxy``/``emailproxy`` are the per-run figures (empty: not measured)."""

    name: str
    unit: str
    direct: list[float] = field(default_factory=list)
    proxy: list[float] = field(default_factory=list)
    emailproxy: list[float] = field(default_factory=list)
    target: str = ""
    check: Callable[["Row"], bool] | None = None
    higher_is_better: bool = True
    note: str = ""

    def ratio_of(self, side: str) -> float | None:
        """Median of ``side`` over the median of direct (None without both)."""
        values = getattr(self, side)
        if self.direct and values and statistics.median(self.direct):
            return statistics.median(values) / statistics.median(self.direct)
        return None

    @property
    def ratio(self) -> float | None:
        return self.ratio_of("proxy")

    def ahead_of_emailproxy(self) -> bool:
        """The proxy's median is better than emailproxy's (True if emailproxy was not measured)."""
        if not self.emailproxy:
            return True
        mine, theirs = self.median("proxy"), self.median("emailproxy")
        return mine > theirs if self.higher_is_better else mine < theirs

    @property
    def passed(self) -> bool | None:
        if self.check is None:
            return None
        if not self.proxy:
            return False
        try:
            return bool(self.check(self))
        except (TypeError, ValueError, ZeroDivisionError):  # a side without figures
            return False

    def median(self, side: str) -> float:
        return statistics.median(getattr(self, side))


class Context:
    def __init__(self, bed: Bed, sizes: Sizes, log: Callable[[str], None]):
        self.bed, self.sizes, self.log = bed, sizes, log
        acc = bed.account
        self.direct = Target("direct", *bed.imap_direct, acc.user, bed.direct_token, bed.client_tls())
        self.proxy = Target("proxy", *bed.imap_proxy, acc.user, acc.password)
        self.emailproxy = (Target("emailproxy", *bed.imap_emailproxy, acc.user, acc.password)
                           if bed.emailproxy is not None else None)

    def targets(self, run: int) -> list[Target]:
        """Every target, the order rotating each run so none always runs on a warmer machine."""
        targets = [t for t in (self.direct, self.proxy, self.emailproxy) if t is not None]
        shift = run % len(targets)
        return targets[shift:] + targets[:shift]

    @property
    def proxy_pid(self) -> int:
        return self.bed.proxy.pid


# ------------------------------------------------------------------------------ fill the mailbox
def fill(ctx: Context) -> None:
    s = ctx.sizes
    started = time.monotonic()
    client = SyncImap(ctx.direct)
    client.login()
    client.command(b"CREATE Big")
    for i in range(s.messages):
        client.append(b"INBOX", make_message(s.message_size, i))
    client.append(b"Big", make_message(s.big_size, 10**6))
    client.close()
    os.sync()  # let the disk writes settle before anything is timed
    ctx.log(f"mailbox filled: {s.messages} × {s.message_size:,} B in INBOX, 1 × {s.big_size:,} B in Big "
            f"({time.monotonic() - started:.1f} s)")


# ------------------------------------------------------------------------------ 1. FETCH throughput
def _fetch_once(target: Target, mailbox: bytes, expected: int, pid: int | None) -> tuple[float, float]:
    client = SyncImap(target)
    try:
        client.login()
        client.command(b"SELECT " + mailbox)
        cpu0 = cpu_seconds(pid) if pid else 0.0
        started = time.perf_counter()
        _, received = client.command(b"FETCH 1:* BODY.PEEK[]")
        elapsed = time.perf_counter() - started
        cpu = (cpu_seconds(pid) - cpu0) / elapsed if pid else 0.0
    finally:
        client.close()
    if received != expected:
        raise ImapError(f"FETCH returned {received} bytes of literals, expected {expected}")
    return received / elapsed / 1e6, cpu


def fetch(ctx: Context) -> list[Row]:
    s = ctx.sizes
    rows = []
    for label, mailbox, expected in ((f"FETCH {s.messages} × {s.message_size / 1e3:g} kB", b"INBOX",
                                      s.messages * s.message_size),
                                     (f"FETCH 1 × {s.big_size / 1e6:g} MB", b"Big", s.big_size)):
        row = Row(label, "MB/s", target="proxy ≥ 90 % of direct", check=lambda r: r.ratio >= 0.9)
        cpu = Row(f"  proxy CPU during {label}", "cores", note="the proxy process only; 2 cores in all")
        for target in ctx.targets(0):  # warm the page cache and every path
            _fetch_once(target, mailbox, expected, None)
        for run in range(s.runs):
            for target in ctx.targets(run):
                rate, load = _fetch_once(target, mailbox, expected, ctx.proxy_pid if target is ctx.proxy else None)
                getattr(row, target.name).append(rate)
                if target is ctx.proxy:
                    cpu.proxy.append(load)
        ctx.log(f"{label}: " + _medians(row, "{:.0f} MB/s"))
        rows += [row, cpu]
    return rows


# ------------------------------------------------------------------------------ 2. logins
def _login_and_close(target: Target) -> None:
    client = SyncImap(target)
    client.login()
    client.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def login_latency(ctx: Context) -> list[Row]:
    s = ctx.sizes
    p50 = Row("LOGIN → OK, p50 (cached token)", "ms", target="proxy ≤ direct + 5 ms", higher_is_better=False,
              check=lambda r: r.median("proxy") <= r.median("direct") + 5)
    p99 = Row("LOGIN → OK, p99", "ms", higher_is_better=False)
    full = Row("connect → logged in, p50", "ms", higher_is_better=False,
               note="includes the client's TLS handshake when direct")
    for target in ctx.targets(0):  # warm-up (the proxies unlock the account at their first login)
        for _ in range(3):
            _login_and_close(target)
    for run in range(s.runs):
        for target in ctx.targets(run):
            latencies, totals = [], []
            for _ in range(s.logins):
                started = time.perf_counter()
                client = SyncImap(target, timeout=30)
                latencies.append(client.login())
                totals.append(time.perf_counter() - started)
                client.close()
            getattr(p50, target.name).append(_percentile(latencies, 0.5) * 1000)
            getattr(p99, target.name).append(_percentile(latencies, 0.99) * 1000)
            getattr(full, target.name).append(_percentile(totals, 0.5) * 1000)
    ctx.log("LOGIN p50: " + _medians(p50, "{:.1f} ms"))
    return [p50, p99, full]


async def _login_loop(target: Target, clients: int, total: int, seconds: float) -> tuple[int, int, float]:
    """``total`` logins by ``clients`` clients, or as many as fit in ``seconds``."""
    remaining = total
    done = failed = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal remaining, done, failed
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            client = AsyncImap(target)
            try:
                await asyncio.wait_for(_connect_login(client), 30)
                done += 1
            except (OSError, ImapError, asyncio.TimeoutError, ConnectionError):
                failed += 1
            finally:
                client.abort()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return done, failed, time.perf_counter() - started


async def _connect_login(client: AsyncImap) -> None:
    await client.connect()
    await client.login()
    client.writer.write(b"z LOGOUT\r\n")


def login_rate(ctx: Context) -> list[Row]:
    s = ctx.sizes
    row = Row(f"logins/s, {s.login_clients} clients", "1/s", target="proxy ≥ 90 % of direct",
              check=lambda r: r.ratio >= 0.9)
    cpu = Row("  proxy CPU during those logins", "cores")
    failures = {side: 0 for side in SIDES}
    for run in range(s.runs):
        for target in ctx.targets(run):
            cpu0 = cpu_seconds(ctx.proxy_pid)
            done, failed, elapsed = asyncio.run(_login_loop(target, s.login_clients, s.logins_concurrent,
                                                            s.peer_seconds / 2))
            failures[target.name] += failed
            getattr(row, target.name).append(done / elapsed)
            if target is ctx.proxy:
                cpu.proxy.append((cpu_seconds(ctx.proxy_pid) - cpu0) / elapsed)
    if any(failures.values()):
        row.note = "logins failed: " + ", ".join(f"{side} {n}" for side, n in failures.items() if n)
    ctx.log("logins/s: " + _medians(row, "{:.0f}"))
    return [row, cpu]


# ------------------------------------------------------------------------------ 3. burst
async def _burst(target: Target, n: int) -> tuple[int, int, float]:
    greeted = logged_in = 0
    gate = asyncio.Event()
    clients = [AsyncImap(target) for _ in range(n)]

    async def one(client: AsyncImap) -> None:
        nonlocal greeted, logged_in
        await gate.wait()
        await client.connect()
        greeted += 1
        await client.login()
        logged_in += 1

    tasks = [asyncio.ensure_future(asyncio.wait_for(one(c), 30)) for c in clients]
    await asyncio.sleep(0)
    started = time.perf_counter()
    gate.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.perf_counter() - started
    for client in clients:
        if client.writer is not None:
            await client.logout()
    return greeted, logged_in, elapsed


def burst(ctx: Context) -> list[Row]:
    s = ctx.sizes
    n = s.burst
    greeted = Row(f"burst of {n}: greeted", "clients", target=f"all {n}", check=lambda r: min(r.proxy) == n)
    logged = Row(f"burst of {n}: logged in", "clients", target=f"all {n}", check=lambda r: min(r.proxy) == n)
    seconds = Row(f"burst of {n}: until the last is logged in", "s", higher_is_better=False)
    for run in range(s.runs):
        for target in ctx.targets(run):
            g, li, elapsed = asyncio.run(_burst(target, n))
            getattr(greeted, target.name).append(g)
            getattr(logged, target.name).append(li)
            getattr(seconds, target.name).append(elapsed)
            time.sleep(1)  # let both servers close the sessions
    ctx.log(f"burst: logged in: direct {logged.direct}, proxy {logged.proxy}, emailproxy {logged.emailproxy}")
    return [greeted, logged, seconds]


# ------------------------------------------------------------------------------ 4. idle sessions
async def _idle(target: Target, n: int, pid: int, concurrency: int = 100,
                seconds: float | None = None) -> tuple[int, float, int]:
    """Open ``n`` IDLE sessions (stop opening after ``seconds``); returns (sessions still alive at the
    end, KiB of ``pid``'s memory per session, errors)."""
    gate = asyncio.Semaphore(concurrency)
    clients: list[AsyncImap] = []
    errors = 0
    deadline = None if seconds is None else time.perf_counter() + seconds

    async def one() -> None:
        nonlocal errors
        client = AsyncImap(target)
        async with gate:
            if deadline is not None and time.perf_counter() > deadline:
                return
            try:
                await asyncio.wait_for(_open_idle(client), 60)
                clients.append(client)
            except (OSError, ImapError, asyncio.TimeoutError, ConnectionError):
                errors += 1
                client.abort()

    await asyncio.sleep(1)
    gc.collect()
    before = rss_kib(pid)
    await asyncio.gather(*(one() for _ in range(n)))
    await asyncio.sleep(2)  # let the dust settle: nothing should be in flight any more
    after = rss_kib(pid)
    per_session = (after - before) / max(1, len(clients))
    alive = 0

    async def leave(client: AsyncImap) -> None:
        nonlocal alive
        try:
            await asyncio.wait_for(client.done(), 30)
            alive += 1
        except (OSError, ImapError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            client.abort()

    for start in range(0, len(clients), 500):
        await asyncio.gather(*(leave(c) for c in clients[start:start + 500]))
    return alive, per_session, errors


async def _open_idle(client: AsyncImap) -> None:
    await client.connect()
    await client.login()
    await client.idle()


def idle(ctx: Context) -> list[Row]:
    s = ctx.sizes
    n = s.idle
    held = Row(f"IDLE sessions held (of {n:,})", "sessions", target=f"proxy ≥ {n:,}",
               check=lambda r: min(r.proxy) >= n,
               note=f"emailproxy: sessions it opened within {s.peer_seconds:g} s, then held")
    memory = Row("  resident memory per IDLE session", "KiB", target="≤ 35 KiB", higher_is_better=False,
                 check=lambda r: r.median("proxy") <= 35)
    for run in range(s.idle_runs):
        for target in ctx.targets(run):
            if target is ctx.proxy:  # a fresh proxy: no heap left free by earlier scenarios' sessions
                ctx.bed.start_proxy()
                for _ in range(3):  # the first login unlocks the account (key derivation)
                    _login_and_close(target)
            pid = ctx.bed.emailproxy.pid if target is ctx.emailproxy else ctx.proxy_pid
            budget = s.peer_seconds if target is ctx.emailproxy else None
            alive, per_session, errors = asyncio.run(_idle(target, n, pid, seconds=budget))
            getattr(held, target.name).append(alive)
            if target is ctx.proxy:
                memory.proxy.append(per_session)
            elif target is ctx.emailproxy:
                memory.emailproxy.append(per_session)
            ctx.log(f"idle {target.name}: {alive} of {n} held ({errors} failed to open)"
                    + (f", {per_session:.1f} KiB per session" if target is not ctx.direct else ""))
            _wait_sessions_gone(ctx)
    return [held, memory]


def tls_idle(ctx: Context) -> list[Row]:
    """Idle sessions over the proxy's implicit-TLS listener: TLS towards the client and upstream."""
    s = ctx.sizes
    n = s.tls_idle
    bed = ctx.bed
    target = Target("proxy", "127.0.0.1", bed.proxy.imaps_port, bed.account.user, bed.account.password,
                    bed.client_tls(), xoauth2=False)
    held = Row(f"IDLE sessions over IMAPS held (of {n:,})", "sessions", target=f"proxy ≥ {n:,}",
               check=lambda r: min(r.proxy) >= n)
    memory = Row("  proxy memory per IDLE session, TLS on both sides", "KiB", target="≤ 50 KiB",
                 higher_is_better=False, check=lambda r: r.median("proxy") <= 50)
    for _ in range(s.idle_runs):
        bed.start_proxy()
        for _ in range(3):
            _login_and_close(target)
        alive, per_session, errors = asyncio.run(_idle(target, n, ctx.proxy_pid))
        held.proxy.append(alive)
        memory.proxy.append(per_session)
        ctx.log(f"idle over IMAPS: {alive} of {n} held ({errors} failed), {per_session:.1f} KiB per session")
        _wait_sessions_gone(ctx)
    return [held, memory]


def _wait_sessions_gone(ctx: Context, timeout: float = 60) -> None:
    """Wait until the proxy's open-file count is back near its baseline (sessions closed)."""
    deadline = time.monotonic() + timeout
    pids = [ctx.proxy_pid] + ([ctx.bed.emailproxy.pid] if ctx.bed.emailproxy is not None else [])
    while time.monotonic() < deadline:
        if all(len(os.listdir(f"/proc/{pid}/fd")) < 64 for pid in pids):
            break
        time.sleep(0.5)
    time.sleep(1)


# ------------------------------------------------------------------------------ 5. stalled reader
def stall(ctx: Context) -> list[Row]:
    """A client stops reading 1 MB into a large FETCH; the proxy must stop reading upstream."""
    s = ctx.sizes
    cpu = Row("stalled reader: CPU while stalled", "% core", target="≈ 0 (≤ 1 %)", higher_is_better=False,
              check=lambda r: max(r.proxy) <= 1.0)
    growth = Row("stalled reader: RSS growth while stalled", "KiB", target="flat (≤ 256 KiB)",
                 higher_is_better=False, check=lambda r: max(r.proxy) <= 256)
    held = Row("stalled reader: RSS above an idle session", "KiB", target="bounded (≤ 2 MiB)",
               higher_is_better=False, check=lambda r: max(r.proxy) <= 2048)
    unread = Row("stalled reader: bytes not yet read by the client", "MB",
                 note="held back by backpressure: upstream, and in kernel socket buffers (not the proxy's memory)")
    first = min(1_000_000, s.big_size // 2)
    for run in range(max(1, min(3, s.runs))):
        for target in [t for t in ctx.targets(run) if t is not ctx.direct]:
            pid = ctx.bed.emailproxy.pid if target is ctx.emailproxy else ctx.proxy_pid
            client = SyncImap(target)
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)  # a client that reads no more
            client.login()
            client.command(b"SELECT Big")
            time.sleep(0.5)
            base = rss_kib(pid)
            tag = client.send(b"FETCH 1 BODY.PEEK[]")
            header = client.readline()  # "* 1 FETCH (BODY[] {size}"
            size = int(header.rsplit(b"{", 1)[1].split(b"}", 1)[0])
            taken = client.received - (client._end - client._start)  # socket bytes up to the literal
            client.skip(first)          # read the first megabyte, then stop reading
            time.sleep(1.0)             # the buffers fill up, the proxy stops reading upstream
            cpu0, rss0, t0 = cpu_seconds(pid), rss_kib(pid), time.perf_counter()
            time.sleep(s.stall_seconds)
            cpu1, rss1, t1 = cpu_seconds(pid), rss_kib(pid), time.perf_counter()
            getattr(cpu, target.name).append((cpu1 - cpu0) / (t1 - t0) * 100)
            getattr(growth, target.name).append(max(0, rss1 - rss0))
            getattr(held, target.name).append(max(0, rss1 - base))
            getattr(unread, target.name).append((size - (client.received - taken)) / 1e6)
            client.skip(size - first)   # read on: everything must still arrive
            line, _ = client.response(tag)
            if not line.startswith(tag + b" OK"):
                raise ImapError(f"FETCH after the stall ({target.name}): {line[:100]!r}")
            client.close()
    ctx.log(f"stalled reader: proxy CPU {max(cpu.proxy):.2f} %, RSS growth {max(growth.proxy):.0f} KiB"
            + (f"; emailproxy CPU {max(cpu.emailproxy):.1f} %" if cpu.emailproxy else ""))
    return [cpu, growth, held, unread]


# ------------------------------------------------------------------------------ 6. SMTP
def _smtp(ctx: Context, side: str) -> smtplib.SMTP:
    bed, acc = ctx.bed, ctx.bed.account
    if side == "direct":
        host, port = bed.smtp_direct
        smtp = smtplib.SMTP(host, port, timeout=120)
        smtp.starttls(context=bed.client_tls())
        smtp.ehlo()
        xoauth2 = f"user={acc.user}\x01auth=Bearer {bed.direct_token}\x01\x01"
        smtp.auth("XOAUTH2", lambda challenge=None: xoauth2, initial_response_ok=False)
    else:
        host, port = bed.smtp_proxy if side == "proxy" else bed.smtp_emailproxy
        smtp = smtplib.SMTP(host, port, timeout=300)
        smtp.login(acc.user, acc.password)
    smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return smtp


def _ahead(ratio: float):
    return lambda r: r.ratio >= ratio and r.ahead_of_emailproxy()


def smtp(ctx: Context) -> list[Row]:
    s = ctx.sizes
    rate = Row(f"SMTP messages/s ({s.smtp_messages} × {s.smtp_message_size / 1e3:g} kB, one session)", "1/s",
               target="proxy ≥ 90 % of direct, > emailproxy", check=_ahead(0.9))
    big = Row(f"SMTP {s.smtp_big_size / 1e6:g} MB message", "MB/s", target="proxy ≥ 90 % of direct, > emailproxy",
              check=_ahead(0.9), note="from MAIL to the final 250 (the proxy's 250 only after the upstream's)")
    small = make_message(s.smtp_message_size, 1)
    large = make_message(s.smtp_big_size, 2)
    sender, rcpt = ctx.bed.account.user, ["someone@example.com"]
    sides = [t.name for t in ctx.targets(0)]
    for side in sides:  # warm-up
        conn = _smtp(ctx, side)
        conn.sendmail(sender, rcpt, small)
        conn.quit()
    for run in range(s.runs):
        for target in ctx.targets(run):
            conn = _smtp(ctx, target.name)
            started = time.perf_counter()
            for _ in range(s.smtp_messages):
                conn.sendmail(sender, rcpt, small)
            getattr(rate, target.name).append(s.smtp_messages / (time.perf_counter() - started))
            started = time.perf_counter()
            conn.sendmail(sender, rcpt, large)
            getattr(big, target.name).append(len(large) / (time.perf_counter() - started) / 1e6)
            conn.quit()
    ctx.log("SMTP: " + _medians(rate, "{:.0f} msg/s") + "; " + _medians(big, "{:.1f} MB/s"))
    return [rate, big, _smtp_memory(ctx)]


def _smtp_memory(ctx: Context) -> Row:
    """The proxy's peak resident memory while relaying one very large message, above its level before."""
    s = ctx.sizes
    row = Row(f"  proxy peak RSS growth, one {s.smtp_huge_size / 1e6:g} MB message", "MB", target="< 20 MB",
              higher_is_better=False, check=lambda r: max(r.proxy) < 20)
    huge = make_message(s.smtp_huge_size, 3)
    pid = ctx.proxy_pid
    for _ in range(max(1, min(2, s.runs))):
        conn = _smtp(ctx, "proxy")
        conn.sendmail(ctx.bed.account.user, ["someone@example.com"], b"Subject: warm-up\r\n\r\nx\r\n")
        before = rss_kib(pid)
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        conn.sendmail(ctx.bed.account.user, ["someone@example.com"], huge)
        row.proxy.append(max(0, peak_rss_kib(pid) - before) * 1024 / 1e6)
        conn.quit()
    del huge
    return row


def _medians(row: Row, fmt: str) -> str:
    return ", ".join(f"{side} " + fmt.format(row.median(side)) for side in SIDES if getattr(row, side))


# ------------------------------------------------------------------------------ 7. POP3 RETR
def _pop3(ctx: Context, direct: bool) -> Pop3Client:
    bed, acc = ctx.bed, ctx.bed.account
    if direct:
        client = Pop3Client(*bed.pop3_direct, context=bed.client_tls(), timeout=120)
        client.login_xoauth2(acc.user, bed.direct_token)
    else:
        client = Pop3Client(*bed.pop3_proxy, timeout=120)
        client.login(acc.user, acc.password)
    return client


def _retr_all(ctx: Context, direct: bool, count: int, pid: int | None) -> tuple[float, float]:
    """RETR 1..count one after the other (as fetchmail and getmail do); MB/s of raw data, proxy CPU."""
    client = _pop3(ctx, direct)
    try:
        cpu0 = cpu_seconds(pid) if pid else 0.0
        started = time.perf_counter()
        received = sum(len(client.retr(number)) for number in range(1, count + 1))
        elapsed = time.perf_counter() - started
        cpu = (cpu_seconds(pid) - cpu0) / elapsed if pid else 0.0
        client.quit()
    finally:
        client.close()
    if received < count * ctx.sizes.message_size:
        raise RuntimeError(f"POP3 RETR returned {received} bytes, expected at least {count * ctx.sizes.message_size}")
    return received / elapsed / 1e6, cpu


def pop3(ctx: Context) -> list[Row]:
    """The INBOX that fill() made (``messages`` × ``message_size``), fetched by POP3: direct is POP3S with
    AUTH XOAUTH2 to Dovecot, the proxy is plain POP3 with USER/PASS on loopback."""
    s = ctx.sizes
    label = f"POP3 RETR {s.messages} × {s.message_size / 1e3:g} kB"
    row = Row(label, "MB/s", target="proxy ≥ 90 % of direct", check=lambda r: r.ratio >= 0.9)
    cpu = Row(f"  proxy CPU during {label}", "cores", note="the proxy process only; 2 cores in all")
    for direct in (True, False):  # warm: the page cache, and Dovecot's POP3 sizes of the mailbox
        _retr_all(ctx, direct, s.messages, None)
    for run in range(s.runs):
        for target in [t for t in ctx.targets(run) if t is not ctx.emailproxy]:  # (not set up for POP3)
            is_proxy = target is ctx.proxy
            rate, load = _retr_all(ctx, not is_proxy, s.messages, ctx.proxy_pid if is_proxy else None)
            getattr(row, target.name).append(rate)
            if is_proxy:
                cpu.proxy.append(load)
    ctx.log(f"{label}: direct {row.median('direct'):.0f} MB/s, proxy {row.median('proxy'):.0f} MB/s")
    return [row, cpu]


# ------------------------------------------------------------------------------ 8. replicas (on request)
def replicas(ctx: Context, count: int = 3) -> list[Row]:
    """Three `proxy serve` replicas on a PostgreSQL token store behind HAProxy (tests/replicas.py,
    the bed of the scale-out tests): LOGIN latency through HAProxy ("proxy" column) against one
    proxy on its token folder ("direct" column); each replica's memory and database connections."""
    from dataclasses import replace

    from tests.harness import rss_kib
    from tests.replicas import HAProxy, PostgresServer, Replicas

    s, bed, account = ctx.sizes, ctx.bed, ctx.bed.account
    p50 = Row(f"LOGIN → OK via HAProxy, {count} replicas on PostgreSQL, p50", "ms", higher_is_better=False,
              note="direct column: one proxy on its token folder, without a balancer")
    p99 = Row(f"LOGIN → OK via HAProxy, {count} replicas on PostgreSQL, p99", "ms", higher_is_better=False)
    memory = Row("resident memory per replica", "MiB", higher_is_better=False)
    connections = Row("database connections per replica", "", higher_is_better=False)
    postgres = PostgresServer().start()
    group = haproxy = None
    try:
        dsn, password = postgres.create_database("bench_tokens")
        group = Replicas(bed.workdir / "replicas", idp=bed.idp, pki=bed.idp.pki, dovecot=bed.dovecot,
                         accounts=[account.user], count=count, log_level="INFO",
                         tokens={"store": "postgresql", "dsn": dsn.replace("@", f":{password}@", 1)},
                         limits={"max_connections": 2000})
        group.authorize(account.user, account.password)
        group.start()
        haproxy = HAProxy(bed.workdir / "haproxy", [group.ports(i) for i in range(count)]).start()
        balanced = replace(ctx.proxy, port=haproxy.ports["imap"])
        for target in (ctx.proxy, balanced, balanced, balanced):   # warm-up: every replica unlocks the account
            for _ in range(count):
                _login_and_close(target)
        for run in range(s.runs):
            for name, target in ((("direct", ctx.proxy), ("proxy", balanced)) if run % 2 == 0 else
                                 (("proxy", balanced), ("direct", ctx.proxy))):
                latencies = []
                for _ in range(s.logins):
                    client = SyncImap(target, timeout=30)
                    latencies.append(client.login())
                    client.close()
                getattr(p50, name).append(_percentile(latencies, 0.5) * 1000)
                getattr(p99, name).append(_percentile(latencies, 0.99) * 1000)
        for process in group.processes:
            if process is not None:
                memory.proxy.append(rss_kib(process.pid) / 1024)
        connections.proxy.append(postgres.connections("bench_tokens") / count)
        ctx.log(f"replicas: LOGIN p50 one proxy {p50.median('direct'):.1f} ms, via HAProxy "
                f"{p50.median('proxy'):.1f} ms; {memory.median('proxy'):.0f} MiB per replica")
    finally:
        if haproxy is not None:
            haproxy.stop()
        if group is not None:
            group.stop()
        postgres.stop()
    return [p50, p99, memory, connections]


SCENARIOS = {"fetch": fetch, "login": login_latency, "rate": login_rate, "burst": burst, "idle": idle,
             "tlsidle": tls_idle, "stall": stall, "smtp": smtp, "pop3": pop3}
# Run only when asked for (``--only replicas``): they need PostgreSQL and HAProxy (docs/scale-out.md).
def floor(ctx: Context) -> list[Row]:
    """bench/floor.py: the same figures through a do-nothing Python relay (what any proxy pays)."""
    from bench.floor import floor as measure
    return measure(ctx)


OPTIONAL_SCENARIOS = {"replicas": replicas, "floor": floor}

