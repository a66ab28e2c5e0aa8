"""A real web proxy for the tests: Debian's tinyproxy on loopback, speaking HTTP CONNECT.

``TinyProxy(workdir, auth=("user", "password"), connect_ports=[...])`` starts one in the
foreground (``-d``) on a free port; ``requests_for(host, port)`` counts the CONNECT requests
its log shows for a target, which is how a test proves that traffic went through it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.harness import end_process, free_port, wait_port


class TinyProxy:
    def __init__(self, workdir: Path, *, auth: tuple[str, str] | None = None,
                 connect_ports: list[int] | None = None):
        binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
        if not Path(binary).exists():
            raise RuntimeError("tinyproxy is missing: install Debian's tinyproxy package (tests/run.sh does)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.workdir / "tinyproxy.log"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 60", "MaxClients 200", "LogLevel Connect",
                 f'LogFile "{self.log_path}"', f'PidFile "{self.workdir}/tinyproxy.pid"', "DisableViaHeader Yes"]
        if auth is not None:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        for port in connect_ports or []:
            lines.append(f"ConnectPort {port}")   # with any ConnectPort line, CONNECT to other ports is refused (403)
        (self.workdir / "tinyproxy.conf").write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen([binary, "-d", "-c", str(self.workdir / "tinyproxy.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port("127.0.0.1", self.port, process=self.process)
        except Exception:
            self.stop()
            raise

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def requests_for(self, host: str, port: int) -> int:
        """CONNECT requests seen for ``host:port`` so far."""
        return len(re.findall(rf"Request \(file descriptor \d+\): CONNECT {re.escape(host)}:{port} ", self.log_text()))

    def stop(self) -> None:
        end_process(self.process)

    def __enter__(self) -> "TinyProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
