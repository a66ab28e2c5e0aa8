"""The folder engine (``tokens.store: folder``, the default): one token file per account.

``<tokens.path>/<account>.tokens`` holds the record as JSON (see :mod:`.store`), mode 0600 in a
0700 folder. Files are written to a temporary file in the same folder and renamed over the old
one, so a crash leaves the old or the new version, never a torn one.

Several processes on one host may share the folder (two `proxy serve` processes, `proxy
authorize` while the proxy runs). Beside each token file, ``<account>.lock`` (empty, 0600)
serialises them: a write takes its lock, checks that the file still has the version it
expects to replace (compare-and-swap), and only then replaces it; the *lease* on an account is
the same lock held for the length of a token refresh. The operating system releases it when
its holder exits, even by ``kill -9``, so no lease outlives a crashed process. Lock files are
never deleted (a process may be waiting on one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from .store import (MAX_RECORD, Conflict, Key, Lease, NoTokens, Sealed, StoreError, TokenStore, Version, _b64d,
                    _b64e, check_header, seal)

if os.name == "nt":
    import msvcrt
else:
    import fcntl

log = logging.getLogger("proxy.tokens")
_SAFE = set("abcdefghijklmnopqrstuvwxyz0123456789.@_-+")
SUFFIX, LOCK_SUFFIX = ".tokens", ".lock"
# How long a write (`proxy authorize`, `proxy forget`) waits for another process's lease: at most
# one token refresh, which the identity provider's timeout bounds.
LOCK_WAIT = 60.0


class FolderStore(TokenStore):
    """The folder of token files."""

    kind = "folder"
    poll_interval = 1.0

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def describe(self) -> str:
        return f"the token folder {self.directory}"

    def where(self, account: str) -> str:
        return str(self.path_for(account))

    def check_private(self) -> None:
        """Refuse a token folder or file another user could tamper with (POSIX; raises StoreError).

        A folder writable by others (or owned by another user) lets them replace, delete or
        plant token files; a file readable or writable by others, or owned by another user,
        exposes or swaps sealed tokens. On Windows the folder's ACL decides: see docs/security.md.
        """
        if os.name == "nt":
            return
        problems = []
        uid = os.geteuid()
        try:
            st = self.directory.stat()
        except FileNotFoundError:
            return  # created 0700 at the first write
        except OSError as exc:
            raise StoreError(f"token folder {self.directory}: cannot check it ({exc.strerror})") from None
        if st.st_uid != uid:
            problems.append(f"the token folder {self.directory} belongs to user id {st.st_uid}, not to the user "
                            f"running the proxy (id {uid})")
        if st.st_mode & 0o022:
            problems.append(f"the token folder {self.directory} is writable by other users "
                            f"(mode {stat.S_IMODE(st.st_mode):04o}; `chmod 700 {self.directory}`)")
        try:
            files = sorted(self.directory.glob("*.tokens"))
        except OSError:
            files = []
        for path in files:
            try:
                st = path.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # (a link or a folder in the way: only we can put it in our folder; that
                #            account's logins say what is wrong with it)
            if st.st_uid != uid:
                problems.append(f"the token file {path} belongs to user id {st.st_uid}, not {uid}")
            elif st.st_mode & 0o077:
                problems.append(f"the token file {path} is open to other users "
                                f"(mode {stat.S_IMODE(st.st_mode):04o}; `chmod 600 {path}`)")
        if problems:
            raise StoreError("; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5
                                                        else "") + ". Other users could read or replace the "
                             "tokens: fix the ownership and permissions (or point tokens.path to a private folder)")

    def path_for(self, account: str) -> Path:
        """File name for an account: readable, case-folded, safe on Windows and POSIX."""
        return self.directory / f"{_file_name(account)}{SUFFIX}"

    def lock_path(self, account: str) -> Path:
        return self.directory / f"{_file_name(account)}{LOCK_SUFFIX}"

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

    # -- the interface -------------------------------------------------------------------
    async def open(self, *, watch: bool = False) -> None:
        if removed := await asyncio.to_thread(self.remove_leftovers):
            log.info("removed %d temporary file(s) left in %s by an interrupted write", removed, self.directory)

    def peek(self, account: str) -> tuple[int, int, int] | None:
        path = self.path_for(account)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror}") from None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def read(self, account: str) -> Sealed:
        return await asyncio.to_thread(self.read_file, account)

    async def write(self, account: str, key: Key, payload: dict[str, Any], meta: dict[str, Any], *,
                    expected: Version | None = None, lease: Lease | None = None) -> Sealed:
        return await asyncio.to_thread(self.write_file, account, key, payload, meta, expected, lease)

    async def delete(self, account: str) -> bool:
        return await asyncio.to_thread(self.delete_file, account)

    async def lease(self, account: str, seconds: float) -> Lease | None:
        return await asyncio.to_thread(self.lease_now, account)

    # -- blocking parts (also used directly by the tests) ----------------------------------
    def read_file(self, account: str) -> Sealed:
        """Read and check the file's structure; raises NoTokens or StoreError."""
        path = self.path_for(account)
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                raw = fh.read(MAX_RECORD)
        except FileNotFoundError:
            raise NoTokens(f"no tokens stored for {account} (expected {path})") from None
        except OSError as exc:
            raise StoreError(f"{path}: cannot read token file ({exc.strerror})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            ciphertext = _b64d(header.pop("ciphertext"))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreError(f"{path}: token file is corrupt ({exc.__class__.__name__}); "
                             f"run `proxy authorize {account}` again") from None
        header = check_header(header, str(path), account, "token file")
        return Sealed(str(path), header, ciphertext, (st.st_mtime_ns, st.st_size, st.st_ino))

    def write_file(self, account: str, key: Key, payload: dict[str, Any], meta: dict[str, Any],
                   expected: Version | None = None, lease: Lease | None = None) -> Sealed:
        """Seal and atomically replace the account's file, under its lock (see :meth:`write`)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = lease if isinstance(lease, _FileLock) and lease.held else None
        own = lock is None
        if own:
            lock = _FileLock(self.lock_path(account), account)
            self._lock_waiting(lock)
        try:
            current = self._version_now(account)
            if expected is not None and current != expected:
                raise Conflict(f"{self.path_for(account)} changed meanwhile")
            header, ciphertext = seal(account, key, payload, meta, current[0] + 1 if current else 1)
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
            return Sealed(str(path), header, ciphertext, self.peek(account) or (0, 0, 0))
        finally:
            lock.release_now()

    def delete_file(self, account: str) -> bool:
        lock = _FileLock(self.lock_path(account), account)
        if self.directory.is_dir():
            self._lock_waiting(lock)
        try:
            self.path_for(account).unlink()
            return True
        except FileNotFoundError:
            return False
        finally:
            lock.release_now()

    def _version_now(self, account: str) -> Version | None:
        """The version of the file as it is now (None if there is none; a corrupt one is (0, ""))."""
        try:
            return self.read_file(account).version
        except NoTokens:
            return None
        except StoreError:
            return (0, "")

    def lease_now(self, account: str) -> _FileLock | None:
        lock = _FileLock(self.lock_path(account), account)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not lock.try_acquire():
            return None
        lock.version = self._version_now(account)
        return lock

    def _lock_waiting(self, lock: _FileLock) -> None:
        deadline = time.monotonic() + LOCK_WAIT
        delay = 0.01
        while not lock.try_acquire():
            if time.monotonic() > deadline:
                raise StoreError(f"{lock.path}: another process has held this lock for more than "
                                 f"{LOCK_WAIT:.0f} s; try again (a stuck `proxy serve`?)")
            time.sleep(delay)
            delay = min(0.1, delay * 2)


class _FileLock(Lease):
    """An exclusive lock on ``<account>.lock``: flock on POSIX, a byte-range lock on Windows.

    Both belong to the open file: the OS drops them when the holder closes the file or exits.
    """

    def __init__(self, path: Path, account: str):
        self.path, self.account = path, account
        self.version: Version | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o600)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot open the lock file ({exc.strerror})") from None
        try:
            if os.name == "nt":
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release_now(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing drops the lock (flock, and msvcrt's lock of this handle)

    async def release(self) -> None:
        self.release_now()


def _file_name(account: str) -> str:
    return "".join(c if c in _SAFE else f"%{ord(c):02x}" for c in account.casefold())


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
