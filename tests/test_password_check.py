"""The broker's local password check under guessing, in one process with a real token file (issue 12).

Before the password of an account is known (after each start), a password can only be checked by
deriving the file key (scrypt, about 0.2 s). Every wrong guess used to run its own derivation
under the account's lock, so a few hundred parallel guessers made the real user's first login
wait behind all of them (17 s or a timeout)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from proxy.config import parse_config
from proxy.tokens import LoginRefused, TokenBroker
from proxy.tokens import broker as broker_module
from proxy.tokens.folder import FolderStore
from proxy.tokens.store import derive_key

ACCOUNT = "alice@example.com"
PASSWORD = "the right password"


@pytest.fixture
def broker(tmp_path: Path, monkeypatch):
    config = parse_config({"identity": {"authority": "https://127.0.0.1:1/tenant", "client_id": "test"},
                           "tokens": {"path": str(tmp_path / "tokens")},
                           "accounts": [{"username": ACCOUNT}, {"username": "shared@example.com", "token": ACCOUNT}]},
                          base_dir=tmp_path)
    store = FolderStore(config.token_path)
    store.write_file(ACCOUNT, derive_key(PASSWORD), {"access_token": "not-a-real-token", "expires_at": time.time() + 3600},
                {"account": ACCOUNT, "state": "ok"})
    derivations = []
    key_for = broker_module.key_for

    def counting_key_for(sealed, password):
        derivations.append(time.monotonic())
        return key_for(sealed, password)
    monkeypatch.setattr(broker_module, "key_for", counting_key_for)
    broker = TokenBroker(config, store)
    broker.derivations = derivations
    yield broker
    asyncio.run(broker.close())


async def attempt(broker: TokenBroker, user: str, password: str) -> bool:
    try:
        await broker.authenticate(user, password)
        return True
    except LoginRefused:
        return False


def test_300_parallel_guessers_right_after_a_start_do_not_hold_up_the_real_user(broker):
    """300 guessers (repeating three wrong passwords, as scripts do) start first; the real user's
    login is answered after at most the three derivations of the wrong ones, and every guess is
    answered from then on without deriving anything."""
    async def main():
        guesses = [asyncio.ensure_future(attempt(broker, ACCOUNT if i % 3 else "shared@example.com",
                                                 f"wrong guess {i % 3}")) for i in range(300)]
        await asyncio.sleep(0)
        started = time.monotonic()
        real = await attempt(broker, ACCOUNT, PASSWORD)
        took = time.monotonic() - started
        results = await asyncio.gather(*guesses)
        later = time.monotonic()
        again = await asyncio.gather(*(attempt(broker, ACCOUNT, f"wrong guess {i % 5}") for i in range(300)))
        return real, took, results, time.monotonic() - later, again
    real, took, results, later, again = asyncio.run(main())
    assert real and not any(results) and not any(again)
    assert len(broker.derivations) <= 4           # three wrong passwords and the right one, each once
    assert took < 0.2 + 4 * 2.0                   # (a derivation is ~0.2 s; generous for a busy machine)
    assert later < 1.0                            # known now: comparisons only


def test_wrong_passwords_are_remembered_and_checks_nobody_waits_for_are_dropped(broker):
    async def main():
        assert not await attempt(broker, ACCOUNT, "wrong once")
        assert not await attempt(broker, ACCOUNT, "wrong once")          # remembered: no new derivation
        assert len(broker.derivations) == 1
        waiting = [asyncio.ensure_future(attempt(broker, ACCOUNT, f"distinct {i}")) for i in range(50)]
        await asyncio.sleep(0.05)
        for task in waiting[1:]:
            task.cancel()                           # these clients gave up (timed out, hung up)
        await asyncio.gather(*waiting, return_exceptions=True)
        assert len(broker.derivations) <= 3         # the one in flight (and perhaps the next), not 50
        assert await attempt(broker, ACCOUNT, PASSWORD)
    asyncio.run(main())


def test_a_replaced_token_file_forgets_the_remembered_wrong_passwords(broker):
    """A password found wrong for one version of the file may be the right one for the next
    (`proxy authorize` with a new password): remembering is per file version."""
    async def main():
        assert not await attempt(broker, ACCOUNT, "the new password")
        broker.store.write_file(ACCOUNT, derive_key("the new password"), {"access_token": "x"},
                           {"account": ACCOUNT, "state": "ok"})
        assert await attempt(broker, ACCOUNT, "the new password")
        assert not await attempt(broker, ACCOUNT, PASSWORD)
    asyncio.run(main())
