"""Helpers for end-to-end tests: write a config, run `proxy authorize` and `proxy serve` for real.

The proxy runs as a subprocess through its real entry point (`python -m proxy`), so these
tests exercise exactly what a user runs. Logs go to a file that tests inspect (for example to
check that no secret ever reaches them).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
FAKE_BROWSER = ROOT / "tests" / "fake_browser.py"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 15.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def write_config(directory: Path, *, idp, pki, dovecot, accounts: list[str | dict], **sections) -> Path:
    """A config.yaml pointing at the test identity provider and Dovecot; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    data = {
        "identity": {"authority": idp.authority(), "client_id": idp.client_id, "ca_file": str(pki.ca_file),
                     "timeout": 5},
        "imap": {"listen": f"127.0.0.1:{free_port()}", "upstream": f"127.0.0.1:{dovecot.imap_port}",
                 "ca_file": str(pki.ca_file)},
        "smtp": {"listen": f"127.0.0.1:{free_port()}",
                 "upstream": f"{dovecot.submission_host}:{dovecot.submission_port}", "ca_file": str(pki.ca_file)},
        "tokens": {"path": "tokens"},
        "accounts": [a if isinstance(a, dict) else {"username": a} for a in accounts],
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def pop3_section(dovecot, pki, **settings) -> dict:
    """A ``pop3`` config section: a free port on loopback, Dovecot's POP3S as the upstream."""
    return {"listen": f"127.0.0.1:{free_port()}", "upstream": f"{dovecot.pop3_host}:{dovecot.pop3_port}",
            "ca_file": str(pki.ca_file), **settings}


def listen_port(config_path: Path, section: str = "imap") -> int | None:
    """The port of ``section``'s listener; None if the config has no such section."""
    data = yaml.safe_load(config_path.read_text())
    if data.get(section) is None:
        return None
    return int(data[section]["listen"].rsplit(":", 1)[1])


def proxy_env(pki, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "BROWSER": f"{sys.executable} {FAKE_BROWSER} %s",
        "FAKE_BROWSER_CA": str(pki.ca_file),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def authorize(config_path: Path, user: str, password: str, pki, *, timeout: float = 20,
              extra_args: tuple[str, ...] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `proxy authorize USER --password-stdin` with the fake browser as $BROWSER."""
    browser_log = config_path.parent / "browser.log"
    return subprocess.run(
        [sys.executable, "-m", "proxy", "-c", str(config_path), "authorize", user, "--password-stdin",
         "--timeout", str(timeout), *extra_args],
        input=password + "\n", capture_output=True, text=True, timeout=timeout + 30, cwd=ROOT,
        env=env or proxy_env(pki, FAKE_BROWSER_LOG=str(browser_log)))


class ProxyProcess:
    """`proxy serve` in a subprocess, logging at DEBUG to a file."""

    def __init__(self, config_path: Path, pki, *, log_level: str = "DEBUG", args: tuple[str, ...] = (),
                 command: tuple[str, ...] = (sys.executable, "-m", "proxy")):
        self.config_path = config_path
        self.log_path = config_path.parent / f"proxy-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [*command, "-c", str(config_path), "--log-level", log_level, *args, "serve"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=proxy_env(pki))
        self.imap_port = listen_port(config_path, "imap")
        self.smtp_port = listen_port(config_path, "smtp")
        self.pop3_port = listen_port(config_path, "pop3")  # None without a pop3 section
        try:
            wait_port("127.0.0.1", self.imap_port, process=self.process)
            self._wait_logged("SMTP listening on ", f":{self.smtp_port}")  # (bound after IMAP's)
            if self.pop3_port is not None:
                wait_port("127.0.0.1", self.pop3_port, process=self.process)
        except Exception:
            self.stop()
            raise RuntimeError(f"proxy did not start:\n{self.log_text()}") from None

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_logged(self, *parts: str, timeout: float = 15.0) -> None:
        """Wait for a log line holding all ``parts`` (a listener's line: connecting to it instead
        would make a session, which tests that count sessions would see)."""
        deadline = time.monotonic() + timeout
        while not any(all(p in line for p in parts) for line in self.log_text().splitlines()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"proxy did not log {parts!r}")
            time.sleep(0.05)

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = 10) -> int:
        end_process(self.process, timeout)
        self._log.close()
        return self.process.returncode


def end_process(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited after ``timeout`` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TcpForwarder:
    """A TCP forwarder to ``target`` that a test can cut (connection refused) and restore.

    Lets a test take the identity provider away from the proxy only: Dovecot keeps reaching
    it directly for introspection, as Microsoft's servers would. ``cut(i)`` resets the i-th
    connection (both sides) and only it; subclasses may override ``_pump`` to meddle with bytes.
    """

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.host, self.port = host, free_port(host)
        self.address = f"{host}:{self.port}"
        self.connections = 0                       # connections accepted so far
        self.pairs: list[tuple[socket.socket, socket.socket]] = []   # (client side, target side)
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self.start()

    def start(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and reset the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            listener.close()
        self.cut_all()

    close = stop

    def cut(self, index: int) -> None:
        with self._lock:
            pair = self.pairs[index]
        self._reset(pair)

    def cut_all(self) -> None:
        with self._lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            self._reset(pair)

    @staticmethod
    def _reset(pair: tuple[socket.socket, socket.socket]) -> None:
        for sock in pair:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                sock.shutdown(socket.SHUT_RDWR)  # (close alone waits for a pump blocked in sendall)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self.connections += 1
                self.pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_target: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
