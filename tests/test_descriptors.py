"""Running out of file descriptors: `proxy serve` raises its soft limit to the hard one; near the
limit new connections are refused with the protocol's own words, at the limit they wait in the
backlog; either way the log gets one line per interval (not one traceback per attempt), open
sessions keep working, and accepting resumes by itself once descriptors are free again.

Both run in subprocesses with a small RLIMIT_NOFILE (``prlimit``), so the test process keeps its own."""

from __future__ import annotations

import imaplib
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from proxy.accept import _target_limit
from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.harness import ProxyProcess
from tests.opsbed import copy_config

ROOT = Path(__file__).resolve().parent.parent


def _greeting(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    try:
        return sock.recv(200)
    except (socket.timeout, OSError):
        return b""


def _limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


def test_serve_raises_its_soft_limit_refuses_near_the_limit_and_recovers(smtp_authorized: Path, tmp_path: Path,
                                                                         pki, dovecot) -> None:
    config_path = copy_config(smtp_authorized, tmp_path / "site")
    proxy = ProxyProcess(config_path, pki, log_level="INFO",
                         command=("prlimit", "--nofile=100:200", sys.executable, "-m", "proxy"))
    sessions: list[imaplib.IMAP4] = []
    try:
        assert _limits(proxy.pid) == (200, 200)
        assert "open-file limit 200 (raised from 100)" in proxy.log_text()
        # Log in until the proxy refuses: it keeps descriptors in reserve for upstream connections.
        refusal = b""
        for _ in range(150):
            sock = socket.create_connection(("127.0.0.1", proxy.imap_port), timeout=10)
            greeting = _greeting(sock, 10)
            sock.close()
            if greeting.startswith(b"* BYE"):
                refusal = greeting
                break
            imap = imaplib.IMAP4("127.0.0.1", proxy.imap_port, timeout=30)
            imap.login(SMTP_USER, SMTP_PASSWORD)
            sessions.append(imap)
        assert refusal == b"* BYE Too many connections to the proxy, try again later\r\n"
        assert 40 <= len(sessions) < 100, len(sessions)  # (200 - 64 reserved) / 2 per session, less its own
        # A flood of connections while at the limit: every one is refused at once, none is lost in a traceback.
        flood = [socket.create_connection(("127.0.0.1", proxy.imap_port), timeout=10) for _ in range(300)]
        answers = [_greeting(sock, 10) for sock in flood]
        for sock in flood:
            sock.close()
        assert set(answers) == {refusal}
        for imap in sessions:  # the open sessions are untouched
            assert imap.noop()[0] == "OK"
        # Free some descriptors: accepting resumes by itself.
        for imap in sessions[:10]:
            imap.logout()
        del sessions[:10]
        deadline = time.monotonic() + 10
        while True:
            try:
                imap = imaplib.IMAP4("127.0.0.1", proxy.imap_port, timeout=30)
                imap.login(SMTP_USER, SMTP_PASSWORD)
                sessions.append(imap)
                break
            except imaplib.IMAP4.abort:
                assert time.monotonic() < deadline, "accepting did not resume"
                time.sleep(0.2)
        assert sessions[-1].noop()[0] == "OK"
        log = proxy.log_text()
        assert log.count("out of file descriptors") == 1, log[-3000:]
        assert "Traceback" not in log
    finally:
        for imap in sessions:
            try:
                imap.logout()
            except (OSError, imaplib.IMAP4.error):
                pass
        proxy.stop()


_SERVER = textwrap.dedent("""
    import asyncio, logging, sys
    from proxy.accept import listen

    class Hello(asyncio.Protocol):
        def connection_made(self, transport):
            transport.write(b"hello\\r\\n")

    async def main():
        listener = await listen("TEST", "127.0.0.1", 0, Hello, reserve=0)
        print(listener.sockets[0].getsockname()[1], flush=True)
        await asyncio.sleep(3600)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    asyncio.run(main())
""")


def test_accept_at_the_limit_waits_logs_once_and_resumes(tmp_path: Path) -> None:
    """With no reserve, accept() itself fails (EMFILE): the listener pauses and retries by itself."""
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(["prlimit", "--nofile=40:40", sys.executable, "-c", _SERVER], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=log_file)
    clients: list[socket.socket] = []
    try:
        port = int(server.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(60)]
        time.sleep(1)  # every connection the server could accept has its greeting by now
        greeted = [c for c in clients if _greeting(c, 0.05) == b"hello\r\n"]
        waiting = [c for c in clients if c not in greeted]
        assert 20 <= len(greeted) < 40 and waiting  # the rest wait in the backlog, connected but not accepted
        time.sleep(1.5)  # several retries at the limit
        for c in greeted[:len(waiting) + 5]:  # free descriptors: the server sees these connections end
            c.close()
        assert all(_greeting(c, 5) == b"hello\r\n" for c in waiting)
        log = log_path.read_text()
        assert log.count("out of file descriptors") == 1, log[-3000:]
        assert "new connections wait in the backlog" in log and "accepting connections again" in log
        assert "Traceback" not in log and server.poll() is None
    finally:
        for c in clients:
            c.close()
        server.kill()
        server.wait()


@pytest.mark.parametrize("soft, hard, infinity, expected", [
    (1024, 20000, -1, 20000), (20000, 20000, -1, 20000), (1024, -1, -1, 1 << 20), (-1, -1, -1, -1)])
def test_target_limit(soft: int, hard: int, infinity: int, expected: int) -> None:
    assert _target_limit(soft, hard, infinity) == expected


def test_where_the_loop_cannot_watch_sockets_asyncio_serves_the_same_listener(monkeypatch) -> None:
    """Windows' Proactor loop has no add_reader: listen() then serves through asyncio's own accept
    loop on the same bound sockets, TLS layer included (the branch forced here on Linux)."""
    import asyncio

    from proxy import accept

    monkeypatch.setattr(accept, "_has_readers", lambda loop: False)

    class Hello(asyncio.Protocol):
        def connection_made(self, transport):
            transport.write(b"hello\r\n")

    async def scenario() -> bytes:
        listener = await accept.listen("TEST", "127.0.0.1", 0, Hello)
        assert isinstance(listener, accept._AsyncioListener) and listener.is_serving()
        port = listener.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        greeting = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        listener.close()
        await listener.wait_closed()
        assert not listener.is_serving()
        return greeting

    assert asyncio.run(scenario()) == b"hello\r\n"
