"""The refresh policy as pure functions of a token's times (proxy/tokens/policy.py)."""

from __future__ import annotations

import pytest

from proxy.tokens import policy


@pytest.mark.parametrize("lifetime, margin", [(3600, 300), (1200, 300), (400, 100), (20, 5)])
def test_refresh_margin_is_a_quarter_of_the_lifetime_at_most_five_minutes(lifetime, margin):
    assert policy.refresh_margin(lifetime) == margin


@pytest.mark.parametrize("left, lifetime, usable", [
    (6, 3600, True), (5, 3600, False), (0, 3600, False), (-1, 3600, False),
    (3, 10, True), (2, 10, False),  # short-lived tokens: a fifth of the lifetime is enough
])
def test_a_token_is_usable_while_enough_is_left_to_complete_a_login(left, lifetime, usable):
    now = 1_000_000.0
    assert policy.usable(now + left, lifetime, now) is usable


def test_refresh_is_due_a_margin_before_expiry_or_after_the_backoff():
    expires, lifetime = 10_000.0, 3600.0
    assert policy.refresh_due_at(expires, lifetime, failed_at=0.0, backoff=0.0) == expires - 300
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
