"""The token store: the interface both engines implement, and the sealing they share.

A token *record* is what a token file holds: the encrypted payload (AES-256-GCM under a key
derived with scrypt from the account's local password) and its clear, non-secret header::

    {"format": "oauth2-mail-proxy-tokens", "version": 1, "account": "alice@firm.de",
     "kdf": {"name": "scrypt", "salt": "<b64>", "n": 65536, "r": 8, "p": 1},
     "aead": "AES-256-GCM", "nonce": "<b64>", "serial": 7,
     "meta": {... non-secret status: expiry, last refresh, last error, state ...},
     "ciphertext": "<b64>"}

Everything but the ciphertext is authenticated as associated data, so the key-derivation
parameters (stored to be raised later), the serial and the status shown by ``proxy status``
cannot be altered unnoticed. A wrong password fails the AEAD tag and never changes a record.
Passwords, derived keys and verifiers never leave the process: a store only ever sees sealed
records.

Two engines hold the records (:func:`open_store` picks one from the config):

- :class:`~proxy.tokens.folder.FolderStore` (``tokens.store: folder``, the default): one file per
  account in ``tokens.path``;
- :class:`~proxy.tokens.postgres.PostgresStore` (``tokens.store: postgresql``): one row per account,
  for several replicas sharing one store.

Both give the same guarantees to several processes: every write of a record is serialised and
checked against the version it replaces (compare-and-swap: ``expected``), only `proxy authorize`
writes without a check (it always wins), a *lease* lets one process refresh an account's tokens
while the others wait for its result, and a change made by one process is seen by the others
(:meth:`TokenStore.peek`, :meth:`TokenStore.watch`).
"""

from __future__ import annotations

import abc
import base64
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Hashable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

if TYPE_CHECKING:
    from ..config import Config

FORMAT = "oauth2-mail-proxy-tokens"
VERSION = 1
# scrypt cost: 64 MiB and about 0.2 s per derivation; paid once per account per process (and
# per guess by anyone who steals a token record). Stored per record, so it can be raised later.
DEFAULT_KDF = {"name": "scrypt", "n": 2**16, "r": 8, "p": 1}
MAX_RECORD = 16 * 1024 * 1024


class StoreError(Exception):
    """A record is missing, unreadable or corrupt, or the store failed (the message names the
    file or the database, never a secret)."""


class NoTokens(StoreError):
    """No record exists for the account: it has not been authorized yet."""


class WrongPassword(StoreError):
    """The password does not open this account's record."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now (the database is down): try again later."""


class Conflict(StoreError):
    """The record changed since the version a write expected to replace (another process wrote)."""


Stamp = Hashable  # what :meth:`TokenStore.peek` returns: equal stamps mean an unchanged record
# A record's version: (serial, salt). The serial grows at every write; the salt is new at every
# `proxy authorize`, so a record deleted and authorized again never matches an older version.
Version = tuple[int, str]


@dataclass
class Sealed:
    """A record as read from the store, before decryption."""

    where: str                      # for messages: the file, or "the PostgreSQL record of X"
    header: dict[str, Any]
    ciphertext: bytes
    stamp: Stamp                    # compare with TokenStore.peek() to see whether it changed

    @property
    def meta(self) -> dict[str, Any]:
        return self.header.get("meta", {})

    @property
    def salt(self) -> bytes:
        return _b64d(self.header["kdf"]["salt"])

    @property
    def serial(self) -> int:
        """0 for a file written before serials existed, then growing at every write."""
        serial = self.header.get("serial", 0)
        return serial if isinstance(serial, int) and not isinstance(serial, bool) else 0

    @property
    def version(self) -> Version:
        return (self.serial, str(self.header["kdf"]["salt"]))


@dataclass
class Key:
    """A derived record key, bound to the salt it was derived with."""

    salt: bytes
    kdf: dict[str, Any]
    secret: bytes = field(repr=False)


class Lease(abc.ABC):
    """The right to refresh one account's tokens, held by one process until released.

    ``version`` is the record's version when the lease was taken (None: no record): if it
    differs from the version the holder loaded, someone else wrote meanwhile (read it first).
    """

    account: str
    version: Version | None

    @abc.abstractmethod
    async def release(self) -> None:
        """Give the lease up (idempotent; a write made under the lease releases it too)."""


class TokenStore(abc.ABC):
    """Where the sealed token records live (see the module docstring)."""

    kind: str = ""
    #: how often a process should compare :meth:`peek` with what it loaded (seconds)
    poll_interval: float = 1.0

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the records are, for messages (never with a password)."""

    @abc.abstractmethod
    def where(self, account: str) -> str:
        """Where the account's record is, for messages (a file, or a database record)."""

    @property
    def available(self) -> bool:
        """False while the store cannot be reached (the database is down)."""
        return True

    @property
    def last_error(self) -> str | None:
        """Why the store could not be reached last, for messages."""
        return None

    @property
    def unavailable_for(self) -> float:
        """Seconds since the store became unreachable (0 while it can be reached)."""
        return 0.0

    def check_private(self) -> None:
        """Refuse a store other local users could tamper with (raises StoreError). The folder
        engine checks owners and modes; a database relies on its own access control."""

    async def open(self, *, watch: bool = False) -> None:
        """Prepare the store for use (connect, create or migrate the table); ``watch``: also
        follow changes made by other processes (``proxy serve``)."""

    async def close(self) -> None:
        """Release connections and background tasks."""

    def watch(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(account)`` (case-folded) soon after another process changed a record.

        An engine that cannot push changes ignores this: callers also poll :meth:`peek`."""

    @abc.abstractmethod
    def peek(self, account: str) -> Stamp | None:
        """Cheaply, without waiting: the stamp of the account's current record, None if there is
        none. Raises StoreError (or StoreUnavailable) if that cannot be known now."""

    @abc.abstractmethod
    async def read(self, account: str) -> Sealed:
        """Read the account's record; raises NoTokens, StoreError or StoreUnavailable."""

    async def read_many(self, accounts: list[str]) -> dict[str, Sealed | StoreError]:
        """Read several records at once (for status): by case-folded account, each a record or the
        error reading it (NoTokens if there is none). Raises StoreUnavailable if the store is."""
        found: dict[str, Sealed | StoreError] = {}
        for account in accounts:
            try:
                found[account_key(account)] = await self.read(account)
            except StoreUnavailable:
                raise
            except StoreError as exc:
                found[account_key(account)] = exc
        return found

    @abc.abstractmethod
    async def write(self, account: str, key: Key, payload: dict[str, Any], meta: dict[str, Any], *,
                    expected: Version | None = None, lease: Lease | None = None) -> Sealed:
        """Seal ``payload`` with ``key`` and store it as the account's record (a new version).

        ``expected``: the version this write replaces; if the record has another version now,
        nothing is written and Conflict is raised. None (only `proxy authorize`): replace
        whatever is there. ``lease``: the caller's lease on the account (released by the write).
        """

    @abc.abstractmethod
    async def delete(self, account: str) -> bool:
        """Delete the account's record; False if there was none."""

    @abc.abstractmethod
    async def lease(self, account: str, seconds: float) -> Lease | None:
        """Take the account's lease for up to ``seconds``, or None if another process holds it."""


def open_store(config: Config) -> TokenStore:
    """The store the config names (not opened yet: call :meth:`TokenStore.open`)."""
    tokens = config.token_store
    if tokens.store == "postgresql":
        from .postgres import PostgresStore
        return PostgresStore(tokens.dsn or "", tokens.dsn_password)
    from .folder import FolderStore
    return FolderStore(tokens.path)


def account_key(account: str) -> str:
    return account.casefold()


# ------------------------------------------------------------------------------ sealing
def derive_key(password: str, salt: bytes | None = None, kdf: dict[str, Any] | None = None) -> Key:
    """Derive the AEAD key from a local password (slow on purpose; call off the event loop)."""
    kdf = dict(kdf or DEFAULT_KDF)
    if kdf.get("name") != "scrypt":
        raise StoreError(f"unsupported key derivation {kdf.get('name')!r}")
    salt = salt if salt is not None else secrets.token_bytes(16)
    secret = Scrypt(salt=salt, length=32, n=int(kdf["n"]), r=int(kdf["r"]), p=int(kdf["p"])).derive(
        password.encode("utf-8"))
    return Key(salt=salt, kdf={k: kdf[k] for k in ("name", "n", "r", "p")}, secret=secret)


def key_for(sealed: Sealed, password: str) -> Key:
    """Derive the key of an existing record from a password (slow)."""
    return derive_key(password, sealed.salt, sealed.header["kdf"])


def open_sealed(sealed: Sealed, key: Key) -> dict[str, Any]:
    """Decrypt a record with ``key``; raises WrongPassword if the tag does not verify."""
    if key.salt != sealed.salt:
        raise WrongPassword("key derived for another record")
    try:
        plain = AESGCM(key.secret).decrypt(_b64d(sealed.header["nonce"]), sealed.ciphertext, _aad(sealed.header))
    except InvalidTag:
        raise WrongPassword(f"wrong password for {sealed.header.get('account')}") from None
    try:
        return json.loads(plain.decode("utf-8"))
    except ValueError:
        raise StoreError(f"{sealed.where}: decrypted content is not valid") from None


def seal(account: str, key: Key, payload: dict[str, Any], meta: dict[str, Any],
         serial: int) -> tuple[dict[str, Any], bytes]:
    """Encrypt ``payload``: the clear header and the ciphertext of a new record."""
    header = {"format": FORMAT, "version": VERSION, "account": account,
              "kdf": {**key.kdf, "salt": _b64e(key.salt)}, "aead": "AES-256-GCM",
              "nonce": _b64e(secrets.token_bytes(12)), "serial": serial, "meta": meta}
    ciphertext = AESGCM(key.secret).encrypt(_b64d(header["nonce"]), json.dumps(payload).encode("utf-8"),
                                            _aad(header))
    return header, ciphertext


def check_header(header: Any, where: str, account: str, noun: str = "token record") -> dict[str, Any]:
    """A record's clear header, checked for structure; raises StoreError naming ``where``."""
    try:
        if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
            raise ValueError("unknown format or version")
        _b64d(header["nonce"]), _b64d(header["kdf"]["salt"])
        if header.get("aead") != "AES-256-GCM" or not isinstance(header.get("meta"), dict):
            raise ValueError("unknown cipher")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StoreError(f"{where}: {noun} is corrupt ({exc.__class__.__name__}); "
                         f"run `proxy authorize {account}` again") from None
    owner = header.get("account")
    if not isinstance(owner, str) or owner.casefold() != account.casefold():
        # The header is authenticated, but only against edits: a record copied to another
        # account's name must not open there (with the other account's password and tokens).
        raise StoreError(f"{where}: this {noun} belongs to {str(owner)[:100]!r}, not {account}; "
                         f"run `proxy authorize {account}`")
    return header


def _aad(header: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in header.items() if k != "ciphertext"},
                      sort_keys=True, separators=(",", ":")).encode("utf-8")


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64d(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    return base64.b64decode(text.encode("ascii"), validate=True)
