"""Several `proxy serve` replicas on one token store behind HAProxy: the bed of the scale-out tests
(tests/test_scale.py) and of the replica benchmark (``python -m bench --only replicas``).

- :class:`PostgresServer`: a throw-away PostgreSQL cluster from Debian's packages (initdb and
  pg_ctl from /usr/lib/postgresql/<version>/bin, run as the ``postgres`` user when root) in a
  temporary folder, on a free loopback port, with password (SCRAM) logins; a database and role
  per test; faults: every connection terminated, a restart; ``pg_dump`` of a database.
- :class:`HAProxy`: Debian's HAProxy in ``mode tcp`` in front of the replicas' IMAP and SMTP
  listeners, round robin, no stickiness, health-checking each replica's ``/readyz`` on its admin
  listener, retrying a connection refused by a dead replica on another one; other frontends
  (:class:`Route`: the PROXY protocol, a claimed client address) for tests/test_proxy_protocol.py.
- :class:`Replicas`: N `proxy serve` processes (tests/harness.py's ProxyProcess) for the same
  accounts on one store (a PostgreSQL DSN, or one token folder on this host), each with its own
  listeners and admin port; kill -9, restart, and `proxy authorize` against the shared store.

PostgreSQL or HAProxy missing is an error, not a skip (bash tests/run.sh installs both).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness import ProxyProcess, authorize, end_process, free_port, wait_port, write_config

PACKAGES = "postgresql haproxy"


class Missing(RuntimeError):
    """PostgreSQL or HAProxy is not installed."""


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's program folder (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    if not found:
        raise Missing(f"PostgreSQL not found in /usr/lib/postgresql: install {PACKAGES} (bash tests/run.sh does)")
    return found[-1].parent


class PostgresServer:
    """A PostgreSQL cluster in a temporary folder, listening on 127.0.0.1:``port``."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.workdir = Path(tempfile.mkdtemp(prefix="test-postgres-"))
        self.data = self.workdir / "data"
        self.port = free_port()
        self.password = secrets.token_urlsafe(18)   # of the superuser "postgres"
        self.user = "postgres" if os.geteuid() == 0 else None
        self.log_path = self.workdir / "postgres.log"

    def _run(self, *args: str, check: bool = True, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess:
        result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                                user=self.user, cwd=self.workdir, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed ({result.returncode}): {result.stderr}\n"
                               f"{self.log_text()[-4000:]}")
        return result

    def start(self) -> PostgresServer:
        if self.user is not None:
            shutil.chown(self.workdir, self.user, self.user)
        pwfile = self.workdir / "superuser-password"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self.user is not None:
            shutil.chown(pwfile, self.user, self.user)
        self._run(self.bin / "initdb", "-D", self.data, "-U", "postgres", f"--pwfile={pwfile}", "-E", "UTF8",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", timeout=120)
        pwfile.unlink()
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.workdir}'\nfsync = off\nsynchronous_commit = off\n"
                       "full_page_writes = off\nmax_connections = 200\nshared_buffers = 32MB\n")
        self._pg_ctl("start")
        return self

    def _pg_ctl(self, action: str, *extra: str) -> None:
        self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.log_path, "-w", "-t", "60", action, *extra)

    def stop(self) -> None:
        if self.data.exists():
            self._run(self.bin / "pg_ctl", "-D", self.data, "-w", "-t", "30", "stop", "-m", "fast", check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self) -> None:
        """A clean restart (``pg_ctl restart -m fast``): every connection ends, the server is down briefly."""
        self._pg_ctl("restart", "-m", "fast")

    def outage(self, seconds: float) -> None:
        """Down for ``seconds`` (``pg_ctl stop -m fast``, then start again)."""
        self._pg_ctl("stop", "-m", "fast")
        time.sleep(seconds)
        self._pg_ctl("start")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def sql(self, statement: str, database: str = "postgres") -> str:
        result = subprocess.run([str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                                 "-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", statement],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PGPASSWORD": self.password})
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr}")
        return result.stdout.strip()

    def create_database(self, name: str) -> tuple[str, str]:
        """A database and its owner role called ``name``: returns (DSN without password, password)."""
        password = secrets.token_urlsafe(18)
        self.sql(f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{password}'")
        self.sql(f"CREATE DATABASE \"{name}\" OWNER \"{name}\"")
        return f"postgresql://{name}@127.0.0.1:{self.port}/{name}", password

    def terminate_connections(self, database: str) -> int:
        """End every connection to ``database`` (``pg_terminate_backend``); returns how many."""
        return int(self.sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            f"WHERE datname = '{database}' AND pid <> pg_backend_pid()"))

    def connections(self, database: str) -> int:
        return int(self.sql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}'"))

    def dump(self, database: str) -> str:
        """The real ``pg_dump`` of ``database`` (plain SQL, data included)."""
        result = subprocess.run([str(self.bin / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                                 database], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PGPASSWORD": self.password})
        if result.returncode != 0:
            raise RuntimeError(f"pg_dump failed: {result.stderr}")
        return result.stdout


@dataclass(frozen=True)
class Route:
    """One HAProxy frontend (``name``, on a free port) to each replica's ``target`` port (a key of
    its ports: imap, smtp, ...), with options for each server line (``send-proxy-v2``) and extra
    frontend lines (``tcp-request connection set-src ...``)."""

    name: str
    target: str
    server_options: str = ""
    frontend_lines: tuple[str, ...] = ()


class HAProxy:
    """HAProxy in ``mode tcp``: one frontend per protocol, round robin over the replicas, no
    stickiness, ``/readyz`` as the health check, a refused connection retried on another replica."""

    def __init__(self, directory: Path, replicas: list[dict[str, int]],
                 routes: tuple[Route, ...] = (Route("imap", "imap"), Route("smtp", "smtp"))):
        self.binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not os.access(self.binary, os.X_OK):
            raise Missing(f"haproxy not found: install {PACKAGES} (bash tests/run.sh does)")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.routes = routes
        self.ports = {route.name: free_port() for route in routes}
        self.config_path = directory / "haproxy.cfg"
        self.config_path.write_text(self.config_text(replicas))
        self.log_path = directory / "haproxy.log"
        self.process: subprocess.Popen | None = None

    def config_text(self, replicas: list[dict[str, int]]) -> str:
        lines = ["global", "    maxconn 5000", "defaults", "    mode tcp", "    timeout connect 3s",
                 "    timeout client 1h", "    timeout server 1h", "    timeout check 2s", "    retries 3",
                 "    option redispatch 1", ""]
        for route in self.routes:
            name = route.name
            lines += [f"frontend {name}", f"    bind 127.0.0.1:{self.ports[name]}",
                      *(f"    {line}" for line in route.frontend_lines), f"    default_backend {name}_replicas",
                      "", f"backend {name}_replicas", "    balance roundrobin", "    option httpchk GET /readyz",
                      "    http-check expect status 200"]
            for index, replica in enumerate(replicas):
                lines.append(f"    server r{index} 127.0.0.1:{replica[route.target]} check port {replica['admin']} "
                             f"inter 500ms fall 2 rise 1 {route.server_options}".rstrip())
            lines.append("")
        return "\n".join(lines)

    def start(self) -> HAProxy:
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen([self.binary, "-db", "-f", str(self.config_path)], stdout=log,
                                        stderr=subprocess.STDOUT)
        log.close()
        for port in self.ports.values():
            wait_port("127.0.0.1", port, process=self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            end_process(self.process)


class Replicas:
    """``count`` `proxy serve` processes on one token store (``tokens``: the config's tokens section)."""

    def __init__(self, directory: Path, *, idp, pki, dovecot, accounts: list[str], count: int,
                 tokens: dict[str, Any], log_level: str = "INFO", **sections: Any):
        self.directory, self.idp, self.pki = directory, idp, pki
        self.configs: list[Path] = []
        self.admin_ports: list[int] = []
        for index in range(count):
            admin = free_port()
            self.admin_ports.append(admin)
            self.configs.append(write_config(directory / f"replica{index}", idp=idp, pki=pki, dovecot=dovecot,
                                             accounts=accounts, tokens=tokens, admin={"listen": f"127.0.0.1:{admin}"},
                                             **sections))
        self.log_level = log_level
        self.processes: list[ProxyProcess | None] = [None] * count
        self.logs: list[Path] = []

    def __len__(self) -> int:
        return len(self.configs)

    def ports(self, index: int) -> dict[str, int]:
        from tests.harness import listen_port
        config = self.configs[index]
        ports = {"imap": listen_port(config, "imap"), "smtp": listen_port(config, "smtp"),
                 "admin": self.admin_ports[index]}
        pop3 = listen_port(config, "pop3")
        return {**ports, "pop3": pop3} if pop3 is not None else ports

    def authorize(self, user: str, password: str, **kwargs) -> subprocess.CompletedProcess:
        """`proxy authorize` (through the fake browser) with replica 0's config: the store is shared."""
        result = authorize(self.configs[0], user, password, self.pki, **kwargs)
        if result.returncode != 0:
            raise RuntimeError(f"proxy authorize {user} failed:\n{result.stderr}")
        return result

    def start(self, index: int | None = None) -> Replicas:
        for i in range(len(self)) if index is None else (index,):
            process = ProxyProcess(self.configs[i], self.pki, log_level=self.log_level)
            wait_port("127.0.0.1", self.admin_ports[i], process=process.process)
            self.processes[i] = process
            self.logs.append(process.log_path)
        return self

    def kill(self, index: int) -> None:
        """``kill -9`` of one replica."""
        process = self.processes[index]
        if process is not None:
            process.process.send_signal(signal.SIGKILL)
            process.stop()
            self.processes[index] = None

    def stop(self) -> None:
        for i, process in enumerate(self.processes):
            if process is not None:
                process.stop()
                self.processes[i] = None

    def log_texts(self) -> list[tuple[str, str]]:
        return [(path.name, path.read_text(encoding="utf-8", errors="replace")) for path in self.logs]
