"""The failure throttle and the login sequence's handling of failures, in memory (issue 12).

Each test reproduces one way password guessing got faster or memory grew, against the pure
pieces: :class:`proxy.throttle.FailureThrottle`, :func:`proxy.login.login` with a fake broker
and upstream, and :class:`proxy.admission.Admission` holding a failed login's slot."""

from __future__ import annotations

import asyncio
import re
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from proxy import throttle as throttle_module
from proxy.admission import Admission
from proxy.config import parse_config
from proxy.login import LoginFailed, Upstream, login
from proxy.metrics import METRICS
from proxy.throttle import FailureThrottle, source_key
from proxy.tokens import LoginRefused
from tests.harness import rss_kib

ACCOUNT = "alice@example.com"
CONFIG = parse_config({"identity": {"authority": "https://127.0.0.1:1/tenant", "client_id": "test"},
                       "accounts": [{"username": ACCOUNT}, {"username": "shared@example.com", "token": ACCOUNT}]},
                      base_dir=Path("."))


def test_delay_grows_per_account_and_per_source_and_is_capped():
    t = FailureThrottle(base=0.5, cap=4)
    assert t.delay("alice", "10.0.0.1") == 0
    delays = []
    for _ in range(6):
        delays.append(t.failed("alice", "10.0.0.1"))
    assert delays == [0.5, 1, 2, 4, 4, 4]
    assert t.delay("alice", "10.0.0.2") == 4      # same account from elsewhere
    assert t.delay("bob", "10.0.0.1") == 4        # same source guessing another account
    assert t.delay("bob", "10.0.0.9") == 0
    t.succeeded("alice")
    assert t.delay("alice", "10.0.0.2") == 0


def test_the_delay_never_overflows_after_1100_failures():
    """0.5 * 2 ** 1024 overflowed: from then on guesses were answered at once (or not at all)."""
    t = FailureThrottle(base=0.5, cap=8)
    delays = [t.failed("alice", "10.0.0.1") for _ in range(1200)]
    assert delays[:5] == [0.5, 1, 2, 4, 8]
    assert set(delays[4:]) == {8}
    assert t.delay("alice", "10.0.0.1") == 8 and t.delay(None, "10.0.0.1") == 8
    assert t.delay_for(10**9) == 8


def test_any_error_in_the_throttle_fails_closed(monkeypatch, caplog):
    t = FailureThrottle(base=0.5, cap=8)

    def broken(source: str) -> str:
        raise RuntimeError("bug")
    monkeypatch.setattr(throttle_module, "source_key", broken)
    with caplog.at_level(logging.ERROR, "proxy.login"):
        assert t.failed("alice", "10.0.0.1") == 8
        assert t.delay("alice", "10.0.0.1") == 8
    assert "answering with the longest delay" in caplog.text


def test_loopback_is_one_source_and_ipv6_counts_per_64():
    assert source_key("127.0.0.1") == source_key("127.0.0.2") == source_key("::1") == source_key("::ffff:127.0.0.9")
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::7") != source_key("2001:db8:1:3::1")
    assert source_key("10.0.0.1") != source_key("10.0.0.2")
    t = FailureThrottle(base=0.5, cap=8)
    t.failed(None, "127.0.0.1")
    t.failed(None, "127.0.0.1")
    assert t.delay(None, "127.0.0.77") == 1       # a new loopback address is not a fresh start


def test_a_full_source_table_drops_the_quietest_source_not_all_of_them():
    """The table was wiped of every source counter once it held 10,000 entries."""
    t = FailureThrottle(base=0.5, cap=8, max_sources=1000, max_accounts=1000)
    for _ in range(5):
        t.failed(None, "10.9.9.9")                # the attacker's address: delay at the cap
    for i in range(5000):                         # then a flood of other sources and names
        t.failed(f"name{i}@example.com" if i % 2 else None, f"10.1.{i // 256}.{i % 256}")
        t.failed(None, "10.9.9.9")                # (still guessing)
    assert t.delay(None, "10.9.9.9") == 8
    assert len(t) <= 2000                         # 1,000 sources + 1,000 names at most (defaults: 10,000 each)


# ------------------------------------------------------------------------------- login() and the throttle
class FakeBroker:
    """authenticate(): right for PASSWORD, else refused, after ``check_seconds``."""

    PASSWORD = "right password"

    def __init__(self, check_seconds: float = 0.0):
        self.config = CONFIG
        self.check_seconds = check_seconds

    async def authenticate(self, username: str, password: str):
        await asyncio.sleep(self.check_seconds)
        if self.config.account(username) is not None and password == self.PASSWORD:
            return SimpleNamespace(account=self.config.account(username))
        raise LoginRefused("unknown user or wrong password")

    async def access_token(self, grant, timeout: float) -> str:
        return "token"

    def reject(self, grant, token: str) -> bool:
        return False


async def _authenticate(conn, mailbox: str, token: str) -> str:
    return "caps"


UPSTREAM = Upstream(connect=lambda: asyncio.sleep(0, result=object()), authenticate=_authenticate,
                    is_closed=lambda conn: False, close=lambda conn: None)


def run_login(broker, throttle, *, username=ACCOUNT, password="wrong", timeout=5.0, slot=None, source="10.0.0.1"):
    return login(broker, throttle, UPSTREAM, username=username, password=password, source=source,
                 timeout=timeout, protocol="imap", slot=slot)


def test_after_1100_failures_a_wrong_password_is_still_answered_no_after_the_longest_delay(caplog):
    """Before: OverflowError escaped the login (IMAP dropped the connection, SMTP said 451, at once)."""
    t = FailureThrottle(base=0.05, cap=0.4)
    for _ in range(1100):
        t.failed(ACCOUNT, "10.0.0.1")
    before = METRICS.logins.labels("imap", "credentials")._value.get()

    async def main():
        started = time.monotonic()
        with pytest.raises(LoginFailed) as failure:
            await run_login(FakeBroker(), t)
        return failure.value, time.monotonic() - started
    with caplog.at_level(logging.INFO, "proxy.login"):
        failure, took = asyncio.run(main())
    assert failure.kind == LoginFailed.CREDENTIALS
    assert 0.35 <= took < 2
    assert METRICS.logins.labels("imap", "credentials")._value.get() == before + 1
    assert f"login {ACCOUNT} failed" in caplog.text and "answered after 0.4 s" in caplog.text


def test_a_guess_at_a_shared_mailbox_counts_against_its_token_owner():
    t = FailureThrottle(base=0.01, cap=0.01)

    async def main():
        with pytest.raises(LoginFailed):
            await run_login(FakeBroker(), t, username="SHARED@example.com", source="10.0.0.1")
    asyncio.run(main())
    assert t.delay(ACCOUNT, "10.7.7.7") > 0      # alice's password was guessed, from another source now
    assert t.delay("nobody@example.com", "10.7.7.7") == 0

    t.base = t.cap = 0.0                         # (not waiting for the delays below)

    async def unknown_names():
        for i in range(1000):
            with pytest.raises(LoginFailed):
                await run_login(FakeBroker(), t, username=f"name{i}@example.com", source="10.0.0.2")
    asyncio.run(unknown_names())
    assert len(t) == 3                           # alice, 10.0.0.1, 10.0.0.2: a typed name gets no counter


def test_an_unknown_user_name_is_never_logged_as_typed(caplog):
    """A password typed into the user name field must not end up in the log: an unknown name shows
    as its length and a fingerprint, the same for the same name while the proxy runs."""
    t = FailureThrottle(base=0.0, cap=0.0)
    typed = "Winter2026!secret"

    async def main():
        for name in (typed, typed, "someone-else"):
            with pytest.raises(LoginFailed):
                await run_login(FakeBroker(), t, username=name)
    with caplog.at_level(logging.INFO, "proxy.login"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(lines) == 3 and typed not in caplog.text and "Winter" not in caplog.text
    fingerprints = [re.search(r"<unknown user name, (\d+) characters, #([0-9a-f]{8})>", line) for line in lines]
    assert [f.group(1) for f in fingerprints] == [str(len(typed)), str(len(typed)), "12"]
    assert fingerprints[0].group(2) == fingerprints[1].group(2) != fingerprints[2].group(2)
    assert all(getattr(r, "fields", {}).get("account", "").startswith("<unknown") for r in caplog.records
               if "failed" in r.getMessage())


def test_a_failure_is_counted_and_logged_before_the_delay_and_a_hang_up_keeps_the_slot(caplog):
    """SMTP: aiosmtpd cancels the handler when the client hangs up. Before, that cancelled the delay
    before anything was counted or logged, and freed the connection slot at once."""
    t = FailureThrottle(base=0.6, cap=0.6)
    clock = SimpleNamespace(now=100.0)
    admission = Admission(clock=lambda: clock.now)

    async def main():
        slot, _ = admission.admit(max_connections=1, max_prelogin=1)
        task = asyncio.ensure_future(run_login(FakeBroker(), t, slot=slot))
        await asyncio.sleep(0.2)                  # inside the failure delay
        task.cancel()                             # the client hung up
        slot.release()
        with pytest.raises(asyncio.CancelledError):
            await task
        return slot
    before = METRICS.logins.labels("imap", "credentials")._value.get()
    with caplog.at_level(logging.INFO, "proxy.login"):
        asyncio.run(main())
    assert METRICS.logins.labels("imap", "credentials")._value.get() == before + 1
    assert f"login {ACCOUNT} failed" in caplog.text
    assert t.delay(ACCOUNT, "10.0.0.1") > 0
    assert admission.total() == 1                                       # still taken ...
    assert admission.admit(max_connections=1, max_prelogin=1)[0] is None
    clock.now += 0.7                                                    # ... until the delay is over
    assert admission.total() == 0
    assert admission.admit(max_connections=1, max_prelogin=1)[0] is not None


def test_a_login_that_times_out_in_the_password_check_blames_local_congestion():
    async def main():
        with pytest.raises(LoginFailed) as failure:
            await run_login(FakeBroker(check_seconds=5), FailureThrottle(), password=FakeBroker.PASSWORD,
                            timeout=0.3)
        return failure.value
    failure = asyncio.run(main())
    assert failure.kind == LoginFailed.UNAVAILABLE
    assert "busy checking other login attempts" in failure.text
    assert "identity provider" not in failure.text and "mail server" not in failure.text


def test_a_correct_password_is_not_delayed_by_the_counters_and_clears_the_account():
    t = FailureThrottle(base=5, cap=5)
    for _ in range(5):
        t.failed(ACCOUNT, "10.0.0.1")

    async def main():
        started = time.monotonic()
        await run_login(FakeBroker(), t, password=FakeBroker.PASSWORD)
        return time.monotonic() - started
    assert asyncio.run(main()) < 1
    assert t.delay(ACCOUNT, "10.0.0.2") == 0 and t.delay(ACCOUNT, "10.0.0.1") == 5   # the source stays slowed


def test_100000_typed_user_names_and_sources_keep_memory_bounded_and_the_source_counter():
    """Every name a client typed got an entry; at 10,000 the table dropped all source counters.
    Here even as if every name were a configured account (the login sequence gives unknown names
    no counter of their own at all: see the test above), and 100,000 sources besides."""
    t = FailureThrottle(base=0.5, cap=8)
    rss_before = rss_kib(os.getpid())
    for i in range(100_000):
        t.failed(f"user{i}-{os.urandom(6).hex()}@example.com", "10.0.0.1")
        t.failed(None, f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" if i % 2 else "10.0.0.1")
    assert (rss_kib(os.getpid()) - rss_before) / 1024 < 50
    assert len(t) <= throttle_module.MAX_ACCOUNTS + throttle_module.MAX_SOURCES
    assert t.delay(None, "10.0.0.1") == 8         # the guessing source kept its counter
    assert t.delay("a-new-name@example.com", "10.0.0.1") == 8
