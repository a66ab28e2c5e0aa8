"""Slow down password guessing without ever locking out the real user.

Each failed local login adds to a counter per account and per source address; the answer to
a failure is delayed by an exponentially growing amount (0.5 s, 1 s, 2 s … capped at 8 s).
Counters fade after a quiet period and a successful login clears its account's counter.
Nothing is ever blocked outright, and stored tokens are never touched.

Built to hold under attack:

- the delay is computed from a bounded exponent, so no count of failures overflows it, and
  any error in here answers with the longest delay (fail closed), never with none;
- memory is bounded whatever user names clients type: only configured accounts get a counter
  of their own (an unknown name is slowed by its source's counter), and sources are kept in
  a least-recently-failed table of fixed size, so a flood of new sources pushes out the
  quietest entries one at a time instead of wiping every source's counter;
- all loopback addresses (127.0.0.0/8, ::1) are one source, and IPv6 sources are counted per
  /64: a local attacker cannot get a fresh counter by binding to 127.0.0.2, nor a remote one
  by rotating through the addresses of its own network.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

log = logging.getLogger("proxy.login")
FORGET_AFTER = 15 * 60.0   # seconds without a failure after which a counter starts again from zero
MAX_SOURCES = 10_000       # source counters kept (least recently failed dropped first)
MAX_ACCOUNTS = 10_000      # account counters kept (only configured accounts get one)
_MAX_EXPONENT = 30         # base * 2**30 is far beyond any cap; keeps the arithmetic small


class FailureThrottle:
    """Failure counters per account and per source; :meth:`failed` says how long to wait."""

    def __init__(self, base: float = 0.5, cap: float = 8.0, *, max_sources: int = MAX_SOURCES,
                 max_accounts: int = MAX_ACCOUNTS, clock: Callable[[], float] = time.monotonic):
        self.base, self.cap = base, cap
        self.clock = clock
        self._max = {"account": max_accounts, "source": max_sources}
        self._tables: dict[str, OrderedDict[str, tuple[int, float]]] = {"account": OrderedDict(),
                                                                        "source": OrderedDict()}

    def delay(self, account: str | None, source: str) -> float:
        """How long to wait before answering a failed attempt now (the longest delay on any error)."""
        try:
            now = self.clock()
            return self.delay_for(self._counts(account, source, now))
        except Exception:  # fail closed: a bug here must never make guessing faster
            log.exception("login throttle failed; answering with the longest delay")
            return self.cap

    def delay_for(self, count: int) -> float:
        """The delay after ``count`` failures: 0, base, 2 base, 4 base … capped (no huge numbers)."""
        if count <= 0:
            return 0.0
        return min(self.cap, self.base * float(2 ** min(count - 1, _MAX_EXPONENT)))

    def failed(self, account: str | None, source: str) -> float:
        """Count a failed login from ``source`` (``account``: a configured account, None for an
        unknown name) and return how long to wait before answering it (fail closed)."""
        try:
            now = self.clock()
            self._bump("source", source_key(source), now)
            if account is not None:
                self._bump("account", account.casefold(), now)
            return self.delay_for(self._counts(account, source, now))
        except Exception:  # fail closed: a bug here must never make guessing faster
            log.exception("login throttle failed; answering with the longest delay")
            return self.cap

    def succeeded(self, account: str) -> None:
        """A successful login clears its account's counter (never the source's: a guesser on the
        same address as the real user stays slowed)."""
        self._tables["account"].pop(account.casefold(), None)

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables.values())

    def _counts(self, account: str | None, source: str, now: float) -> int:
        count = self._count("source", source_key(source), now)
        return count if account is None else max(count, self._count("account", account.casefold(), now))

    def _count(self, kind: str, key: str, now: float) -> int:
        count, last = self._tables[kind].get(key, (0, now))
        return count if now - last < FORGET_AFTER else 0

    def _bump(self, kind: str, key: str, now: float) -> None:
        table = self._tables[kind]
        count = self._count(kind, key, now)
        table.pop(key, None)
        table[key] = (min(count + 1, 1 << 20), now)   # most recent last
        while len(table) > self._max[kind]:
            table.popitem(last=False)                  # the least recently failed one


@functools.lru_cache(maxsize=4096)
def source_key(source: str) -> str:
    """The counter a source address belongs to: loopback as one, IPv6 per /64, IPv4 per address."""
    try:
        address = ipaddress.ip_address(source.strip("[]").split("%", 1)[0])
    except ValueError:
        return source[:100]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "loopback"
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
