"""The PostgreSQL engine (``tokens.store: postgresql``): several replicas share one token store.

One row per token owner in ``oauth2_mail_proxy_tokens`` holds exactly what a token file holds
(the clear, authenticated header as JSON text and the AES-256-GCM ciphertext), a version and a
lease. The database never sees a password, a derived key or a verifier; a ``pg_dump`` holds
only sealed records. The proxy creates the table itself on first use (`proxy serve`, `proxy
authorize`); its schema is versioned in ``oauth2_mail_proxy_schema`` and migrated under an
advisory lock, so replicas starting together do it once.

- **Versions**: every write takes a new version from a sequence (so a record deleted and
  created again never repeats one) inside a transaction that locks the row and checks the
  version it expects to replace (compare-and-swap). `proxy authorize` writes unconditionally.
- **Leases**: a replica about to refresh an account's tokens sets ``lease_holder`` and
  ``lease_until`` (``now()`` plus the lease time: the database's clock, never the replicas'),
  unless another replica holds an unexpired lease. A write releases the lease; a crashed
  holder's lease simply expires.
- **Notifications**: every write and delete sends ``NOTIFY oauth2_mail_proxy_tokens,
  '<version> <account>'`` in its transaction. A replica running `proxy serve` LISTENs on its own
  connection; after that connection was lost it reconnects (backing off), and re-reads every
  account's version (*resync*), so nothing missed while it was away goes unnoticed; it also
  re-reads them every :data:`RESYNC_INTERVAL` seconds as a backup.
- **Outages**: :meth:`PostgresStore.peek` answers from the versions last seen, so a replica
  keeps serving the accounts it has unlocked while the database is down; operations that need
  the database retry for up to :data:`RETRY_FOR` seconds, then raise StoreUnavailable.

The DSN's password (from ``tokens.dsn`` or ``tokens.dsn_password_file``) is never logged: the
store describes itself by user, host, port and database only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from ..logs import register_secret
from .store import (Conflict, Key, Lease, NoTokens, Sealed, StoreError, StoreUnavailable, TokenStore, Version,
                    account_key, check_header, seal)

log = logging.getLogger("proxy.tokens")

TABLE = "oauth2_mail_proxy_tokens"
SCHEMA_TABLE = "oauth2_mail_proxy_schema"
SEQUENCE = "oauth2_mail_proxy_serial"
CHANNEL = "oauth2_mail_proxy_tokens"
ADVISORY_LOCK = 0x6F326D70  # "o2mp": serialises migrations across replicas
RETRY_FOR = 10.0            # seconds an operation keeps retrying a lost connection
RESYNC_INTERVAL = 30.0      # seconds between re-reads of every version (backup for lost notifications)
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 10.0

# Schema versions, applied in order, each once (oauth2_mail_proxy_schema records them).
MIGRATIONS: list[tuple[int, str]] = [
    (1, f"""
CREATE SEQUENCE {SEQUENCE};
CREATE TABLE {TABLE} (
    account      text PRIMARY KEY,       -- the token owner, case-folded
    version      bigint NOT NULL,        -- from {SEQUENCE}: new at every write
    header       text NOT NULL,          -- the record's clear header (JSON, authenticated; no secret in it)
    ciphertext   bytea NOT NULL,         -- AES-256-GCM under a key derived from the local password
    lease_holder text,                   -- the replica refreshing this account's tokens now
    lease_until  timestamptz,            -- ... until then (the database's clock)
    updated      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE {TABLE} IS 'oauth2-mail-proxy: sealed token records (no password, key or token in clear)';
"""),
]
LATEST = MIGRATIONS[-1][0]


def redact_dsn(dsn: str) -> str:
    """The DSN without its password (for messages)."""
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError:
        return "postgresql://..."
    if parts.password is None:
        netloc = parts.netloc
    else:
        netloc = parts.netloc.rsplit("@", 1)[-1]
        netloc = f"{parts.username or ''}:***@{netloc}" if parts.username else f":***@{netloc}"
    query = "&".join(p for p in parts.query.split("&") if p and not p.lower().startswith("password="))
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _driver():
    try:
        import asyncpg
    except ImportError:
        raise StoreError("tokens.store: postgresql needs the PostgreSQL driver: pip install "
                         "'oauth2-mail-proxy[postgresql]' (asyncpg)") from None
    return asyncpg


class PostgresStore(TokenStore):
    """Token records in a PostgreSQL table (see the module docstring)."""

    kind = "postgresql"
    poll_interval = 1.0

    def __init__(self, dsn: str, password: str | None = None):
        self.dsn, self._password = dsn, password
        parts = _split(dsn)
        for secret in (password, parts.password if parts is not None else None):
            if secret:
                register_secret(secret)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._pool = None
        self._versions: dict[str, int] = {}   # account -> version, as last seen
        self._updates = 0                     # counts changes to _versions other than by a resync
        self._synced = False                  # _versions has been read in full at least once
        self._available = False
        self._down_since = time.monotonic()
        self._last_error: str | None = None
        self._reported: str | None = None
        self._watchers: list[Callable[[str], None]] = []
        self._listener: asyncio.Task | None = None
        self._closed = False

    def describe(self) -> str:
        parts = _split(self.dsn)
        if parts is None:
            return "PostgreSQL (tokens.dsn is not a valid URL)"
        host = parts.hostname or "localhost"
        where = f"{host}:{parts.port}" if parts.port else host
        user = f"{parts.username}@" if parts.username else ""
        database = parts.path.lstrip("/") or parts.username or "postgres"
        return f"PostgreSQL {user}{where}/{database}"

    def where(self, account: str) -> str:
        return f"the record of {account_key(account)} in {self.describe()}"

    @property
    def available(self) -> bool:
        return self._available

    @property
    def unavailable_for(self) -> float:
        return 0.0 if self._available else time.monotonic() - self._down_since

    @property
    def last_error(self) -> str | None:
        return self._last_error

    # -- connections -----------------------------------------------------------------------
    async def open(self, *, watch: bool = False) -> None:
        """Connect and migrate; ``watch`` (`proxy serve`): follow changes, and if the database is
        down now, keep trying in the background instead of failing."""
        asyncpg = _driver()
        if self._pool is None:
            self._pool = asyncpg.create_pool(self.dsn, password=self._password, min_size=0, max_size=4,
                                             timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT,
                                             max_inactive_connection_lifetime=300)
            await self._pool
        if watch:
            try:  # usually the database is up: be in sync before serving
                await self._run(self._migrate, retry_for=0)
                await self._resync(retry_for=0)
            except StoreUnavailable:
                pass  # the listener keeps trying
            self._listener = asyncio.get_running_loop().create_task(self._listen())
            return
        await self._run(self._migrate)
        await self._resync()

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except (asyncio.CancelledError, Exception):
                pass
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 5)
            except (asyncio.TimeoutError, Exception):
                self._pool.terminate()
            self._pool = None

    def watch(self, callback: Callable[[str], None]) -> None:
        self._watchers.append(callback)

    async def _run(self, operation, *args, retry_for: float = RETRY_FOR):
        """Run ``operation(connection, *args)`` on a pooled connection, retrying lost connections."""
        asyncpg = _driver()
        deadline = time.monotonic() + retry_for
        delay = 0.1
        while True:
            try:
                async with self._pool.acquire() as conn:
                    result = await operation(conn, *args)
                self._set_available(True)
                return result
            except (Conflict, StoreError):
                raise
            except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
                self._set_available(False, f"the database refused the login ({exc.__class__.__name__})")
                raise StoreUnavailable(f"the token store {self.describe()} refused the login: check tokens.dsn and "
                                       "tokens.dsn_password_file") from None
            except asyncpg.ClientConfigurationError as exc:  # (an InterfaceError: before the next clause)
                raise _unusable_dsn(exc) from None
            except asyncpg.InsufficientPrivilegeError as exc:
                raise StoreError(f"{self.describe()}: the database user lacks a privilege ({_first_line(exc)}); "
                                 "see docs/scale-out.md") from None
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                    asyncpg.CannotConnectNowError, asyncpg.OperatorInterventionError,
                    asyncpg.TooManyConnectionsError) as exc:
                reason = _connection_problem(exc)
                self._set_available(False, reason)
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailable(f"the token store {self.describe()} is unreachable ({reason})") from None
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
            except asyncpg.PostgresError as exc:
                raise StoreError(f"{self.describe()}: database error {exc.sqlstate} "
                                 f"({exc.__class__.__name__})") from None
            except (ValueError, OverflowError, TypeError) as exc:
                raise _unusable_dsn(exc) from None

    def _set_available(self, available: bool, reason: str | None = None) -> None:
        if available and not self._available:
            log.info("token store %s reachable", self.describe())
        elif not available and self._available:
            log.warning("token store %s unreachable (%s): serving the accounts already unlocked; "
                        "others wait until it is back", self.describe(), reason)
            self._down_since = time.monotonic()
        self._available = available
        if reason:
            self._last_error = reason

    async def _migrate(self, conn) -> None:
        asyncpg = _driver()
        try:
            current = await conn.fetchval(f"SELECT max(version) FROM {SCHEMA_TABLE}")
        except asyncpg.UndefinedTableError:
            current = None
        if current == LATEST:
            return
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK)
            await conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} (version integer PRIMARY KEY, "
                               "applied timestamptz NOT NULL DEFAULT now())")
            current = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {SCHEMA_TABLE}")
            if current > LATEST:
                raise StoreError(f"{self.describe()}: the token table has schema version {current}, from a newer "
                                 f"proxy; this one knows up to {LATEST}: upgrade it")
            for version, statements in MIGRATIONS:
                if version > current:
                    await conn.execute(statements)
                    await conn.execute(f"INSERT INTO {SCHEMA_TABLE} (version) VALUES ($1)", version)
                    log.info("token store %s: schema version %d created", self.describe(), version)

    # -- changes ----------------------------------------------------------------------------
    async def _listen(self) -> None:
        """Keep a LISTEN connection; resync after every (re)connect and every RESYNC_INTERVAL."""
        asyncpg = _driver()
        delay = 0.2
        migrated = False
        while not self._closed:
            conn = None
            try:
                if not migrated:
                    await self._run(self._migrate, retry_for=0)
                    migrated = True
                conn = await asyncpg.connect(self.dsn, password=self._password, timeout=CONNECT_TIMEOUT,
                                             command_timeout=COMMAND_TIMEOUT)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn: lost.set())
                await conn.add_listener(CHANNEL, self._notified)
                await self._resync(retry_for=0)
                delay, self._reported = 0.2, None
                while not lost.is_set() and not self._closed:
                    try:
                        await asyncio.wait_for(lost.wait(), RESYNC_INTERVAL)
                    except asyncio.TimeoutError:
                        await conn.fetchval("SELECT 1")   # is the listening connection still alive?
                        await self._resync(retry_for=0)
                if not self._closed:
                    self._set_available(False, "the connection was closed")
            except asyncio.CancelledError:
                raise
            except StoreError as exc:  # unreachable, login refused, a schema from a newer proxy
                self._report(str(exc))
            except Exception as exc:  # connection errors of every kind: try again
                self._set_available(False, _connection_problem(exc))
                self._report(f"the token store {self.describe()} is unreachable ({_connection_problem(exc)})")
            finally:
                if conn is not None:
                    conn.terminate()
            if not self._closed:
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    def _report(self, text: str) -> None:
        """Log why the store cannot be followed, once per reason (it is retried every few seconds)."""
        if text != self._reported:
            self._reported = text
            log.warning("%s; trying again", text)

    def _notified(self, _conn, _pid, _channel, payload: str) -> None:
        version, _, account = payload.partition(" ")
        if not account:
            return
        if version.isdigit():
            if self._versions.get(account, -1) >= int(version):
                return  # our own write, or one we have seen already
            self._versions[account] = int(version)
        else:
            self._versions.pop(account, None)
        self._updates += 1
        self._changed(account)

    async def _resync(self, retry_for: float = RETRY_FOR) -> None:
        """Read every version; a snapshot overtaken by a notification or a write meanwhile is read
        again, so it never replaces newer knowledge."""
        for _ in range(3):
            updates = self._updates
            rows = await self._run(lambda conn: conn.fetch(f"SELECT account, version FROM {TABLE}"),
                                   retry_for=retry_for)
            if self._updates == updates:
                break
        seen = {row["account"]: int(row["version"]) for row in rows}
        changed = {a for a, v in seen.items() if self._versions.get(a) != v} | (set(self._versions) - set(seen))
        self._versions, self._synced = seen, True
        for account in changed:
            self._changed(account)

    def _changed(self, account: str) -> None:
        for callback in self._watchers:
            try:
                callback(account)
            except Exception:
                log.exception("token store: a change callback failed")

    # -- the interface -------------------------------------------------------------------------
    def peek(self, account: str) -> int | object | None:
        if not self._synced:
            return _UNKNOWN  # never equal to a loaded record's stamp: callers read the record
        return self._versions.get(account_key(account))

    async def read(self, account: str) -> Sealed:
        key = account_key(account)
        row = await self._run(lambda conn: conn.fetchrow(
            f"SELECT version, header, ciphertext FROM {TABLE} WHERE account = $1", key))
        if row is None:
            raise NoTokens(f"no tokens stored for {account} in {self.describe()}")
        return self._sealed(account, row)

    async def read_many(self, accounts: list[str]) -> dict[str, Sealed | StoreError]:
        names = {account_key(a): a for a in accounts}
        rows = await self._run(lambda conn: conn.fetch(
            f"SELECT account, version, header, ciphertext FROM {TABLE} WHERE account = ANY($1::text[])",
            list(names)), retry_for=2.0)
        found: dict[str, Sealed | StoreError] = {
            key: NoTokens(f"no tokens stored for {name} in {self.describe()}") for key, name in names.items()}
        for row in rows:
            try:
                found[row["account"]] = self._sealed(names[row["account"]], row)
            except StoreError as exc:
                found[row["account"]] = exc
        return found

    def _sealed(self, account: str, row) -> Sealed:
        where = self.where(account)
        try:
            header = json.loads(row["header"])
        except ValueError:
            header = None
        return Sealed(where, check_header(header, where, account), bytes(row["ciphertext"]), int(row["version"]))

    async def write(self, account: str, key: Key, payload: dict[str, Any], meta: dict[str, Any], *,
                    expected: Version | None = None, lease: Lease | None = None) -> Sealed:
        name = account_key(account)

        async def transaction(conn) -> Sealed:
            async with conn.transaction():
                row = await conn.fetchrow(f"SELECT version, header FROM {TABLE} WHERE account = $1 FOR UPDATE", name)
                if expected is not None:
                    current = None
                    if row is not None:
                        try:
                            current = (int(json.loads(row["header"]).get("serial", 0)),
                                       str(json.loads(row["header"])["kdf"]["salt"]))
                        except (ValueError, KeyError, TypeError, AttributeError):
                            current = (0, "")
                    if current != expected:
                        raise Conflict(f"{self.where(account)} changed meanwhile")
                serial = int(await conn.fetchval(f"SELECT nextval('{SEQUENCE}')"))
                header, ciphertext = seal(account, key, payload, meta, serial)
                text = json.dumps(header)
                if row is None:
                    inserted = await conn.fetchval(
                        f"INSERT INTO {TABLE} (account, version, header, ciphertext) VALUES ($1, $2, $3, $4) "
                        "ON CONFLICT (account) DO NOTHING RETURNING version", name, serial, text, ciphertext)
                    if inserted is None:
                        raise _Retry()
                else:
                    await conn.execute(f"UPDATE {TABLE} SET version = $2, header = $3, ciphertext = $4, "
                                       "lease_holder = NULL, lease_until = NULL, updated = now() WHERE account = $1",
                                       name, serial, text, ciphertext)
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{serial} {name}")
            return Sealed(self.where(account), header, ciphertext, serial)

        for _ in range(3):
            try:
                sealed = await self._run(transaction)
            except _Retry:
                if expected is not None:
                    raise Conflict(f"{self.where(account)} was created meanwhile") from None
                continue
            self._versions[name] = sealed.serial
            self._updates += 1
            return sealed
        raise StoreError(f"{self.where(account)}: could not be written (concurrent writers); try again")

    async def delete(self, account: str) -> bool:
        name = account_key(account)

        async def transaction(conn) -> bool:
            async with conn.transaction():
                deleted = await conn.fetchval(f"DELETE FROM {TABLE} WHERE account = $1 RETURNING version", name)
                if deleted is not None:
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"deleted {name}")
            return deleted is not None

        deleted = await self._run(transaction)
        self._versions.pop(name, None)
        self._updates += 1
        return deleted

    async def lease(self, account: str, seconds: float) -> Lease | None:
        name = account_key(account)

        async def take(conn):
            row = await conn.fetchrow(
                f"UPDATE {TABLE} SET lease_holder = $2, lease_until = now() + make_interval(secs => $3) "
                "WHERE account = $1 AND (lease_until IS NULL OR lease_until < now() OR lease_holder = $2) "
                "RETURNING header", name, self.holder, float(seconds))
            if row is not None:
                return True, row["header"]
            exists = await conn.fetchval(f"SELECT true FROM {TABLE} WHERE account = $1", name)
            return False, exists

        taken, detail = await self._run(take, retry_for=1.0)  # the caller retries, or refreshes without one
        if not taken:
            return None if detail else _PgLease(self, name, None, held=False)
        try:
            header = json.loads(detail)
            version = (int(header.get("serial", 0)), str(header["kdf"]["salt"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            version = (0, "")
        return _PgLease(self, name, version, held=True)


class _PgLease(Lease):
    def __init__(self, store: PostgresStore, account: str, version: Version | None, held: bool):
        self.store, self.account, self.version, self.held = store, account, version, held

    async def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            await self.store._run(lambda conn: conn.execute(
                f"UPDATE {TABLE} SET lease_holder = NULL, lease_until = NULL WHERE account = $1 AND lease_holder = $2",
                self.account, self.store.holder), retry_for=2.0)
        except StoreError:
            pass  # it expires by itself


_UNKNOWN = object()  # peek() before the versions were read once


class _Retry(Exception):
    """A concurrent insert won the race: run the transaction again."""


def _unusable_dsn(exc: Exception) -> StoreError:
    # Only the class: the driver's message may quote the DSN, password and all.
    return StoreError(f"tokens.dsn cannot be used ({exc.__class__.__name__}): check the host, the port and "
                      "the parameters")


def _split(dsn: str) -> urllib.parse.SplitResult | None:
    """The DSN's parts (None if it is not a URL with a valid port)."""
    try:
        parts = urllib.parse.urlsplit(dsn)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
        return parts
    except ValueError:
        return None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__


def _connection_problem(exc: BaseException) -> str:
    """A short reason for a lost or refused connection (never the DSN)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return exc.__class__.__name__
