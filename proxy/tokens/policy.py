"""When to refresh an access token: pure functions of the token's times, no clock, no I/O.

Like pizauth's refresher, the broker asks these with the current time (its clock is
injectable, so the policy is unit-tested with made-up times):

- a token is *usable* for a login while it has more than a few seconds left (enough to
  complete the login);
- the background refresh is *due* a margin before expiry, or, after a failure, once the
  backoff has passed, whichever is later;
- after a failure the backoff doubles, from 2 s up to ``MAX_BACKOFF``; a waiting login may
  retry sooner, after at most ``LOGIN_RETRY_INTERVAL`` (msal itself honours Retry-After).
"""

from __future__ import annotations

# After a failed refresh, a login may try again after at most this long (the background task
# backs off exponentially up to MAX_BACKOFF); msal itself honours Retry-After on 429/5xx.
LOGIN_RETRY_INTERVAL = 5.0
MAX_BACKOFF = 60.0
# A token the upstream refused is refreshed by force at most this often (per token owner).
MIN_FORCED_REFRESH_INTERVAL = 30.0


def refresh_margin(lifetime: float) -> float:
    """How long before expiry the background refresh runs."""
    return min(300.0, lifetime / 4)


def usable(expires_at: float, lifetime: float, now: float) -> bool:
    """A token stays valid long enough to complete a login."""
    return expires_at - now > min(5.0, lifetime / 5)


def refresh_due_at(expires_at: float, lifetime: float, failed_at: float, backoff: float) -> float:
    """When the background refresh should run next (a time, on the clock of the arguments)."""
    return max(expires_at - refresh_margin(lifetime), failed_at + backoff)


def may_refresh(now: float, failed_at: float, backoff: float, *, login_waiting: bool) -> bool:
    """A refresh may start now: not within the backoff after a failure (shorter when a login waits)."""
    pause = min(backoff, LOGIN_RETRY_INTERVAL) if login_waiting else backoff
    return now >= failed_at + pause


def login_retry_in(now: float, failed_at: float, backoff: float) -> float:
    """Seconds until a waiting login may try a refresh again after a failure."""
    return failed_at + min(backoff, LOGIN_RETRY_INTERVAL) - now


def next_backoff(backoff: float) -> float:
    """The backoff after one more failed refresh."""
    return min(max(2 * backoff, 2.0), MAX_BACKOFF)
