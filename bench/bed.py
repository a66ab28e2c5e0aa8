"""The benchmark's test bed: identity provider, Dovecot, SMTP sink and the proxy, each in its own process.

Every peer runs in a separate process so that none of them competes with the benchmark client
for its interpreter lock: the identity provider (``python -m tests.idp``), a discarding SMTP
sink (``python -m bench.sink``), a Dovecot tuned for thousands of sessions (:class:`BenchDovecot`)
and ``python -m proxy serve`` (through tests/harness.py's :class:`ProxyProcess`), with IMAP, SMTP and POP3. The account is
authorized with the real ``proxy authorize`` and the tests' fake browser.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import ssl
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.dovecot import Dovecot
from bench.emailproxy import EmailProxyProcess, install as install_emailproxy, version as emailproxy_version
from tests.harness import ProxyProcess, authorize, free_port, pop3_section, end_process, wait_port, write_config
from tests.pki import TestPKI

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ID = "test-client"
# The direct client's token: what `proxy authorize` gets with a pop3 section (POP3 needs its permission).
DIRECT_SCOPES = ("https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/SMTP.Send "
                 "https://outlook.office.com/POP.AccessAsUser.All")


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0 and hard != resource.RLIM_INFINITY and hard < 65536:
        try:  # root may raise the hard limit too (CAP_SYS_RESOURCE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
            return 65536
        except (ValueError, OSError):
            pass
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class IdpProcess:
    """``python -m tests.idp`` in a subprocess; controlled over HTTPS (``/_test/<method>``)."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([sys.executable, "-m", "tests.idp", "--port", "0", "--dir", str(directory)],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, text=True)
        line = self.process.stdout.readline().strip()
        if not line.startswith("https://"):
            self.stop()
            raise RuntimeError(f"the identity provider did not start ({line!r})")
        self.url = line
        self.pki = TestPKI(directory / "ca.pem", directory / "server.pem", directory / "server.key")
        self._context = ssl.create_default_context(cafile=str(self.pki.ca_file))
        self.client_id = CLIENT_ID

    # what tests/harness.py and tests/dovecot.py read from an identity provider
    def authority(self, tenant: str = "test-tenant") -> str:
        return f"{self.url}/{tenant}"

    @property
    def introspection_url(self) -> str:
        return f"{self.url}/introspect"

    def control(self, name: str, **kwargs):
        request = urllib.request.Request(f"{self.url}/_test/{name}", data=json.dumps(kwargs).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, context=self._context, timeout=10) as response:
            return json.load(response)["result"]

    def mint_access_token(self, user: str, lifetime: int = 7200, scope: str = DIRECT_SCOPES) -> str:
        return self.control("mint_access_token", user=user, lifetime=lifetime, scope=scope)

    def stop(self) -> None:
        end_process(self.process)


class SinkProcess:
    """``python -m bench.sink``: an SMTP server on loopback that discards every message."""

    def __init__(self):
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, "-m", "bench.sink", "--port", str(self.port)],
                                        stdin=subprocess.DEVNULL, cwd=ROOT)
        wait_port("127.0.0.1", self.port, process=self.process)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class BenchDovecot(Dovecot):
    """tests/dovecot.py's Dovecot, tuned to hold thousands of sessions from one user and address.

    - ``mail_max_userip_connections`` raised (the proxy and the direct client connect as one
      user from 127.0.0.1);
    - imap-login in "high-performance mode" (``service_count = 0``, one long-lived process per
      core, many clients each), and imap processes serving many clients each, so 5,000 sessions
      need some 50 processes instead of 5,000;
    - logins: Dovecot's auth cache keyed on the token is left off (every login introspects the
      token at the identity provider, as Microsoft's servers validate every token).
    """

    def __init__(self, *args, max_sessions: int = 6000, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_sessions = max_sessions

    def config_text(self) -> str:
        text = super().config_text()
        for expected in ("mail_max_userip_connections = 1000", "service imap-login {"):
            if expected not in text:
                raise RuntimeError(f"tests/dovecot.py changed: no {expected!r} in its configuration to tune")
        text = text.replace("mail_max_userip_connections = 1000",
                            f"mail_max_userip_connections = {self.max_sessions * 3}")
        per_process = 200
        processes = max(4, self.max_sessions * 2 // per_process + 2)
        login_clients = self.max_sessions * 2 + 1000
        text = text.replace("service imap-login {", f"""service imap-login {{
  service_count = 0
  process_min_avail = {os.cpu_count() or 2}
  process_limit = {max(4, os.cpu_count() or 2)}
  client_limit = {login_clients}
  vsz_limit = 2G""", 1)
        return text + f"""
service imap {{
  service_count = 0
  process_limit = {processes}
  client_limit = {per_process}
  vsz_limit = 1G
}}
service auth {{
  client_limit = {login_clients + 100}
}}
service anvil {{
  client_limit = {login_clients + 100}
}}
default_client_limit = {login_clients}
imap_idle_notify_interval = 30 mins
submission_max_mail_size = 200M
"""


#: The open-file limits ``proxy serve`` is started with: a common Linux default (soft 1,024) and
#: this machine's hard limit; ``serve`` raises its soft limit to the hard one itself.
PROXY_NOFILE = (1024, 20000)


class ServeProcess(ProxyProcess):
    """tests/harness.py's ProxyProcess (``python -m proxy serve``), optionally on uvloop's event loop,
    started with the open-file limits of :data:`PROXY_NOFILE` (through ``prlimit``)."""

    def __init__(self, config_path: Path, pki: TestPKI, *, log_level: str = "INFO", uvloop: bool = False):
        command: tuple[str, ...] = (sys.executable, "-m", "proxy")
        if uvloop:  # uvloop.install() before the CLI's asyncio.run(): the same proxy code on libuv's loop.
            command = (sys.executable, "-c",
                       "import sys, uvloop; uvloop.install(); from proxy.cli import main; sys.exit(main())")
        if shutil.which("prlimit"):
            command = ("prlimit", f"--nofile={PROXY_NOFILE[0]}:{PROXY_NOFILE[1]}", *command)
        super().__init__(config_path, pki, log_level=log_level, command=command)
        settings = yaml.safe_load(config_path.read_text())["imap"]
        self.imaps_port = int(settings["tls_listen"].rsplit(":", 1)[1]) if settings.get("tls_listen") else 0

    def open_file_limit(self) -> int:
        for line in Path(f"/proc/{self.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
        raise RuntimeError("no open-file limit in /proc")


@dataclass
class Account:
    user: str
    password: str


class Bed:
    """Everything the benchmarks talk to. ``start()`` brings it up, ``stop()`` tears it down."""

    def __init__(self, *, max_sessions: int = 6000, keep: bool = False, log=print, emailproxy: bool = True):
        self.max_sessions = max_sessions
        self.with_emailproxy = emailproxy
        self.emailproxy: EmailProxyProcess | None = None
        self.emailproxy_version = ""
        self.keep = keep
        self.log = log
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-"))
        self.workdir.chmod(0o755)  # Dovecot's processes run as other users
        self.idp: IdpProcess | None = None
        self.sink: SinkProcess | None = None
        self.dovecot: BenchDovecot | None = None
        self.proxy: ServeProcess | None = None
        self.config_path: Path | None = None
        self.account = Account("bench@example.com", "bench local password")
        self.uvloop = False

    def start(self, uvloop: bool = False) -> "Bed":
        started = time.monotonic()
        self.fd_limit = raise_fd_limit()
        if self.fd_limit < 2 * self.max_sessions + 200:
            self.log(f"warning: open-file limit {self.fd_limit} is too low for {self.max_sessions} sessions "
                     f"through the proxy (2 per session): run as root or raise `ulimit -Hn`")
        self.idp = IdpProcess(self.workdir / "idp")
        self.sink = SinkProcess()
        self.dovecot = BenchDovecot(self.workdir / "dovecot", self.idp.pki, self.idp, self.sink.port,
                                    max_sessions=self.max_sessions)
        self.dovecot.start()
        pki = self.idp.pki
        self.config_path = write_config(
            self.workdir / "proxy", idp=self.idp, pki=pki, dovecot=self.dovecot,
            accounts=[self.account.user], pop3=pop3_section(self.dovecot, pki),
            tls={"cert_file": str(pki.cert_file), "key_file": str(pki.key_file)},
            imap={"tls_listen": f"127.0.0.1:{free_port()}"},
            limits={"max_connections": self.max_sessions * 2 + 1000})
        result = authorize(self.config_path, self.account.user, self.account.password, self.idp.pki)
        if result.returncode != 0:
            raise RuntimeError(f"proxy authorize failed:\n{result.stderr}")
        self.start_proxy(uvloop)
        self.direct_token = self.idp.mint_access_token(self.account.user)
        if self.with_emailproxy:
            python = install_emailproxy(self.log)
            self.emailproxy_version = emailproxy_version(python)
            # emailproxy's password flow: the identity provider checks the user's password itself
            self.idp.control("set_user_password", user=self.account.user, password=self.account.password)
            self.emailproxy = EmailProxyProcess(self.workdir / "emailproxy", python, idp=self.idp,
                                                dovecot=self.dovecot, user=self.account.user,
                                                ca_file=self.idp.pki.ca_file)
        self.log(f"test bed up in {time.monotonic() - started:.1f} s (fd limit {self.fd_limit}, "
                 f"work dir {self.workdir})")
        return self

    def start_proxy(self, uvloop: bool | None = None) -> None:
        """(Re)start ``proxy serve`` (a fresh process, for measurements not flattered by memory that
        earlier sessions left free in its heap)."""
        if uvloop is not None:
            self.uvloop = uvloop
        if self.proxy is not None:
            self.proxy.stop()
        self.proxy = ServeProcess(self.config_path, self.idp.pki, log_level="INFO", uvloop=self.uvloop)
        wait_port("127.0.0.1", self.proxy.smtp_port, process=self.proxy.process)

    @property
    def imap_direct(self) -> tuple[str, int]:
        return self.dovecot.imap_host, self.dovecot.imap_port

    @property
    def imap_proxy(self) -> tuple[str, int]:
        return "127.0.0.1", self.proxy.imap_port

    @property
    def pop3_direct(self) -> tuple[str, int]:
        return self.dovecot.pop3_host, self.dovecot.pop3_port

    @property
    def pop3_proxy(self) -> tuple[str, int]:
        return "127.0.0.1", self.proxy.pop3_port

    @property
    def smtp_direct(self) -> tuple[str, int]:
        return self.dovecot.submission_host, self.dovecot.submission_port

    @property
    def smtp_proxy(self) -> tuple[str, int]:
        return "127.0.0.1", self.proxy.smtp_port

    @property
    def imap_emailproxy(self) -> tuple[str, int]:
        return "127.0.0.1", self.emailproxy.imap_port

    @property
    def smtp_emailproxy(self) -> tuple[str, int]:
        return "127.0.0.1", self.emailproxy.smtp_port

    def client_tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.idp.pki.ca_file))

    def stop(self) -> None:
        for part in (self.emailproxy, self.proxy, self.dovecot, self.sink, self.idp):
            if part is not None:
                try:
                    part.stop()
                except Exception as exc:  # keep tearing down the rest
                    self.log(f"stopping {part.__class__.__name__}: {exc}")
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Bed":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
