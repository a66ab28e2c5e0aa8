"""An SMTP sink: accepts mail on loopback and keeps every message's exact bytes and envelope.

aiosmtpd's SMTP protocol runs on an asyncio loop in a background thread. Message bytes are
``envelope.original_content``: what the client sent between DATA and the final dot, with the
dot-stuffing removed and line endings untouched (it never decodes with ``decode_data=False``).
Lines longer than 1,000 bytes are accepted (aiosmtpd refuses them by default; real MTAs don't).
Tests can refuse recipients (550), whole messages (554) or make the final reply slow.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True)
class ReceivedMessage:
    """One accepted message: envelope, parameters and the exact data bytes."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    rcpt_options: list[str]

    def data_after_received(self, count: int = 1) -> bytes:
        """``data`` without the first ``count`` ``Received:`` header fields (a relay such as Dovecot's
        submission service prepends one); raises ValueError if they are not there."""
        data = self.data
        for _ in range(count):
            if not data.startswith(b"Received:"):
                raise ValueError(f"no Received: header at {data[:40]!r}")
            end = data.index(b"\r\n") + 2
            while data[end:end + 1] in (b" ", b"\t"):  # folded continuation lines
                end = data.index(b"\r\n", end) + 2
            data = data[end:]
        return data


class _SinkSMTP(SMTP):
    line_length_limit = 1 << 20


class SinkServer:
    """``start()`` listens on ``host``:``port`` (port 0: a free one); ``messages`` lists what arrived."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, data_size_limit: int = 64 << 20):
        self.host, self.port = host, port
        self.data_size_limit = data_size_limit
        self._lock = threading.Condition()
        self._messages: list[ReceivedMessage] = []
        self._refused_recipients: set[str] = set()
        self._refuse_message = False
        self._delay = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="smtp-sink", daemon=True)
        self._thread.start()
        factory = lambda: _SinkSMTP(self, hostname="sink.test", decode_data=False,  # noqa: E731
                                    data_size_limit=self.data_size_limit, enable_SMTPUTF8=True)
        future = asyncio.run_coroutine_threadsafe(loop.create_server(factory, self.host, self.port), loop)
        self._server = future.result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def shut_down() -> None:
            server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut_down(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        loop.close()
        self._loop = self._server = None

    def __enter__(self) -> SinkServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- results and controls
    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._lock:
            return list(self._messages)

    def wait_for_messages(self, count: int = 1, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until at least ``count`` messages arrived (TimeoutError otherwise)."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._messages) >= count, timeout):
                raise TimeoutError(f"{len(self._messages)} of {count} messages arrived in {timeout} s")
            return list(self._messages)

    def reset(self) -> None:
        """Forget messages and undo refusals and delays."""
        with self._lock:
            self._messages.clear()
            self._refused_recipients.clear()
            self._refuse_message = False
            self._delay = 0.0

    def refuse_recipient(self, address: str) -> None:
        """RCPT TO:<address> gets ``550``."""
        with self._lock:
            self._refused_recipients.add(address.lower())

    def refuse_messages(self, refuse: bool = True) -> None:
        """The end of DATA gets ``554`` (nothing is stored)."""
        with self._lock:
            self._refuse_message = refuse

    def set_delay(self, seconds: float) -> None:
        """Wait this long before answering the end of DATA (a slow upstream MTA)."""
        with self._lock:
            self._delay = seconds

    # ----------------------------------------------------------------- aiosmtpd handler hooks
    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,  # noqa: N802
                          rcpt_options: list[str]) -> str:
        with self._lock:
            refused = address.lower() in self._refused_recipients
        if refused:
            return f"550 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        with self._lock:
            delay, refuse = self._delay, self._refuse_message
        if delay:
            await asyncio.sleep(delay)
        if refuse:
            return "554 Message rejected by the test sink"
        message = ReceivedMessage(str(envelope.mail_from), list(envelope.rcpt_tos), bytes(envelope.original_content
                                  or b""), list(envelope.mail_options), list(envelope.rcpt_options))
        with self._lock:
            self._messages.append(message)
            self._lock.notify_all()
        return f"250 Ok: queued as {uuid.uuid4().hex[:12].upper()}"

    def __repr__(self) -> str:
        return f"SinkServer({self.host}:{self.port}, {len(self._messages)} messages)"

