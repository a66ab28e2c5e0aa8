"""The refresh policy as pure functions of a token's times (proxy/tokens/policy.py), and the
broker's use of it with an injectable clock and a stand-in for the identity provider."""

from __future__ import annotations

import asyncio
import threading

import pytest

from proxy.config import AccountConfig, parse_config
from proxy.tokens import LoginGrant, TokenBroker, TokenError, policy
from proxy.tokens.broker import AccountState
from proxy.tokens.store import Lease, NoTokens, TokenStore


@pytest.mark.parametrize("lifetime, margin", [(3600, 1860), (4800, 2460), (1200, 660), (20, 11), (12, 6.6)])
def test_background_refresh_runs_a_little_before_half_the_lifetime(lifetime, margin):
    assert policy.refresh_margin(lifetime) == pytest.approx(margin)
    assert lifetime / 2 < policy.refresh_margin(lifetime) <= lifetime / 2 + 60


@pytest.mark.parametrize("left, lifetime, fresh", [
    (1800, 3600, True), (1799, 3600, False), (2500, 4800, True), (2300, 4800, False), (10, 20, True), (9, 20, False),
])
def test_a_login_wants_a_token_with_half_of_its_lifetime_left(left, lifetime, fresh):
    now = 1_000_000.0
    assert policy.fresh(now + left, lifetime, now) is fresh


@pytest.mark.parametrize("left, lifetime, usable", [
    (6, 3600, True), (5, 3600, False), (0, 3600, False), (-1, 3600, False),
    (3, 10, True), (2, 10, False),  # short-lived tokens: a fifth of the lifetime is enough
])
def test_a_token_is_usable_while_enough_is_left_to_complete_a_login(left, lifetime, usable):
    now = 1_000_000.0
    assert policy.usable(now + left, lifetime, now) is usable


def test_refresh_is_due_before_half_the_lifetime_or_after_the_backoff():
    expires, lifetime = 10_000.0, 3600.0
    assert policy.refresh_due_at(expires, lifetime, failed_at=0.0, backoff=0.0) == expires - 1860
    # after a failure close to expiry, not before the backoff has passed
    assert policy.refresh_due_at(expires, lifetime, failed_at=9_900.0, backoff=8.0) == 9_908.0


def test_backoff_doubles_from_two_seconds_to_a_minute():
    backoffs, backoff = [], 0.0
    for _ in range(8):
        backoff = policy.next_backoff(backoff)
        backoffs.append(backoff)
    assert backoffs == [2, 4, 8, 16, 32, 60, 60, 60]


def test_a_waiting_login_retries_sooner_than_the_background():
    failed_at, backoff = 100.0, 60.0
    assert not policy.may_refresh(104.0, failed_at, backoff, login_waiting=True)
    assert policy.may_refresh(105.0, failed_at, backoff, login_waiting=True)
    assert not policy.may_refresh(105.0, failed_at, backoff, login_waiting=False)
    assert policy.may_refresh(160.0, failed_at, backoff, login_waiting=False)
    assert policy.login_retry_in(101.0, failed_at, backoff) == 4.0
    # a refusal that passes by itself: logins once a minute, the background every 30 minutes
    assert not policy.may_refresh(159.0, failed_at, 1800.0, login_waiting=True, login_pause=60.0)
    assert policy.may_refresh(160.0, failed_at, 1800.0, login_waiting=True, login_pause=60.0)
    assert not policy.may_refresh(1899.0, failed_at, 1800.0, login_waiting=False, login_pause=60.0)
    assert policy.login_retry_in(130.0, failed_at, 1800.0, 60.0) == 30.0


@pytest.mark.parametrize("forced_at, forced_by, protocol, now, allowed", [
    (None, None, "imap", 1000.0, True),       # a normally refreshed token: one forced refresh
    (990.0, "smtp", "smtp", 1000.0, False),   # just forced for SMTP and SMTP refuses again: no
    (990.0, "smtp", "imap", 1000.0, True),    # SMTP's refusal never blocks IMAP's refresh-and-retry
    (960.0, "smtp", "smtp", 1000.0, True),    # 30 s later SMTP may try again
])
def test_forced_refresh_allowance_is_per_token_and_protocol(forced_at, forced_by, protocol, now, allowed):
    assert policy.may_force_refresh(now, forced_at, forced_by, protocol) is allowed


# ------------------------------------------------------------------------------------ the broker
class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeProvider:
    """Stands in for msal: each refresh returns a new token of ``lifetime`` seconds, or raises
    ``error``, or blocks until ``release`` is set."""

    def __init__(self, lifetime: float = 20.0):
        self.lifetime, self.calls, self.error = lifetime, 0, None
        self.release = threading.Event()
        self.release.set()

    def __call__(self, state) -> dict:
        self.calls += 1
        self.release.wait(10)
        if self.error is not None:
            raise self.error
        return {"access_token": f"token-{self.calls}", "expires_in": self.lifetime}


class QuietStore(TokenStore):
    """A store nobody else writes to: the lease is always free, the record never changes (the
    broker's refresh timing is under test here, not storing; tests/test_store.py covers that)."""

    class _Lease(Lease):
        account, version = "a@firm.de", None

        async def release(self) -> None:
            pass

    def describe(self) -> str:
        return "memory"

    def where(self, account: str) -> str:
        return account

    def peek(self, account: str):
        return None

    async def read(self, account: str):
        raise NoTokens(account)

    async def write(self, *args, **kwargs):
        raise AssertionError("not persisted in these tests")

    async def delete(self, account: str) -> bool:
        return False

    async def lease(self, account: str, seconds: float) -> Lease:
        return self._Lease()


def make_broker(tmp_path, provider: FakeProvider, clock: Clock) -> tuple[TokenBroker, LoginGrant]:
    config = parse_config({"identity": {"authority": "https://login.example/t", "client_id": "c"},
                           "accounts": [{"username": "a@firm.de"}]}, base_dir=tmp_path)
    broker = TokenBroker(config, QuietStore(), clock=clock)
    broker._refresh_sync = provider

    async def no_persist(state, status="ok"):
        pass

    broker._persist = no_persist
    account = AccountConfig("a@firm.de")
    state = AccountState(account, access_token="token-0", expires_at=clock.now + 20, lifetime=20.0)
    state.key = object()  # unlocked (the broker refreshes only accounts whose key it holds)
    return broker, LoginGrant(account, state)


def run(coroutine):
    return asyncio.run(coroutine)


def test_login_with_half_the_lifetime_left_uses_the_token_without_waiting(tmp_path):
    clock, provider = Clock(), FakeProvider()
    broker, grant = make_broker(tmp_path, provider, clock)
    clock.now += 10                                   # exactly half left
    assert run(broker.access_token(grant, 5)) == "token-0"
    assert provider.calls == 0


def test_login_with_less_than_half_left_refreshes_first(tmp_path):
    clock, provider = Clock(), FakeProvider()
    broker, grant = make_broker(tmp_path, provider, clock)
    clock.now += 11                                   # 9 s of 20 left
    assert run(broker.access_token(grant, 5)) == "token-1"
    assert provider.calls == 1 and grant.state.expires_at == clock.now + 20


def test_login_falls_back_to_the_old_token_if_the_refresh_fails_and_it_is_still_valid(tmp_path):
    clock, provider = Clock(), FakeProvider()
    broker, grant = make_broker(tmp_path, provider, clock)
    provider.error = TokenError("identity provider unreachable (ConnectionError)")
    clock.now += 11

    async def logins():
        first = await broker.access_token(grant, 5)
        second = await broker.access_token(grant, 5)   # within the backoff: no new attempt, old token
        return first, second

    assert run(logins()) == ("token-0", "token-0")
    assert provider.calls == 1
    clock.now += 8                                    # 1 s left: no longer enough for a login
    with pytest.raises(TokenError, match="unreachable"):
        run(broker.access_token(grant, 5))              # (the backoff has passed: tried again)
    assert provider.calls == 2


def test_login_does_not_wait_past_its_budget_for_a_slow_refresh(tmp_path):
    clock, provider = Clock(), FakeProvider()
    broker, grant = make_broker(tmp_path, provider, clock)
    provider.release.clear()                          # the identity provider hangs
    clock.now += 11

    async def login():
        loop = asyncio.get_running_loop()
        started = loop.time()
        token = await broker.access_token(grant, 1.0)
        elapsed = loop.time() - started
        provider.release.set()
        await asyncio.sleep(0.05)
        return token, elapsed

    token, elapsed = run(login())
    assert token == "token-0"
    assert 0.4 <= elapsed < 0.9                       # half of the 1 s deadline, then the old token


def test_expired_token_and_failed_refresh_fail_the_login(tmp_path):
    clock, provider = Clock(), FakeProvider()
    broker, grant = make_broker(tmp_path, provider, clock)
    provider.error = TokenError("identity provider unreachable (ConnectionError)")
    clock.now += 30
    with pytest.raises(TokenError, match="unreachable"):
        run(broker.access_token(grant, 5))


def test_forced_refresh_is_per_token_and_protocol(tmp_path):
    clock, provider = Clock(), FakeProvider()
    broker, grant = make_broker(tmp_path, provider, clock)

    async def scenario():
        assert broker.reject(grant, "token-0", "smtp")            # SMTP refuses: refresh once
        assert await broker.access_token(grant, 5) == "token-1"
        assert not broker.reject(grant, "token-1", "smtp")        # SMTP refuses the new one too: stop
        assert broker.reject(grant, "token-1", "imap")            # IMAP's refusal is its own evidence
        assert await broker.access_token(grant, 5) == "token-2"
        assert broker.reject(grant, "token-1", "imap")            # an old token: already replaced
        assert await broker.access_token(grant, 5) == "token-2"

    run(scenario())
    assert provider.calls == 2
