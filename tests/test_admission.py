"""The pre-login connection budget (proxy/admission.py), as pure bookkeeping with a fake clock."""

from __future__ import annotations

import random

from proxy.admission import CHECKING, EVICT_GRACE, IDLE, PENALTY, SESSION, VERIFIED, Admission


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**limits):
    clock = Clock()
    admission = Admission(clock=clock)
    limits = {"max_connections": 10, "max_prelogin": 4, **limits}
    return clock, admission, lambda: admission.admit(**limits)


def test_a_full_prelogin_budget_drops_the_longest_waiting_connection_not_the_new_one():
    clock, admission, admit = make()
    slots = []
    for _ in range(4):
        slot, victims = admit()
        assert victims == []
        slots.append(slot)
        clock.now += 0.5
    clock.now += EVICT_GRACE
    newest, victims = admit()
    assert newest is not None and victims == [slots[0]] and slots[0].released
    assert admission.prelogin == 4


def test_a_client_that_talks_is_never_the_longest_waiting():
    """A real client answers at once (CAPABILITY, EHLO, LOGIN); a silent flood does not: the flood's
    own connections go first, whatever their age."""
    clock, admission, admit = make(max_connections=4, max_prelogin=4)
    real, _ = admit()
    flood = [admit()[0] for _ in range(3)]
    for _ in range(5):
        clock.now += 0.6
        real.waiting()                            # the proxy answered its latest command
    for expected in flood:
        clock.now += 0.1
        slot, victims = admit()
        assert victims == [expected]
        slot.waiting()
        real.waiting()
    assert not real.released


def test_nothing_idle_for_less_than_the_grace_is_dropped_and_a_full_total_then_refuses():
    """A flood accepted in one go must not push out a real client before its first command could even
    be read; a burst of real clients does not evict itself."""
    clock, admission, admit = make(max_connections=8, max_prelogin=2)
    burst = [admit() for _ in range(8)]
    assert all(slot is not None and victims == [] for slot, victims in burst)   # over the budget: spared
    assert admit() == (None, [])                                                # the total: refused
    clock.now += EVICT_GRACE + 0.1
    slot, victims = admit()
    assert slot is not None and victims == [burst[0][0]]


def test_logged_in_sessions_and_logins_in_progress_are_never_dropped():
    clock, admission, admit = make(max_connections=6, max_prelogin=3)
    session, _ = admit()
    session.logged_in()
    checking, _ = admit()
    checking.checking()
    verified, _ = admit()
    verified.checking()
    verified.verified()
    idle, _ = admit()
    clock.now += 10
    for _ in range(100):                          # a flood: each new one pushes out the previous idle one
        slot, victims = admit()
        assert slot is not None and all(v.state == IDLE for v in victims)
        clock.now += 2
    assert idle.released
    assert not session.released and not checking.released and not verified.released
    assert admission.sessions == 1


def test_when_nothing_can_be_dropped_the_new_connection_is_refused():
    _, admission, admit = make(max_connections=2, max_prelogin=2)
    for _ in range(2):
        slot, _ = admit()
        slot.logged_in()
    assert admit() == (None, [])
    assert admission.refused == 1


def test_a_failed_login_holds_its_slot_for_the_whole_delay_also_after_the_connection_ends():
    clock, admission, admit = make(max_connections=2, max_prelogin=2)
    guesser, _ = admit()
    guesser.checking()
    guesser.penalize(8.0)
    assert admission.prelogin == 0 and admission.total() == 1   # not in the pre-login budget: in the total
    guesser.release()                                            # hung up
    other, _ = admit()
    other.penalize(8.0)
    other.release()
    assert admit() == (None, [])                                 # both places still taken
    clock.now += 8.01
    assert admit()[0] is not None


def test_bookkeeping_stays_consistent_and_bounded_under_random_use():
    clock, admission, admit = make(max_connections=50, max_prelogin=20)
    rng = random.Random(12)
    live = []
    for _ in range(20_000):
        clock.now += rng.random() * 0.05
        action = rng.random()
        if action < 0.3:
            slot, victims = admit()
            assert all(clock.now - v.idle_since >= EVICT_GRACE for v in victims)
            live = [s for s in live if s not in victims]
            if slot is not None:
                live.append(slot)
        elif live:
            slot = rng.choice(live)
            step = rng.choice(["checking", "verified", "penalty", "idle", "session", "release", "waiting"])
            if step == "release":
                slot.release()
                live.remove(slot)
            elif step == "penalty":
                slot.penalize(rng.random() * 8)
            else:
                getattr(slot, {"session": "logged_in"}.get(step, step))()
        counts = {state: sum(s.state == state for s in live) for state in (IDLE, CHECKING, VERIFIED, PENALTY, SESSION)}
        assert admission.prelogin == counts[IDLE] + counts[CHECKING] + counts[VERIFIED]
        assert admission.sessions == counts[SESSION]
        assert admission.total() <= 50 + 1
        assert len(admission._queue) <= 2 * counts[IDLE] + 64 + 1
