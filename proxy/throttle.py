"""Slow down password guessing without ever locking out the real user.

Each failed local login adds to a counter per account and per source address; the next
failure answer is delayed by an exponentially growing amount (0.5 s, 1 s, 2 s … capped).
Counters decay after a quiet period and a successful login clears its account's counter.
Nothing is ever blocked outright, and stored tokens are never touched.
"""

from __future__ import annotations

import time

_FORGET_AFTER = 15 * 60.0
_MAX_ENTRIES = 10_000


class FailureThrottle:
    def __init__(self, base: float = 0.5, cap: float = 8.0):
        self.base, self.cap = base, cap
        self._failures: dict[tuple[str, str], tuple[int, float]] = {}

    def delay(self, account: str, source: str) -> float:
        """How long to wait before answering the current failed attempt."""
        now = time.monotonic()
        count = max(self._count(("account", account), now), self._count(("source", source), now))
        return 0.0 if count == 0 else min(self.cap, self.base * 2 ** (count - 1))

    def failed(self, account: str, source: str) -> None:
        now = time.monotonic()
        if len(self._failures) >= _MAX_ENTRIES:
            self._prune(now)
        for key in (("account", account), ("source", source)):
            self._failures[key] = (self._count(key, now) + 1, now)

    def succeeded(self, account: str) -> None:
        self._failures.pop(("account", account), None)

    def _count(self, key: tuple[str, str], now: float) -> int:
        count, last = self._failures.get(key, (0, now))
        return count if now - last < _FORGET_AFTER else 0

    def _prune(self, now: float) -> None:
        stale = [k for k, (_, last) in self._failures.items() if now - last >= _FORGET_AFTER]
        for key in stale:
            del self._failures[key]
        if len(self._failures) >= _MAX_ENTRIES:  # a flood of sources: keep the accounts' counters
            for key in [k for k in self._failures if k[0] == "source"]:
                del self._failures[key]
