"""The client-facing IMAP server before login, as a state machine without I/O.

In the style of h11: :class:`ImapFront` takes the bytes a client sent and returns events
(:class:`Send` bytes to the client, a :class:`Login` to perform, :class:`StartTLS`,
:class:`Close`; shared with the POP3 core, :mod:`proxy.events`, as is the connection's life
around the login, :mod:`proxy.prelogin`). The asyncio shell around it does the I/O and the
actual logins, then calls :meth:`ImapFront.login_succeeded` or :meth:`ImapFront.login_failed`. After a successful
login the core is done: :meth:`ImapFront.take_pending` hands over the bytes the client sent
after its login command, to be forwarded upstream unchanged.

Supported before login: CAPABILITY, NOOP, LOGOUT, ID (RFC 2971), STARTTLS, LOGIN and
AUTHENTICATE PLAIN with or without an initial response (RFC 4959), with literals of both
kinds (RFC 7888 LITERAL+). Every input is bounded and nothing here raises on any input.
"""

from __future__ import annotations

import enum
import functools
from typing import Callable

from ..events import Close, Event, Login, Send, StartTLS
from ..prelogin import PreloginCore
from ..sasl import SaslError, SaslSyntaxError, decode_plain, validate_password, validate_username
from ..text import printable, reply_text
from .reader import (ATOM_CHARS, TAG_CHARS, Arguments, Command, CommandReader, LiteralStart,
                     ParseError, Rejected, tag_of)

__all__ = ["Close", "Event", "ImapFront", "Login", "Send", "StartTLS", "State"]


class State(enum.Enum):
    """Where the connection is; only NOT_AUTHENTICATED and AUTHENTICATE_CONTINUE parse input."""

    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATE_CONTINUE = "waiting for the AUTHENTICATE response"
    AUTHENTICATING = "login in progress"
    STARTTLS = "waiting for the TLS handshake"
    DONE = "logged in"
    CLOSED = "closed"


# Commands a client may legitimately send in other states: BAD "not permitted", not unknown.
_LATER_COMMANDS = frozenset(
    "SELECT EXAMINE CREATE DELETE RENAME SUBSCRIBE UNSUBSCRIBE LIST LSUB STATUS APPEND CHECK "
    "CLOSE EXPUNGE SEARCH FETCH STORE COPY MOVE UID IDLE NAMESPACE ENABLE UNSELECT GETQUOTA "
    "GETQUOTAROOT SETQUOTA GETACL SETACL DELETEACL LISTRIGHTS MYRIGHTS GETMETADATA SETMETADATA "
    "COMPRESS SORT THREAD XLIST ESEARCH UNAUTHENTICATE REPLACE".split())
_CONTINUE_LITERAL = b"+ Ready for literal data\r\n"


class ImapFront(PreloginCore):
    """One client connection's IMAP server side, up to a successful login."""

    _states, _ready = State, State.NOT_AUTHENTICATED

    def __init__(self, *, max_line: int = 8192, max_literal: int = 8192, max_errors: int = 10,
                 max_login_failures: int = 5, starttls: bool = False, tls_active: bool = False,
                 login_requires_tls: bool = False, greeting_text: str = "IMAP proxy ready",
                 id_fields: dict[str, str] | None = None) -> None:
        self.max_command = 4 * max_line + 2 * max_literal
        super().__init__(CommandReader(max_line=max_line, max_literal=max_literal, max_command=self.max_command),
                         starttls=starttls, tls_active=tls_active, login_requires_tls=login_requires_tls)
        self._reader: CommandReader
        self.max_errors = max_errors
        self.max_login_failures = max_login_failures
        self.greeting_text = reply_text(greeting_text, "IMAP proxy ready")
        self.id_fields = dict(id_fields or {})
        self._tag = ""  # of the AUTHENTICATE or login in progress
        self.errors = 0
        self.login_failures = 0
        self._handlers: dict[str, Callable[[str, Arguments, list[Event]], None]] = {
            "CAPABILITY": self._capability, "NOOP": self._noop, "LOGOUT": self._logout,
            "ID": self._id, "STARTTLS": self._starttls, "LOGIN": self._login,
            "AUTHENTICATE": self._authenticate,
        }

    # -- public API (and receive_data, tls_started, take_pending: PreloginCore) -------------
    @property
    def capabilities(self) -> str:
        """The pre-login capability list, e.g. ``IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN``."""
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID"]
        if self._starttls_offered:
            caps.append("STARTTLS")
        caps.append("LOGINDISABLED" if self._login_disabled else "AUTH=PLAIN")
        return " ".join(caps)

    def greeting(self) -> bytes:
        """The server greeting, ``* OK [CAPABILITY ...] text``."""
        return f"* OK [CAPABILITY {self.capabilities}] {self.greeting_text}\r\n".encode()

    def login_succeeded(self, capabilities: str | None, text: str = "Logged in") -> bytes:
        """The login worked: return the tagged OK (with the upstream's capabilities)."""
        if not self._end_login(State.DONE):
            return b""
        caps = _atoms(capabilities or "")
        code = f"[CAPABILITY {caps}] " if caps else ""
        return f"{self._tag} OK {code}{reply_text(text, 'Logged in')}\r\n".encode()

    def login_failed(self, code: str, text: str) -> list[Event]:
        """The login failed: answer NO [code] text, then go on with any pipelined input."""
        if not self._end_login(State.NOT_AUTHENTICATED):
            return []
        out: list[Event] = []
        self._fail_login(out, self._tag, code, text)
        return self._process(out)

    # -- the command loop -----------------------------------------------------------------
    def _process(self, out: list[Event] | None = None) -> list[Event]:
        out = [] if out is None else out
        while True:
            if self._state is State.AUTHENTICATE_CONTINUE:
                line = self._reader.read_line()
                if line is None:
                    break
                if isinstance(line, Rejected):
                    self._close(out, "line too long", "Line too long")
                else:
                    self._sasl_response(line, out)
                continue
            if self._state is not State.NOT_AUTHENTICATED:
                break
            event = self._reader.next_event()
            if event is None:
                break
            if isinstance(event, Command):
                self._dispatch(event.parts, out)
            elif isinstance(event, LiteralStart):
                tag = tag_of(event.head)
                if tag is None:
                    self._reader.abandon()
                    self._bad(out, None, "Invalid tag")
                else:
                    out.append(Send(_CONTINUE_LITERAL))
            elif event.fatal:
                self._close(out, event.reason.lower(), event.reason)
            else:
                self._bad(out, tag_of(event.head), event.reason)
        return out

    def _dispatch(self, parts: tuple[bytes, ...], out: list[Event]) -> None:
        tag = tag_of(parts[0])
        if tag is None:
            self._bad(out, None, "Missing or invalid tag")
            return
        args = Arguments(parts)
        args.token(TAG_CHARS)  # known to be followed by SP
        args.space()
        try:
            name = args.token(ATOM_CHARS, "a command").decode("ascii").upper()
        except ParseError:
            self._bad(out, tag, "Missing or invalid command name")
            return
        handler = self._handlers.get(name)
        if handler is None:
            known = name in _LATER_COMMANDS
            self._bad(out, tag, "Command not permitted before login" if known else "Unknown command")
            return
        try:
            handler(tag, args, out)
        except ParseError as exc:
            self._bad(out, tag, f"Invalid arguments for {name}: {exc}")

    # -- commands -------------------------------------------------------------------------
    def _capability(self, tag: str, args: Arguments, out: list[Event]) -> None:
        args.end()
        _reply(out, "*", f"CAPABILITY {self.capabilities}")
        _reply(out, tag, "OK Capability completed")

    def _noop(self, tag: str, args: Arguments, out: list[Event]) -> None:
        args.end()
        _reply(out, tag, "OK NOOP completed")

    def _logout(self, tag: str, args: Arguments, out: list[Event]) -> None:
        args.end()
        _reply(out, "*", "BYE Logging out")
        _reply(out, tag, "OK Logout completed")
        self._close(out, "logout")

    def _id(self, tag: str, args: Arguments, out: list[Event]) -> None:
        args.space()
        if args.peek() == ord("("):
            args.expect(b"(")
            while args.peek() != ord(")"):  # lenient: "()" is accepted too
                args.string()
                args.space()
                args.nstring()
                if args.peek() == ord(" "):
                    args.space()
                    if args.peek() == ord(")"):
                        raise ParseError("expected a string")
            args.expect(b")")
        elif args.token(ATOM_CHARS, "NIL").upper() != b"NIL":
            raise ParseError("expected a list or NIL")
        args.end()
        pairs = " ".join(f"{_quote(k)} {_quote(v)}" for k, v in self.id_fields.items())
        _reply(out, "*", f"ID ({pairs})" if pairs else "ID NIL")
        _reply(out, tag, "OK ID completed")

    def _starttls(self, tag: str, args: Arguments, out: list[Event]) -> None:
        args.end()
        if not self._starttls_offered:
            self._bad(out, tag, "STARTTLS is not available")
            return
        _reply(out, tag, "OK Begin TLS negotiation now")
        out.append(StartTLS())
        self._start_tls()

    def _login(self, tag: str, args: Arguments, out: list[Event]) -> None:
        args.space()
        user = args.astring()
        args.space()
        password = args.astring()
        args.end()
        if self._login_disabled:
            _reply(out, tag, "NO [PRIVACYREQUIRED] Use STARTTLS before logging in")
            return
        try:
            username = validate_username(user.decode("utf-8"))
            secret = validate_password(password.decode("utf-8"))
        except (UnicodeDecodeError, SaslError):
            self._fail_login(out, tag, "AUTHENTICATIONFAILED",
                             "Invalid characters in user name or password")
            return
        self._emit_login(out, tag, username, secret, "", "LOGIN")

    def _authenticate(self, tag: str, args: Arguments, out: list[Event]) -> None:
        args.space()
        mechanism = args.token(ATOM_CHARS, "a mechanism").decode("ascii").upper()
        initial = None
        if not args.at_end():
            args.space()
            initial = args.token(ATOM_CHARS, "base64")
        args.end()
        if mechanism != "PLAIN":
            _reply(out, tag, "NO [CANNOT] Unsupported authentication mechanism")
        elif self._login_disabled:
            _reply(out, tag, "NO [PRIVACYREQUIRED] Use STARTTLS before logging in")
        elif initial is not None:
            self._plain(tag, initial, out)
        else:
            out.append(Send(b"+ \r\n"))
            self._tag = tag
            self._state = State.AUTHENTICATE_CONTINUE

    def _sasl_response(self, line: bytes, out: list[Event]) -> None:
        self._state = State.NOT_AUTHENTICATED
        if line == b"*":
            self._bad(out, self._tag, "Authentication cancelled")
        else:
            self._plain(self._tag, line, out)

    def _plain(self, tag: str, response: bytes, out: list[Event]) -> None:
        try:
            creds = decode_plain(response)
        except SaslSyntaxError:
            self._bad(out, tag, "Invalid base64 in the SASL response")
            return
        except SaslError:
            self._fail_login(out, tag, "AUTHENTICATIONFAILED", "Invalid PLAIN credentials")
            return
        self._emit_login(out, tag, creds.authcid, creds.password, creds.authzid, "PLAIN")

    # -- helpers --------------------------------------------------------------------------
    def _emit_login(self, out: list[Event], tag: str, user: str, password: str, authzid: str,
                    mechanism: str) -> None:
        self._tag = tag
        self._state = State.AUTHENTICATING
        out.append(Login(tag, user, password, authzid, mechanism))

    def _fail_login(self, out: list[Event], tag: str, code: str, text: str) -> None:
        self.login_failures += 1
        code = str(code or "").strip()
        code = code if _atoms(code) == code else ""  # a single atom, or no code
        _reply(out, tag, (f"NO [{code}] " if code else "NO ") + reply_text(text, "Login failed"))
        if self.login_failures >= self.max_login_failures:
            self._close(out, "too many login failures", "Too many failed logins")

    def _bad(self, out: list[Event], tag: str | None, text: str) -> None:
        self.errors += 1
        _reply(out, tag or "*", "BAD " + text)
        if self.errors >= self.max_errors:
            self._close(out, "too many errors", "Too many invalid commands")

    def _close(self, out: list[Event], reason: str, bye: str | None = None) -> list[Event]:
        if bye is not None:
            _reply(out, "*", "BYE " + bye)
        out.append(Close(reason))
        self._state = State.CLOSED
        self._reader.take_rest()
        self._reader.abandon()
        return out


def _reply(out: list[Event], tag: str, text: str) -> None:
    out.append(Send(f"{tag} {text}\r\n".encode("ascii", "replace")))


@functools.lru_cache(maxsize=32)
def _atoms(text: str) -> str:
    """The space-separated atoms of ``text`` (e.g. capabilities or a response code).

    Cached: every login through one upstream answers with the same capability list (~300
    characters checked one by one, ~50 µs on each login's path to its reply)."""
    words = str(text or "").split()
    return " ".join(w for w in words if all(ord(c) in ATOM_CHARS for c in w))


def _quote(text: str) -> str:
    """A quoted string holding the printable form of ``text``."""
    text = printable(text)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
