"""The PostgreSQL engine against a real PostgreSQL from Debian's packages (tests/replicas.py starts
it in a temporary folder): the table created on first use under versioned migrations, sealed
records only (a pg_dump holds no token and no password), compare-and-swap writes that never
undo `proxy authorize`, leases timed by the database's clock, notifications with a resync after
a lost connection, and operations that wait out a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import pytest
import yaml

from proxy.tokens.postgres import LATEST, SCHEMA_TABLE, TABLE, PostgresStore, redact_dsn
from proxy.tokens.store import Conflict, NoTokens, StoreError, StoreUnavailable, derive_key, key_for, open_sealed
from tests.faultbed import leaks

FAST = {"name": "scrypt", "n": 2**10, "r": 8, "p": 1}
SECRET = "rt-0123456789-very-secret-refresh-token"


@pytest.fixture
def database(postgres):
    """A fresh database and owner role: (name, DSN without password, password)."""
    name = f"proxy_{uuid.uuid4().hex[:10]}"
    dsn, password = postgres.create_database(name)
    return name, dsn, password


def run(coroutine):
    return asyncio.run(coroutine)


@contextlib.asynccontextmanager
async def opened(dsn: str, password: str | None, count: int = 1, *, watch: bool = False):
    """``count`` stores on the database, opened (``watch``: as `proxy serve` does), closed after."""
    stores = [PostgresStore(dsn, password) for _ in range(count)]
    try:
        for store in stores:
            await store.open(watch=watch)
        yield stores
    finally:
        for store in stores:
            await store.close()


def test_table_is_created_once_on_first_use_by_replicas_starting_together(postgres, database):
    name, dsn, password = database

    async def main():
        stores = [PostgresStore(dsn, password) for _ in range(3)]
        await asyncio.gather(*(s.open() for s in stores))
        for store in stores:
            await store.close()
        async with opened(dsn, password):
            pass

    run(main())
    assert postgres.sql(f"SELECT version FROM {SCHEMA_TABLE} ORDER BY version", name) == str(LATEST)
    assert postgres.sql(f"SELECT count(*) FROM {TABLE}", name) == "0"


def test_a_schema_from_a_newer_proxy_is_refused(postgres, database):
    name, dsn, password = database
    run(_open_close(dsn, password))
    postgres.sql(f"INSERT INTO {SCHEMA_TABLE} (version) VALUES ({LATEST + 1})", name)
    with pytest.raises(Exception, match=f"schema version {LATEST + 1}, from a newer proxy"):
        run(_open_close(dsn, password))


async def _open_close(dsn, password):
    async with opened(dsn, password):
        pass


def test_records_are_sealed_and_a_pg_dump_holds_no_secret(postgres, database):
    name, dsn, password = database
    local_password = "correct horse battery"

    async def main():
        async with opened(dsn, password) as (store,):
            key = derive_key(local_password, kdf=FAST)
            written = await store.write("Alice@Firm.de", key, {"refresh": SECRET}, {"state": "ok"})
            sealed = await store.read("alice@firm.de")
            assert sealed.version == written.version and sealed.meta == {"state": "ok"}
            assert open_sealed(sealed, key_for(sealed, local_password)) == {"refresh": SECRET}
            assert store.peek("ALICE@firm.de") == sealed.stamp
            with pytest.raises(NoTokens):
                await store.read("bob@firm.de")

    run(main())
    dump = postgres.dump(name)
    assert f"COPY public.{TABLE}" in dump and "alice@firm.de" in dump     # the record is in the dump...
    assert leaks([("pg_dump", dump)], {SECRET, local_password, password}) == []   # ...but sealed


def test_writes_compare_and_swap_and_authorize_always_wins(database):
    _, dsn, password = database

    async def main():
        async with opened(dsn, password) as (store,):
            key = derive_key("first password", kdf=FAST)
            first = await store.write("alice@firm.de", key, {"n": 1}, {})
            second = await store.write("alice@firm.de", key, {"n": 2}, {}, expected=first.version)
            with pytest.raises(Conflict):      # a refresh that loaded the first version is too late
                await store.write("alice@firm.de", key, {"n": 3}, {}, expected=first.version)
            new_key = derive_key("new password", kdf=FAST)
            await store.write("alice@firm.de", new_key, {"n": "authorize"}, {})   # `proxy authorize`
            with pytest.raises(Conflict):      # never undone by the refresh that loaded the second version
                await store.write("alice@firm.de", key, {"n": 4}, {}, expected=second.version)
            assert await store.delete("alice@firm.de") and not await store.delete("alice@firm.de")
            again = await store.write("alice@firm.de", key, {"n": 5}, {})      # authorized again after forget
            assert again.serial > second.serial
            with pytest.raises(Conflict):
                await store.write("alice@firm.de", key, {"n": 6}, {}, expected=second.version)
            assert open_sealed(await store.read("alice@firm.de"), key) == {"n": 5}

    run(main())


def test_one_lease_per_account_timed_by_the_database_clock(postgres, database):
    name, dsn, password = database

    async def main():
        async with opened(dsn, password, 2) as (a, b):
            key = derive_key("pw", kdf=FAST)
            record = await a.write("alice@firm.de", key, {"n": 1}, {})
            lease = await a.lease("alice@firm.de", 1.5)
            assert lease is not None and lease.version == record.version
            assert await b.lease("alice@firm.de", 1.5) is None          # held: b waits for a's result
            until = float(postgres.sql(f"SELECT extract(epoch FROM lease_until - now()) FROM {TABLE}", name))
            assert 0.5 < until <= 1.5                                    # the database's clock
            written = await a.write("alice@firm.de", key, {"n": 2}, {}, expected=record.version, lease=lease)
            taken = await b.lease("alice@firm.de", 1.5)                  # the write released it
            assert taken is not None and taken.version == written.version
            assert await a.lease("alice@firm.de", 1.5) is None
            await asyncio.sleep(1.7)                                     # b "died": its lease runs out
            assert await a.lease("alice@firm.de", 30) is not None
            assert (await b.lease("nobody@firm.de", 5)).version is None  # no record: nothing to refresh

    run(main())


def test_changes_are_pushed_and_a_lost_connection_resyncs(postgres, database):
    name, dsn, password = database

    async def main():
        changes: list[str] = []
        async with opened(dsn, password) as (writer,), opened(dsn, password, watch=True) as (watcher,):
            watcher.watch(changes.append)
            await _until(lambda: watcher.available, "the watcher connected")
            key = derive_key("pw", kdf=FAST)
            record = await writer.write("alice@firm.de", key, {"n": 1}, {})
            await _until(lambda: watcher.peek("alice@firm.de") == record.stamp, "a notification")
            assert changes == ["alice@firm.de"]
            changes.clear()
            assert postgres.terminate_connections(name) >= 2             # the listener's too
            record = await writer.write("alice@firm.de", key, {"n": 2}, {})   # writer reconnects by itself
            await _until(lambda: watcher.peek("alice@firm.de") == record.stamp, "the resync after reconnecting")
            assert "alice@firm.de" in changes
            await writer.delete("alice@firm.de")
            await _until(lambda: watcher.peek("alice@firm.de") is None, "the deletion")

    run(main())


def test_operations_wait_out_a_restart_and_report_an_outage(postgres, database, caplog):
    name, dsn, password = database

    async def main():
        async with opened(dsn, password) as (store,):
            key = derive_key("pw", kdf=FAST)
            await store.write("alice@firm.de", key, {"n": 1}, {})
            restart = asyncio.get_running_loop().run_in_executor(None, postgres.restart)
            await asyncio.sleep(0.3)
            started = time.monotonic()
            assert open_sealed(await store.read("alice@firm.de"), key) == {"n": 1}   # retried until it is back
            assert time.monotonic() - started < 10
            await restart
        wrong = PostgresStore(dsn.replace("@", ":not-the-password@"), None)
        with pytest.raises(StoreUnavailable) as refused:
            await wrong.open()
        await wrong.close()
        assert "refused the login" in str(refused.value) and "not-the-password" not in str(refused.value)

    with caplog.at_level(logging.DEBUG, logger="proxy"):
        run(main())
    assert password not in caplog.text and "not-the-password" not in caplog.text


def test_the_dsn_password_is_never_shown():
    assert redact_dsn("postgresql://proxy:s3cret@db:5432/tokens?sslmode=require&password=x") == \
        "postgresql://proxy:***@db:5432/tokens?sslmode=require"
    store = PostgresStore("postgresql://proxy:s3cret@db.example:5433/tokens", None)
    assert store.describe() == "PostgreSQL proxy@db.example:5433/tokens" and "s3cret" not in store.where("a@b")
    for dsn in ("postgresql://u:s3cret@127.0.0.1:1/db?sslmode=bogus", "postgresql://u:s3cret@127.0.0.1:x/db"):
        with pytest.raises(StoreError, match="tokens.dsn cannot be used") as refused:   # not a traceback
            run(_open_close(dsn, None))
        assert "s3cret" not in str(refused.value)


async def _until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except StoreUnavailable:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_the_tokens_section_names_the_store_and_never_repeats_the_dsn(tmp_path):
    from proxy.config import ConfigError, load_config, parse_config
    from proxy.tokens.store import open_store
    from tests.test_config import BASE

    secret = tmp_path / "db-password"
    secret.write_text("pw-from-a-file\n")
    config = parse_config({**BASE, "tokens": {"store": "postgresql", "dsn": "postgresql://proxy@db:5432/tokens",
                                              "dsn_password_file": str(secret)}}, base_dir=tmp_path)
    store = open_store(config)
    assert isinstance(store, PostgresStore) and store.describe() == "PostgreSQL proxy@db:5432/tokens"
    assert config.token_store.dsn_password == "pw-from-a-file"
    assert "pw-from-a-file" not in repr(config) and "pw-from-a-file" not in config.token_store.describe()
    folder = parse_config(BASE, base_dir=tmp_path)
    assert folder.token_store.store == "folder" and open_store(folder).describe() == f"the token folder {tmp_path}/tokens"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**BASE, "tokens": {"store": "postgresql"}}))
    from_env = load_config(path, {"PROXY_TOKENS_DSN": "postgresql://proxy:s3cret-in-env@db/tokens"})
    assert from_env.token_store.dsn == "postgresql://proxy:s3cret-in-env@db/tokens"
    assert "s3cret-in-env" not in from_env.token_store.describe()
    for tokens, key in (({"store": "postgresql"}, "tokens.dsn: required"),
                        ({"store": "postgresql", "dsn": "mysql://u:s3cret@h/db"}, "tokens.dsn: expected a URL"),
                        ({"dsn": "postgresql://u:s3cret@h/db"}, "tokens.dsn: only used with tokens.store: postgresql"),
                        ({"store": "sqlite"}, "tokens.store"),
                        ({"store": "postgresql", "dsn": "postgresql://u:s3cret@h:99999/db"}, "not a valid URL"),
                        ({"store": "postgresql", "dsn": "postgresql://u:s3cret@[::1/db"}, "not a valid URL"),
                        ({"store": "postgresql", "dsn": "postgresql://u@h/db", "dsn_password_file": str(tmp_path / "no")},
                         "tokens.dsn_password_file")):
        with pytest.raises(ConfigError, match=key) as error:
            parse_config({**BASE, "tokens": tokens}, base_dir=tmp_path)
        assert "s3cret" not in str(error.value)
