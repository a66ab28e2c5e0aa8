"""One client connection: aiosmtpd's SMTP protocol turned into a relay to the user's upstream session.

Before AUTH only EHLO/HELO, AUTH, NOOP, RSET and QUIT work; MAIL, RCPT, DATA (and HELP,
VRFY) get ``530 5.7.0``. AUTH PLAIN and AUTH LOGIN run the shared login sequence
(:func:`proxy.login.login`: local password, access token, upstream connection, XOAUTH2).
Afterwards MAIL, RCPT, DATA, RSET and NOOP are relayed to that connection and the client gets
the upstream's own replies. MAIL/RCPT arguments are relayed byte for byte, so every parameter
the upstream supports passes (aiosmtpd would refuse DSN's with 555 and upper-case the rest).
After AUTH those five commands no longer go through aiosmtpd's command loop: the session reads
them from aiosmtpd's buffer itself (:meth:`ProxySMTP._mail_loop`), and what it decides for them
is :mod:`proxy.smtp.transaction`'s; every other line is still aiosmtpd's to read and answer.

Guarantees:

- the end of DATA gets 250 only after the upstream's 250 for that very message;
- if the upstream connection breaks, times out or says 421 during a transaction, the client
  gets ``451 4.4.2`` for it and for the rest of it (pipelined RCPTs, DATA); the connection is
  dropped and the next MAIL logs in again (``421`` and close if that fails). A MAIL that finds
  an idle connection gone is retried once on a new one: nothing was in flight;
- the body reaches the upstream unchanged: it is passed on as it arrives (:mod:`proxy.smtp.data`,
  which gives the upstream what aiosmtpd's reader plus :func:`~proxy.smtp.wire.dot_stuff` gave
  it), so a message of any size costs the proxy a few hundred kilobytes;
- a message refused on the way (larger than the SIZE offered, a line too long, a dot after a
  bare CR or LF: "SMTP smuggling") never reaches an end of data upstream: the upstream
  connection is dropped before, the server discards the unfinished message, and the next MAIL
  logs in again;
- pipelined MAIL/RCPT go upstream without waiting when it offers PIPELINING; replies keep the
  order of the commands;
- the proxy's upstream deadlines are shorter than aiosmtpd's per-command timer, so a slow
  upstream gets the client a 4xx reply, never a silently dropped connection.

aiosmtpd private API used here (the dependency is pinned below 2.0): ``_reader`` (and its
``_buffer``, ``_limit``, ``_eof`` and ``_wait_for_data``: asyncio.StreamReader's, the same since
Python 3.4), ``_writer``, ``_reset_timeout``, ``_timeout_cb``, ``_timeout_handle`` and
``_timeout_duration`` (the per-command timer), ``_set_rset_state``, ``_original_transport`` and
``_tls_protocol`` (STARTTLS).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import re
import ssl
import time
from typing import TYPE_CHECKING, Awaitable, Callable

from aiosmtpd.smtp import SMTP, Envelope, syntax

from ..admission import Slot
from ..config import STARTTLS_OFF, STARTTLS_REQUIRED
from ..hints import send_as_hint
from ..listeners import HANDSHAKE_TIMEOUT, unread_input
from ..login import LoginFailed, UpstreamError, relogin, upstream_user
from ..logs import log_event
from ..metrics import METRICS, TO_SERVER
from ..tls import describe_tls_error
from ..tlsendpoint import start_tls
from ..tokens import LoginGrant
from .auth import SaslAuthMixin
from .data import LINE_TOO_LONG, LONE_DOT_FOUND, OK, TOO_BIG, DataStream
from .upstream import Connection
from .transaction import EXTENDED_SIZE_LIMITS, LOST, PIPELINABLE, Relay, Transaction, parse_command
from .wire import (AUTH_REQUIRED, MAX_MESSAGE_SIZE, Reply, advertised_size, data_size_limit, local_extensions,
                   one_line, send_as_denied, with_advice)

if TYPE_CHECKING:
    from .server import SmtpProxy

log = logging.getLogger("proxy.smtp")
_UNPRINTABLE = re.compile(rb"[^\x20-\x7e]")
# A dot after a bare LF or CR: servers that also end lines there (Dovecot does) would read the end
# of the message in it, deliver it cut short with a 250, and take the rest for commands ("SMTP
# smuggling"), their replies then answering the client's next commands. Such a message is refused
# (found by proxy.smtp.data.DataStream).
LONE_DOT_REFUSED = ("550 5.6.0 Message not sent: it has a bare CR or LF followed by a dot, which the mail "
                    "server could take for the end of the message; use CRLF line ends")
_LINE_LIMIT = 256 * 1024  # longest command or message line accepted (RFC 5321 says 1,000; clients exceed it)
_MAIL_FROM = re.compile(r"FROM:\s*<([^>]*)>", re.IGNORECASE)
_EVICTED = b"421 4.7.0 Too many connections waiting to log in; closing the oldest idle one\r\n"
# Before AUTH only EHLO, AUTH, NOOP, RSET, QUIT and STARTTLS work; none needs more (credentials are
# at most 4 KiB decoded): a client that has not logged in cannot make the proxy buffer more.
PRELOGIN_LINE_LIMIT = 4096

_READ_SIZE = 64 * 1024    # bytes of a message taken from the client at a time (below _LINE_LIMIT: see data.py)
_REPLY_BACKLOG = 64 * 1024  # replies written but not yet sent before the session waits for the client
_OK = Reply.of("250 2.0.0 OK")
_LONGEST_COMMAND = max(EXTENDED_SIZE_LIMITS["MAIL"], EXTENDED_SIZE_LIMITS["RCPT"]) + 2  # (with CRLF)


class _Hooks:
    """aiosmtpd's handler hooks; everything per connection lives on :class:`ProxySMTP`."""

    async def handle_QUIT(self, server: ProxySMTP, session: object, envelope: Envelope) -> str:  # noqa: N802
        return "221 2.0.0 Bye"


class ProxySMTP(SaslAuthMixin, SMTP):
    line_length_limit = _LINE_LIMIT

    def __init__(self, proxy: SmtpProxy, implicit_tls: bool = False, slot: Slot | None = None):
        # STARTTLS (aiosmtpd's) on the plain listener if configured; "required": no AUTH before it.
        starttls = STARTTLS_OFF if implicit_tls or proxy.server_tls is None else proxy.config.smtp.starttls
        super().__init__(_Hooks(), hostname=proxy.hostname, ident="oauth2-mail-proxy ESMTP",
                         timeout=proxy.timeouts.command(proxy.config.limits.login_timeout),
                         data_size_limit=data_size_limit(MAX_MESSAGE_SIZE), enable_SMTPUTF8=True,
                         decode_data=False, auth_require_tls=starttls == STARTTLS_REQUIRED,
                         tls_context=proxy.server_tls if starttls != STARTTLS_OFF else None,
                         loop=asyncio.get_running_loop())
        self.implicit_tls = implicit_tls
        self._busy = False  # a command is being handled (see close_when_idle)
        self._opened = False
        self._relayed = 0
        self._smtp_methods = {name: self._tracked(method) for name, method in self._smtp_methods.items()}
        # aiosmtpd's limits dict is shared by all its instances; keep our own (see transaction.py).
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit, EXTENDED_SIZE_LIMITS)
        self.proxy = proxy
        self.upstream: Connection | None = None
        self.user: str | None = None
        self.account: LoginGrant | None = None  # to log in upstream again if the connection is lost
        self.tx = Transaction()  # the mail transaction as the client has been answered
        # Pipelined MAIL/RCPT sent upstream whose replies are still owed to the client, in order
        # (see _pipelining).
        self._deferred: list[Relay] = []
        self._handlers: dict[str, Callable[[bytes], Awaitable[None]]] = {
            "MAIL": self._mail, "RCPT": self._rcpt, "DATA": self._data, "RSET": self._rset, "NOOP": self._noop}
        self._sent = self._failed = 0
        self._started = time.monotonic()
        self._preauth: asyncio.TimerHandle | None = None
        self._idle_deadline = 0.0
        self.closed: asyncio.Future = self.loop.create_future()
        # Before login aiosmtpd's per-command timer is the pre-login idle timeout (a login itself gets
        # the full command timeout); after it, the normal command timeout.
        self._command_timeout = self._timeout_duration
        self._timeout_duration = proxy.config.limits.prelogin_idle_timeout
        self.slot = slot
        self._evicted = False
        if slot is not None:
            slot.on_evict = self._evict
            slot.has_input = self._has_input

    # -- connection ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # (aiosmtpd calls this again after STARTTLS)
        if not self._opened:
            self._opened = True
            self._reader._limit = min(PRELOGIN_LINE_LIMIT, self.line_length_limit)  # (asyncio.StreamReader's; raised after login)
            if self._evicted:  # dropped for a newer connection before this one was even up
                self._handler_coroutine.cancel()  # (no greeting)
                self.closed.set_result(None)      # (never counted as a session)
                transport.write(_EVICTED)
                transport.close()
                return
            self.proxy.register(self)
            self._preauth = self.loop.call_later(self.proxy.config.limits.preauth_timeout, self._preauth_expired)
            METRICS.session_opened("smtp")
            log_event(log, "smtp %s session start%s", self.peer, " (TLS)" if self.implicit_tls else "",
                      event="session_start", protocol="smtp", peer=self.peer, tls=self.implicit_tls)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)  # (cancels a running command: a failure delay keeps the slot itself)
        self.proxy.untrack_session(self)
        if self.slot is not None:
            self.slot.release()
        if self._preauth is not None:
            self._preauth.cancel()
        self._drop_upstream()
        if self.closed.done():
            return
        self.closed.set_result(None)
        METRICS.session_closed("smtp")
        duration = time.monotonic() - self._started
        log_event(log, "smtp %s session end: user %s, %d message(s) sent, %d failed, %.1f s, %d bytes relayed",
                  self.peer, self.user or "-", self._sent, self._failed, duration, self._relayed,
                  event="session_end", protocol="smtp", peer=self.peer, account=self.user,
                  result="ok" if self.user else "closed before login", duration_s=round(duration, 3),
                  bytes_from_client=self._relayed, messages_sent=self._sent, messages_failed=self._failed,
                  tls=self.implicit_tls or self._tls_protocol is not None)

    def _tracked(self, method):  # noqa: ANN001, ANN202
        """Wrap an ``smtp_*`` handler so a shutdown knows whether a command is in progress
        (keeping the attributes aiosmtpd's HELP reads); once logged in, the session's own
        command loop takes over after it (:meth:`_mail_loop`)."""
        pipelinable = method.__name__ in ("smtp_MAIL", "smtp_RCPT")
        quitting = method.__name__ == "smtp_QUIT"

        @functools.wraps(method)
        async def run(arg: str | None) -> None:
            self._busy = True
            try:
                if self._deferred and not pipelinable:
                    await self._settle()
                await method(arg)
            finally:
                self._busy = False
                if self.proxy.draining:
                    self.close_when_idle()
            if self.session.authenticated and not quitting:
                await self._mail_loop()
        return run

    async def _mail_loop(self) -> None:
        """After AUTH: run MAIL, RCPT, DATA, RSET and NOOP here, straight from aiosmtpd's read
        buffer, until a line comes that is left to aiosmtpd (EHLO, QUIT, STARTTLS, an unknown
        or over-long command: :func:`~proxy.smtp.transaction.parse_command`) or the connection
        ends. aiosmtpd then reads that line and answers it as before, and this loop starts
        again after it. aiosmtpd's own command loop (parsing, logging, dispatch, a timer per
        command) cost the proxy more CPU per message than the upstream took to answer it."""
        reader, handlers = self._reader, self._handlers
        while self.transport is not None and not self.transport.is_closing() and self.session.authenticated:
            buffer = reader._buffer
            end = buffer.find(b"\n")
            if end < 0:
                if reader._eof or reader.exception() is not None or len(buffer) > _LONGEST_COMMAND:
                    return  # (aiosmtpd's reader handles the end of the stream and over-long lines)
                await reader._wait_for_data("readuntil")  # (also resumes a paused transport)
                continue
            command = parse_command(bytes(buffer[:end + 1]), self.session.extended_smtp)
            if command is None:
                return
            del buffer[:end + 1]
            self._reset_timeout()  # a valid command: aiosmtpd's per-command timer starts again
            self._busy = True
            try:
                if self._deferred and command.verb not in PIPELINABLE:
                    await self._settle()
                await handlers[command.verb](command.arg)
            finally:
                self._busy = False
                if self.proxy.draining:
                    self.close_when_idle()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's per-command timer (the deadline for the next command), set lazily: the
        deadline moves on every command, the timer only when it would fire too late (aiosmtpd
        cancels and makes one per command); one that fires early sleeps until the deadline."""
        self._idle_deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._idle_deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._timeout_cb)

    def close_when_idle(self) -> None:
        """The proxy is stopping: close now if no command and no mail transaction is in progress,
        otherwise once they are done (called again after every command while draining)."""
        if not self._busy and not self.tx.open:
            self.shutdown()

    @property
    def peer(self) -> str:
        peer = self.session.peer if self.session is not None else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"

    def _has_input(self) -> bool:
        """A command from the client not handled yet (a partial line, a byte at a time, is not one)."""
        reader = getattr(self, "_reader", None)  # (aiosmtpd's StreamReader, once connected)
        return unread_input(self.transport) or (reader is not None and b"\n" in reader._buffer)

    def release_if_unopened(self) -> None:
        if not self._opened and self.slot is not None:
            self.slot.release()

    def _evict(self) -> None:
        """Dropped to make room for a newer connection (the pre-login budget is full)."""
        self._evicted = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_EVICTED)
            self.transport.close()

    def _timeout_cb(self) -> None:
        """aiosmtpd's command timer ran out: before login that is the pre-login idle timeout."""
        if self.loop.time() < self._idle_deadline:  # (set lazily: the deadline has moved on)
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._timeout_cb)
            return
        if self.transport is not None and not self.session.authenticated and not self.transport.is_closing():
            self.transport.write(b"421 4.4.2 No command within %d s; closing\r\n" % self._timeout_duration)
        super()._timeout_cb()

    def _preauth_expired(self) -> None:
        if self.transport is not None and not self.session.authenticated:
            self.transport.write(b"421 4.4.2 No authentication within the time allowed; closing\r\n")
            self.transport.close()

    def end_session(self, reason: str) -> None:
        """The account may not use the proxy any more (removed from the config, tokens deleted): 421
        and close, also in the middle of a message (which then gets no 250: nothing is lost)."""
        log.info("smtp %s: closing the session of %s: %s", self.peer, self.user, reason)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(f"421 4.7.0 {one_line(reason)}; closing\r\n".encode("ascii", "replace"))
            self.transport.close()

    def shutdown(self) -> None:
        """The proxy is stopping: say so and close."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"421 4.3.2 The proxy is shutting down; please try again later\r\n")
            self.transport.close()

    async def handle_exception(self, error: Exception) -> str:
        """A bug must not leave an upstream transaction half done: drop it, answer 451."""
        log.error("smtp %s: internal error", self.peer, exc_info=error)
        self._lose("internal error in the proxy")
        return "451 4.3.0 Internal error in the proxy; please try again"

    async def push(self, status: str | bytes) -> None:
        """Send a reply, after the replies still owed to pipelined commands (so replies keep
        the order of the commands)."""
        if self._deferred:
            await self._settle()
        await self._push_now(status)

    async def _answer(self, reply: Reply | bytes) -> None:
        """:meth:`push` for the replies of the session's own loop: a :class:`Reply` (its
        :meth:`~proxy.smtp.wire.Reply.wire` is printable ASCII already) or a fixed reply,
        written at once; it waits for the client to read only if replies pile up unread."""
        if self._deferred:
            await self._settle()
        await self._write(reply)

    async def _write(self, reply: Reply | bytes) -> None:
        self._writer.write((reply.wire() if isinstance(reply, Reply) else reply) + b"\r\n")
        if self._writer.transport.get_write_buffer_size() > _REPLY_BACKLOG:
            await self._writer.drain()
        if self.slot is not None:
            self.slot.waiting()  # (as _push_now: before login RSET and NOOP answer through here)

    async def _push_now(self, status: str | bytes) -> None:
        """Send a reply with every line reduced to printable ASCII: aiosmtpd echoes parts of a
        malformed command (a bare CR, a NUL, an escape sequence) in its own 500 replies."""
        data = status.encode("utf-8", "replace") if isinstance(status, str) else bytes(status)
        await super().push(b"\r\n".join(_UNPRINTABLE.sub(b"?", line) for line in data.split(b"\r\n")))
        if self.slot is not None:
            self.slot.waiting()  # answered: from now on it waits for the client (see proxy/admission.py)

    def _pipelining(self) -> bool:
        """Send the current MAIL or RCPT without waiting for its reply: the client has already
        sent its next command (RFC 2920) and the upstream offers PIPELINING. Its reply is read
        and passed on before any later reply (:meth:`_settle`)."""
        upstream = self.upstream
        return (upstream is not None and not upstream.is_closed and "PIPELINING" in upstream.extensions
                and b"\n" in self._reader._buffer)

    async def _settle(self) -> None:
        """Read the upstream's replies to the pipelined commands and pass them on, in order."""
        while self._deferred:
            relay = self._deferred.pop(0)
            if self.upstream is None:  # the connection failed on an earlier reply
                reply = Reply.of(self.tx.broken or LOST)
            else:
                reply = await self._step(self.upstream.reply(self.proxy.timeouts.reply))
            await self._write(self.tx.replied(relay, reply))  # (not _answer: in order)

    async def check_auth_needed(self, caller_method: str) -> bool:
        if not self.session.authenticated:
            await self.push(AUTH_REQUIRED)
            return True
        return False

    def _logged_in(self, username: str, account: LoginGrant, conn: Connection) -> None:
        """Called by the AUTH mechanisms after a successful login."""
        if self._preauth is not None:
            self._preauth.cancel()
        self._timeout_duration = self._command_timeout
        self._reader._limit = self.line_length_limit
        self.proxy.track_session(self, account.account, self.end_session)
        self.user, self.account = username, account
        self._adopt(conn)

    # -- session commands ---------------------------------------------------------------
    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:  # noqa: N802
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        extensions = self.upstream.extensions if self.upstream else await self.proxy.extensions.get()
        await self._end_transaction()  # EHLO resets like RSET (RFC 5321 4.1.4)
        self.session.extended_smtp, self.session.host_name = True, hostname
        self.data_size_limit = data_size_limit(advertised_size(extensions))
        lines = [self.hostname, *local_extensions(extensions)]
        if self.tls_context and not self._tls_protocol:
            lines.insert(1, "STARTTLS")
        if self._auth_require_tls and not self._tls_protocol:
            lines = [line for line in lines if not line.startswith("AUTH ")]  # RFC 3207: only after TLS
        await self.push("\r\n".join(f"250-{line}" for line in lines[:-1]) + f"\r\n250 {lines[-1]}")

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:  # noqa: N802
        await self._end_transaction()
        await super().smtp_HELO(hostname)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str | None) -> None:  # noqa: N802
        await self._rset(_raw(arg))

    async def _rset(self, arg: bytes) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        self.tx.reset()
        reply = await self._relay_quietly(b"RSET")
        self.tx.broken = None
        await self._answer(reply or _OK)

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str | None) -> None:  # noqa: N802
        await self._noop(_raw(arg))

    async def _noop(self, arg: bytes) -> None:
        reply = await self._relay_quietly(b"NOOP")
        await self._answer(reply or _OK)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:  # noqa: N802
        """Answered locally without parsing: aiosmtpd's own parses the address with the email
        package, which raises on some malformed ones (``VRFY c@``)."""
        if await self.check_auth_needed("VRFY"):
            return
        await self.push("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery" if arg
                        else "501 5.5.4 Syntax: VRFY <address>")

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:  # noqa: N802
        """aiosmtpd's STARTTLS, with the proxy's own TLS layer (:func:`proxy.tlsendpoint.start_tls`:
        no 256 KiB buffer per connection as with asyncio's). Plaintext the client sent after the
        command is discarded (RFC 3207); the session starts over as aiosmtpd does it."""
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if not self.tls_context or self._tls_protocol is not None:
            await self.push("454 TLS not available")
            return
        await self.push("220 Ready to start TLS")
        raw = self.transport
        self._reader._buffer.clear()

        def ready(transport: asyncio.Transport) -> None:  # before the client's first encrypted command
            self._original_transport = raw
            self._tls_protocol = raw.get_protocol()  # (aiosmtpd reads its _extra into session.ssl)
            self.connection_made(transport)  # aiosmtpd's state reset after STARTTLS (RFC 3207 4.2)

        try:
            await start_tls(raw, self, self.tls_context, timeout=HANDSHAKE_TIMEOUT, on_ready=ready)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.info("smtp %s STARTTLS failed: %s", self.peer, describe_tls_error(exc))
            raw.close()

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str) -> None:  # noqa: N802
        if not arg:
            self._drop_upstream()
        await super().smtp_QUIT(arg)

    # -- the mail transaction (the decisions are proxy.smtp.transaction's) ----------------
    # The smtp_* methods are aiosmtpd's entry points (before AUTH: 530); once logged in, the
    # session's own loop calls _mail, _rcpt and _data directly (_mail_loop).
    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:  # noqa: N802
        if await self.check_helo_needed() or await self.check_auth_needed("MAIL"):
            return
        await self._mail(_raw(arg))

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:  # noqa: N802
        if await self.check_helo_needed() or await self.check_auth_needed("RCPT"):
            return
        await self._rcpt(_raw(arg))

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:  # noqa: N802
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        await self._data(_raw(arg))

    async def _mail(self, arg: bytes) -> None:
        relay = self.tx.mail(arg)
        if isinstance(relay, Reply):
            await self._answer(relay)
        elif self._pipelining():
            self.upstream.send_command(relay.line)
            self.tx.sent_ahead(relay)
            self._deferred.append(relay)
        else:
            reply = await self._start_transaction(relay.line)
            if reply is not None:  # (None: the session was closed with 421)
                await self._answer(self.tx.replied(relay, reply))

    async def _rcpt(self, arg: bytes) -> None:
        relay = self.tx.rcpt(arg, connected=self.upstream is not None)
        if isinstance(relay, Reply):
            await self._answer(relay)
        elif self._pipelining():
            self.upstream.send_command(relay.line)
            self._deferred.append(relay)
        else:
            reply = await self._step(self.upstream.command(relay.line, self.proxy.timeouts.reply))
            await self._answer(self.tx.replied(relay, reply))

    async def _data(self, arg: bytes) -> None:
        """The message is passed on as it arrives (:mod:`proxy.smtp.data`), not read whole first.
        The client's ``354`` does not wait for the upstream's: no byte of the message goes
        upstream before the upstream's own ``354``, and if it refuses DATA its reply answers the
        end of the message instead."""
        refusal = self.tx.data(arg)
        if refusal is not None:
            await self._answer(refusal)
            return
        started, recipients = time.monotonic(), self.tx.recipients
        mail_from = self.tx.mail_from  # (the transaction is over at the end of the data)
        # The upstream's DATA goes out now and its reply is read before the first bytes of the
        # message are passed on: the client's 354 needs no round trip to the upstream.
        if self.upstream is None:
            self._lose("no connection")
        else:
            self.upstream.send_command(b"DATA")
        await self._answer(b"354 End data with <CR><LF>.<CR><LF>")
        try:
            reply, size = await self._relay_payload()
        finally:
            if self.transport is not None:  # (after a disconnect, no timer must be left behind)
                self._reset_timeout()
        if send_as_denied(reply):
            reply = self._send_as_advice(reply, _text(mail_from))
        self._finish_message(reply, size, recipients, started)
        if reply.code != 250 and self.tx.open:  # the upstream keeps its envelope after refusing DATA
            self.tx.open = False
            await self._relay_quietly(b"RSET")
        await self._answer(reply)

    async def _relay_payload(self) -> tuple[Reply, int]:
        """Read the payload in bulk and stream it upstream; returns the client's reply and the size.

        A refusal found on the way (too large, a line too long, a dot after a bare CR or LF)
        drops the upstream connection before any end of data went out, so the server discards
        the unfinished message; the next MAIL logs in again. A failing upstream (closed, or not
        taking data for ``timeouts.final`` seconds) makes it 451. Either way the rest of the
        payload is read, so the session stays in step with the client.
        """
        timeouts = self.proxy.timeouts
        stream = DataStream(self.data_size_limit, self.line_length_limit)
        reader = self._reader
        refused: Reply | None = None  # the upstream's answer to DATA, if it was not 354
        data_reply = self.upstream is None  # (no upstream: LOST is the answer)
        last = b""  # the payload's last bytes, sent with the final dot (one write, not two)
        while not stream.done:
            chunk = await reader.read(_READ_SIZE)
            if not chunk:  # the client went away mid-message: connection_lost aborts the upstream
                raise ConnectionResetError("connection lost during DATA")
            self._reset_timeout()  # the client is making progress (RFC 5321 4.5.3.2.5: per data block)
            out = stream.feed(chunk)
            if not data_reply:
                data_reply = True
                reply = await self._step(self.upstream.reply(timeouts.reply))
                if reply.code != 354 and self.upstream is not None:
                    refused = reply
            upstream = self.upstream
            if stream.verdict != OK:
                if upstream is not None and self.tx.open and refused is None:
                    self._drop_upstream(polite=False)  # nothing delivered: no end of data went out
                    self.tx.open = False
                continue
            if upstream is None or refused is not None:
                continue
            if stream.done:
                last = out
            elif out:
                upstream.send_data(out)
            if upstream.is_closed:
                self._lose("the mail server closed the connection")
            elif upstream.backlogged:
                self._reset_timeout(timeouts.final + 30)
                try:
                    await upstream.drain_data(timeouts.final)
                except UpstreamError as exc:
                    self._lose(str(exc))
        if stream.rest:  # pipelined commands after the end of data: read next
            reader._buffer[0:0] = stream.rest
        self.tx.message_read()
        if stream.verdict == LONE_DOT_FOUND:
            log.warning("smtp %s user %s message refused: a bare CR or LF followed by a dot", self.peer, self.user)
            return Reply.of(LONE_DOT_REFUSED), stream.content_size
        if stream.verdict == TOO_BIG:
            return Reply.of("552 5.3.4 Error: Too much mail data"), stream.content_size
        if stream.verdict == LINE_TOO_LONG:
            return Reply.of("500 5.5.6 Line too long (see RFC5321 4.5.3.1.6)"), stream.content_size
        if refused is not None:
            return refused, stream.content_size
        if self.upstream is None:
            return Reply.of(self.tx.broken or LOST), stream.content_size
        if not data_reply:  # an empty message: the upstream's 354 is still to be read
            reply = await self._step(self.upstream.reply(timeouts.reply))
            if reply.code != 354:
                return reply, stream.content_size
        self._reset_timeout(timeouts.final + 30)
        reply = await self._step(self.upstream.finish_message(timeouts.final, last))
        self.tx.open = False
        return reply, stream.content_size

    def _finish_message(self, reply: Reply, size: int, recipients: int, started: float) -> None:
        """Count and log one message's outcome."""
        if reply.code == 250:
            self._sent += 1
            self._relayed += size
            METRICS.relayed.add("smtp", TO_SERVER, size)
        else:
            self._failed += 1
        duration = time.monotonic() - started
        log_event(log, "smtp %s user %s message: %d bytes, %d recipient(s), upstream reply %d (%.0f ms)", self.peer,
                  self.user, size, recipients, reply.code, duration * 1000, event="message",
                  protocol="smtp", peer=self.peer, account=self.user, result=reply.code,
                  duration_s=round(duration, 3), bytes=size, recipients=recipients)

    def _send_as_advice(self, reply: Reply, mail_from: str | None) -> Reply:
        """Exchange refused to send as the MAIL FROM address: say who must grant what to whom."""
        found = _MAIL_FROM.match(mail_from or "")
        sender = found.group(1) if found else "this sender"
        identity = upstream_user(self.account.account, "smtp") if self.account else self.user
        log.info("smtp %s user %s: the mail server refused to send as %s for %s", self.peer, self.user, sender,
                 identity)
        return with_advice(reply, send_as_hint(identity, sender))

    # -- upstream helpers ---------------------------------------------------------------
    async def _start_transaction(self, line: bytes) -> Reply | None:
        """Relay a MAIL; a connection found dead (idle timeout, 421) is replaced once."""
        reused = self.upstream is not None and not self.upstream.is_closed
        while True:
            if not reused and not await self._reconnect():
                return None
            try:
                reply = await self.upstream.command(line, self.proxy.timeouts.reply)
                if reply.code != 421:
                    return reply
                reason = f"it answered {reply.code} {reply.text}"
            except UpstreamError as exc:
                reason = str(exc)
            if not reused:
                return self._lose(reason)
            log.info("smtp %s user %s: mail server connection gone (%s); reconnecting", self.peer, self.user, reason)
            reused = False

    async def _reconnect(self) -> bool:
        """Log in upstream again for the session's account; on failure answer 421 and close."""
        self._drop_upstream()
        try:
            conn, _ = await relogin(self.proxy.broker, self.proxy.login_upstream, self.account,
                                    timeout=self.proxy.config.limits.login_timeout, protocol="smtp")
        except LoginFailed as failure:
            await self.push(f"421 4.4.2 {one_line(failure.text)}")
            if self.transport is not None:
                self.transport.close()
            return False
        self._adopt(conn)
        return True

    async def _step(self, exchange: Awaitable[Reply]) -> Reply:
        """One upstream exchange; a failure or a 421 ends the connection and the transaction (451)."""
        try:
            reply = await exchange
        except UpstreamError as exc:
            return self._lose(str(exc))
        return self._lose(f"it answered {reply.code} {reply.text}") if reply.code == 421 else reply

    async def _relay_quietly(self, line: bytes) -> Reply | None:
        """Relay RSET or NOOP if there is an upstream connection; None if there is none (any more)."""
        if self.upstream is None:
            return None
        reply = await self._step(self.upstream.command(line, self.proxy.timeouts.reply))
        return reply if self.upstream is not None else None

    async def _end_transaction(self) -> None:
        self._set_rset_state()
        if self.tx.reset():
            await self._relay_quietly(b"RSET")

    def _lose(self, reason: str) -> Reply:
        if self.upstream is not None:
            log.warning("smtp %s user %s: mail server connection failed (%s)", self.peer, self.user, reason)
        self._drop_upstream(polite=False)
        return self.tx.lost()  # (so a new MAIL is not taken for a nested one)

    def _adopt(self, conn: Connection) -> None:
        self.upstream = conn
        self.proxy.extensions.update(conn.extensions)

    def _drop_upstream(self, polite: bool = True) -> None:
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.quit() if polite and not self.tx.open else conn.abort()


def _text(arg: bytes | None) -> str | None:
    """A command argument as aiosmtpd gave it (decoded with surrogateescape)."""
    return arg.decode("utf-8", "surrogateescape") if arg is not None else None


def _raw(arg: str | None) -> bytes:
    """A command argument as the client sent it (aiosmtpd decoded it with surrogateescape)."""
    return arg.encode("utf-8", "surrogateescape") if arg else b""
