"""Which client connections a listener takes: a small budget for connections that have not logged in.

Pure bookkeeping (no sockets, no asyncio), shared by every client-facing front (IMAP, SMTP,
POP3): a front asks :meth:`Admission.admit` for each new connection, tells the returned
:class:`Slot` what the connection is doing, closes the victims ``admit`` names, and releases the
slot when the connection ends.

The rules, and why:

- **Logged-in sessions are never evicted**; they count against ``max_connections`` only.
- Connections that have not logged in share a smaller budget, ``max_prelogin``. When it is
  full, or the total is, the connection that has **waited longest for its client** (idle: the
  proxy answered it and has nothing to do for it) is dropped to make room, not the new one: a
  flood of silent connections pushes out its own oldest members, while a real client, which
  answers at once, is never the longest waiting.
- Only a connection idle for at least ``grace`` (1 s) goes, and none whose client has sent
  bytes the proxy has not read yet: a connection just accepted or greeted, or whose last
  command the proxy has just answered, is safe, so a flood cannot push out a real client in the
  instant between its greeting and its next command, even when the proxy is so busy accepting
  the flood that it takes a while to read that command; a burst of real clients that connect at
  the same instant does not evict itself. If no connection qualifies and the total is full,
  the new connection is refused (the client tries again).
- A connection whose password is being checked, or was found right and is logging in upstream,
  is never dropped: a correct password must not lose a race against a flood.
- A failed login holds its slot for its whole failure delay (``PENALTY``), also when the
  client hangs up or the connection is closed: hanging up does not buy the next guess sooner.
  Such a slot counts against ``max_connections`` but not against the pre-login budget (it is
  waiting for the proxy, not the client), so guessers cannot crowd the real user out of it.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable

IDLE = "idle"            # not logged in; between the proxy's answers and the client's commands
CHECKING = "checking"    # a login is being checked (the local password)
VERIFIED = "verified"    # the password was right; logging in upstream
PENALTY = "penalty"      # a failed login is waiting out its delay
SESSION = "session"      # logged in
_PRELOGIN = (IDLE, CHECKING, VERIFIED)
EVICT_GRACE = 1.0        # seconds a connection must have waited for its client before it may be dropped


class Slot:
    """One admitted connection (or, after :meth:`Admission.release` during a penalty, its held place)."""

    __slots__ = ("_admission", "opened", "state", "held_until", "released", "seq", "on_evict", "idle_since",
                 "has_input")

    def __init__(self, admission: Admission, opened: float, seq: int):
        self._admission = admission
        self.opened, self.seq = opened, seq
        self.state = IDLE
        self.held_until = 0.0
        self.released = False
        self.idle_since: float | None = None  # when the proxy last turned to wait for the client
        self.on_evict: Callable[[], None] | None = None  # set by the front: how to close this connection
        # set by the front: whether the client sent bytes the proxy has not read yet (then it is
        # not idle, only waiting for a busy proxy: see _longest_waiting)
        self.has_input: Callable[[], bool] | None = None

    def waiting(self) -> None:
        """The proxy has answered and now waits for the client (call it before each read)."""
        self._admission._waiting(self)

    def checking(self) -> None:
        self._admission._move(self, CHECKING)

    def verified(self) -> None:
        self._admission._move(self, VERIFIED)

    def penalize(self, seconds: float) -> None:
        """A failed login: keep this slot taken for ``seconds`` from now, even if the connection ends."""
        self.held_until = max(self.held_until, self._admission.clock() + seconds)
        self._admission._move(self, PENALTY)

    def idle(self) -> None:
        """Back to waiting for the client (after a failed login)."""
        self._admission._move(self, IDLE)
        self.waiting()

    def logged_in(self) -> None:
        self._admission._move(self, SESSION)

    def release(self) -> None:
        self._admission.release(self)

    def __lt__(self, other: Slot) -> bool:  # (for the heap; never compared in practice)
        return self.seq < other.seq


class Admission:
    """The connections of one listener (both of a protocol's listeners share one)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._seq = itertools.count()
        self._counts = {IDLE: 0, CHECKING: 0, VERIFIED: 0, PENALTY: 0, SESSION: 0}
        self._queue: list[tuple[float, int, Slot]] = []  # heap by idle_since; stale entries skipped
        self._ghosts: list[float] = []                     # held_until of released slots still penalised
        self.evicted = 0                                   # connections dropped to make room (for the log)
        self.refused = 0                                   # connections refused because nothing could be dropped

    # -- counts -------------------------------------------------------------------------------
    @property
    def prelogin(self) -> int:
        """Open connections that have not logged in and are not waiting out a failure delay."""
        return sum(self._counts[state] for state in _PRELOGIN)

    @property
    def sessions(self) -> int:
        return self._counts[SESSION]

    def total(self) -> int:
        """Every open connection plus the places still held by closed ones' failure delays."""
        self._expire(self.clock())
        return sum(self._counts.values()) + len(self._ghosts)

    # -- admission ----------------------------------------------------------------------------
    def admit(self, *, max_connections: int, max_prelogin: int,
              grace: float = EVICT_GRACE) -> tuple[Slot | None, list[Slot]]:
        """A slot for a new connection (None: refuse it), and the connections to close to make room
        (their slots are already released: the caller only closes them)."""
        now = self.clock()
        self._expire(now)
        victims = []
        if self.prelogin >= max_prelogin or self.total() >= max_connections:
            victim = self._longest_waiting(now - grace)
            if victim is not None:
                victims.append(victim)
        if self.total() >= max_connections:
            self.refused += 1
            self.evicted += len(victims)
            return None, victims
        self.evicted += len(victims)
        slot = Slot(self, now, next(self._seq))
        self._counts[IDLE] += 1
        self._waiting(slot)  # (one never greeted, a TLS handshake that hangs, goes too once idle long enough)
        return slot, victims

    def release(self, slot: Slot) -> None:
        """The connection ended. A slot in its failure delay stays taken until the delay is over."""
        if slot.released:
            return
        slot.released = True
        self._counts[slot.state] -= 1
        if slot.state == PENALTY and slot.held_until > self.clock():
            heapq.heappush(self._ghosts, slot.held_until)
        self._compact()

    # -- internals ----------------------------------------------------------------------------
    def _move(self, slot: Slot, state: str) -> None:
        if slot.released or slot.state == state:
            return
        self._counts[slot.state] -= 1
        self._counts[state] += 1
        slot.state = state
        self._compact()

    def _waiting(self, slot: Slot) -> None:
        if slot.released or slot.state != IDLE:
            return
        slot.idle_since = self.clock()
        heapq.heappush(self._queue, (slot.idle_since, slot.seq, slot))
        self._compact()

    def _longest_waiting(self, since_before: float) -> Slot | None:
        """Release and return the idle connection that has waited longest for its client, if it
        has waited since before ``since_before``."""
        heap = self._queue
        while heap:
            since, _, slot = heap[0]
            if slot.released or slot.state != IDLE or slot.idle_since != since:
                heapq.heappop(heap)          # stale: it moved on (pushed again when it waits again)
                continue
            if since > since_before:
                return None
            heapq.heappop(heap)
            if slot.has_input is not None and slot.has_input():
                continue  # its client has spoken; the proxy has not got to it yet (pushed again when answered)
            self.release(slot)
            return slot
        return None

    def _expire(self, now: float) -> None:
        while self._ghosts and self._ghosts[0] <= now:
            heapq.heappop(self._ghosts)

    def _compact(self) -> None:
        """Drop stale heap entries once they outnumber the live ones (keeps memory bounded)."""
        if len(self._queue) > 2 * self._counts[IDLE] + 64:
            self._queue = [e for e in self._queue
                             if not e[2].released and e[2].state == IDLE and e[2].idle_since == e[0]]
            heapq.heapify(self._queue)
