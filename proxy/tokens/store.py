"""Encrypted token store: one file per account, sealed with a key derived from its local password.

File layout (JSON, UTF-8)::

    {"format": "oauth2-mail-proxy-tokens", "version": 1, "account": "alice@firm.de",
     "kdf": {"name": "scrypt", "salt": "<b64>", "n": 65536, "r": 8, "p": 1},
     "aead": "AES-256-GCM", "nonce": "<b64>",
     "meta": {... non-secret status: expiry, last refresh, last error, state ...},
     "ciphertext": "<b64>"}

Everything but the ciphertext is authenticated as associated data, so the key-derivation
parameters (stored to be raised later) and the status shown by ``proxy status`` cannot be
altered unnoticed. A wrong password fails the AEAD tag and never changes the file. Files are
written to a temporary file in the same folder (created 0600) and renamed over the old one,
so a crash leaves the old or the new version, never a torn one.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

FORMAT = "oauth2-mail-proxy-tokens"
VERSION = 1
# scrypt cost: 64 MiB and about 0.2 s per derivation; paid once per account per process (and
# per guess by anyone who steals a token file). Stored per file, so it can be raised later.
DEFAULT_KDF = {"name": "scrypt", "n": 2**16, "r": 8, "p": 1}
_SAFE = set("abcdefghijklmnopqrstuvwxyz0123456789.@_-+")


class StoreError(Exception):
    """A token file is missing, unreadable or corrupt (the message names the file, never secrets)."""


class NoTokens(StoreError):
    """No token file exists for the account: it has not been authorized yet."""


class WrongPassword(StoreError):
    """The password does not open this account's token file."""


@dataclass
class Sealed:
    """A token file as read from disk, before decryption."""

    path: Path
    header: dict[str, Any]
    ciphertext: bytes
    stamp: tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino): detects replacement

    @property
    def meta(self) -> dict[str, Any]:
        return self.header.get("meta", {})

    @property
    def salt(self) -> bytes:
        return _b64d(self.header["kdf"]["salt"])


@dataclass
class Key:
    """A derived file key, bound to the salt it was derived with."""

    salt: bytes
    kdf: dict[str, Any]
    secret: bytes = field(repr=False)


def derive_key(password: str, salt: bytes | None = None, kdf: dict[str, Any] | None = None) -> Key:
    """Derive the AEAD key from a local password (slow on purpose; call off the event loop)."""
    kdf = dict(kdf or DEFAULT_KDF)
    if kdf.get("name") != "scrypt":
        raise StoreError(f"unsupported key derivation {kdf.get('name')!r}")
    salt = salt if salt is not None else secrets.token_bytes(16)
    secret = Scrypt(salt=salt, length=32, n=int(kdf["n"]), r=int(kdf["r"]), p=int(kdf["p"])).derive(
        password.encode("utf-8"))
    return Key(salt=salt, kdf={k: kdf[k] for k in ("name", "n", "r", "p")}, secret=secret)


class TokenStore:
    """The folder of token files."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def remove_leftovers(self, older_than: float = 600.0) -> int:
        """Delete temporary files that a write interrupted by a crash left behind (``.tmp-*``).

        Only files older than ``older_than`` seconds: a younger one may belong to a write that is
        still running in another process (`proxy authorize`). Returns how many were removed.
        """
        removed = 0
        now = time.time()
        try:
            leftovers = list(self.directory.glob(".tmp-*"))
        except OSError:
            return 0
        for path in leftovers:
            try:
                if now - path.stat().st_mtime >= older_than:
                    path.unlink()
                    removed += 1
            except OSError:
                pass
        return removed

    def path_for(self, account: str) -> Path:
        """File name for an account: readable, case-folded, safe on Windows and POSIX."""
        name = "".join(c if c in _SAFE else f"%{ord(c):02x}" for c in account.casefold())
        return self.directory / f"{name}.tokens"

    def stamp(self, account: str) -> tuple[int, int, int] | None:
        try:
            st = self.path_for(account).stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{self.path_for(account)}: {exc.strerror}") from None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def read(self, account: str) -> Sealed:
        """Read and check the file's structure; raises NoTokens or StoreError."""
        path = self.path_for(account)
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                raw = fh.read(16 * 1024 * 1024)
        except FileNotFoundError:
            raise NoTokens(f"no tokens stored for {account} (expected {path})") from None
        except OSError as exc:
            raise StoreError(f"{path}: cannot read token file ({exc.strerror})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            if header.get("format") != FORMAT or header.get("version") != VERSION:
                raise ValueError("unknown format or version")
            ciphertext = _b64d(header.pop("ciphertext"))
            _b64d(header["nonce"]), _b64d(header["kdf"]["salt"])
            if header.get("aead") != "AES-256-GCM" or not isinstance(header.get("meta"), dict):
                raise ValueError("unknown cipher")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreError(f"{path}: token file is corrupt ({exc.__class__.__name__}); "
                             f"run `proxy authorize {account}` again") from None
        return Sealed(path, header, ciphertext, (st.st_mtime_ns, st.st_size, st.st_ino))

    def open(self, sealed: Sealed, key: Key) -> dict[str, Any]:
        """Decrypt a sealed file with ``key``; raises WrongPassword if the tag does not verify."""
        if key.salt != sealed.salt:
            raise WrongPassword("key derived for another file")
        try:
            plain = AESGCM(key.secret).decrypt(_b64d(sealed.header["nonce"]), sealed.ciphertext,
                                               _aad(sealed.header))
        except InvalidTag:
            raise WrongPassword(f"wrong password for {sealed.header.get('account')}") from None
        try:
            return json.loads(plain.decode("utf-8"))
        except ValueError:
            raise StoreError(f"{sealed.path}: decrypted content is not valid") from None

    def key_for(self, sealed: Sealed, password: str) -> Key:
        """Derive the key for an existing file from a password (slow)."""
        return derive_key(password, sealed.salt, sealed.header["kdf"])

    def write(self, account: str, key: Key, payload: dict[str, Any], meta: dict[str, Any]) -> tuple[int, int, int]:
        """Seal ``payload`` with ``key`` and atomically replace the account's file."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        header = {"format": FORMAT, "version": VERSION, "account": account,
                  "kdf": {**key.kdf, "salt": _b64e(key.salt)}, "aead": "AES-256-GCM",
                  "nonce": _b64e(secrets.token_bytes(12)), "meta": meta}
        ciphertext = AESGCM(key.secret).encrypt(_b64d(header["nonce"]),
                                                json.dumps(payload).encode("utf-8"), _aad(header))
        data = json.dumps({**header, "ciphertext": _b64e(ciphertext)}, indent=1).encode("utf-8")
        path = self.path_for(account)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.directory)  # mode 0600 on POSIX
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            _replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(self.directory)
        return self.stamp(account) or (0, 0, 0)

    def delete(self, account: str) -> bool:
        try:
            self.path_for(account).unlink()
            return True
        except FileNotFoundError:
            return False


def _aad(header: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in header.items() if k != "ciphertext"},
                      sort_keys=True, separators=(",", ":")).encode("utf-8")


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64d(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    return base64.b64decode(text.encode("ascii"), validate=True)


def _replace(src: str, dst: Path, *, windows: bool = os.name == "nt", replace=os.replace, sleep=time.sleep) -> None:
    # On Windows a reader (or a virus scanner) holding the target open makes replace fail briefly
    # (about 2 s of retries in all); on POSIX a rename never waits for readers.
    for attempt in range(10):
        try:
            replace(src, dst)
            return
        except PermissionError:
            if not windows or attempt == 9:
                raise
            sleep(0.05 * (attempt + 1))


def _fsync_dir(directory: Path, *, windows: bool = os.name == "nt") -> None:
    if windows:  # Windows cannot open a folder for fsync; NTFS journals the rename itself
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
