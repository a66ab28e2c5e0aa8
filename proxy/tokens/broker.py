"""The token broker: owns each account's tokens, refreshes them ahead of expiry, one refresh at a time.

Modelled on pizauth's refresher: the broker is the only place that talks to the identity
provider (through msal) once ``proxy serve`` runs. Per account it keeps the decrypted msal
cache, the current access token and its expiry. Logins ask :meth:`TokenBroker.access_token`;
a valid token is answered from memory, otherwise every caller waits on the same refresh
(N simultaneous logins, one token request), always within the caller's deadline. After the
first successful login (which yields the file key) a background task refreshes ahead of
expiry, so logins rarely wait and the refresh token stays alive.

Several processes may share one store (replicas on PostgreSQL, or `proxy serve` and `proxy
authorize` on one token folder); then one refresh serves them all (see :meth:`_coordinate`):
a process takes the account's lease before refreshing and writes only over the version it
loaded, the others wait for its result and load it with the key they hold, and `proxy
authorize` always wins (its new record, password and salt are never overwritten). Changes
other processes make are followed as the store reports them (:meth:`_follow`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import FLOW_CLIENT_CREDENTIALS, AccountConfig, Config
from ..logs import register_secret
from ..metrics import METRICS
from . import policy
from .errors import LoginRefused, TokenError
from .identity import (HttpCache, fetch_app_only_token, has_refresh_token, make_msal_app, new_cache,
                       refresh_delegated, transport_error)
from .state import NEEDS_AUTHORIZATION, REFRESH_FAILING, TokenStatus, token_meta, token_payload
from .store import (Conflict, Key, Lease, NoTokens, Sealed, Stamp, StoreError, StoreUnavailable, TokenStore, Version,
                    WrongPassword, key_for, open_sealed)

log = logging.getLogger("proxy.tokens")
# While another process refreshes an account's tokens, how often to look for its result.
LEASE_POLL = 0.2
# After the store failed (not the identity provider), retry this soon.
STORE_RETRY = 1.0
# With no usable token left, refresh without a lease once the store has been unreachable this long
# (a database restart or a dropped connection is shorter; with Microsoft's tokens the refresh margin
# of five minutes lets the lease be retried long before any token runs out).
UNLEASED_AFTER = 5.0
_MAX_WRONG = 4096  # wrong passwords remembered per account (as keyed HMACs), for the current file


@dataclass(eq=False)
class LoginGrant:
    """A successful local login: the account (its ``mailbox``) and its token owner's state.

    Several accounts may share one owner (shared and archive mailboxes); they then share one
    AccountState: one token, one refresh, one local password (the owner's).
    """

    account: AccountConfig
    state: AccountState

    @property
    def access_token(self) -> str | None:
        return self.state.access_token


@dataclass
class AccountState:
    """What the broker knows about one token owner (``account`` is the owner, with its flow)."""

    account: AccountConfig
    verifier: bytes | None = field(default=None, repr=False)
    key: Key | None = field(default=None, repr=False)
    stamp: Stamp | None = None  # what the store's peek() said of the record loaded (changes at every write)
    version: Version | None = None  # the loaded record's version (a write must replace exactly this one)
    meta: dict = field(default_factory=dict, repr=False)  # the loaded record's clear status
    cache: Any = field(default=None, repr=False)  # msal's SerializableTokenCache
    home_account_id: str | None = None
    app: Any = field(default=None, repr=False)  # msal's ClientApplication, built at the first refresh
    access_token: str | None = field(default=None, repr=False)
    expires_at: float = 0.0
    lifetime: float = 3600.0
    obtained_at: float = 0.0
    forced_at: float | None = None  # the current token came from a forced refresh at this time...
    forced_by: str | None = None    # ...because this protocol's server refused the one before
    force_pending: str | None = None  # a forced refresh was asked for by this protocol
    last_refresh: float | None = None
    last_error: str | None = None
    granted_scope: str | None = None  # as the last token response listed it (for `proxy check`)
    failed_at: float = 0.0  # time of the last failed refresh (0: the last one succeeded)
    backoff: float = 0.0
    login_pause: float = policy.LOGIN_RETRY_INTERVAL  # after a failure, a waiting login retries this often
    dead: str | None = None  # reason the refresh token is unusable (needs `proxy authorize`)
    refreshing: asyncio.Task | None = None
    refresher: asyncio.Task | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # loading and following a record
    lease: Lease | None = field(default=None, repr=False)  # held while this process refreshes
    unsaved: str | None = None  # status of tokens refreshed while the store was unreachable: save later
    following: asyncio.Task | None = field(default=None, repr=False)
    # password checks before the password is known: in flight (by verifier), and found wrong
    checks: dict[bytes, _Check] = field(default_factory=dict, repr=False)
    checkers: list[asyncio.Task | None] = field(default_factory=lambda: [None, None], repr=False)
    wrong: set[bytes] = field(default_factory=set, repr=False)
    wrong_stamp: Stamp | None = None

    def usable_token(self, now: float) -> str | None:
        """The current token if it stays valid long enough to complete a login."""
        if self.access_token and policy.usable(self.expires_at, self.lifetime, now):
            return self.access_token
        return None


@dataclass(eq=False)
class _Check:
    """One password check waiting or running; every login with that password waits for its result."""

    result: asyncio.Future
    password: str = field(repr=False)
    waiters: int = 0
    started: bool = False  # its derivation began (then it runs to the end, and its result is kept)


class TokenBroker:
    """Verifies local passwords and hands out access tokens, refreshing them as needed."""

    def __init__(self, config: Config, store: TokenStore, *, executor: ThreadPoolExecutor | None = None,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock  # wall-clock seconds; injectable so the refresh timing can be tested
        self.store = store
        self._executor = executor or ThreadPoolExecutor(max_workers=8, thread_name_prefix="tokens")
        self._states: dict[str, AccountState] = {}
        self._pepper = secrets.token_bytes(32)  # keys the in-memory password verifiers
        self._http_cache = HttpCache()  # msal's, shared by all accounts (discovery, Retry-After)
        self._closed = False
        # A refresh takes at most a few requests, each bounded by identity.timeout.
        self.lease_seconds = max(15.0, 3 * config.identity.timeout)
        self._watcher: asyncio.Task | None = None
        store.watch(self._store_changed)
        # Called with a token owner's name when its tokens were deleted (`proxy forget`, `proxy
        # revoke`, found when following the store): the fronts close its sessions.
        self.on_owner_gone: Callable[[str], None] | None = None

    # -- public API ---------------------------------------------------------------------
    async def authenticate(self, username: str, password: str) -> LoginGrant:
        """Check a local login (against the token owner's file); raises LoginRefused or TokenError.

        Once an account's password is known (after its first login in this process) every check
        is one keyed HMAC, answered at once. Before that a password can only be checked by
        deriving the file key (scrypt, slow on purpose), so under guessing:

        - logins with the same password share one check (N connections, one derivation);
        - a password found wrong is remembered (as a keyed HMAC, for this version of the file),
          so repeating it costs nothing;
        - two derivations per account run at a time, one taking the newest waiting password
          next, the other the oldest (:meth:`_checker`): the real user's login is next in one of
          them whether guessers wait for their answers (they queue up old guesses) or hang up
          and come back with new ones (theirs are dropped: see next);
        - a check nobody waits for any more (the client timed out or hung up) is dropped before
          it starts, and once the right password is found every login still waiting is
          answered by comparison at once.
        """
        login_account = self.config.account(username)
        if login_account is None:
            raise LoginRefused("unknown user or wrong password")
        account = login_account.token_owner
        state = self._states.get(account.key)
        if state is None or state.account != account:
            state = self._states[account.key] = AccountState(account)
        grant = LoginGrant(login_account, state)
        verifier = hmac.new(self._pepper, password.encode("utf-8"), hashlib.sha256).digest()
        stamp = self._file_stamp(account.username)
        if state.verifier is not None and stamp == state.stamp:
            if hmac.compare_digest(state.verifier, verifier):
                return grant
            raise LoginRefused("unknown user or wrong password")
        if state.wrong_stamp == stamp and verifier in state.wrong:
            raise LoginRefused("unknown user or wrong password")
        check = state.checks.get(verifier)
        if check is None:
            check = state.checks[verifier] = _Check(asyncio.get_running_loop().create_future(), password)
            check.result.add_done_callback(_consume_exception)
            for lane, newest in enumerate((True, False)):
                if state.checkers[lane] is None or state.checkers[lane].done():
                    state.checkers[lane] = asyncio.get_running_loop().create_task(self._checker(state, newest))
        check.waiters += 1
        try:
            right = await asyncio.shield(check.result)
        finally:
            check.waiters -= 1
            if check.waiters == 0 and not check.started and state.checks.get(verifier) is check:
                del state.checks[verifier]  # nobody waits for it (timed out, hung up): never derived
                check.result.cancel()
        if not right:
            raise LoginRefused("unknown user or wrong password")
        return grant

    def _file_stamp(self, owner: str) -> Stamp:
        """What the store says of the owner's record now (changes at every write)."""
        try:
            stamp = self.store.peek(owner)
        except StoreError as exc:
            raise TokenError(str(exc)) from None
        if stamp is None:
            raise TokenError(f"{owner} is not authorized yet: run `proxy authorize {owner}`", reauthorize=True)
        return stamp

    async def _checker(self, state: AccountState, newest: bool) -> None:
        """Run an account's waiting password checks one at a time, the newest (or the oldest) first.

        Two of these run per account. Guessers that wait for their answers keep old guesses
        queued: the real user's login, newer, is the newest lane's next. Guessers that hang up
        and come back with new passwords keep adding newer ones, but theirs are dropped when
        they hang up: the real user's soon becomes the oldest lane's next.
        """
        while True:
            waiting = [(v, c) for v, c in state.checks.items() if not c.started]
            if not waiting:
                return
            verifier, check = waiting[-1] if newest else waiting[0]
            check.started = True
            try:
                right = await self._check(state, check.password, verifier)
            except Exception as exc:  # TokenError, or a bug: every waiter gets it
                if not check.result.done():
                    check.result.set_exception(exc)
            else:
                if not check.result.done():
                    check.result.set_result(right)
            finally:
                check.password = ""
                if state.checks.get(verifier) is check:
                    del state.checks[verifier]

    async def _check(self, state: AccountState, password: str, verifier: bytes) -> bool:
        """Whether ``password`` opens the owner's token file (loading it if so)."""
        stamp = self._file_stamp(state.account.username)
        if state.verifier is not None and stamp == state.stamp:  # found meanwhile: compare
            return hmac.compare_digest(state.verifier, verifier)
        if state.wrong_stamp == stamp and verifier in state.wrong:
            return False
        try:
            await self._load(state, password, verifier)
        except LoginRefused:
            if state.wrong_stamp != stamp:
                state.wrong_stamp, state.wrong = stamp, set()
            if len(state.wrong) >= _MAX_WRONG:
                state.wrong.clear()
            state.wrong.add(verifier)
            return False
        return True

    async def access_token(self, grant: LoginGrant, timeout: float) -> str:
        """An access token for a login, within ``timeout`` seconds or TokenError.

        Preferably a fresh one (at least half its lifetime left, :func:`policy.fresh`): Exchange
        ends a session when the token it logged in with expires. A login that finds less waits
        for a refresh; if that fails, or takes more than :func:`policy.refresh_budget`, and the
        old token is still usable, the login goes on with the old token. It also does at once
        while the token store is unreachable (the refresh waits for the store's lease).
        """
        state = grant.state
        if state.dead:
            raise TokenError(state.dead, reauthorize=True)
        now = self.clock()
        current = state.usable_token(now)
        if current is not None and policy.fresh(state.expires_at, state.lifetime, now):
            return current
        task = self._start_refresh(state, eager=True)
        if task is None:  # backing off after a failed refresh
            if current is not None:
                return current
            wait = policy.login_retry_in(now, state.failed_at, state.backoff, state.login_pause)
            raise TokenError(f"no valid token, and the last refresh failed ({state.last_error}); "
                             f"retrying in {wait:.0f} s", retry_after=wait)
        if current is not None and not self.store.available:
            # The refresh must wait for the store (its lease) while the old token still works: a
            # login does not wait for that (its session may end sooner than half a lifetime).
            return current
        budget = timeout if current is None else min(timeout, policy.refresh_budget(timeout))
        try:
            return await asyncio.wait_for(asyncio.shield(task), budget)
        except asyncio.TimeoutError:
            if current is not None and state.usable_token(self.clock()) is not None:
                log.info("account %s: refresh still running; this login uses the current token",
                         state.account.username)
                return current
            raise TokenError("the identity provider did not answer in time") from None
        except TokenError:
            if state.dead or current is None or not policy.usable(state.expires_at, state.lifetime, self.clock()):
                raise
            return current  # the refresh failed, but the old token is still valid

    async def force_refresh(self, grant: LoginGrant, timeout: float) -> str:
        """A token fetched from the identity provider now (for `proxy check`), or TokenError."""
        grant.state.access_token = None
        grant.state.failed_at = 0.0
        return await self.access_token(grant, timeout)

    def reject(self, grant: LoginGrant, token: str, protocol: str = "") -> bool:
        """The upstream ``protocol`` server refused ``token``. Returns True if a fresh one may be tried.

        The allowance is per token (:func:`policy.may_force_refresh`): a token is replaced by
        force at most once, and one protocol's refusals never stop another's refresh-and-retry.
        """
        state = grant.state
        if token != state.access_token:
            return True  # someone already replaced it
        if not policy.may_force_refresh(self.clock(), state.forced_at, state.forced_by, protocol):
            return False  # it was just refreshed for this protocol and still refused: refreshing won't help
        state.access_token = None
        state.force_pending = protocol
        return True

    def held_state(self, owner: str) -> AccountState | None:
        """The in-memory state of a token owner, if a login unlocked it in this process."""
        state = self._states.get(owner.casefold())
        return state if state is not None and state.key is not None else None

    def held_status(self, owner: str) -> TokenStatus | None:
        """The token state of an owner whose tokens this process holds, None if it holds none."""
        state = self.held_state(owner)
        if state is None:
            return None
        status = TokenStatus.from_meta(state.meta, state.account.flow).held_as(
            access_token_expires=state.expires_at or None, last_refresh=state.last_refresh,
            last_error=state.last_error)
        if state.dead:
            return replace(status, state=NEEDS_AUTHORIZATION)
        if state.failed_at and not state.usable_token(self.clock()):
            return replace(status, state=REFRESH_FAILING)
        return status

    def reconfigure(self, config: Config) -> None:
        """Use ``config`` for new logins and refreshes (a config reload); open sessions go on.

        Token owners no longer in the config are forgotten (their background refresh stops);
        a changed ``identity`` section makes the next refresh build a new msal application.
        """
        old, self.config = self.config, config
        if old.identity != config.identity:
            self._http_cache.clear()
            for state in self._states.values():
                state.app = None
        owners = {a.owner_key for a in config.accounts}
        for key in [k for k in self._states if k not in owners]:
            state = self._states.pop(key)
            if state.refresher is not None:
                state.refresher.cancel()

    def _forget_owner(self, state: AccountState) -> None:
        """The owner's stored tokens were deleted (`proxy forget` or `proxy revoke`, maybe by another
        process): its key and tokens leave memory, its waiting password checks end, and
        :attr:`on_owner_gone` closes the sessions that used them."""
        name = state.account.username
        for task in (state.refreshing, *state.checkers):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        state.cache = None
        self._drop(state, f"the stored tokens of {name} were deleted; run `proxy authorize {name}`")
        log.info("account %s: stored tokens deleted; they are forgotten here and its sessions closed", name)
        if self.on_owner_gone is not None:
            try:
                self.on_owner_gone(name)
            except Exception:  # closing sessions must not break the broker
                log.exception("closing the sessions of %s failed", name)

    async def close(self) -> None:
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
        for state in self._states.values():
            for task in (state.refresher, state.refreshing, state.following, *state.checkers):
                if task is not None:
                    task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- loading ------------------------------------------------------------------------
    async def _load(self, state: AccountState, password: str, verifier: bytes) -> None:
        name = state.account.username
        try:
            sealed = await self.store.read(name)
            key = state.key
            if key is None or key.salt != sealed.salt or state.verifier != verifier:
                key = await self._run(key_for, sealed, password)
            payload = open_sealed(sealed, key)
        except NoTokens as exc:
            raise TokenError(f"{exc}; run `proxy authorize {name}`", reauthorize=True) from None
        except WrongPassword:
            raise LoginRefused("unknown user or wrong password") from None
        except StoreUnavailable as exc:
            raise TokenError(str(exc)) from None
        except StoreError as exc:
            raise TokenError(str(exc), reauthorize=True) from None
        async with state.lock:  # (not during the derivation: two password checks may run at once)
            state.key, state.verifier = key, verifier
            self._apply(state, sealed, payload)
        log.info("account %s unlocked (token valid for %.0f s)", name, max(0.0, state.expires_at - self.clock()))
        if state.refresher is None or state.refresher.done():
            state.refresher = asyncio.get_running_loop().create_task(self._keep_fresh(state))
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_store())

    def _apply(self, state: AccountState, sealed: Sealed, payload: dict[str, Any]) -> None:
        """Take a record's tokens and status as the account's current ones."""
        name = state.account.username
        meta = sealed.meta
        state.stamp, state.version, state.meta = sealed.stamp, sealed.version, meta
        state.cache = new_cache(payload.get("msal_cache"))
        state.home_account_id = payload.get("home_account_id")
        state.app = None
        state.access_token = payload.get("access_token")
        state.expires_at = float(payload.get("expires_at") or 0)
        if payload.get("lifetime"):
            state.lifetime = max(1.0, float(payload["lifetime"]))
        else:  # written before records held the lifetime
            state.lifetime = max(60.0, state.expires_at - float(meta.get("last_refresh") or 0)) \
                if meta.get("last_refresh") else 3600.0
        state.last_refresh, state.last_error = meta.get("last_refresh"), meta.get("last_error")
        state.dead = (f"the stored authorization no longer works ({meta.get('last_error')}); run `proxy authorize "
                      f"{name}`") if TokenStatus.from_meta(meta).state == NEEDS_AUTHORIZATION else None
        state.unsaved = None
        if state.access_token:
            register_secret(state.access_token)

    def _drop(self, state: AccountState, dead: str | None = None) -> None:
        """Forget an account's key and tokens: its record was replaced by a new authorization (the
        next login derives the key from the new password) or deleted (``dead`` says so)."""
        state.key = state.verifier = state.access_token = None
        state.stamp = state.version = None
        state.dead = dead
        state.unsaved = None
        if state.refresher is not None and state.refresher is not asyncio.current_task():
            state.refresher.cancel()

    # -- following other processes -----------------------------------------------------
    def _store_changed(self, account: str) -> None:
        """The store reports that another process changed ``account``'s record."""
        state = self._states.get(account)
        if state is not None and state.key is not None and not self._closed:
            self._follow_soon(state)

    def _follow_soon(self, state: AccountState) -> None:
        if state.following is None or state.following.done():
            state.following = asyncio.get_running_loop().create_task(self._follow(state))
            state.following.add_done_callback(_consume_exception)

    async def _follow(self, state: AccountState) -> None:
        """Load another process's newer record of an account this process holds.

        The same authorization (same salt): its tokens are loaded with the key held here, so a
        refresh by one process serves all. A new authorization (`proxy authorize`, maybe with a
        new password): the key and tokens are forgotten, and the next login must open the new
        record with its password: the old one is refused from then on. Deleted: stop.
        """
        name = state.account.username
        async with state.lock:
            if state.key is None:
                return
            try:
                sealed = await self.store.read(name)
            except NoTokens:
                self._forget_owner(state)
                return
            except StoreError as exc:
                log.debug("account %s: cannot read the changed record yet (%s)", name, exc)
                return
            if sealed.stamp == state.stamp or state.key is None:
                return
            if sealed.salt != state.key.salt:
                log.info("account %s: authorized again (`proxy authorize`); the next login unlocks the new "
                         "authorization", name)
                self._drop(state)
                return
            try:
                payload = open_sealed(sealed, state.key)
            except StoreError as exc:  # WrongPassword: not written with this key after all
                log.warning("account %s: the changed record does not open with the key held (%s)", name, exc)
                self._drop(state)
                return
            self._apply(state, sealed, payload)
            log.debug("account %s: loaded the tokens another process stored (valid for %.0f s)", name,
                      max(0.0, state.expires_at - self.clock()))

    async def _watch_store(self) -> None:
        """Compare each held account's record with the store every ``poll_interval`` (engines that
        push changes need this only as a backup) and save tokens refreshed during an outage."""
        while not self._closed:
            await asyncio.sleep(self.store.poll_interval)
            for state in list(self._states.values()):
                if state.key is None:
                    continue
                try:
                    stamp = self.store.peek(state.account.username)
                except StoreError:
                    continue
                if stamp != state.stamp:
                    self._follow_soon(state)
                elif state.unsaved and self.store.available and state.lease is None:
                    await self._persist(state, state.unsaved)

    # -- refreshing ---------------------------------------------------------------------
    def _start_refresh(self, state: AccountState, eager: bool = False) -> asyncio.Task | None:
        """The running refresh, or a new one; None while backing off after a failure.

        ``eager`` (a login is waiting) shortens the backoff (:func:`policy.may_refresh`).
        """
        if state.refreshing is None or state.refreshing.done():
            if not policy.may_refresh(self.clock(), state.failed_at, state.backoff, login_waiting=eager,
                                      login_pause=state.login_pause):
                return None
            state.refreshing = asyncio.get_running_loop().create_task(self._coordinated_refresh(state))
            state.refreshing.add_done_callback(_consume_exception)
        return state.refreshing

    async def _coordinated_refresh(self, state: AccountState) -> str:
        """A refresh as one of several processes sharing the store (:meth:`_coordinate`)."""
        try:
            lease, token = await self._coordinate(state)
        except StoreError as exc:
            state.failed_at, state.backoff = self.clock(), STORE_RETRY  # the store, not the identity provider
            state.last_error = f"token store: {exc}"
            raise TokenError(f"the token store failed ({exc}); try again shortly") from None
        if token is not None:
            return token
        state.lease = lease
        try:
            return await self._refresh(state)
        except TokenError as exc:
            if lease is None and exc.reauthorize and state.key is not None:
                # Refused without a lease: another replica may have redeemed this refresh token
                # meanwhile (Microsoft allows that, stricter providers do not). Only the store can
                # tell; until it is back this is a failed refresh, not a dead authorization.
                log.warning("account %s: refresh without a lease refused (%s); deciding once the token store "
                            "is back", state.account.username, exc)
                state.dead, state.unsaved = None, None
                state.failed_at, state.backoff = self.clock(), policy.next_backoff(state.backoff)
                raise TokenError(f"the token store is unreachable and the refresh was refused: {exc}") from None
            raise
        finally:
            state.lease = None
            if lease is not None:
                try:
                    await lease.release()
                except StoreError:
                    pass  # it expires by itself

    async def _coordinate(self, state: AccountState) -> tuple[Lease | None, str | None]:
        """Before refreshing: take the account's lease, so that one process refreshes for all.

        Returns (lease, None) to refresh now, or (None, token) when another process refreshed
        meanwhile and its token is good. While another process holds the lease, wait for its
        result (or for its lease to run out, if it died). With the store unreachable, try again
        every STORE_RETRY seconds (logins meanwhile use the token held); only once it has been
        unreachable for UNLEASED_AFTER seconds and no usable token is left, refresh without a
        lease (nothing can say who refreshes then; Microsoft accepts an old refresh token once
        more, and serving beats waiting).
        """
        name = state.account.username
        while True:
            if state.key is None:
                raise TokenError(f"the stored tokens of {name} were replaced or deleted; log in again")
            if state.dead:
                raise TokenError(state.dead, reauthorize=True)
            try:
                lease = await self.store.lease(name, self.lease_seconds)
            except StoreUnavailable as exc:
                if state.usable_token(self.clock()) or self.store.unavailable_for < UNLEASED_AFTER:
                    await asyncio.sleep(STORE_RETRY)
                    continue
                log.warning("account %s: token store unreachable for %.0f s (%s) and no usable token left: "
                            "refreshing without a lease", name, self.store.unavailable_for, exc)
                return None, None
            if lease is None:  # another process is refreshing: wait for its result
                await asyncio.sleep(LEASE_POLL)
                token = await self._fresh_from_store(state)
            else:
                # Another process may have refreshed just before: its record (read now, or already
                # followed) may hold a token that needs no refresh yet.
                token = await self._fresh_from_store(state, force=lease.version != state.version)
                if token is None and state.key is not None and not state.dead:
                    return lease, None
                await lease.release()
            if token is not None:
                return None, token

    async def _fresh_from_store(self, state: AccountState, force: bool = False) -> str | None:
        """Load the account's newer record, if any; the token held then, if it needs no refresh now
        (a token refused upstream was dropped by :meth:`reject`, so a forced refresh goes ahead)."""
        try:
            changed = force or self.store.peek(state.account.username) != state.stamp
        except StoreError:
            changed = False
        if changed:
            await self._follow(state)
        now = self.clock()
        token = state.usable_token(now)
        if token is not None and policy.refresh_due_at(state.expires_at, state.lifetime, 0.0, 0.0) > now:
            return token
        return None

    async def _refresh(self, state: AccountState) -> str:
        name = state.account.username
        started = self.clock()
        forced_by, state.force_pending = state.force_pending, None
        try:
            result = await self._run(self._refresh_sync, state)
        except TokenError as exc:
            state.last_error = str(exc)
            if exc.reauthorize:
                state.dead = f"the stored authorization no longer works ({exc}); run `proxy authorize {name}`"
                log.warning("account %s: refresh token rejected (%s); needs `proxy authorize`", name, exc)
                METRICS.token_refreshes.labels("reauthorize").inc()
                await self._persist(state, status="needs_authorization")
                raise TokenError(state.dead, reauthorize=True) from None
            state.failed_at = self.clock()
            METRICS.token_refreshes.labels("failed").inc()
            if exc.passes:  # Conditional Access and the like: not dead, but no point in asking often
                identity = self.config.identity
                state.backoff, state.login_pause = identity.refresh_retry_in_background, identity.refresh_retry_on_login
                log.warning("account %s: %s; next attempt in %.0f s (at a login after %.0f s)", name, exc,
                            state.backoff, state.login_pause)
                raise TokenError(f"{exc} (the proxy tries again at the next login after {state.login_pause:.0f} s, "
                                 f"and every {state.backoff / 60:.0f} min by itself)", passes=True) from None
            state.backoff, state.login_pause = policy.next_backoff(state.backoff), policy.LOGIN_RETRY_INTERVAL
            log.warning("account %s: token refresh failed (%s); next attempt in %.0f s", name, exc, state.backoff)
            raise
        token = result["access_token"]
        register_secret(token)
        if result.get("refresh_token"):
            register_secret(result["refresh_token"])
        lifetime = float(result.get("expires_in") or 3600)
        state.access_token, state.lifetime = token, max(1.0, lifetime)
        state.expires_at, state.obtained_at = started + lifetime, started
        state.forced_at, state.forced_by = (started, forced_by) if forced_by is not None else (None, None)
        state.last_refresh, state.last_error = self.clock(), None
        state.granted_scope = result.get("scope") or state.granted_scope
        state.backoff, state.failed_at = 0.0, 0.0
        log.info("account %s: access token refreshed (valid %.0f s)", name, lifetime)
        if result.get("scopes_not_granted"):
            log.warning("account %s: not authorized for %s yet (no consent): IMAP and SMTP go on; run `proxy "
                        "authorize %s` to add it", name, " ".join(result["scopes_not_granted"]), name)
        METRICS.token_refreshes.labels("ok").inc()
        await self._persist(state)
        return token

    def _refresh_sync(self, state: AccountState) -> dict[str, Any]:
        """Blocking: one refresh through msal (runs in the executor)."""
        identity = self.config.identity
        if state.account.flow == FLOW_CLIENT_CREDENTIALS:
            return fetch_app_only_token(identity, self._http_cache)
        if state.app is None:
            try:
                state.app = make_msal_app(identity, state.cache, self._http_cache)
            except Exception as exc:  # discovery: network errors, ValueError on bad metadata
                raise transport_error(exc, identity) from None
        return refresh_delegated(state.app, identity, state.home_account_id)

    async def _persist(self, state: AccountState, status: str = "ok") -> None:
        """Save the refreshed tokens, replacing exactly the version loaded (never a newer sign-in)."""
        name = state.account.username
        if state.key is None:
            return
        if state.lease is None and not self.store.available:  # don't make the waiting logins wait for it
            self._keep_unsaved(state, status, f"{self.store.describe()} unreachable")
            return
        has_rt = has_refresh_token(state.cache)
        payload = token_payload(state.cache, state.home_account_id, state.access_token, state.expires_at,
                                state.lifetime)
        meta = token_meta(name, expires_at=state.expires_at, has_refresh_token=has_rt,
                          last_refresh=state.last_refresh, last_error=state.last_error, state=status,
                          flow=state.account.flow)
        try:
            sealed = await self.store.write(name, state.key, payload, meta, expected=state.version, lease=state.lease)
        except Conflict:
            # Another process wrote meanwhile: `proxy authorize` (always wins), `proxy forget`, or a
            # refresh made while this one could not reach the store. Theirs stays; follow it.
            log.info("account %s: the stored tokens changed meanwhile; keeping the stored ones", name)
            state.stamp = None
            await self._follow(state)
        except StoreUnavailable as exc:
            self._keep_unsaved(state, status, str(exc))
        except (OSError, StoreError) as exc:
            log.error("account %s: cannot save refreshed tokens (%s); keeping them in memory", name, exc)
        else:
            state.stamp, state.version, state.meta, state.unsaved = sealed.stamp, sealed.version, sealed.meta, None

    def _keep_unsaved(self, state: AccountState, status: str, reason: str) -> None:
        if not state.unsaved:
            log.warning("account %s: the token store is unreachable (%s); the refreshed tokens are kept in memory "
                        "and saved when it is back", state.account.username, reason)
        state.unsaved = status

    async def _keep_fresh(self, state: AccountState) -> None:
        """Background task: refresh ahead of expiry; back off on failures (honouring Retry-After)."""
        while not self._closed and not state.dead:
            due = policy.refresh_due_at(state.expires_at, state.lifetime, state.failed_at, state.backoff) - self.clock()
            if due > 0:
                await asyncio.sleep(min(due, 60.0))  # re-check the wall clock (laptops sleep)
                continue
            task = self._start_refresh(state)
            if task is not None:
                try:
                    await asyncio.shield(task)
                except TokenError:
                    pass  # logged by _refresh; the backoff decides when to try again

    async def _run(self, func, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(func, *args))


def _consume_exception(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
