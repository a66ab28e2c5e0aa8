"""The mail transaction after AUTH: command lines in, decisions out (no I/O).

After a successful AUTH the session reads the client's command lines itself (see
``ProxySMTP._mail_loop``) instead of through aiosmtpd's command loop, which cost more CPU per
command than the upstream's whole answer. :func:`parse_command` picks out the lines that loop
handles (MAIL, RCPT, DATA, RSET, NOOP); every other line (EHLO, QUIT, STARTTLS, unknown or
over-long commands) is left to aiosmtpd, so it gets aiosmtpd's answer exactly as before.

:class:`Transaction` holds what the client has been told about the transaction: the accepted
MAIL, how many RCPTs the upstream accepted, whether the upstream has a transaction open, and
the reply owed for the rest of a transaction whose upstream connection was lost. For each
command it returns either the reply to give locally (syntax, sequence, a lost connection) or
a :class:`Relay`: the line to pass upstream. The upstream's reply goes through
:meth:`Transaction.replied`, in the order of the commands, which updates the state and gives
the reply for the client (the upstream's own: never a 250 the upstream did not give).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .wire import Reply

#: The reply for the rest of a transaction whose upstream connection failed.
LOST = "451 4.4.2 The connection to the mail server failed; please try again"
#: Longest command line (without CRLF) per command once EHLO was given (aiosmtpd's default 512
#: otherwise): room for DSN parameters (RFC 3461: +100 MAIL, +500 RCPT) and AUTH lines (RFC 4954).
COMMAND_SIZE_LIMIT = 512
EXTENDED_SIZE_LIMITS = {"MAIL": 2048, "RCPT": 2048, "AUTH": 12288}
#: The commands the session's own loop runs after AUTH.
HANDLED = frozenset({"MAIL", "RCPT", "DATA", "RSET", "NOOP"})
#: MAIL and RCPT may go upstream before the reply to the one before has come (RFC 2920).
PIPELINABLE = frozenset({"MAIL", "RCPT"})

# A bare CR or a NUL relayed inside MAIL/RCPT could end the command early for the upstream and
# put its replies out of step with the proxy's (a 250 answering the wrong command).
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Command:
    """One client command line: the verb (upper case) and the argument (stripped; b"" if none)."""

    verb: str
    arg: bytes


def parse_command(line: bytes, extended: bool) -> Command | None:
    """The command in ``line`` (ending in LF) if the session's loop handles it, as aiosmtpd would
    have split it; None for anything else (left to aiosmtpd, which answers it as before)."""
    line = line.rstrip(b"\r\n")
    verb, _, arg = line.partition(b" ")
    if len(verb) != 4:
        return None
    try:
        name = verb.upper().decode("ascii")
    except UnicodeDecodeError:
        return None
    if name not in HANDLED:
        return None
    limit = EXTENDED_SIZE_LIMITS.get(name, COMMAND_SIZE_LIMIT) if extended else COMMAND_SIZE_LIMIT
    if len(line) > limit:
        return None  # aiosmtpd's "500 Command line too long"
    return Command(name, arg.strip())


@dataclass(frozen=True)
class Relay:
    """Pass ``line`` upstream; hand its reply to :meth:`Transaction.replied`."""

    verb: str
    line: bytes
    arg: bytes
    generation: int  # the transaction it belongs to (a reset starts a new one)


class Transaction:
    """The client's mail transaction as the proxy has answered it (see the module docstring)."""

    def __init__(self) -> None:
        self.mail_from: bytes | None = None  # the MAIL argument (provisional while a pipelined reply is owed)
        self.recipients = 0                  # RCPTs the upstream accepted
        self.open = False                    # the upstream has (or may have) a transaction open
        self.broken: str | None = None       # the reply for the rest of a transaction that lost its upstream
        self.generation = 0

    # -- commands ----------------------------------------------------------------------
    def mail(self, arg: bytes) -> Reply | Relay:
        if arg[:5].upper() != b"FROM:" or _CONTROL.search(arg):
            return Reply.of("501 5.5.4 Syntax: MAIL FROM:<address> [parameters]")
        if self.mail_from is not None:
            return Reply.of("503 5.5.1 Error: nested MAIL command")
        self.broken = None
        return Relay("MAIL", b"MAIL " + arg, arg, self.generation)

    def rcpt(self, arg: bytes, connected: bool) -> Reply | Relay:
        if self.broken:
            return Reply.of(self.broken)
        if not self.mail_from or not connected:
            return Reply.of("503 5.5.1 Error: need MAIL command")
        if arg[:3].upper() != b"TO:" or _CONTROL.search(arg):
            return Reply.of("501 5.5.4 Syntax: RCPT TO:<address> [parameters]")
        return Relay("RCPT", b"RCPT " + arg, arg, self.generation)

    def data(self, arg: bytes) -> Reply | None:
        """A local reply, or None: the message follows (the caller answers 354)."""
        if self.broken:
            return Reply.of(self.broken)
        if not self.recipients:
            return Reply.of("503 Error: need RCPT command")
        if arg:
            return Reply.of("501 Syntax: DATA")
        return None

    def sent_ahead(self, relay: Relay) -> None:
        """A pipelined MAIL went upstream before its reply: the transaction is open provisionally,
        so that the pipelined RCPTs go upstream too (which answers them itself if the MAIL fails)."""
        if relay.verb == "MAIL" and relay.generation == self.generation:
            self.mail_from, self.open = relay.arg, True

    def replied(self, relay: Relay, reply: Reply) -> Reply:
        """The upstream's ``reply`` to ``relay`` (or the proxy's own if the connection failed);
        returns the reply for the client."""
        ok = reply.code // 100 == 2
        current = relay.generation == self.generation
        if relay.verb == "MAIL":
            if ok and current:
                self.mail_from, self.open = relay.arg, True
            elif current and self.mail_from is relay.arg:
                self.mail_from, self.open = None, False
        elif relay.verb == "RCPT" and ok and current and self.mail_from is not None:
            self.recipients += 1  # (not after a pipelined MAIL that failed: the upstream has no transaction)
        return reply

    # -- ends of a transaction ------------------------------------------------------------
    def reset(self) -> bool:
        """RSET, EHLO, HELO: start over. Returns whether the upstream had a transaction open
        (then it needs an RSET of its own)."""
        was_open = self.open
        self._new()
        self.open = False
        self.broken = None
        return was_open

    def message_read(self) -> None:
        """The message's payload has been read: the client's transaction is over (the upstream's
        only once it answered the end of data: :attr:`open` is the caller's to clear then)."""
        self._new()

    def lost(self) -> Reply:
        """The upstream connection failed: the rest of the transaction gets :data:`LOST`."""
        self._new()
        self.open = False
        self.broken = LOST
        return Reply.of(LOST)

    def _new(self) -> None:
        self.mail_from, self.recipients = None, 0
        self.generation += 1

