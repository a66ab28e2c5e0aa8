"""The client-facing POP3 server before login, as a state machine without I/O.

The POP3 counterpart of :mod:`proxy.imap.core`: :class:`Pop3Front` takes the bytes a client
sent and returns events (:mod:`proxy.events`: bytes to send, a login to perform, STARTTLS,
close). The asyncio shell (:mod:`proxy.front`) does the I/O and the login, then calls
:meth:`Pop3Front.login_succeeded` or :meth:`Pop3Front.login_failed`. After a successful login
the core is done: :meth:`Pop3Front.take_pending` hands over the bytes the client sent after its
login command, to be forwarded upstream unchanged (STAT, LIST, RETR, DELE, ... are the server's).

Supported in the AUTHORIZATION state: CAPA (RFC 2449), USER/PASS (RFC 1939), AUTH PLAIN with
or without an initial response (RFC 5034, RFC 4616; a bare ``AUTH`` lists the mechanisms),
STLS (RFC 2595) and QUIT. Replies carry RFC 2449/3206 response codes: ``-ERR [AUTH]`` for
refused credentials, ``-ERR [SYS/TEMP]`` when the proxy cannot log in for now. Lines are
bounded, as are errors and failed logins per connection; nothing here raises on any input.
"""

from __future__ import annotations

import enum
from typing import Callable

from ..events import Close, Event, Login, Send, StartTLS
from ..lines import LineReader, LineTooLong
from ..prelogin import PreloginCore
from ..sasl import SaslError, SaslSyntaxError, decode_plain, validate_password, validate_username
from ..text import reply_text

__all__ = ["Close", "Event", "Login", "Pop3Front", "Send", "StartTLS", "State"]


class State(enum.Enum):
    """Where the connection is; only AUTHORIZATION and AUTH_CONTINUE parse input."""

    AUTHORIZATION = "authorization"
    AUTH_CONTINUE = "waiting for the AUTH response"
    AUTHENTICATING = "login in progress"
    STARTTLS = "waiting for the TLS handshake"
    DONE = "logged in"
    CLOSED = "closed"


# Commands of the TRANSACTION state (and APOP, which needs the clear password): "-ERR not logged in".
_LATER_COMMANDS = frozenset("STAT LIST RETR DELE NOOP RSET TOP UIDL LAST".split())
_RESPONSE_CODE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-/")


class Pop3Front(PreloginCore):
    """One client connection's POP3 server side, up to a successful login."""

    _states, _ready = State, State.AUTHORIZATION

    def __init__(self, *, max_line: int = 8192, max_errors: int = 10, max_login_failures: int = 5,
                 starttls: bool = False, tls_active: bool = False, login_requires_tls: bool = False,
                 greeting_text: str = "POP3 proxy ready") -> None:
        super().__init__(LineReader(max_line=max_line), starttls=starttls, tls_active=tls_active,
                         login_requires_tls=login_requires_tls)
        self.max_errors = max_errors
        self.max_login_failures = max_login_failures
        self.greeting_text = reply_text(greeting_text, "POP3 proxy ready")
        self._user: str | None = None  # from USER, until PASS (or STLS) uses it up
        self.errors = 0
        self.login_failures = 0
        self._handlers: dict[str, Callable[[bytes | None, list[Event]], None]] = {
            "CAPA": self._capa, "USER": self._user_command, "PASS": self._pass, "AUTH": self._auth,
            "STLS": self._stls, "QUIT": self._quit, "APOP": self._apop,
        }

    # -- public API (and receive_data, tls_started, take_pending: PreloginCore) -------------
    @property
    def capabilities(self) -> list[str]:
        """The CAPA lines before login (RFC 2449). No PIPELINING: the upstream's is unknown."""
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE"]
        if not self._login_disabled:
            caps += ["USER", "SASL PLAIN"]
        if self._starttls_offered:
            caps.append("STLS")
        caps.append("IMPLEMENTATION oauth2-mail-proxy")
        return caps

    def greeting(self) -> bytes:
        return f"+OK {self.greeting_text}\r\n".encode()

    def login_succeeded(self, text: str | None = None) -> bytes:
        """The login worked: return the ``+OK`` for the client."""
        if not self._end_login(State.DONE):
            return b""
        return f"+OK {reply_text(text or '', 'Logged in')}\r\n".encode()

    def login_failed(self, code: str, text: str) -> list[Event]:
        """The login failed: answer ``-ERR [code] text``, then go on with any pipelined input."""
        if not self._end_login(State.AUTHORIZATION):
            return []
        out: list[Event] = []
        self._fail_login(out, code, text)
        return self._process(out)

    # -- the command loop -----------------------------------------------------------------
    def _process(self, out: list[Event] | None = None) -> list[Event]:
        out = [] if out is None else out
        while self._state in (State.AUTHORIZATION, State.AUTH_CONTINUE):
            try:
                line = self._reader.next_line()
            except LineTooLong:
                self._close(out, "line too long", "-ERR Line too long")
                break
            if line is None:
                break
            if self._state is State.AUTH_CONTINUE:
                self._sasl_response(line, out)
            else:
                self._dispatch(line, out)
        return out

    def _dispatch(self, line: bytes, out: list[Event]) -> None:
        name, space, argument = line.partition(b" ")
        try:
            command = name.decode("ascii").upper()
        except UnicodeDecodeError:
            command = ""
        handler = self._handlers.get(command) if command.isalpha() else None
        if handler is None:
            self._error(out, "Not logged in" if command in _LATER_COMMANDS else "Unknown command")
            return
        handler(argument if space else None, out)

    # -- commands -------------------------------------------------------------------------
    def _capa(self, argument: bytes | None, out: list[Event]) -> None:
        if argument is not None:
            self._error(out, "CAPA takes no argument")
            return
        lines = "".join(f"{cap}\r\n" for cap in self.capabilities)
        out.append(Send(f"+OK Capability list follows\r\n{lines}.\r\n".encode()))

    def _quit(self, argument: bytes | None, out: list[Event]) -> None:
        _reply(out, "+OK Bye")
        self._close(out, "quit")

    def _apop(self, argument: bytes | None, out: list[Event]) -> None:
        self._error(out, "APOP is not supported: use USER and PASS, or AUTH PLAIN")

    def _stls(self, argument: bytes | None, out: list[Event]) -> None:
        if argument is not None or not self._starttls_offered:
            self._error(out, "STLS is not available" if argument is None else "STLS takes no argument")
            return
        _reply(out, "+OK Begin TLS negotiation now")
        out.append(StartTLS())
        self._start_tls()
        self._user = None  # a USER from before TLS does not count after it

    def _user_command(self, argument: bytes | None, out: list[Event]) -> None:
        if self._login_disabled:
            self._error(out, "Use STLS before logging in")
            return
        try:
            self._user = validate_username((argument or b"").decode("utf-8"))
        except (UnicodeDecodeError, SaslError):
            self._user = None
            self._error(out, "Invalid user name")
            return
        _reply(out, "+OK Send the password")

    def _pass(self, argument: bytes | None, out: list[Event]) -> None:
        user, self._user = self._user, None
        if self._login_disabled:
            self._error(out, "Use STLS before logging in")
        elif user is None:
            self._error(out, "Send USER first")
        else:
            try:
                password = validate_password((argument or b"").decode("utf-8"))
            except (UnicodeDecodeError, SaslError):
                self._fail_login(out, "AUTH", "The password is empty or has invalid characters")
                return
            self._emit_login(out, user, password, "", "USER")

    def _auth(self, argument: bytes | None, out: list[Event]) -> None:
        if argument is None:  # the mechanisms (RFC 1734's form, which clients still send)
            out.append(Send(b"+OK\r\n" + (b"" if self._login_disabled else b"PLAIN\r\n") + b".\r\n"))
            return
        mechanism, space, initial = argument.partition(b" ")
        if mechanism.upper() != b"PLAIN":
            self._error(out, "Unsupported authentication mechanism")
        elif self._login_disabled:
            self._error(out, "Use STLS before logging in")
        elif space:
            self._plain(initial, out)
        else:
            out.append(Send(b"+ \r\n"))
            self._state = State.AUTH_CONTINUE

    def _sasl_response(self, line: bytes, out: list[Event]) -> None:
        self._state = State.AUTHORIZATION
        if line == b"*":
            self._error(out, "Authentication cancelled")
        else:
            self._plain(line, out)

    def _plain(self, response: bytes, out: list[Event]) -> None:
        try:
            creds = decode_plain(response)
        except SaslSyntaxError:
            self._error(out, "Invalid base64 in the SASL response")
            return
        except SaslError:
            self._fail_login(out, "AUTH", "Invalid PLAIN credentials")
            return
        self._emit_login(out, creds.authcid, creds.password, creds.authzid, "PLAIN")

    # -- helpers --------------------------------------------------------------------------
    def _emit_login(self, out: list[Event], user: str, password: str, authzid: str, mechanism: str) -> None:
        self._state = State.AUTHENTICATING
        out.append(Login("", user, password, authzid, mechanism))

    # One reply per command, even the last: the limits add to its text rather than a second line.
    def _fail_login(self, out: list[Event], code: str, text: str) -> None:
        self.login_failures += 1
        code = str(code or "").strip().upper()
        code = code if code and set(code) <= _RESPONSE_CODE_CHARS else ""
        text = "-ERR " + (f"[{code}] " if code else "") + reply_text(text, "Login failed")
        if self.login_failures >= self.max_login_failures:
            self._close(out, "too many login failures", text + " (too many failed logins, closing)")
        else:
            _reply(out, text)

    def _error(self, out: list[Event], text: str) -> None:
        self.errors += 1
        if self.errors >= self.max_errors:
            self._close(out, "too many errors", f"-ERR {text} (too many invalid commands, closing)")
        else:
            _reply(out, "-ERR " + text)

    def _close(self, out: list[Event], reason: str, reply: str | None = None) -> list[Event]:
        if reply is not None:
            _reply(out, reply)
        out.append(Close(reason))
        self._state = State.CLOSED
        self._reader.take_rest()
        return out


def _reply(out: list[Event], text: str) -> None:
    out.append(Send(f"{text}\r\n".encode("ascii", "replace")))
