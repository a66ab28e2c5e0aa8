"""What differs on Windows, tested on both branches here on Linux (the platform and the OS calls
are parameters of proxy/system.py's functions), and a scan that no POSIX-only call runs unguarded."""

from __future__ import annotations

import ast
import io
import signal as real_signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from proxy import system
from proxy.tokens import folder as token_folder

ROOT = Path(__file__).resolve().parent.parent


def test_default_config_path_is_under_localappdata_on_windows_only():
    env = {"LOCALAPPDATA": r"C:\Users\alice\AppData\Local", "USERPROFILE": r"C:\Users\alice"}
    assert system.default_config_path("win32", env) == r"C:\Users\alice\AppData\Local\oauth2-mail-proxy\config.yaml"
    assert system.default_config_path("win32", {"USERPROFILE": r"C:\Users\bob"}) == \
        r"C:\Users\bob\AppData\Local\oauth2-mail-proxy\config.yaml"
    assert system.default_config_path("linux", env) == "config.yaml"


def test_current_user_names_the_account():
    assert system.current_user("win32", {"USERNAME": "alice", "USERDOMAIN": "KANZLEI"}) == "KANZLEI\\alice"
    assert system.current_user("win32", {"USERNAME": "mailproxy"}) == "mailproxy"
    assert system.current_user("linux", {}) == "root" or system.current_user("linux", {})  # the real account


class FakeLoop:
    def __init__(self, supports_signals: bool = True):
        self.handlers: dict[int, object] = {}
        self.soon: list[object] = []
        self.supports = supports_signals

    def add_signal_handler(self, number, handler):
        if not self.supports:
            raise NotImplementedError
        self.handlers[number] = handler

    def remove_signal_handler(self, number):
        self.handlers.pop(number, None)

    def call_soon_threadsafe(self, callback):
        self.soon.append(callback)


class FakeSignals:
    """The signal module as Windows has it: no SIGHUP, a SIGBREAK (Ctrl+Break)."""
    SIGINT, SIGTERM, SIGBREAK = 2, 15, 21

    def __init__(self):
        self.installed: dict[int, object] = {2: "default-int", 15: "default-term", 21: "default-break"}

    def signal(self, number, handler):
        old, self.installed[number] = self.installed[number], handler
        return old


def test_posix_signals_go_through_the_event_loop():
    loop, calls = FakeLoop(), []
    remove = system.install_stop_handlers(loop, lambda: calls.append("stop"), lambda: calls.append("reload"),
                                          platform="linux", signals=real_signal)
    assert loop.handlers == {real_signal.SIGINT: loop.handlers[real_signal.SIGINT],
                             real_signal.SIGTERM: loop.handlers[real_signal.SIGTERM],
                             real_signal.SIGHUP: loop.handlers[real_signal.SIGHUP]}
    loop.handlers[real_signal.SIGTERM]()
    loop.handlers[real_signal.SIGHUP]()
    assert calls == ["stop", "reload"]
    remove()
    assert loop.handlers == {}
    # a loop that cannot (not the main thread) is not an error
    system.install_stop_handlers(FakeLoop(False), lambda: None, None, platform="linux", signals=real_signal)()


def test_windows_ctrl_c_and_ctrl_break_stop_through_python_handlers():
    loop, signals, calls = FakeLoop(supports_signals=False), FakeSignals(), []
    remove = system.install_stop_handlers(loop, lambda: calls.append("stop"), lambda: calls.append("reload"),
                                          platform="win32", signals=signals)
    assert loop.handlers == {}                                  # asyncio's add_signal_handler is not used
    for number in (signals.SIGINT, signals.SIGBREAK, signals.SIGTERM):
        assert callable(signals.installed[number])
        signals.installed[number](number, None)                 # what Windows does on Ctrl+C / Ctrl+Break
    assert calls == []                                          # handed to the loop, not run in the handler
    for callback in loop.soon:
        callback()
    assert calls == ["stop", "stop", "stop"]
    remove()
    assert signals.installed == {2: "default-int", 15: "default-term", 21: "default-break"}


def test_private_folder_posix_mode(tmp_path):
    folder = tmp_path / "a" / "tokens"
    assert system.make_private_dir(folder, platform="linux") is True
    assert folder.stat().st_mode & 0o777 == 0o700
    assert system.make_private_dir(folder, platform="linux") is False       # existing: left alone


def test_private_folder_windows_access_list(tmp_path):
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        if command[0] == "whoami":
            return SimpleNamespace(stdout='"kanzlei\\\\alice","S-1-5-21-1-2-3-1001"\r\n', returncode=0)
        return SimpleNamespace(stdout="", returncode=0)

    folder = tmp_path / "tokens"
    assert system.make_private_dir(folder, platform="win32", run=run) is True
    assert commands[1] == ["icacls", str(folder), "/inheritance:r", "/grant:r", "*S-1-5-18:(OI)(CI)F",
                           "*S-1-5-32-544:(OI)(CI)F", "*S-1-5-21-1-2-3-1001:(OI)(CI)F"]

    def broken(command, **kwargs):
        raise FileNotFoundError("icacls")
    assert system.make_private_dir(tmp_path / "other", platform="win32", run=broken) is True  # inherited list stays


def test_a_console_that_cannot_show_a_character_escapes_it():
    raw = io.BytesIO()
    console = io.TextIOWrapper(raw, encoding="cp1252")        # a redirected Windows console
    system.safe_console(console, None)                         # None: pythonw.exe has no streams
    print("Entra ID → App registrations; 東京", file=console)
    console.flush()
    assert raw.getvalue().decode("cp1252") == "Entra ID \\u2192 App registrations; \\u6771\\u4eac\n"


def test_token_file_replacement_waits_for_a_windows_reader_but_not_on_posix():
    attempts, sleeps = [], []

    def busy_twice(src, dst):
        attempts.append((src, dst))
        if len(attempts) <= 2:
            raise PermissionError(13, "The process cannot access the file because it is being used")

    token_folder._replace("tmp", Path("dst"), windows=True, replace=busy_twice, sleep=sleeps.append)
    assert len(attempts) == 3 and sleeps == [0.05, 0.1]
    attempts.clear()
    with pytest.raises(PermissionError):
        token_folder._replace("tmp", Path("dst"), windows=False, replace=busy_twice, sleep=sleeps.append)
    assert len(attempts) == 1

    def always_busy(src, dst):
        raise PermissionError(13, "busy")
    with pytest.raises(PermissionError):
        token_folder._replace("tmp", Path("dst"), windows=True, replace=always_busy, sleep=lambda s: None)
    token_folder._fsync_dir(Path("/nonexistent-on-windows"), windows=True)      # no directory handle on Windows


# ------------------------------------------------------------------ no POSIX-only call unguarded
POSIX_ONLY_MODULES = {"fcntl", "pwd", "grp", "resource", "termios", "tty", "pty", "syslog", "posix"}
POSIX_ONLY_ATTRIBUTES = {
    "os": {"getuid", "geteuid", "getgid", "getegid", "fchmod", "fchown", "chown", "lchown", "fork", "setsid",
           "killpg", "getpgid", "sysconf", "O_NOFOLLOW", "O_CLOEXEC", "O_DIRECTORY", "statvfs", "mkfifo",
           "setuid", "setgid", "initgroups", "getloadavg", "sched_getaffinity", "WNOHANG", "wait4"},
    "signal": {"SIGHUP", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGQUIT", "SIGPIPE", "SIGCHLD", "SIGALRM", "alarm",
               "setitimer", "pthread_sigmask", "pthread_kill", "sigwait"},
    "socket": {"AF_UNIX", "SO_REUSEPORT"},
    "*": {"add_signal_handler", "remove_signal_handler", "add_reader", "add_writer"},  # not on Proactor loops
}
GUARD_WORDS = ("hasattr", "sys.platform", "os.name", "is_windows", "windows", "getattr")
GUARD_EXCEPTIONS = {"AttributeError", "ImportError", "ModuleNotFoundError", "NotImplementedError", "OSError",
                    "Exception"}


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST], source: str) -> bool:
    child = node
    while child in parents:
        parent = parents[child]
        if isinstance(parent, ast.If) and any(w in ast.get_source_segment(source, parent.test) for w in GUARD_WORDS):
            return True
        if isinstance(parent, ast.IfExp) and any(w in ast.get_source_segment(source, parent.test)
                                                 for w in GUARD_WORDS):
            return True
        if isinstance(parent, ast.Try) and child in parent.body:
            for handler in parent.handlers:
                names = {n.id for n in ast.walk(handler.type) if isinstance(n, ast.Name)} if handler.type is not None else {"Exception"}
                if names & GUARD_EXCEPTIONS:
                    return True
        child = parent
    return False


def posix_only_uses(path: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    found = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            absolute = isinstance(node, ast.Import) or node.level == 0
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if absolute and any(m.split(".")[0] in POSIX_ONLY_MODULES for m in modules):
                name = "import " + ",".join(modules)
        elif isinstance(node, ast.Attribute):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if node.attr in POSIX_ONLY_ATTRIBUTES["*"] or node.attr in POSIX_ONLY_ATTRIBUTES.get(owner or "", ()):
                name = f"{owner or '...'}.{node.attr}"
        if name and not _guarded(node, parents, source):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    return found


# Code that only ever runs where the guard named here holds (the guard's own branch is tested).
GUARDED_ELSEWHERE = {
    # proxy.accept.listen() builds a Listener only where the loop can watch sockets (_has_readers);
    # on Windows' Proactor loop it serves through asyncio instead (test_descriptors.py tests both).
    "proxy/accept.py": ("add_reader", "remove_reader"),
    # FolderStore.check_private() returns at once where os.name == "nt" (the folder's ACL decides there).
    "proxy/tokens/folder.py": ("geteuid",),
}


def test_no_posix_only_call_runs_unguarded_on_windows():
    """proxy/system.py holds the platform branches (tested above); anywhere else a POSIX-only call
    must sit under a platform/hasattr check or a try that catches its absence."""
    uses = [use for path in sorted((ROOT / "proxy").rglob("*.py")) if path.name != "system.py"
            for use in posix_only_uses(path)
            if not use.endswith(GUARDED_ELSEWHERE.get(path.relative_to(ROOT).as_posix(), ()))]
    assert uses == []


def test_the_scan_finds_an_unguarded_call(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    sample = tmp_path / "sample.py"
    sample.write_text("import os, signal, sys\nimport resource\n"
                      "def f(loop):\n    os.getuid()\n    loop.add_signal_handler(signal.SIGHUP, f)\n"
                      "    if hasattr(os, 'getuid'):\n        os.getuid()\n"
                      "    try:\n        import fcntl\n    except ImportError:\n        pass\n")
    assert posix_only_uses(sample) == ["sample.py:2: import resource", "sample.py:4: os.getuid",
                                       "sample.py:5: loop.add_signal_handler", "sample.py:5: signal.SIGHUP"]


def test_error_texts_are_shortened_between_words():
    from proxy.hints import shorten
    from proxy.tokens.identity import describe_msal_error
    long = "AADSTS700016: Application with identifier 'x' was not found in the directory 'Kanzlei'. " * 10
    text = describe_msal_error({"error": "unauthorized_client", "error_description": long + "\r\nTrace ID: 1"})
    assert len(text) <= 330 and text.endswith(" ...") and text[:-4].split()[-1] in long.split()
    assert shorten("two  words\n", 40) == "two words"
