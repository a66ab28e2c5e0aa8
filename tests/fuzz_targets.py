"""Drivers for the hostile-input suites, shared by hypothesis and atheris.

Five targets, each a function of one ``bytes`` input that raises (AssertionError or the
escaped exception) when the code under test misbehaves:

- ``imap``: the pre-authentication IMAP core (:class:`proxy.imap.core.ImapFront`), fed in
  chunks, with logins answered as succeeded or failed and STARTTLS completed;
- ``smtp``: the SMTP front exactly as ``proxy serve`` runs it (aiosmtpd's protocol with the
  proxy's AUTH mechanisms and relay, :class:`proxy.smtp.session.ProxySMTP`), driven through an
  in-memory transport on a private event loop, with a fake token broker (one account, one
  password) and a fake upstream that accepts everything;
- ``pop3``: the pre-authentication POP3 core (:class:`proxy.pop3.core.Pop3Front`), fed in
  chunks or line by line (then each command line must get exactly one reply, or start a login);
- ``sasl``: the SASL decoders (:mod:`proxy.sasl`);
- ``proxyproto``: the PROXY protocol header parser (:func:`proxy.proxyproto.parse_header`): a
  header, "read more" or an error, consistent for every prefix and extension of the input.

Properties checked on every input: no exception escapes; every reply line is well formed
(IMAP ``tag SP text CRLF`` in printable ASCII; SMTP ``ddd[ -]text CRLF``, one code per reply;
POP3 ``+OK``/``-ERR`` lines, ``+ `` and dot-terminated lists);
nothing follows a close; the bytes held per connection stay under a fixed bound.

As a fuzzer: ``python -m tests.fuzz_targets TARGET [libFuzzer options] [corpus dirs]``,
e.g. ``-max_total_time=20``. tests/test_hostile_input.py runs each target for a bounded time.
"""

from __future__ import annotations

import asyncio
import base64
import re
import sys
from types import SimpleNamespace

# ------------------------------------------------------------------------------- IMAP
IMAP_LIMITS = dict(max_line=64, max_literal=32, max_errors=6, max_login_failures=3)
_IMAP_TAG = rb"[" + re.escape(bytes(sorted(set(range(0x21, 0x7F)) - set(b'(){%*"\\+')))) + rb"]+"
IMAP_REPLY = re.compile(rb"(\*|\+|" + _IMAP_TAG + rb") [\x20-\x7e]*\r\n")


def imap_input(data: bytes) -> None:
    """Feed ``data[2:]`` to an ImapFront in chunks of ``data[1]`` bytes; ``data[0]`` holds options."""
    from proxy.imap.core import Close, ImapFront, Login, Send, StartTLS, State

    flags = data[0] if data else 0
    size = (data[1] if len(data) > 1 else 0) or 1_000_000
    stream = data[2:]
    front = ImapFront(starttls=bool(flags & 1), login_requires_tls=bool(flags & 2), **IMAP_LIMITS)
    succeed = bool(flags & 4)
    # Unparsed input is cut at max_line; a command holds at most max_command bytes.
    bound = front.max_command + IMAP_LIMITS["max_line"] + 2 + size
    pending = [stream[i:i + size] for i in range(0, len(stream), size)]
    while pending:
        events = front.receive_data(pending.pop(0))
        i = 0
        while i < len(events):
            event = events[i]
            if isinstance(event, Send):
                assert IMAP_REPLY.fullmatch(event.data), event.data
            elif isinstance(event, Login):
                assert event.tag and event.username and event.password
                assert not set(event.password) & set("\0\r\n") and not set(event.username) & set("\0\r\n")
                if succeed:
                    reply = front.login_succeeded("IMAP4rev1 IDLE", "Logged in")
                    assert IMAP_REPLY.fullmatch(reply), reply
                    front.take_pending()
                    return  # from here on the bytes are relayed, not parsed
                events += front.login_failed("AUTHENTICATIONFAILED", "wrong \r\n [password]")
            elif isinstance(event, (Close, StartTLS)):
                assert i == len(events) - 1, events  # nothing may follow
                if isinstance(event, Close):
                    assert front.state is State.CLOSED
                    assert front.receive_data(b"more") == []
                    return
                front.tls_started()
            else:
                raise AssertionError(f"unexpected event {event!r}")
            i += 1
        if front.state in (State.NOT_AUTHENTICATED, State.AUTHENTICATE_CONTINUE):
            assert front.buffered <= bound, (front.buffered, bound)
    end = front.receive_data(b"")
    assert all(isinstance(e, Close) for e in end) and front.state is State.CLOSED


# ------------------------------------------------------------------------------- POP3
POP3_LIMITS = dict(max_line=64, max_errors=6, max_login_failures=3)
# A status line, the SASL continuation, or a multi-line answer (CAPA, bare AUTH) ending in ".".
POP3_REPLY = re.compile(rb"(\+OK|-ERR)( [\x20-\x7e]*)?\r\n|\+ \r\n"
                        rb"|\+OK[\x20-\x7e]*\r\n(?:[\x20-\x2d\x2f-\x7e][\x20-\x7e]*\r\n)*\.\r\n")


def pop3_input(data: bytes) -> None:
    """Feed ``data[2:]`` to a Pop3Front in chunks of ``data[1]`` bytes (0: one line at a time, and
    then every line must get exactly one reply or start one login); ``data[0]`` holds options."""
    from proxy.pop3.core import Pop3Front

    flags = data[0] if data else 0
    size = data[1] if len(data) > 1 else 0
    stream = data[2:]
    front = Pop3Front(starttls=bool(flags & 1), login_requires_tls=bool(flags & 2), tls_active=bool(flags & 8),
                      **POP3_LIMITS)
    if size:
        chunks = [stream[i:i + size] for i in range(0, len(stream), size)]
    else:
        chunks = stream.splitlines(keepends=True)
    pop3_replies(front, chunks, succeed=bool(flags & 4), one_per_line=not size)


def pop3_replies(front, chunks: list[bytes], *, succeed: bool = False, one_per_line: bool = False) -> list[bytes]:
    """Run ``chunks`` through ``front`` (logins fail, or the first succeeds), checking the properties;
    returns the replies."""
    from proxy.pop3.core import Close, Login, Send, StartTLS, State

    bound = POP3_LIMITS["max_line"] + 2
    replies: list[bytes] = []
    for chunk in chunks:
        parsing = front.state in (State.AUTHORIZATION, State.AUTH_CONTINUE)
        events = front.receive_data(chunk)
        if one_per_line and parsing and chunk.endswith(b"\n"):
            answers = [e for e in events if isinstance(e, (Send, Login))]
            assert len(answers) == 1, (chunk, events)  # one reply per command, or its login
        i = 0
        while i < len(events):
            event = events[i]
            if isinstance(event, Send):
                assert POP3_REPLY.fullmatch(event.data), event.data
                replies.append(event.data)
            elif isinstance(event, Login):
                assert event.tag == "" and event.username and event.password
                assert not set(event.password) & set("\0\r\n") and not set(event.username) & set("\0\r\n")
                if succeed:
                    reply = front.login_succeeded("Logged in\r\n-ERR")
                    assert POP3_REPLY.fullmatch(reply), reply
                    front.take_pending()
                    return replies + [reply]  # from here on the bytes are relayed, not parsed
                events += front.login_failed("AUTH", "wrong \r\n [password]")
            elif isinstance(event, (Close, StartTLS)):
                assert i == len(events) - 1, events  # nothing may follow
                if isinstance(event, Close):
                    assert front.state is State.CLOSED
                    assert front.receive_data(b"more\r\n") == []
                    return replies
                front.tls_started()
            else:
                raise AssertionError(f"unexpected event {event!r}")
            i += 1
        if front.state in (State.AUTHORIZATION, State.AUTH_CONTINUE):
            assert front.buffered <= bound + len(chunk), (front.buffered, bound)
    end = front.receive_data(b"")
    assert all(isinstance(e, Close) for e in end) and front.state is State.CLOSED
    return replies


# ------------------------------------------------------------------------------- SASL
def sasl_input(data: bytes) -> None:
    """The decoders raise nothing but SaslError, and what they accept round-trips."""
    from proxy.sasl import (MAX_RESPONSE, SaslError, decode_login_step, decode_plain, parse_xoauth2_error,
                            xoauth2_initial_response)

    try:
        creds = decode_plain(data)
    except SaslError as exc:
        assert str(exc).isascii() and len(str(exc)) < 80  # fixed texts, never the data
    else:
        raw = f"{creds.authzid}\0{creds.authcid}\0{creds.password}".encode()
        assert len(raw) <= MAX_RESPONSE and base64.b64encode(raw) == data.strip(b" \t\r\n")
        assert "password" not in repr(creds)
    try:
        step = decode_login_step(data)
    except SaslError:
        pass
    else:
        assert step and not set(step) & set("\0\r\n")
    result = parse_xoauth2_error(data)
    assert result is None or isinstance(result, dict)
    text = data.decode("utf-8", "replace")
    try:
        encoded = xoauth2_initial_response("user@example.com", text)
    except SaslError:
        pass
    else:
        assert base64.b64decode(encoded).count(b"\x01") == 3


# ------------------------------------------------------------------------------- SMTP
SMTP_USER = "alice@example.com"
SMTP_PASSWORD = "correct horse battery"
SMTP_LINE_LIMIT = 300  # small, so short inputs reach the limits (the real one is 256 KiB)
SMTP_REPLY = re.compile(rb"([2-5][0-9][0-9])([ -][\x20-\x7e]*)?\r\n")


class SmtpRun:
    """What one in-memory SMTP session produced."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.errors: list[object] = []
        self.closed = False
        self.max_buffered = 0
        self.upstream_lines: list[bytes] = []
        self.messages: list[bytes] = []

    def replies(self) -> list[tuple[int, list[bytes]]]:
        """The complete replies as (code, lines); asserts they are well formed."""
        data = bytes(self.output)
        assert not data or data.endswith(b"\r\n"), data[-200:]
        replies: list[tuple[int, list[bytes]]] = []
        current: list[bytes] = []
        for line in data.splitlines(keepends=True):
            match = SMTP_REPLY.fullmatch(line)
            assert match, line
            code = int(match.group(1))
            if current:
                assert int(current[0][:3]) == code, (current, line)
            current.append(line)
            if match.group(2) is None or match.group(2).startswith(b" "):
                replies.append((code, current))
                current = []
        assert not current, current  # a multi-line reply left unfinished
        return replies


class _FakeTransport(asyncio.Transport):
    def __init__(self, run: SmtpRun) -> None:
        super().__init__()
        self.run = run
        self.protocol: asyncio.Protocol | None = None
        self.closing = False
        self.paused = False

    def write(self, data) -> None:
        if not self.closing:
            self.run.output += data

    def writelines(self, lines) -> None:
        for data in lines:
            self.write(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.run.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 1587)}.get(name, default)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_reading(self) -> bool:
        return not self.paused

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False


class _FakeUpstream:
    """An upstream session that accepts everything (SIZE 100000, so 552s are reachable)."""

    def __init__(self, run: SmtpRun) -> None:
        self.run = run
        self.extensions = {"SIZE": "100000", "8BITMIME": "", "DSN": "", "AUTH": "XOAUTH2"}
        self.is_closed = False

    async def command(self, line: bytes, timeout):
        self.send_command(line)
        return await self.reply(timeout)

    def send_command(self, line: bytes) -> None:
        from proxy.smtp.wire import Reply

        assert not re.search(rb"[\x00-\x1f\x7f]", line), line  # one clean command line upstream
        self.run.upstream_lines.append(line)
        self._replies = getattr(self, "_replies", [])
        self._replies.append(Reply(354, (b"Go ahead",)) if line.upper() == b"DATA" else Reply(250, (b"2.0.0 OK",)))

    async def reply(self, timeout):
        await asyncio.sleep(0)
        assert self._replies, "a reply read before its command was sent"
        return self._replies.pop(0)

    backlogged = False
    address = "fake.upstream:587"

    def send_data(self, data: bytes) -> None:
        assert not self.is_closed
        self._payload = getattr(self, "_payload", b"") + data

    async def drain_data(self, timeout) -> None:
        await asyncio.sleep(0)

    async def finish_message(self, timeout, data: bytes = b""):
        from proxy.smtp.wire import Reply

        payload, self._payload = getattr(self, "_payload", b"") + data, b""
        # no dot after a bare CR or LF: a lenient server would end the message there
        assert not re.search(rb"(?<!\r)\n\.|\r\.", payload), payload[:300]
        assert b"\r\n.\r\n" not in b"\r\n" + payload, payload[:300]  # no end of data before the final dot
        # the receiver removes the first dot of every line that starts with one (RFC 5321 4.5.2)
        content = re.sub(rb"(?m)(?<=\n)\.", b"", b"\n" + payload)[1:] if payload else b""
        self.run.messages.append(content)
        return Reply(250, (b"2.0.0 Queued",))

    def quit(self) -> None:
        self.is_closed = True

    def abort(self) -> None:
        self.is_closed = True


class _FakeBroker:
    def __init__(self) -> None:
        from proxy.config import AccountConfig

        self.state = SimpleNamespace(account=AccountConfig(SMTP_USER))
        self.config = _fake_config()

    async def authenticate(self, username: str, password: str):
        from proxy.tokens import LoginRefused

        await asyncio.sleep(0)
        if username.casefold() == SMTP_USER and password == SMTP_PASSWORD:
            return self.state
        raise LoginRefused("unknown user or wrong password")

    async def access_token(self, state, timeout: float) -> str:
        return "fake-access-token"

    def reject(self, state, token: str, protocol: str = "") -> bool:
        return False


class _FakeExtensions:
    async def get(self):
        return {"SIZE": "100000", "8BITMIME": "", "DSN": ""}

    def update(self, extensions) -> None:
        pass


def _fake_config():
    from pathlib import Path

    from proxy.config import parse_config

    return parse_config({"identity": {"authority": "https://127.0.0.1:1/tenant", "client_id": "fuzz"},
                         "imap": {"listen": "127.0.0.1:1143", "upstream": "127.0.0.1:993"},
                         "smtp": {"listen": "127.0.0.1:1587", "upstream": "127.0.0.1:587"},
                         "limits": {"login_timeout": 5, "preauth_timeout": 60},
                         "accounts": [{"username": SMTP_USER}]}, base_dir=Path("."))


def _fake_proxy(run: SmtpRun, broker=None):
    """A real SmtpProxy (so the sessions see every setting they read), with a fake broker, a fake
    upstream, fixed extensions and a throttle that does not wait."""
    from proxy.login import Upstream
    from proxy.smtp.server import SmtpProxy
    from proxy.throttle import FailureThrottle

    config = _fake_config()

    async def connect():
        return _FakeUpstream(run)

    async def authenticate(conn, mailbox: str, token: str):
        return conn.extensions

    proxy = SmtpProxy(config, broker or _FakeBroker(), upstream_tls=None)
    proxy.hostname = "proxy.test"
    proxy.throttle = FailureThrottle(base=0.0)  # no real waiting in the fuzzer
    proxy.extensions = _FakeExtensions()
    proxy.login_upstream = Upstream(connect=connect, authenticate=authenticate, is_closed=lambda c: c.is_closed,
                                    close=lambda c: c.abort())
    return proxy


_protocols: dict[int, type] = {}


def _protocol_class(line_limit: int):
    from proxy.smtp.session import ProxySMTP

    if line_limit not in _protocols:
        _protocols[line_limit] = type("LimitedProxySMTP", (ProxySMTP,), {"line_length_limit": line_limit})
    return _protocols[line_limit]


async def _settle(protocol, transport: _FakeTransport) -> None:
    """Run the session until it waits for client input (or is closed)."""
    for _ in range(5000):
        await asyncio.sleep(0)
        task = protocol._handler_coroutine
        if transport.closing or task is None or task.done():
            return
        if protocol._reader._waiter is not None and not protocol._reader._waiter.done():
            return
    raise AssertionError("the SMTP session neither waits for input nor ends")


async def smtp_session(chunks: list[bytes], *, line_limit: int = SMTP_LINE_LIMIT,
                       each_line_answered: bool = False, broker=None, internal_errors: bool = False) -> SmtpRun:
    """Run one session over ``chunks`` (then the client closes) and check the properties.

    With ``each_line_answered`` every chunk must be one complete line, and each line sent
    while the session waits for a command must get a reply (or end the session).
    ``broker`` replaces the fake token broker; with ``internal_errors`` an exception in the
    session is left to the proxy's own handler (logged, 451) instead of failing the run.
    """
    run = SmtpRun()
    loop = asyncio.get_running_loop()
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: run.errors.append(context))
    protocol = _protocol_class(line_limit)(_fake_proxy(run, broker))

    async def record(error: Exception) -> str:
        run.errors.append(error)
        return "451 4.3.0 internal error"
    if not internal_errors:
        protocol.handle_exception = record
    transport = _FakeTransport(run)
    transport.protocol = protocol
    try:
        protocol.connection_made(transport)
        await _settle(protocol, transport)
        for chunk in chunks:
            if transport.closing:
                break
            if transport.paused:  # the reader's buffer is full: a real socket stops reading too
                break
            before = len(run.replies())
            waiting_for_command = before and run.replies()[-1][0] not in (334, 354)
            protocol.data_received(chunk)
            run.max_buffered = max(run.max_buffered, len(protocol._reader._buffer))
            assert len(protocol._reader._buffer) <= 2 * line_limit + len(chunk) + 2
            await _settle(protocol, transport)
            if each_line_answered and waiting_for_command and chunk.endswith(b"\n") and not transport.closing:
                assert len(run.replies()) > before, (chunk, bytes(run.output[-300:]))
    finally:
        if not transport.closing:  # the client goes away (also when a check above failed)
            transport.close()
        await asyncio.sleep(0)
        task = protocol._handler_coroutine
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), 5)
            except (asyncio.CancelledError, ConnectionResetError):
                pass
        loop.set_exception_handler(previous_handler)
    for error in run.errors:
        if isinstance(error, BaseException):
            raise AssertionError(f"exception in the SMTP session: {error!r}") from error
        raise AssertionError(f"unhandled error in the event loop: {error!r}")
    replies = run.replies()
    assert replies and replies[0][0] == 220, bytes(run.output[:200])
    for message in run.messages:
        assert len(message) <= 100000 + 100000 // 32 + 1024
    return run


_loop: asyncio.AbstractEventLoop | None = None


def smtp_input(data: bytes) -> None:
    """Split ``data[1:]`` into chunks of ``data[0]`` bytes (0: one chunk per line) and run a session."""
    global _loop
    size = data[0] if data else 0
    stream = data[1:]
    if size:
        chunks = [stream[i:i + size] for i in range(0, len(stream), size)]
    else:
        chunks = stream.splitlines(keepends=True)
    if _loop is None:
        _loop = asyncio.new_event_loop()
    _loop.run_until_complete(smtp_session(chunks, each_line_answered=not size))


# ------------------------------------------------------------------------------- PROXY protocol
def proxyproto_input(data: bytes) -> None:
    """``parse_header`` on ``data`` and on a prefix of it: bounded, and never changing its mind."""
    import ipaddress

    from proxy.proxyproto import MAX_HEADER, HeaderError, parse_header

    def parse(chunk: bytes):
        try:
            return parse_header(chunk)
        except HeaderError as exc:
            assert str(exc) and "\n" not in str(exc)
            return exc

    whole = parse(data)
    if whole is None:  # "read more" only while a header could still fit
        assert len(data) < MAX_HEADER, len(data)
    elif not isinstance(whole, HeaderError):
        assert 16 <= whole.length <= MAX_HEADER or 15 <= whole.length <= 107, whole
        assert whole.length <= len(data) and whole.version in (1, 2)
        assert parse(data[:whole.length]) == whole and parse(data[:whole.length - 1]) is None
        for address in (whole.source, whole.destination):
            if address is not None:
                ipaddress.ip_address(address[0])
                assert 0 <= address[1] <= 65535
        assert (whole.source is None) == (whole.destination is None)
    cut = data[0] % (len(data) + 1) if data else 0
    prefix = parse(data[:cut])
    if isinstance(prefix, HeaderError):  # an error is final: more input never makes it a header
        assert isinstance(whole, HeaderError), (cut, whole)
    elif prefix is not None:             # so is a header: what follows it is the client's
        assert prefix == whole, (cut, prefix, whole)


TARGETS = {"imap": imap_input, "sasl": sasl_input, "smtp": smtp_input, "pop3": pop3_input,
           "proxyproto": proxyproto_input}


# ------------------------------------------------------------------------------- seeds
def _b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


_PLAIN = _b64(f"\0{SMTP_USER}\0{SMTP_PASSWORD}".encode())
SEEDS: dict[str, list[bytes]] = {
    "imap": [
        b"\x00\x00a CAPABILITY\r\nb ID (\"name\" {3}\r\nabc)\r\nc LOGIN {5}\r\nalice {2+}\r\npw\r\nd NOOP\r\n",
        b"\x04\x07a AUTHENTICATE PLAIN\r\n" + _b64(b"\0alice\0pw") + b"\r\nb LOGOUT\r\n",
        b"\x00\x00a AUTHENTICATE PLAIN " + _b64(b"x\0alice\0pw") + b"\r\nb AUTHENTICATE PLAIN\r\n*\r\n",
        b"\x01\x00s STARTTLS\r\nb LOGIN a b\r\n",
        b"\x03\x00a LOGIN alice pw\r\ns STARTTLS\r\nb LOGIN \"al\\\"ice\" \"p\\\\w\"\r\n",
        b"\x00\x00a LOGIN {2147483648}\r\nb LOGIN {2147483648+}\r\n",
        b"\x00\x05a LOGIN {40+}\r\n" + b"y" * 40 + b"\r\nb SELECT INBOX\r\n\x00\xff\r\n",
        b"\x00\x00a AUTHENTICATE XOAUTH2 =\r\n* LOGIN\r\n+ x\r\n" + b"z" * 70 + b"\r\n",
    ],
    "smtp": [
        b"\x00EHLO x\r\nAUTH PLAIN " + _PLAIN + b"\r\nMAIL FROM:<a@b> SIZE=10\r\nRCPT TO:<c@d> NOTIFY=NEVER\r\n"
        b"DATA\r\n..dot\r\nbody\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n",
        b"\x00EHLO x\r\nAUTH LOGIN\r\n" + _b64(SMTP_USER.encode()) + b"\r\n" + _b64(SMTP_PASSWORD.encode())
        + b"\r\nMAIL FROM:<a@b>\r\nDATA\r\nRCPT TO:<c@d>\r\nDATA\r\n.\r\n",
        b"\x00EHLO x\r\nAUTH LOGIN " + _b64(SMTP_USER.encode()) + b"\r\n" + _b64(b"wrong") + b"\r\nMAIL FROM:<a@b>\r\n",
        b"\x00HELO x\r\nAUTH PLAIN\r\nEHLO x\r\nAUTH PLAIN\r\n*\r\nAUTH plain =\r\nAUTH PLAIN !!\r\n"
        b"AUTH XOAUTH2\r\nVRFY a\r\nHELP\r\nSTARTTLS\r\n",
        b"\x07EHLO x\r\nAUTH PLAIN\r\n" + _PLAIN + b"\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"
        + b"x" * 400 + b"\r\n.\r\nQUIT\r\n",
        b"\x00EHLO x\r\n\x00\xff\x1b[31m\r\nFOO\rBAR\r\n" + b"A" * 400 + b"\r\nQUIT now\r\nQUIT\r\n",
    ],
    "pop3": [
        b"\x00\x00CAPA\r\nUSER alice\r\nPASS p w\r\nSTAT\r\n",
        b"\x04\x05AUTH\r\nAUTH PLAIN\r\n" + _b64(b"\0alice\0pw") + b"\r\nRETR 1\r\n",
        b"\x00\x00AUTH PLAIN " + _b64(b"x\0alice\0pw") + b"\r\nAUTH PLAIN\r\n*\r\nAUTH PLAIN =\r\nQUIT\r\n",
        b"\x01\x00USER a\r\nSTLS\r\nPASS injected\r\nCAPA\r\n",
        b"\x03\x00USER a\r\nPASS b\r\nAUTH PLAIN\r\nSTLS\r\nUSER a\r\nPASS b\r\n",
        b"\x00\x07APOP a b\r\nNOOP\r\nUSER \xff\r\nPASS\r\n" + b"x" * 70 + b"\r\n",
    ],
    "proxyproto": [
        b"PROXY TCP4 198.51.100.7 10.0.0.2 56324 1143\r\na1 LOGIN x y\r\n",
        b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 993\r\n", b"PROXY UNKNOWN\r\n", b"PROXY TCP4 1.2.3.4\r",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\xc6\x33\x64\x07\x0a\x00\x00\x02\xdb\xe4\x04\x77\x16\x03",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x2a" + bytes(range(36)) + b"\x05\x00\x03abc",
        b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00", b"\r\n\r\n\x00\r\nQUIT\n\x21\x31\x00\xd8" + b"\0" * 216,
    ],
    "sasl": [_PLAIN, _b64(b"a\0b\0c"), _b64(b"pw"), b"=", b"*", b"AGFsaWNlAHB3\r\n",
             _b64(b'{"status":"401","schemes":"bearer","scope":"mail"}'), b"eyJzdGF0dXMiOiI0MDAifQ"],
}
DICTIONARY: dict[str, list[bytes]] = {
    "imap": [b"LOGIN", b"AUTHENTICATE", b"PLAIN", b"CAPABILITY", b"STARTTLS", b"LOGOUT", b"NOOP", b"ID",
             b"NIL", b"{0}", b"{5+}", b"\r\n", b"\"", b"\\", b"*", b"+", b"="],
    "smtp": [b"EHLO ", b"HELO ", b"AUTH ", b"PLAIN", b"LOGIN", b"MAIL FROM:<", b"RCPT TO:<", b"DATA", b"RSET",
             b"NOOP", b"QUIT", b"\r\n", b"\r\n.\r\n", b"*", b"=", _PLAIN, b"SIZE=", b"BODY=8BITMIME"],
    "sasl": [b"=", b"==", b"\x00", b"\x01", b"auth=Bearer ", b"user="],
    "proxyproto": [b"PROXY ", b"TCP4 ", b"TCP6 ", b"UNKNOWN", b"\r\n", b"\r\n\r\n\x00\r\nQUIT\n", b"\x21",
                   b"\x20", b"\x11", b"\x21", b"\x00\x0c", b"\x00\x24", b"127.0.0.1 ", b"::1 ", b"65535"],
    "pop3": [b"USER ", b"PASS ", b"AUTH", b" PLAIN", b"CAPA", b"STLS", b"QUIT", b"APOP", b"STAT", b"RETR 1",
             b"\r\n", b"*", b"=", _PLAIN],
}


def write_seeds(target: str, corpus: str, dictionary: str) -> None:
    """Write ``target``'s seed inputs into the folder ``corpus`` and its libFuzzer dictionary."""
    import os

    os.makedirs(corpus, exist_ok=True)
    for index, seed in enumerate(SEEDS[target]):
        with open(os.path.join(corpus, f"seed-{index}"), "wb") as fh:
            fh.write(seed)
    with open(dictionary, "w", encoding="ascii") as fh:
        for word in DICTIONARY[target]:
            fh.write('"' + "".join(f"\\x{b:02x}" for b in word) + '"\n')


def main() -> None:
    import logging

    import atheris

    logging.disable(logging.CRITICAL)  # a million sessions' INFO lines help nobody
    target = sys.argv[1]
    # Coverage feedback from the code under test only (instrumenting the standard library's email
    # package, which aiosmtpd imports, would cost seconds of start-up for nothing).
    modules = {"imap": ["proxy.imap.core"], "sasl": ["proxy.sasl"], "smtp": ["aiosmtpd.smtp", "proxy.smtp.session"],
               "pop3": ["proxy.pop3.core", "proxy.lines"], "proxyproto": ["proxy.proxyproto"]}
    with atheris.instrument_imports(include=["proxy", "aiosmtpd"]):
        for module in modules[target]:
            __import__(module)
    atheris.Setup([sys.argv[0], *sys.argv[2:]], TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
