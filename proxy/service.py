"""Running `proxy serve` as a service: config reload, health and readiness, graceful shutdown.

:class:`Runtime` sits beside the listeners that :func:`proxy.serve.serve` starts:

- **Reload** (SIGHUP, or the config file changing on disk; checked every few seconds, which
  also covers Windows, which has no SIGHUP): the file is read and validated again, with the
  same environment overrides. A valid new config is handed to the listeners and the token
  broker, which use it for new connections and logins; open sessions keep going on what they
  have, except those of accounts removed from the config (or whose mailbox or token owner
  changed), which are closed. An invalid one is refused with the error in the log, and the
  running config stays. Listener addresses, the admin address and the token store (``tokens``)
  are bound at start: a change to them is logged as needing a restart. Renewed TLS certificate
  files are picked up.
- **Deleted tokens** (`proxy forget`, `proxy revoke`, maybe run by another process): the broker
  follows the token store (:mod:`proxy.tokens.broker`); the owner's tokens leave memory and every
  session that used them is closed.
- **Health** (``/healthz``): every listener bound and accepting. **Readiness** (``/readyz``):
  this replica can serve: its listeners are bound and it has read the token store at least once
  since it started. Neither an account that needs `proxy authorize` nor a store outage (a
  replica keeps serving the accounts it has unlocked) makes it unready: a load balancer must not
  take every replica out because of one account. Both show in ``/metrics``
  (``proxy_account_needs_authorization``, ``proxy_token_store_up``), in `proxy status` and in
  the log; the ``/readyz`` body lists each account's state as last read.
- **Shutdown** (SIGTERM, SIGINT): listeners close at once; sessions get
  ``limits.shutdown_grace`` seconds to finish (SMTP sessions are closed as soon as no
  command or mail transaction is in progress), then the rest are cut. A second signal cuts
  them at once. ``proxy serve`` then exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from .adminhttp import AdminServer
from .config import Config, ConfigError, load_config
from .imap.server import ImapProxy
from .logs import register_secret
from .metrics import METRICS
from .pop3.server import Pop3Proxy
from .smtp.server import SmtpProxy
from .tls import client_context, reload_server_context, server_context
from .tokens import TokenBroker
from .tokens.state import NEEDS_AUTHORIZATION, REFRESH_FAILING, STORE_UNAVAILABLE, TokenStatus, owner_statuses
from .tokens.store import StoreError, TokenStore

log = logging.getLogger("proxy")
WATCH_INTERVAL = 2.0  # seconds between checks of the config file for changes
STATUS_INTERVAL = 5.0  # seconds between reads of the stored token states (for /metrics, /readyz's body, the log)
# Settings bound when `proxy serve` starts; a reload only warns about changes to them.
_RESTART_KEYS = (("imap.listen", lambda c: c.imap.listen), ("imap.tls_listen", lambda c: c.imap.tls_listen),
                 ("smtp.listen", lambda c: c.smtp.listen), ("smtp.tls_listen", lambda c: c.smtp.tls_listen),
                 ("pop3 (the section)", lambda c: c.pop3 is not None),
                 ("pop3.listen", lambda c: c.pop3.listen if c.pop3 else None),
                 ("pop3.tls_listen", lambda c: c.pop3.tls_listen if c.pop3 else None),
                 ("admin.listen", lambda c: c.admin.listen if c.admin else None),
                 ("tokens", lambda c: c.token_store.describe()))


def make_server_tls(config: Config) -> ssl.SSLContext | None:
    """The context of the proxy's own TLS listeners, or None if the config has no ``tls``."""
    if config.tls is None:
        return None
    return server_context(config.tls.cert_file, config.tls.key_file)


@dataclass
class AccountHealth:
    account: str
    ready: bool       # a login can get a token now (or at its first refresh)
    reason: str
    expires: float | None  # access token expiry (Unix time), if known
    state: str = "ok"
    needs_authorization: bool = False


class Runtime:
    """Reload, health, readiness and shutdown for one running proxy."""

    def __init__(self, config: Config, *, store: TokenStore, broker: TokenBroker, imap: ImapProxy,
                 smtp: SmtpProxy, server_tls: ssl.SSLContext | None, pop3: Pop3Proxy | None = None):
        self.config, self.store, self.broker = config, store, broker
        self.imap, self.smtp, self.pop3, self.server_tls = imap, smtp, pop3, server_tls
        self.admin: AdminServer | None = None
        self.stopping = False
        self._file_stamp = _stamp(config.source)
        self._reloading: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._stored: dict[str, TokenStatus] = {}  # the stored state of each token owner, as last read
        self.store_read = False  # the store has been read at least once since start
        self._statuses: asyncio.Task | None = None
        self._status_wakeup = asyncio.Event()
        if broker is not None:
            broker.on_owner_gone = self._owner_gone
        METRICS.token_expiry = self.token_expiries
        METRICS.accounts_needing_authorization = self.needing_authorization
        METRICS.store_up = lambda: self.store.available
        METRICS.config_loaded.set(time.time())

    # -- start --------------------------------------------------------------------------
    async def start(self, *, watch_interval: float = WATCH_INTERVAL) -> None:
        """After the listeners started: the admin listener, warnings, the config file watcher."""
        for name, listener in (("imap", self.config.imap), ("smtp", self.config.smtp), ("pop3", self.config.pop3)):
            if listener is not None and listener.plaintext_exposed:
                log.warning("%s.listen is %s without TLS required (allow_plaintext: true): passwords from other "
                            "computers cross the network in clear. Prefer %s.starttls: required or %s.tls_listen",
                            name, listener.listen, name, name)
        if self.config.admin is not None:
            register_secret(self.config.admin.token)  # (masked should it ever reach a log)
            self.admin = AdminServer(self.config.admin.listen, health=self.health, ready=self.readiness,
                                     metrics=METRICS, token=self.config.admin.token)
            await self.admin.start()
        if self.config.source is not None and watch_interval > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(watch_interval))
        if self.store is not None:
            self.store.watch(lambda _account: self._status_wakeup.set())
            self._statuses = asyncio.get_running_loop().create_task(self._follow_statuses())

    # -- health -------------------------------------------------------------------------
    def listeners(self) -> dict[str, bool]:
        listeners = {"imap": self.imap.listening, "smtp": self.smtp.listening}
        if self.pop3 is not None:
            listeners["pop3"] = self.pop3.listening
        return listeners

    def health(self) -> tuple[bool, dict]:
        listeners = self.listeners()
        ok = all(listeners.values()) and not self.stopping
        return ok, {"listeners": listeners, "stopping": self.stopping}

    def readiness(self) -> tuple[bool, dict]:
        """Ready: the listeners are bound and the store was read once (accounts' states are shown, but
        never make a replica unready)."""
        listeners = self.listeners()
        ok = all(listeners.values()) and self.store_read and not self.stopping
        accounts = {a.account: {"usable": a.ready, "state": a.state, "reason": a.reason} for a in self.account_health()}
        store = {"kind": self.store.kind, "read": self.store_read, "available": self.store.available}
        return ok, {"listeners": listeners, "store": store, "accounts": accounts, "stopping": self.stopping}

    def token_expiries(self) -> list[tuple[str, float | None]]:
        return [(a.account, a.expires) for a in self.account_health()]

    def needing_authorization(self) -> list[tuple[str, bool]]:
        return [(a.account, a.needs_authorization) for a in self.account_health()]

    async def read_stored(self) -> bool:
        """Read the stored token state of every token owner (for /metrics, /readyz and the log);
        False if the store could not be read."""
        try:
            stored = await owner_statuses(self.config, self.store)
        except StoreError as exc:
            log.warning("cannot read the token store %s (%s)", self.store.describe(), exc)
            return False
        if any(s.state == STORE_UNAVAILABLE for s in stored.values()):
            return False
        for owner_key, status in stored.items():
            before, owner = self._stored.get(owner_key), self.config.owner_account(owner_key)
            if self.store_read and before is not None and before.state != status.state and owner is not None and \
                    self.broker.held_state(owner_key) is None and (problem := status.problem(owner.username)):
                log.warning("account %s: %s", owner.username, problem)
        self._stored, self.store_read = stored, True
        return True

    async def _follow_statuses(self) -> None:
        """Keep the stored states current: every STATUS_INTERVAL, and soon after the store reports
        a change (PostgreSQL's notifications)."""
        while not self.stopping:
            try:
                await asyncio.wait_for(self._status_wakeup.wait(), STATUS_INTERVAL)
                await asyncio.sleep(0.2)  # a burst of changes: one read
            except asyncio.TimeoutError:
                pass
            self._status_wakeup.clear()
            try:
                await self.read_stored()
            except Exception:  # never let this task die
                log.exception("reading the stored token states failed")

    def account_status(self, owner: str) -> TokenStatus:
        """The token state of ``owner``: as this process holds it, else as last read from the store."""
        held = self.broker.held_status(owner)
        if held is not None:
            return held
        return self._stored.get(owner.casefold()) or TokenStatus.missing()

    def account_health(self) -> list[AccountHealth]:
        now = time.time()
        result = []
        for account in self.config.accounts:
            owner = account.owner
            status = self.account_status(owner)
            expires = status.access_token_expires
            if status.state == NEEDS_AUTHORIZATION and status.held:
                entry = (False, f"needs `proxy authorize {owner}`")
            elif status.state == REFRESH_FAILING:
                entry = (False, status.problem(owner))
            elif status.held:
                entry = (True, "token valid" if (expires or 0) > now else "token refreshed at the next login")
            elif problem := status.problem(owner):
                entry = (False, problem)
            else:
                entry = (True, "authorized (unlocked at the first login)")
            result.append(AccountHealth(account.username, entry[0], entry[1], expires, status.state,
                                        status.needs_authorization))
        return result

    # -- reload -------------------------------------------------------------------------
    def request_reload(self, reason: str = "SIGHUP") -> None:
        """Schedule a reload (safe to call from a signal handler on the loop)."""
        if self.stopping or self.config.source is None:
            return
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.get_running_loop().create_task(self._reload_task(reason))

    async def _reload_task(self, reason: str) -> None:
        try:
            self.reload(reason)
        except Exception:  # a reload must never take the proxy down
            log.exception("config reload failed unexpectedly; the running config stays")

    def reload(self, reason: str = "request") -> bool:
        """Load the config file again and apply it to new sessions; False if it was refused."""
        source = self.config.source
        assert source is not None
        self._file_stamp = _stamp(source)
        try:
            new = load_config(source)
            imap_tls, smtp_tls = client_context(new.imap.ca_file), client_context(new.smtp.ca_file)
            pop3_tls = client_context(new.pop3.ca_file) if new.pop3 is not None else None
            server_tls = make_server_tls(new)  # checks the certificate and key before anything changes
        except (ConfigError, OSError, ssl.SSLError, ValueError) as exc:
            METRICS.config_reloads.labels("refused").inc()
            log.error("config reload (%s) refused, the running config stays: %s", reason, exc)
            return False
        old = self.config
        if new.tls is not None:
            if self.server_tls is None:
                self.server_tls = server_tls  # STARTTLS can start now; new TLS listeners need a restart
            else:
                reload_server_context(self.server_tls, new.tls.cert_file, new.tls.key_file)
        self.imap.server_tls = self.smtp.server_tls = self.server_tls
        self.imap.reconfigure(new, imap_tls)
        self.smtp.reconfigure(new, smtp_tls)
        if self.pop3 is not None:
            self.pop3.server_tls = self.server_tls
            self.pop3.reconfigure(new, pop3_tls or self.pop3.upstream_tls)
        self.broker.reconfigure(new)
        self.config = new
        METRICS.config_reloads.labels("ok").inc()
        METRICS.config_loaded.set(time.time())
        before = {a.key: a for a in old.accounts}
        after = {a.key: a for a in new.accounts}
        added = [a.username for k, a in after.items() if k not in before]
        removed = [a.username for k, a in before.items() if k not in after]
        changed = [a.username for k, a in after.items() if k in before and before[k] != a]
        log.info("config reloaded (%s): %d account(s)%s%s%s; new logins use it, open sessions go on", reason,
                 len(new.accounts), f", added {', '.join(added)}" if added else "",
                 f", removed {', '.join(removed)}" if removed else "",
                 f", changed {', '.join(changed)}" if changed else "")
        # Sessions of accounts removed from the config, or whose mailbox or token owner changed, end
        # now: the config no longer allows them (the others keep going on what they have).
        closed = sum(front.close_sessions(lambda account: new.account(account.username) != account,
                                          "the account was removed from the proxy's configuration or changed")
                     for front in self.fronts)
        if closed:
            log.info("config reload: closed %d session(s) of removed or changed accounts", closed)
        for key, get in _RESTART_KEYS:
            if get(old) != get(new):
                log.warning("config reload: %s changed (%s -> %s); restart `proxy serve` to apply it",
                            key, get(old), get(new))
        return True

    async def _watch(self, interval: float) -> None:
        """Reload when the config file changes (mtime, size or inode)."""
        source = self.config.source
        while not self.stopping:
            await asyncio.sleep(interval)
            stamp = _stamp(source)
            if stamp is not None and stamp != self._file_stamp:
                self.request_reload("config file changed")

    @property
    def fronts(self) -> list:
        return [f for f in (self.imap, self.smtp, self.pop3) if f is not None]

    def _owner_gone(self, owner: str) -> None:
        """The broker found ``owner``'s tokens deleted: end every session that used them."""
        folded = owner.casefold()
        closed = sum(front.close_sessions(lambda account: account.owner_key == folded,
                                          f"the stored tokens of {owner} were deleted") for front in self.fronts)
        if closed:
            log.info("closed %d session(s) that used the deleted tokens of %s", closed, owner)

    # -- shutdown -----------------------------------------------------------------------
    async def shutdown(self, grace: float, force: asyncio.Event | None = None) -> None:
        """Close the listeners, let sessions finish for up to ``grace`` seconds, end the rest."""
        self.stopping = True
        for task in (self._watcher, self._statuses):
            if task is not None:
                task.cancel()
        fronts = self.fronts
        open_sessions = [len(f.sessions) for f in fronts]
        if grace > 0 and sum(open_sessions):
            log.info("shutting down: listeners closed; waiting up to %.0f s for %s", grace, _sessions(open_sessions))
        else:
            log.info("shutting down")
        drain = asyncio.ensure_future(asyncio.gather(*(f.drain(grace) for f in fronts)))
        waits: set[asyncio.Future] = {drain}
        if force is not None:
            waits.add(asyncio.ensure_future(force.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not drain.done():
                log.warning("second signal: ending the open sessions now")
                await asyncio.gather(*(f.close() for f in fronts))
            cut = await drain
        finally:
            for waiter in waits:
                waiter.cancel()
            if self.admin is not None:
                await self.admin.close()
            await self.broker.close()
            await self.store.close()
        if sum(cut):
            log.info("stopped; %s were still open after the grace period and were closed", _sessions(cut))
        else:
            log.info("stopped")


def _sessions(counts: list[int]) -> str:
    """``[2, 1]`` → "2 IMAP and 1 SMTP session(s)" (and POP3 when its listener runs)."""
    parts = [f"{n} {name}" for n, name in zip(counts, ("IMAP", "SMTP", "POP3"))]
    return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + " session(s)"


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino
