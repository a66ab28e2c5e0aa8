"""Pieces for the fault, hostile-client and secrets suites (tests/test_faults.py, tests/test_secrets.py).

- :class:`Bed`: one config directory with its accounts, `proxy authorize` and `proxy serve` run for
  real (serve logs at DEBUG), and a record of every text the run produced: the proxy's log
  (stdout and stderr, so tracebacks too), the output of every `proxy authorize`, every byte a
  test client received, the token files. :func:`leaks` looks for secrets in all of it.
- :class:`Client`: a raw line-oriented TCP client that keeps everything it receives.
- :class:`FakeTLSFailure`: an upstream that answers like a server but never completes TLS.
"""

from __future__ import annotations

import base64
import imaplib
import poplib
import re
import smtplib
import socket
import threading
import time
from pathlib import Path

from tests.harness import ProxyProcess, authorize, free_port, write_config

PASSWORD = "local password 1"


class Bed:
    """A configured proxy for some accounts; everything it outputs is kept for :func:`leaks`."""

    def __init__(self, directory: Path, idp, pki, dovecot, users: list[str], **sections) -> None:
        self.directory, self.idp, self.pki, self.dovecot, self.users = directory, idp, pki, dovecot, users
        self.config = write_config(directory, idp=idp, pki=pki, dovecot=dovecot, accounts=users, **sections)
        self.proxy: ProxyProcess | None = None
        self.logs: list[Path] = []
        self.outputs: list[tuple[str, str]] = []     # (what, text)
        self.passwords: set[str] = set()             # every password typed, right or wrong
        self.clients: list[Client] = []

    # -- the proxy -----------------------------------------------------------------------
    def authorize(self, user: str, password: str = PASSWORD, *, check: bool = True, **kwargs):
        self.passwords.add(password)
        result = authorize(self.config, user, password, self.pki, **kwargs)
        self.outputs.append((f"authorize {user} stdout", result.stdout))
        self.outputs.append((f"authorize {user} stderr", result.stderr))
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def start(self) -> Bed:
        self.proxy = ProxyProcess(self.config, self.pki)
        self.logs.append(self.proxy.log_path)
        wait_listening(self.proxy.smtp_port)
        return self

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        """The log of the latest `proxy serve` (running or stopped)."""
        return self.logs[-1].read_text(encoding="utf-8", errors="replace") if self.logs else ""

    def token_file(self, user: str) -> Path:
        return self.directory / "tokens" / f"{user.casefold()}.tokens"

    # -- clients ---------------------------------------------------------------------------
    def imap(self) -> imaplib.IMAP4:
        return imaplib.IMAP4("127.0.0.1", self.proxy.imap_port, timeout=40)

    def imap_login(self, user: str, password: str = PASSWORD) -> str:
        """Log in with imaplib; returns "OK" or the error text (kept for :func:`leaks`)."""
        self.passwords.add(password)
        imap = self.imap()
        try:
            typ, data = imap.login(user, password)
            self.outputs.append(("imap login reply", repr(data)))
            imap.logout()
            return typ
        except imaplib.IMAP4.error as exc:
            self.outputs.append(("imap login error", str(exc)))
            imap.shutdown()
            return str(exc)

    def smtp_login(self, user: str, password: str = PASSWORD) -> tuple[int, bytes]:
        """AUTH PLAIN with smtplib; returns (code, text) (kept for :func:`leaks`)."""
        self.passwords.add(password)
        client = smtplib.SMTP("127.0.0.1", self.proxy.smtp_port, timeout=40)
        try:
            client.ehlo("client.test")
            client.user, client.password = user, password
            try:
                code, text = client.auth("PLAIN", client.auth_plain)
            except smtplib.SMTPAuthenticationError as exc:
                code, text = exc.smtp_code, exc.smtp_error
            self.outputs.append(("smtp auth reply", f"{code} {text!r}"))
            return code, text
        finally:
            client.close()

    def pop3_login(self, user: str, password: str = PASSWORD) -> str:
        """USER/PASS with poplib (the config needs a pop3 section); returns "+OK" or the error text."""
        self.passwords.add(password)
        client = poplib.POP3("127.0.0.1", self.proxy.pop3_port, timeout=40)
        try:
            client.user(user)
            reply = client.pass_(password).decode()
            self.outputs.append(("pop3 login reply", reply))
            client.quit()
            return "+OK"
        except poplib.error_proto as exc:
            self.outputs.append(("pop3 login error", str(exc)))
            client.close()
            return exc.args[0].decode("utf-8", "replace")

    def client(self, port: int | str = "imap", timeout: float = 30) -> Client:
        port = {"imap": self.proxy.imap_port, "smtp": self.proxy.smtp_port, "pop3": self.proxy.pop3_port}.get(port, port)
        client = Client(int(port), timeout)
        self.clients.append(client)
        return client

    # -- what the run produced ---------------------------------------------------------
    def texts(self) -> list[tuple[str, str]]:
        texts = list(self.outputs)
        for path in self.logs:
            texts.append((path.name, path.read_text(encoding="utf-8", errors="replace")))
        for client in self.clients:
            texts.append((f"client on port {client.port}", client.received.decode("utf-8", "replace")))
        tokens = self.directory / "tokens"
        if tokens.is_dir():
            for path in tokens.iterdir():
                if path.is_file():
                    texts.append((str(path), path.read_text(encoding="utf-8", errors="replace")))
        return texts

    def secrets(self) -> set[str]:
        return {*self.idp.issued_tokens(), *self.passwords}


_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{12,}={0,2}")


def leaks(texts: list[tuple[str, str]], secrets: set[str]) -> list[str]:
    """Where a secret appears in ``texts``, as such or inside base64 (AUTH PLAIN/LOGIN, XOAUTH2)."""
    secrets = {s for s in secrets if s and len(s) >= 8}
    found = []
    for what, text in texts:
        for secret in secrets:
            if secret in text:
                found.append(f"{secret[:6]}... in {what}")
        for run in _BASE64_RUN.findall(text):
            for shift in range(4):  # the secret may start anywhere inside the encoded text
                chunk = run[shift:]
                chunk = chunk[:len(chunk) - len(chunk) % 4]
                try:
                    decoded = base64.b64decode(chunk).decode("utf-8", "replace")
                except ValueError:
                    continue
                for secret in secrets:
                    if secret in decoded:
                        found.append(f"base64 of {secret[:6]}... in {what}")
    return sorted(set(found))


def wait_listening(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Client:
    """A raw TCP client for IMAP, SMTP or POP3 that keeps every byte it received."""

    def __init__(self, port: int, timeout: float = 30) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.received = b""
        self._buffer = b""

    def send(self, data: bytes, may_be_cut_off: bool = False) -> None:
        """Send ``data``; with ``may_be_cut_off`` the server may close before it has all of it
        (it refuses an oversized line and closes: the rest then meets a reset, which is fine)."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            if not may_be_cut_off:
                raise

    def line(self) -> bytes:
        """The next line (b"" at end of stream)."""
        while b"\n" not in self._buffer:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                line, self._buffer = self._buffer, b""
                return line
            self.received += data
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def until(self, prefix: bytes) -> list[bytes]:
        """Lines up to and including the first that starts with ``prefix``."""
        lines = []
        while True:
            line = self.line()
            assert line, f"closed before {prefix!r}: {lines}"
            lines.append(line)
            if line.startswith(prefix):
                return lines

    def read_to_end(self) -> bytes:
        """Everything until the server closes."""
        data = self._buffer
        self._buffer = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return data
            self.received += chunk
            data += chunk

    def close(self) -> None:
        self.sock.close()


class FakeTLSFailure:
    """An "upstream" whose TLS never works: on the IMAP port it greets in clear text where the
    TLS handshake should be; on the SMTP port it offers STARTTLS, says 220, then sends garbage."""

    def __init__(self) -> None:
        self.imap_port, self.smtp_port = free_port(), free_port()
        self._listeners = [socket.create_server(("127.0.0.1", p)) for p in (self.imap_port, self.smtp_port)]
        for listener, handler in zip(self._listeners, (self._imap, self._smtp)):
            threading.Thread(target=self._accept, args=(listener, handler), daemon=True).start()

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()

    @staticmethod
    def _accept(listener: socket.socket, handler) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    @staticmethod
    def _imap(conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(b"* OK IMAP4rev1 server without TLS\r\n")
                conn.recv(65536)
            except OSError:
                pass

    @staticmethod
    def _smtp(conn: socket.socket) -> None:
        with conn:
            try:
                reader = conn.makefile("rb")
                conn.sendall(b"220 fake.test ESMTP\r\n")
                while line := reader.readline():
                    if line.upper().startswith(b"EHLO"):
                        conn.sendall(b"250-fake.test\r\n250-AUTH XOAUTH2\r\n250 STARTTLS\r\n")
                    elif line.upper().startswith(b"STARTTLS"):
                        conn.sendall(b"220 2.0.0 Ready to start TLS\r\n")
                        conn.sendall(b"this is not a TLS server hello\r\n" * 4)
                        conn.recv(65536)
                        return
                    else:
                        conn.sendall(b"500 5.5.1 what?\r\n")
            except OSError:
                pass
