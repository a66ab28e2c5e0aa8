"""The encrypted token store's folder engine: sealed at rest, 0600, atomic, tamper-evident, never damaged by a
wrong password; several processes serialised by a lock file per account, and a write never replaces a newer
record."""

import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from proxy.tokens.folder import FolderStore
from proxy.tokens.store import Conflict, NoTokens, StoreError, WrongPassword, derive_key, key_for, open_sealed
from tests.harness import ROOT

FAST = {"name": "scrypt", "n": 2**10, "r": 8, "p": 1}
SECRET = "rt-0123456789-very-secret-refresh-token"


@pytest.fixture
def store(tmp_path):
    return FolderStore(tmp_path / "tokens")


def write(store, password="correct horse", payload=None, meta=None):
    key = derive_key(password, kdf=FAST)
    store.write_file("Alice@Firm.de", key, payload or {"refresh": SECRET}, meta or {"state": "ok"})
    return key


def test_round_trip_and_encryption_at_rest(store):
    key = write(store)
    path = store.path_for("alice@firm.de")
    raw = path.read_bytes()
    assert SECRET.encode() not in raw and b"correct horse" not in raw
    sealed = store.read_file("ALICE@firm.de")
    assert sealed.meta == {"state": "ok"}
    assert sealed.header["kdf"]["n"] == 2**10  # parameters stored so they can be raised later
    assert open_sealed(sealed, key_for(sealed, "correct horse")) == {"refresh": SECRET}
    assert open_sealed(sealed, key) == {"refresh": SECRET}


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_file_and_folder_permissions(store):
    write(store)
    assert stat.S_IMODE(store.path_for("alice@firm.de").stat().st_mode) == 0o600
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700


def test_wrong_password_changes_nothing(store):
    write(store)
    before = store.path_for("alice@firm.de").read_bytes()
    sealed = store.read_file("alice@firm.de")
    with pytest.raises(WrongPassword):
        open_sealed(sealed, key_for(sealed, "wrong password"))
    assert store.path_for("alice@firm.de").read_bytes() == before


def test_a_file_copied_to_another_accounts_name_does_not_open_there(store):
    """The header's account is authenticated against edits, and now also compared with the account
    opening the file: a copy under another name is refused before any password is tried."""
    write(store)
    store.path_for("bob@firm.de").write_bytes(store.path_for("alice@firm.de").read_bytes())
    with pytest.raises(StoreError, match="belongs to 'Alice@Firm.de', not bob@firm.de"):
        store.read_file("bob@firm.de")
    assert store.read_file("ALICE@FIRM.DE").meta == {"state": "ok"}


def test_tampered_metadata_or_kdf_is_detected(store):
    write(store)
    path = store.path_for("alice@firm.de")
    data = json.loads(path.read_text())
    data["meta"]["state"] = "forged"
    path.write_text(json.dumps(data))
    sealed = store.read_file("alice@firm.de")
    with pytest.raises(WrongPassword):
        open_sealed(sealed, key_for(sealed, "correct horse"))


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"format": "other"}', b"\xff\xfe garbage"])
def test_corrupt_file_is_a_clear_error(store, content):
    write(store)
    store.path_for("alice@firm.de").write_bytes(content)
    with pytest.raises(StoreError, match="corrupt") as info:
        store.read_file("alice@firm.de")
    assert "proxy authorize" in str(info.value)


def test_missing_file(store):
    with pytest.raises(NoTokens):
        store.read_file("nobody@firm.de")
    assert store.peek("nobody@firm.de") is None


def test_replace_is_atomic_and_leaves_no_temp_files(store):
    write(store, payload={"v": 1})
    stamp1 = store.peek("alice@firm.de")
    key = write(store, payload={"v": 2})
    assert store.peek("alice@firm.de") != stamp1
    sealed = store.read_file("alice@firm.de")
    assert open_sealed(sealed, key) == {"v": 2}
    assert sorted(p.name for p in store.directory.iterdir()) == [store.lock_path("alice@firm.de").name,
                                                                 store.path_for("alice@firm.de").name]



def test_leftovers_of_an_interrupted_write_are_removed_when_old(store):
    write(store)
    old, young = store.directory / ".tmp-old", store.directory / ".tmp-young"
    old.write_bytes(b"half a token file")
    young.write_bytes(b"a write still running")
    hour_ago = os.path.getmtime(old) - 3600
    os.utime(old, (hour_ago, hour_ago))
    assert store.remove_leftovers() == 1
    assert not old.exists() and young.exists()            # a young one may be another process's write
    assert store.path_for("alice@firm.de").exists()       # the token file itself is never touched
    assert FolderStore(store.directory / "missing").remove_leftovers() == 0

def test_file_names_are_safe(store):
    assert store.path_for("a/b\\c:d@x").name == "a%2fb%5cc%3ad@x.tokens"
    assert store.path_for("Alice@Firm.DE") == store.path_for("alice@firm.de")


# ---------------------------------------------------------------------------------- several processes
def test_a_write_replaces_only_the_version_it_expects(store):
    key = write(store, payload={"v": 1})
    first = store.read_file("alice@firm.de")
    second = store.write_file("alice@firm.de", key, {"v": 2}, {}, expected=first.version)
    assert second.serial == first.serial + 1
    with pytest.raises(Conflict):                  # a refresh that loaded the first version is too late
        store.write_file("alice@firm.de", key, {"v": 3}, {}, expected=first.version)
    write(store, "new password", payload={"v": "authorize"})   # `proxy authorize`: always wins
    with pytest.raises(Conflict):
        store.write_file("alice@firm.de", key, {"v": 4}, {}, expected=second.version)
    assert store.delete_file("alice@firm.de")
    write(store, payload={"v": "again"})            # authorized again after `proxy forget`: serial 1 again,
    with pytest.raises(Conflict):                  # but a new salt, so the first version never matches
        store.write_file("alice@firm.de", key, {"v": 5}, {}, expected=first.version)
    assert open_sealed(store.read_file("alice@firm.de"), key_for(store.read_file("alice@firm.de"),
                                                                   "correct horse")) == {"v": "again"}


LEASE_HOLDER = """
import sys
from proxy.tokens.folder import FolderStore
lease = FolderStore(sys.argv[1]).lease_now("alice@firm.de")
print("held" if lease else "busy", flush=True)
sys.stdin.readline()
"""


def test_the_lease_is_one_process_at_a_time_and_ends_with_its_holder(store):
    """Another process refreshing holds the account's lock file: this one gets no lease, and a
    write (`proxy authorize`) waits for it; ``kill -9`` of the holder releases it at once."""
    key = write(store)
    holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, str(store.directory)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        assert store.lease_now("alice@firm.de") is None
        writer = threading.Thread(target=store.write_file, args=("alice@firm.de", key, {"v": 2}, {}))
        writer.start()
        time.sleep(0.5)
        assert writer.is_alive()                     # serialised behind the other process's lease
        holder.kill()
        holder.wait()
        writer.join(5)
        assert not writer.is_alive()
        lease = store.lease_now("alice@firm.de")
        assert lease is not None and lease.version == store.read_file("alice@firm.de").version
        lease.release_now()
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------- the one model of a token state
def test_token_status_reads_a_records_clear_status_in_one_way():
    from proxy.tokens.state import NEEDS_AUTHORIZATION, NOT_AUTHORIZED, OK, TokenStatus, token_meta

    fresh = TokenStatus.from_meta(token_meta("a@b", expires_at=time.time() + 3600, has_refresh_token=True,
                                             last_refresh=time.time(), last_error=None))
    assert fresh.state == OK and not fresh.needs_authorization and fresh.problem("a@b") is None
    refused = TokenStatus.from_meta(token_meta("a@b", expires_at=None, has_refresh_token=True, last_refresh=None,
                                               last_error="invalid_grant: AADSTS50173", state=NEEDS_AUTHORIZATION))
    assert refused.needs_authorization and "AADSTS50173" in refused.problem("a@b")
    assert "proxy authorize a@b" in refused.problem("a@b")
    no_refresh_token = TokenStatus.from_meta(token_meta("a@b", expires_at=time.time() - 1, has_refresh_token=False,
                                                        last_refresh=None, last_error=None))
    assert no_refresh_token.needs_authorization and "no refresh token" in no_refresh_token.problem("a@b")
    app_only = TokenStatus.from_meta(token_meta("a@b", expires_at=time.time() - 1, has_refresh_token=False,
                                                last_refresh=None, last_error=None, flow="client_credentials"))
    assert not app_only.needs_authorization                      # fetches a new token by itself
    assert TokenStatus.missing().state == NOT_AUTHORIZED and TokenStatus.missing().needs_authorization
    odd = TokenStatus.from_meta({"state": "something else", "access_token_expires": "soon", "last_refresh": True})
    assert odd.state == OK and odd.access_token_expires is None and odd.last_refresh is None
