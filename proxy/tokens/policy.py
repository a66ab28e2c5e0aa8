"""When to refresh an access token: pure functions of the token's times, no clock, no I/O.

Like pizauth's refresher, the broker asks these with the current time (its clock is
injectable, so the policy is unit-tested with made-up times). The timing follows from how
Exchange Online treats a session: it ends an IMAP session when the access token the session
logged in with expires (``* BYE Session invalidated - AccessTokenExpired``). So:

- a login gets a *fresh* token, one with at least half of its lifetime left: a session opened
  at any moment then lives at least half a token lifetime (30–45 min at Microsoft). A login
  that finds less refreshes first; if that refresh fails (or takes too long) and the old token
  is still *usable* (valid long enough to complete a login), the login uses the old token;
- the background refresh runs shortly before half the lifetime has passed, so logins
  normally find a fresh token and never wait;
- after a failure the background backs off, doubling from 2 s up to ``MAX_BACKOFF``; a waiting
  login may retry sooner, after at most its ``login_pause`` (msal honours Retry-After itself).
  Refusals that pass by themselves (Conditional Access, MFA, sign-in frequency, see
  :mod:`proxy.aadsts`) use longer, configured pauses instead (``identity.refresh_retry_*``).
"""

from __future__ import annotations

# After a failed refresh (network, identity provider error), a login may try again after at
# most this long (the background task backs off exponentially up to MAX_BACKOFF).
LOGIN_RETRY_INTERVAL = 5.0
MAX_BACKOFF = 60.0
# A token the upstream refused is refreshed by force at most once, and a token obtained that way
# that the *same protocol* refuses again within this many seconds is not refreshed again (the
# server refuses for another reason). Kept per token, not per account: one protocol's refusal
# never blocks another protocol's refresh-and-retry.
MIN_FORCED_REFRESH_INTERVAL = 30.0
# The background refresh runs this share of the lifetime (at most a minute) before half of it
# has passed, so that a refresh which takes a moment still beats the logins' half-life check.
_LEAD_SHARE, _MAX_LEAD = 0.05, 60.0


def refresh_margin(lifetime: float) -> float:
    """How long before expiry the background refresh runs: a little more than half the lifetime."""
    return lifetime / 2 + min(_MAX_LEAD, lifetime * _LEAD_SHARE)


def fresh(expires_at: float, lifetime: float, now: float) -> bool:
    """The token has at least half of its lifetime left: good for opening a session."""
    return expires_at - now >= lifetime / 2


def usable(expires_at: float, lifetime: float, now: float) -> bool:
    """A token stays valid long enough to complete a login."""
    return expires_at - now > min(5.0, lifetime / 5)


def refresh_budget(timeout: float) -> float:
    """How long a login that holds a usable (but not fresh) token waits for a refresh before it
    logs in with the old token: half its deadline, so the upstream login still fits."""
    return timeout / 2


def refresh_due_at(expires_at: float, lifetime: float, failed_at: float, backoff: float) -> float:
    """When the background refresh should run next (a time, on the clock of the arguments)."""
    return max(expires_at - refresh_margin(lifetime), failed_at + backoff)


def may_refresh(now: float, failed_at: float, backoff: float, *, login_waiting: bool,
                login_pause: float = LOGIN_RETRY_INTERVAL) -> bool:
    """A refresh may start now: not within the backoff after a failure (shorter when a login waits)."""
    pause = min(backoff, login_pause) if login_waiting else backoff
    return now >= failed_at + pause


def login_retry_in(now: float, failed_at: float, backoff: float, login_pause: float = LOGIN_RETRY_INTERVAL) -> float:
    """Seconds until a waiting login may try a refresh again after a failure."""
    return failed_at + min(backoff, login_pause) - now


def next_backoff(backoff: float) -> float:
    """The backoff after one more failed refresh."""
    return min(max(2 * backoff, 2.0), MAX_BACKOFF)


def may_force_refresh(now: float, forced_at: float | None, forced_by: str | None, protocol: str) -> bool:
    """The upstream refused the current token over ``protocol``: may it be replaced by force?

    ``forced_at``/``forced_by``: when and for which protocol the current token itself was
    obtained by a forced refresh (None if it came from a normal refresh). Refused again by the
    same protocol soon after, a new token will not help; another protocol's refusal is that
    protocol's first evidence and gets its own refresh-and-retry.
    """
    if forced_at is None or forced_by != protocol:
        return True
    return now - forced_at >= MIN_FORCED_REFRESH_INTERVAL
