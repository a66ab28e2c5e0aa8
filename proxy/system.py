"""What differs between Windows and Linux (POSIX), in one place.

Every function takes the platform (``sys.platform``'s value) and the operating-system calls it
makes as parameters with the real ones as defaults, so both branches run in the unit tests on
Linux (tests/test_system.py) without faking the whole OS:

- the default config location (``%LOCALAPPDATA%`` on Windows, the working folder elsewhere);
- stop and reload signals (asyncio's ``add_signal_handler`` on POSIX; ``signal.signal`` for
  Ctrl+C and Ctrl+Break on Windows, where a service wrapper stops a console program that way);
- a private folder (mode 0700 on POSIX; on Windows an access list for the user, SYSTEM and
  administrators, as ``%LOCALAPPDATA%`` has by inheritance);
- who the proxy runs as, for messages;
- a console that cannot print a character (a redirected Windows console is cp1252) must not
  turn a message into a traceback.

The event loop is asyncio's default on each system: on Windows the Proactor loop (I/O
completion ports, no 512-socket limit as with select()), which has no ``add_signal_handler``
and no ``add_reader``; tests/test_system.py scans the code so neither is used outside a guard.
Replacing a token file while another process reads it is retried on Windows
(proxy/tokens/folder.py ``_replace``, tested with both branches there too).
"""

from __future__ import annotations

import asyncio
import getpass
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

APP_DIR = "oauth2-mail-proxy"


def is_windows(platform: str = sys.platform) -> bool:
    return platform.startswith("win")


def default_config_path(platform: str = sys.platform, environ: Mapping[str, str] | None = None) -> str:
    """Where the config is when neither ``-c`` nor ``$PROXY_CONFIG`` says: on Windows
    ``%LOCALAPPDATA%\\oauth2-mail-proxy\\config.yaml`` (a service or task does not start in the
    user's folder, and that folder is private to the user); elsewhere ``config.yaml`` in the
    working folder (a systemd unit or container passes ``-c``)."""
    environ = os.environ if environ is None else environ
    if not is_windows(platform):
        return "config.yaml"
    base = environ.get("LOCALAPPDATA") or "\\".join((environ.get("USERPROFILE") or "~", "AppData", "Local"))
    return "\\".join((base.rstrip("\\/"), APP_DIR, "config.yaml"))


def current_user(platform: str = sys.platform, environ: Mapping[str, str] | None = None) -> str:
    """The account the proxy runs as, for messages ("cannot write ... as user X")."""
    environ = os.environ if environ is None else environ
    if is_windows(platform):
        name = environ.get("USERNAME") or "?"
        domain = environ.get("USERDOMAIN")
        return f"{domain}\\{name}" if domain else name
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid without a passwd entry (containers)
        getuid = getattr(os, "getuid", None)
        return f"uid {getuid()}" if getuid else "?"


# ------------------------------------------------------------------------------ signals
def install_stop_handlers(loop: asyncio.AbstractEventLoop, on_stop: Callable[[], None],
                          on_reload: Callable[[], None] | None = None, *, platform: str = sys.platform,
                          signals: Any = signal) -> Callable[[], None]:
    """Call ``on_stop`` on SIGINT/SIGTERM (Ctrl+C, Ctrl+Break on Windows) and ``on_reload`` on
    SIGHUP where it exists. Both run on ``loop``. Returns a function that removes the handlers."""
    if is_windows(platform):
        return _install_windows(loop, on_stop, signals)
    installed = []
    wanted = [(signals.SIGINT, on_stop), (signals.SIGTERM, on_stop)]
    if on_reload is not None and hasattr(signals, "SIGHUP"):
        wanted.append((signals.SIGHUP, on_reload))
    for number, handler in wanted:
        try:
            loop.add_signal_handler(number, handler)
            installed.append(number)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass

    def remove() -> None:
        for number in installed:
            try:
                loop.remove_signal_handler(number)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
    return remove


def _install_windows(loop: asyncio.AbstractEventLoop, on_stop: Callable[[], None], signals: Any) -> Callable[[], None]:
    """asyncio has no add_signal_handler on Windows: Python's own handlers run in the main thread
    between bytecodes and hand the work to the loop (waking it up)."""
    def handler(number: int, frame: object) -> None:
        loop.call_soon_threadsafe(on_stop)

    previous = []
    for name in ("SIGINT", "SIGBREAK", "SIGTERM"):
        number = getattr(signals, name, None)
        if number is None:
            continue
        try:
            previous.append((number, signals.signal(number, handler)))
        except (ValueError, OSError):  # not the main thread
            pass

    def remove() -> None:
        for number, old in previous:
            try:
                signals.signal(number, old)
            except (ValueError, OSError, TypeError):
                pass
    return remove


# ------------------------------------------------------------------------------ private folders
def make_private_dir(path: Path, *, platform: str = sys.platform, run: Callable[..., Any] = subprocess.run,
                     environ: Mapping[str, str] | None = None) -> bool:
    """Create ``path`` (and parents) if missing, readable by the current user only. Returns True
    if it was created. On POSIX: mode 0700. On Windows the access list is set to the user,
    SYSTEM and administrators without inheritance (icacls, by security identifiers so it works in
    every language); if that fails the folder keeps its inherited list, which under
    ``%LOCALAPPDATA%`` is private already."""
    path = Path(path)
    if path.is_dir():
        return False
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if is_windows(platform):
        sid = _windows_user_sid(run)
        grants = ["*S-1-5-18:(OI)(CI)F", "*S-1-5-32-544:(OI)(CI)F"]
        if sid:
            grants.append(f"*{sid}:(OI)(CI)F")
        try:
            run(["icacls", str(path), "/inheritance:r", "/grant:r", *grants], capture_output=True, timeout=30,
                check=False)
        except (OSError, subprocess.SubprocessError):
            pass
    return True


def _windows_user_sid(run: Callable[..., Any]) -> str | None:
    """The current user's security identifier, from ``whoami /user /fo csv /nh``."""
    try:
        result = run(["whoami", "/user", "/fo", "csv", "/nh"], capture_output=True, text=True, timeout=30,
                     check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    fields = [f.strip().strip('"') for f in (result.stdout or "").strip().split(",")]
    return fields[-1] if fields and fields[-1].startswith("S-1-") else None


# ------------------------------------------------------------------------------ console
def safe_console(*streams: TextIO | None) -> None:
    """Characters the console cannot show are printed escaped instead of raising.

    A Windows console redirected to a file (Task Scheduler, a service wrapper) writes cp1252, in
    which "→" or a Microsoft error text in another script has no code: without this, a message
    would end as a UnicodeEncodeError traceback. Under pythonw.exe the streams are None.
    """
    for stream in streams:
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is None or (getattr(stream, "encoding", "") or "").lower().replace("-", "") == "utf8":
            continue
        try:
            reconfigure(errors="backslashreplace")
        except (ValueError, OSError):
            pass
