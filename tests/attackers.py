"""Attackers on the same machine, for the attack tests (tests/test_attacks.py) and `python -m bench.attacks`.

- :class:`Guessers`: N parallel password guessers over IMAP (``LOGIN``) and SMTP (``AUTH PLAIN``),
  each in a loop: connect, guess, and either wait for the answer or hang up as soon as no
  success came back within ``hang_up_after`` seconds (the attacker learns "wrong" from the
  silence, and hanging up used to free its connection at once).
- :func:`silent_connections`: connections that never say anything.

Everything runs on its own asyncio loop in a background thread, so the test's own client (the
"real user") is not slowed down by the attack's bookkeeping.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time


class Guessers:
    def __init__(self, account: str, imap_port: int, smtp_port: int, *, count: int = 300,
                 passwords: list[str] | None = None, hang_up_after: float | None = None, host: str = "127.0.0.1"):
        self.account, self.host = account, host
        self.ports = {"imap": imap_port, "smtp": smtp_port}
        self.count = count
        self.passwords = passwords  # None: every guess a new password (a dictionary split between the guessers)
        self.hang_up_after = hang_up_after
        self.sent = 0          # guesses whose password reached the proxy
        self.answered = 0      # guesses answered NO / 535 (waited for)
        self.hung_up = 0       # guesses abandoned after hang_up_after without a success
        self.succeeded = 0     # a guess that got in (must stay 0)
        self.refused = 0       # connections refused or dropped before the guess
        self.started = 0.0
        self._stop = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Guessers:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def rate(self) -> float:
        """Guesses checked per second so far (answered or hung up on)."""
        return (self.answered + self.hung_up) / max(1e-9, time.monotonic() - self.started)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        workers = [asyncio.ensure_future(self._worker(i)) for i in range(self.count)]
        while not self._stop.is_set():
            await asyncio.sleep(0.05)
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    async def _worker(self, index: int) -> None:
        protocol = "imap" if index % 2 == 0 else "smtp"
        guess = 0
        while not self._stop.is_set():
            password = (self.passwords[(index + guess) % len(self.passwords)] if self.passwords
                        else f"guess {index}-{guess}")
            guess += 1
            try:
                await self._guess(protocol, password)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                self.refused += 1
                await asyncio.sleep(0.05)

    async def _guess(self, protocol: str, password: str) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.ports[protocol])
        try:
            greeting = await asyncio.wait_for(reader.readline(), 30)
            if protocol == "imap":
                if not greeting.startswith(b"* OK"):
                    raise OSError("not greeted")
                writer.write(f'a LOGIN {self.account} "{password}"\r\n'.encode())
                done = b"a "
            else:
                if not greeting.startswith(b"220"):
                    raise OSError("not greeted")
                writer.write(b"EHLO attacker\r\n")
                while not (await asyncio.wait_for(reader.readline(), 30)).startswith(b"250 "):
                    pass
                plain = base64.b64encode(f"\0{self.account}\0{password}".encode()).decode()
                writer.write(f"AUTH PLAIN {plain}\r\n".encode())
                done = b""
            self.sent += 1
            try:
                while True:
                    line = await asyncio.wait_for(reader.readline(), self.hang_up_after or 60)
                    if not line:
                        raise OSError("closed")
                    if line.startswith(done) or protocol == "smtp":
                        break
            except asyncio.TimeoutError:
                if self.hang_up_after is None:
                    raise
                self.hung_up += 1   # no success within hang_up_after: wrong, next
                return
            if (protocol == "imap" and line.startswith(b"a OK")) or line.startswith(b"235"):
                self.succeeded += 1
            elif line.startswith((b"a NO", b"535")):
                self.answered += 1
            else:
                raise OSError(f"unexpected answer {line[:40]!r}")
        finally:
            writer.close()


def silent_connections(port: int, count: int, host: str = "127.0.0.1") -> list[socket.socket]:
    """``count`` connections that never send anything (the caller closes them)."""
    sockets = []
    for _ in range(count):
        sockets.append(socket.create_connection((host, port), timeout=30))
    return sockets


def raise_open_file_limit(wanted: int = 16384) -> int:
    """Raise this process's descriptor limit (children inherit it); returns the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
