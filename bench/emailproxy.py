"""emailproxy (Simon Robinson's Email OAuth 2.0 Proxy, PyPI package ``emailproxy``) as a second baseline.

The most used peer of this project: the same job (password logins from a mail client, XOAUTH2
upstream), in one Python file. The benchmark installs it into its own virtual environment
(``bench/.venv-emailproxy``, never a dependency of the project), configures it against the
same test bed and runs it headless:

- ``--no-gui``, a config file with one account whose ``oauth2_flow = password`` (and no
  ``permission_url``, which would make emailproxy wait for an interactive sign-in): emailproxy
  sends the password the client logs in with to the identity provider's token endpoint
  (the resource owner password credentials grant, which ``tests/idp.py`` answers as Microsoft
  documents it), caches the tokens in its config file, encrypted with that password, and
  logs in upstream with XOAUTH2;
- ``SSL_CERT_FILE`` points Python's default trust store (which emailproxy uses for the
  identity provider and both upstream servers) at the test CA;
- IMAP: plain on loopback, implicit TLS to Dovecot's IMAPS; SMTP: plain on loopback, STARTTLS
  to Dovecot's submission service, exactly as the proxy is set up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

from tests.harness import free_port, end_process, wait_port

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(__file__).resolve().parent / ".venv-emailproxy"
PACKAGE = "emailproxy"
SCOPES = ("https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/SMTP.Send offline_access")


def install(log) -> Path:
    """The virtual environment's Python with emailproxy installed (made on first use)."""
    python = VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import emailproxy"], capture_output=True,
                                          env={**os.environ, "PYTHONPATH": ""}, cwd="/").returncode == 0:
        return python
    log(f"installing {PACKAGE} into {VENV} (the benchmark's own environment)")
    venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    result = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", PACKAGE],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip install {PACKAGE} failed:\n{result.stderr[-2000:]}")
    return python


def version(python: Path) -> str:
    result = subprocess.run([str(python), "-m", "pip", "show", PACKAGE], capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return "?"


class EmailProxyProcess:
    """``emailproxy --no-gui`` serving one IMAP and one SMTP port in front of the bed's Dovecot."""

    def __init__(self, workdir: Path, python: Path, *, idp, dovecot, user: str, ca_file: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.imap_port, self.smtp_port = free_port(), free_port()
        self.config = workdir / "emailproxy.config"
        self.log_path = workdir / "emailproxy.log"
        authority = idp.authority()
        self.config.write_text(f"""[Server setup]

[IMAP-{self.imap_port}]
server_address = {dovecot.imap_host}
server_port = {dovecot.imap_port}
local_address = 127.0.0.1

[SMTP-{self.smtp_port}]
server_address = {dovecot.submission_host}
server_port = {dovecot.submission_port}
server_starttls = True
local_address = 127.0.0.1

[Account setup]

[{user}]
token_url = {authority}/oauth2/v2.0/token
oauth2_scope = {SCOPES}
oauth2_flow = password
client_id = {idp.client_id}

[emailproxy]
delete_account_token_on_password_error = False
""")
        env = {**os.environ, "SSL_CERT_FILE": str(ca_file), "PYTHONUNBUFFERED": "1", "PYTHONPATH": ""}
        env.pop("REQUESTS_CA_BUNDLE", None)
        env.pop("CURL_CA_BUNDLE", None)
        self._stdout = open(workdir / "emailproxy.out", "wb")
        self.process = subprocess.Popen([str(python), "-m", "emailproxy", "--no-gui", "--config-file", str(self.config),
                                         "--log-file", str(self.log_path)],
                                        stdin=subprocess.DEVNULL, stdout=self._stdout, stderr=subprocess.STDOUT,
                                        cwd=workdir, env=env)
        try:
            wait_port("127.0.0.1", self.imap_port, process=self.process, timeout=30)
            wait_port("127.0.0.1", self.smtp_port, process=self.process, timeout=30)
        except Exception:
            self.stop()
            raise RuntimeError(f"emailproxy did not start:\n{self.log_text()[-3000:]}") from None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        parts = []
        for path in (self.log_path, self.config.parent / "emailproxy.out"):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def stop(self) -> None:
        end_process(self.process)
        self._stdout.close()


if __name__ == "__main__":  # python -m bench.emailproxy: install only
    print(install(print), version(install(print)))
    sys.exit(0)
