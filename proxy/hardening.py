"""Process hardening for `proxy serve`: no core dumps, and a warning about secrets others can read.

A running proxy holds decrypted refresh tokens, access tokens and the file keys of unlocked
accounts. A crash that writes a core dump puts them on disk, readable by whoever can read the
dump (on many systems a crash reporter collects it). :func:`disable_core_dumps` sets the core
file size limit to 0 and, on Linux, marks the process not dumpable (which also keeps other
processes of the same user from attaching a debugger to it). Both are POSIX/Linux only and
silently skipped elsewhere (Windows writes no core files; its crash dumps are configured in
Windows Error Reporting: see docs/security.md).
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from pathlib import Path

import yaml

from .config import Config

log = logging.getLogger("proxy")
_PR_SET_DUMPABLE, _PR_GET_DUMPABLE = 4, 3


def disable_core_dumps() -> list[str]:
    """No core dumps from this process; returns what was done (for the log)."""
    done = []
    try:
        import resource
    except ImportError:  # Windows
        return done
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        done.append("core dumps off (RLIMIT_CORE 0)")
    except (OSError, ValueError) as exc:
        log.warning("could not turn core dumps off (%s); a crash could write tokens to disk", exc)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
                done.append("not dumpable (PR_SET_DUMPABLE 0)")
            else:
                log.warning("could not mark the process not dumpable (errno %d)", ctypes.get_errno())
        except (OSError, AttributeError) as exc:
            log.warning("could not mark the process not dumpable (%s)", exc)
    return done


def is_dumpable() -> bool | None:
    """Linux: whether this process may be dumped (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return bool(ctypes.CDLL(None, use_errno=True).prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))


def exposed_secrets(config: Config) -> list[str]:
    """Warnings for client secrets and keys that other users of this computer can read: the config
    file holding ``client_secret`` inline, or a ``client_secret_file`` / key file, readable by others."""
    if os.name == "nt" or config.source is None:
        return []
    warnings = []
    try:
        data = yaml.safe_load(config.source.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return []
    identity = data.get("identity") if isinstance(data, dict) else None
    identity = identity if isinstance(identity, dict) else {}
    app_only = identity.get("app_only") if isinstance(identity.get("app_only"), dict) else {}
    inline = [key for key, present in (("identity.client_secret", identity.get("client_secret")),
                                       ("identity.app_only.client_secret", app_only.get("client_secret"))) if present]
    if inline and _readable_by_others(config.source):
        warnings.append(f"{config.source} holds {' and '.join(inline)} and is readable by other users of this "
                        f"computer: `chmod 600 {config.source}`, or move the secret to a file of its own "
                        "(client_secret_file) or the environment (PROXY_IDENTITY_CLIENT_SECRET)")
    base = config.source.resolve().parent
    keys = ["client_secret_file", "private_key_file" if app_only.get("private_key_file") else "certificate_file"]
    for key in keys:  # (a certificate file holds the private key too unless private_key_file is given)
        value = app_only.get(key)
        if isinstance(value, str) and value:
            path = Path(value).expanduser()
            path = path if path.is_absolute() else base / path
            if _readable_by_others(path):
                warnings.append(f"identity.app_only.{key}: {path} is readable by other users of this computer: "
                                f"`chmod 600 {path}`")
    return warnings


def _readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False
