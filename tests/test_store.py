"""The encrypted token store: sealed at rest, 0600, atomic, tamper-evident, never damaged by a wrong password."""

import json
import os
import stat

import pytest

from proxy.tokens.folder import FolderStore
from proxy.tokens.store import NoTokens, StoreError, WrongPassword, derive_key, key_for, open_sealed

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
