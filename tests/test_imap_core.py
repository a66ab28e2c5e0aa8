"""Tests for the I/O-free pre-login IMAP core (proxy.imap.core) and its reader."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.imap.core import Close, Event, ImapFront, Login, Send, StartTLS, State
from proxy.imap.reader import Arguments, ParseError, literal_marker

CAPS = b"IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN"
PASSWORD = 'p a"s\\s wörd'
CONTINUE = Send(b"+ Ready for literal data\r\n")


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def feed(front: ImapFront, *chunks: bytes) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events += front.receive_data(chunk)
    return events


def lines(events: list[Event]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, Send)]


def only_sends(events: list[Event]) -> bool:
    return all(isinstance(e, Send) for e in events)


def logins(events: list[Event]) -> list[Login]:
    return [e for e in events if isinstance(e, Login)]


# -- greeting and capabilities ------------------------------------------------------------
@pytest.mark.parametrize("kwargs, caps", [
    ({}, CAPS),
    ({"starttls": True}, b"IMAP4rev1 LITERAL+ SASL-IR ID STARTTLS AUTH=PLAIN"),
    ({"starttls": True, "tls_active": True}, CAPS),
    ({"starttls": True, "login_requires_tls": True}, b"IMAP4rev1 LITERAL+ SASL-IR ID STARTTLS LOGINDISABLED"),
    ({"login_requires_tls": True, "tls_active": True}, CAPS),
])
def test_greeting_and_capability(kwargs, caps):
    front = ImapFront(**kwargs)
    assert front.greeting() == b"* OK [CAPABILITY " + caps + b"] IMAP proxy ready\r\n"
    events = feed(front, b"a1 CAPABILITY\r\n")
    assert lines(events) == [b"* CAPABILITY " + caps + b"\r\n", b"a1 OK Capability completed\r\n"]
    assert front.state is State.NOT_AUTHENTICATED


def test_greeting_text_is_sanitized():
    front = ImapFront(greeting_text="[ALERT] hi\r\n* BYE\x00 ü")
    assert front.greeting() == b"* OK [CAPABILITY " + CAPS + b"] ALERT] hi * BYE ?\r\n"


def test_command_names_are_case_insensitive_and_bare_lf_is_accepted():
    events = feed(ImapFront(), b"x capability\nY NoOp\r\n")
    assert lines(events) == [b"* CAPABILITY " + CAPS + b"\r\n", b"x OK Capability completed\r\n",
                             b"Y OK NOOP completed\r\n"]


def test_commands_without_arguments_reject_arguments():
    events = feed(ImapFront(), b"a CAPABILITY x\r\nb NOOP \r\nc LOGOUT now\r\n")
    assert [line.split(b" ")[:2] for line in lines(events)] == [[b"a", b"BAD"], [b"b", b"BAD"],
                                                                [b"c", b"BAD"]]


def test_logout_closes_and_ignores_the_rest():
    front = ImapFront()
    events = feed(front, b"a LOGOUT\r\nb NOOP\r\n")
    assert events == [Send(b"* BYE Logging out\r\n"), Send(b"a OK Logout completed\r\n"), Close("logout")]
    assert front.state is State.CLOSED
    assert feed(front, b"c NOOP\r\n", b"") == []
    assert front.buffered == 0


def test_eof_closes():
    front = ImapFront()
    assert feed(front, b"a NO", b"") == [Close("client closed the connection")]
    assert front.state is State.CLOSED


# -- ID -----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [
    b'a ID NIL', b'a ID nil', b'a ID ("name" "Thunderbird" "version" "115.0")', b'a ID ("name" NIL)',
    b'a ID ({4}\r\nname "x")', b'a ID ("name" {2+}\r\nab)', b'a ID ()',
])
def test_id_accepted(command):
    front = ImapFront(id_fields={"name": 'oauth2 "proxy"', "version": "1\r\n"})
    events = feed(front, command + b"\r\n")
    assert [e for e in events if e != CONTINUE] == [
        Send(b'* ID ("name" "oauth2 \\"proxy\\"" "version" "1")\r\n'), Send(b"a OK ID completed\r\n")]


def test_id_without_fields_answers_nil():
    assert lines(feed(ImapFront(), b"a ID NIL\r\n")) == [b"* ID NIL\r\n", b"a OK ID completed\r\n"]


@pytest.mark.parametrize("command", [
    b"a ID", b"a ID ", b"a ID (", b'a ID ("name")', b'a ID ("name" "x"', b"a ID foo", b'a ID ("a" "b")x',
    b'a ID ("a""b")', b'a ID ("a" "b" )', b"a ID (name x)", b"a ID NIL NIL", b'a ID ("a" "b\\x")',
])
def test_id_malformed(command):
    events = feed(ImapFront(), command + b"\r\n")
    assert len(events) == 1 and events[0].data.startswith(b"a BAD ")


# -- LOGIN --------------------------------------------------------------------------------
@pytest.mark.parametrize("args, user, password", [
    (b"alice secret", "alice", "secret"),
    (b'"alice@example.com" "se cr\\"et\\\\"', "alice@example.com", 'se cr"et\\'),
    (b"alice] ]", "alice]", "]"),
    ('"jürgen" "pässwörd"'.encode(), "jürgen", "pässwörd"),
    (b"alice {6+}\r\n  x  y", "alice", "  x  y"),
])
def test_login(args, user, password):
    front = ImapFront()
    events = feed(front, b"t1 LOGIN " + args + b"\r\n")
    assert events == [Login("t1", user, password, "", "LOGIN")]
    assert front.state is State.AUTHENTICATING


def test_login_with_synchronizing_literal_password():
    raw = PASSWORD.encode()
    front = ImapFront()
    first = feed(front, b"t LOGIN {5}\r\n")
    assert first == [CONTINUE]
    second = feed(front, b"alice {%d}\r\n" % len(raw))
    assert second == [CONTINUE]
    assert feed(front, raw) == []
    assert feed(front, b"\r\n") == [Login("t", "alice", PASSWORD, "", "LOGIN")]


def test_login_event_repr_hides_the_password():
    event = feed(ImapFront(), b"t LOGIN alice hunter2\r\n")[0]
    assert isinstance(event, Login) and event.password == "hunter2"
    assert "hunter2" not in repr(event) and "alice" in repr(event)


@pytest.mark.parametrize("args", [b"", b"alice", b"alice ", b"alice secret extra", b"alice  secret",
                                  b'"alice secret', b'alice "sec\\ret"', b"al(ice secret", b"alice sec%ret",
                                  b"alice {3}x", b'alice "a\x00b"'])
def test_login_syntax_errors(args):
    events = feed(ImapFront(), b"t LOGIN " + args + b"\r\n")
    assert len(events) == 1 and events[0].data.startswith(b"t BAD ")


@pytest.mark.parametrize("args", [b'"" secret', b'alice ""', b"{2+}\r\n\xff\xfe secret",
                                  b"alice {2+}\r\na\x00", b"alice {3+}\r\na\r\n", b"{3+}\r\na\nb secret",
                                  b"{3+}\r\na\x01b secret"])
def test_login_invalid_credentials(args):
    front = ImapFront()
    events = feed(front, b"t LOGIN " + args + b"\r\n")
    assert lines(events) == [b"t NO [AUTHENTICATIONFAILED] Invalid characters in user name or password\r\n"]
    assert front.login_failures == 1 and front.state is State.NOT_AUTHENTICATED


def test_literal_marker_inside_a_quoted_string_is_not_a_literal():
    events = feed(ImapFront(), b't LOGIN alice "x{3}\r\n')
    assert CONTINUE not in events
    assert lines(events)[0].startswith(b"t BAD ")


# -- AUTHENTICATE -------------------------------------------------------------------------
def test_authenticate_plain_with_initial_response():
    front = ImapFront()
    events = feed(front, b"a AUTHENTICATE PLAIN " + b64(b"\x00alice\x00" + PASSWORD.encode()) + b"\r\n")
    assert events == [Login("a", "alice", PASSWORD, "", "PLAIN")]


def test_authenticate_plain_with_continuation_and_authzid():
    front = ImapFront()
    assert feed(front, b"a authenticate plain\r\n") == [Send(b"+ \r\n")]
    assert front.state is State.AUTHENTICATE_CONTINUE
    events = feed(front, b64(b"boss\x00alice\x00pw") + b"\r\n")
    assert events == [Login("a", "alice", "pw", "boss", "PLAIN")]


def test_authenticate_response_line_is_not_a_command_and_has_no_literals():
    front = ImapFront()
    events = feed(front, b"a AUTHENTICATE PLAIN\r\nb NOOP {5}\r\n")
    assert events == [Send(b"+ \r\n"), Send(b"a BAD Invalid base64 in the SASL response\r\n")]


def test_authenticate_cancel():
    front = ImapFront()
    events = feed(front, b"a AUTHENTICATE PLAIN\r\n*\r\nb NOOP\r\n")
    assert lines(events) == [b"+ \r\n", b"a BAD Authentication cancelled\r\n", b"b OK NOOP completed\r\n"]


@pytest.mark.parametrize("response, reply", [
    (b"=", b"a NO [AUTHENTICATIONFAILED] Invalid PLAIN credentials\r\n"),
    (b64(b"alice\x00pw"), b"a NO [AUTHENTICATIONFAILED] Invalid PLAIN credentials\r\n"),
    (b64(b"\x00alice\x00"), b"a NO [AUTHENTICATIONFAILED] Invalid PLAIN credentials\r\n"),
    (b64(b"\x00alice\x00p\r\nw"), b"a NO [AUTHENTICATIONFAILED] Invalid PLAIN credentials\r\n"),
    (b"AHUAcA", b"a BAD Invalid base64 in the SASL response\r\n"),
    (b"AHUAcB==", b"a BAD Invalid base64 in the SASL response\r\n"),
])
def test_authenticate_invalid_responses(response, reply):
    for stream in (b"a AUTHENTICATE PLAIN " + response + b"\r\n",
                   b"a AUTHENTICATE PLAIN\r\n" + response + b"\r\n"):
        events = [e for e in feed(ImapFront(), stream) if e != Send(b"+ \r\n")]
        assert lines(events) == [reply]


def test_authenticate_empty_continuation_line_fails():
    assert lines(feed(ImapFront(), b"a AUTHENTICATE PLAIN\r\n\r\n"))[1].startswith(b"a NO ")


@pytest.mark.parametrize("command", [b"a AUTHENTICATE XOAUTH2 abc", b"a AUTHENTICATE CRAM-MD5",
                                     b"a AUTHENTICATE LOGIN"])
def test_authenticate_other_mechanisms(command):
    events = feed(ImapFront(), command + b"\r\n")
    assert lines(events) == [b"a NO [CANNOT] Unsupported authentication mechanism\r\n"]


@pytest.mark.parametrize("command", [b"a AUTHENTICATE", b"a AUTHENTICATE PLAIN abc def",
                                     b"a AUTHENTICATE PLAIN {4+}\r\nAHUA", b"a AUTHENTICATE (PLAIN)"])
def test_authenticate_syntax_errors(command):
    events = feed(ImapFront(), command + b"\r\n")
    assert len(events) == 1 and lines(events)[0].startswith(b"a BAD ")


# -- TLS ----------------------------------------------------------------------------------
def test_starttls_discards_injected_bytes():
    front = ImapFront(starttls=True)
    events = feed(front, b"s STARTTLS\r\nx LOGIN alice pw\r\ny LOGOUT\r\n")
    assert events == [Send(b"s OK Begin TLS negotiation now\r\n"), StartTLS()]
    assert front.state is State.STARTTLS and front.buffered == 0
    assert feed(front, b"z LOGIN injected pw\r\n") == []
    front.tls_started()
    assert front.buffered == 0
    assert lines(feed(front, b"c CAPABILITY\r\n"))[0] == b"* CAPABILITY " + CAPS + b"\r\n"
    assert lines(feed(front, b"d STARTTLS\r\n"))[0].startswith(b"d BAD ")


def test_starttls_not_offered():
    assert lines(feed(ImapFront(), b"s STARTTLS\r\n")) == [b"s BAD STARTTLS is not available\r\n"]


def test_login_requires_tls():
    front = ImapFront(starttls=True, login_requires_tls=True)
    events = feed(front, b"a LOGIN alice pw\r\nb AUTHENTICATE PLAIN " + b64(b"\x00alice\x00pw") + b"\r\n")
    assert lines(events) == [b"a NO [PRIVACYREQUIRED] Use STARTTLS before logging in\r\n",
                             b"b NO [PRIVACYREQUIRED] Use STARTTLS before logging in\r\n"]
    feed(front, b"s STARTTLS\r\n")
    front.tls_started()
    assert feed(front, b"c LOGIN alice pw\r\n") == [Login("c", "alice", "pw", "", "LOGIN")]


# -- errors, tags, unknown commands -------------------------------------------------------
@pytest.mark.parametrize("line", [b"", b" NOOP", b"+ NOOP", b"* NOOP", b'"a" NOOP', b"a{ NOOP", b"a(b NOOP",
                                  b"\xc3\xa4 NOOP", b"a\x01 NOOP", b"a%b NOOP", b"{3}"])
def test_bad_tags_get_untagged_bad(line):
    front = ImapFront()
    events = feed(front, line + b"\r\n")
    assert lines(events) in ([b"* BAD Missing or invalid tag\r\n"], [b"* BAD Invalid tag\r\n"])
    assert front.errors == 1


@pytest.mark.parametrize("line, reply", [
    (b"a", b"* BAD Missing or invalid tag\r\n"),
    (b"a ", b"a BAD Missing or invalid command name\r\n"),
    (b"a  NOOP", b"a BAD Missing or invalid command name\r\n"),
    (b"a FROB", b"a BAD Unknown command\r\n"),
    (b"a SELECT INBOX", b"a BAD Command not permitted before login\r\n"),
    (b"a uid fetch 1:* FLAGS", b"a BAD Command not permitted before login\r\n"),
    (b"a] ENABLE UTF8=ACCEPT", b"a] BAD Command not permitted before login\r\n"),
])
def test_bad_commands(line, reply):
    assert lines(feed(ImapFront(), line + b"\r\n")) == [reply]


def test_too_many_errors_disconnects():
    front = ImapFront(max_errors=3)
    events = feed(front, b"garbage\r\nmore garbage\r\n")
    assert only_sends(events) and len(events) == 2 and front.state is State.NOT_AUTHENTICATED
    events = feed(front, b"x FOO\r\nb NOOP\r\n")
    assert events == [Send(b"x BAD Unknown command\r\n"), Send(b"* BYE Too many invalid commands\r\n"),
                      Close("too many errors")]


# -- limits -------------------------------------------------------------------------------
def test_line_length_limit_boundary():
    ok = b"a NOOP" + b" " * 94  # 100 bytes of content: parsed (and rejected as BAD)
    front = ImapFront(max_line=100)
    assert lines(feed(front, ok + b"\r\n"))[0].startswith(b"a BAD")
    assert feed(front, ok + b"\r") == []  # a CR at the limit may still be followed by LF
    assert front.state is State.NOT_AUTHENTICATED
    assert lines(feed(front, b"\n"))[0].startswith(b"a BAD")
    events = feed(front, ok + b"x")
    assert events == [Send(b"* BYE Line too long\r\n"), Close("line too long")]
    events = feed(ImapFront(max_line=100), ok + b"x\r\n")  # the same when the LF is already there
    assert events == [Send(b"* BYE Line too long\r\n"), Close("line too long")]


@pytest.mark.parametrize("chunk", [b"a" * 1_000_000, b"a" * 9000 + b"\r\n"])
def test_oversized_line_disconnects_and_frees_memory(chunk):
    front = ImapFront()
    assert feed(front, chunk) == [Send(b"* BYE Line too long\r\n"), Close("line too long")]
    assert front.buffered == 0


def test_oversized_continuation_line_disconnects():
    front = ImapFront(max_line=50)
    events = feed(front, b"a AUTHENTICATE PLAIN\r\n" + b"A" * 51)
    assert events[-2:] == [Send(b"* BYE Line too long\r\n"), Close("line too long")]


def test_oversized_synchronizing_literal_is_refused():
    front = ImapFront(max_literal=100)
    events = feed(front, b"a LOGIN {101}\r\n")
    assert events == [Send(b"a BAD Literal too large\r\n")]
    assert front.buffered == 0
    assert lines(feed(front, b"b NOOP\r\n")) == [b"b OK NOOP completed\r\n"]
    # exactly at the limit is fine
    events = feed(front, b"c LOGIN {100}\r\n" + b"u" * 100 + b" pw\r\n")
    assert events == [CONTINUE, Login("c", "u" * 100, "pw", "", "LOGIN")]


@pytest.mark.parametrize("marker", [b"{2147483648}", b"{4294967296}", b"{" + b"9" * 5000 + b"}"])
def test_two_gigabyte_synchronizing_literal(marker):
    front = ImapFront()
    assert feed(front, b"a LOGIN alice " + marker + b"\r\n") == [Send(b"a BAD Literal too large\r\n")]
    assert front.buffered == 0 and front.state is State.NOT_AUTHENTICATED


@pytest.mark.parametrize("marker", [b"{8193+}", b"{2147483648+}"])
def test_oversized_non_synchronizing_literal_disconnects(marker):
    front = ImapFront()
    events = feed(front, b"a LOGIN alice " + marker + b"\r\n" + b"x" * 10000)
    assert events == [Send(b"* BYE Literal too large\r\n"), Close("literal too large")]
    assert front.buffered == 0


def test_oversized_literal_with_invalid_tag():
    assert feed(ImapFront(), b"+ LOGIN {9999}\r\n") == [Send(b"* BAD Literal too large\r\n")]


def test_synchronizing_literal_with_invalid_tag_gets_no_continuation():
    front = ImapFront()
    assert feed(front, b"* LOGIN {5}\r\n") == [Send(b"* BAD Invalid tag\r\n")]
    assert lines(feed(front, b"b NOOP\r\n")) == [b"b OK NOOP completed\r\n"]


def test_total_command_size_is_bounded():
    # A command is at most 4 * 100 + 2 * 100 bytes; each literal below adds 109 bytes.
    front = ImapFront(max_line=100, max_literal=100)
    events = feed(front, b"a ID (" + b"{100+}\r\n" + (b"x" * 100 + b" {100+}\r\n") * 4)
    assert events == []
    assert feed(front, b"x" * 100 + b" {100+}\r\n") == [Send(b"* BYE Literal too large\r\n"),
                                                      Close("literal too large")]
    front = ImapFront(max_line=100, max_literal=100)
    events = feed(front, b"a ID (" + b"{100}\r\n" + (b"x" * 100 + b" {100}\r\n") * 5)
    assert events == [CONTINUE] * 5 + [Send(b"a BAD Literal too large\r\n")]
    assert front.buffered == 0


def test_many_empty_literals_are_bounded():
    front = ImapFront(max_line=100, max_literal=100)
    events = feed(front, b"a NOOP " + b"{0+}\r\n" * 1000)
    assert events == [Send(b"* BYE Literal too large\r\n"), Close("literal too large")]


# -- the login hand-off -------------------------------------------------------------------
def test_pipelined_commands_after_login_reach_take_pending_unchanged():
    after = b"b SELECT INBOX\r\nc APPEND INBOX {5}\r\nhello\r\nd FETCH 1 BODY[]\r\n\xff\x00garbage"
    front = ImapFront()
    events = feed(front, b"a0 CAPABILITY\r\na LOGIN alice pw\r\n" + after[:20])
    assert isinstance(events[-1], Login) and len(events) == 3
    assert feed(front, after[20:]) == []  # buffered, not parsed: no continuation for APPEND
    assert front.buffered == len(after)
    reply = front.login_succeeded("IMAP4rev1 IDLE MOVE")
    assert reply == b"a OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n"
    assert front.state is State.DONE
    assert front.take_pending() == after
    assert front.take_pending() == b""
    feed(front, b"late")
    assert front.take_pending() == b"late"


@pytest.mark.parametrize("caps, reply", [
    (None, b"a OK Logged in\r\n"),
    ("", b"a OK Logged in\r\n"),
    ("IMAP4rev1]\r\n* BYE x \x00 IDLE", b"a OK [CAPABILITY BYE x IDLE] Logged in\r\n"),
])
def test_login_succeeded_sanitizes_capabilities(caps, reply):
    front = ImapFront()
    feed(front, b"a LOGIN alice pw\r\n")
    assert front.login_succeeded(caps) == reply


def test_login_failed_then_pipelined_login():
    front = ImapFront()
    first = feed(front, b"a LOGIN alice wrong\r\nb LOGIN alice right\r\nc NOOP\r\n")
    assert first == [Login("a", "alice", "wrong", "", "LOGIN")]
    second = front.login_failed("AUTHENTICATIONFAILED", "Invalid\r\ncredentials \x07 ü")
    assert second == [Send(b"a NO [AUTHENTICATIONFAILED] Invalid credentials ?\r\n"),
                      Login("b", "alice", "right", "", "LOGIN")]
    assert front.login_succeeded(None, "Welcome\r\n") == b"b OK Welcome\r\n"
    assert front.take_pending() == b"c NOOP\r\n"


@pytest.mark.parametrize("code, text, reply", [
    ("", "Nope", b"a NO Nope\r\n"),
    ("BAD CODE]", "[ALERT] fake", b"a NO ALERT] fake\r\n"),
    (" ALERT ", "x", b"a NO [ALERT] x\r\n"),
    ("UNAVAILABLE", "", b"a NO [UNAVAILABLE] Login failed\r\n"),
    ("X]Y", "x" * 5000, b"a NO " + b"x" * 1000 + b"\r\n"),
])
def test_login_failed_sanitizes(code, text, reply):
    front = ImapFront()
    feed(front, b"a LOGIN alice pw\r\n")
    assert lines(front.login_failed(code, text)) == [reply]


def test_max_login_failures():
    front = ImapFront(max_login_failures=3)
    for n in range(2):
        assert logins(feed(front, b"t%d LOGIN alice pw\r\n" % n))
        reply = lines(front.login_failed("AUTHENTICATIONFAILED", "no"))
        assert reply == [b"t%d NO [AUTHENTICATIONFAILED] no\r\n" % n]
    feed(front, b"t2 LOGIN alice pw\r\nt3 LOGIN alice pw\r\n")
    assert front.login_failed("AUTHENTICATIONFAILED", "no") == [
        Send(b"t2 NO [AUTHENTICATIONFAILED] no\r\n"), Send(b"* BYE Too many failed logins\r\n"),
        Close("too many login failures")]
    assert front.state is State.CLOSED and front.buffered == 0


def test_login_failures_count_local_rejections():
    front = ImapFront(max_login_failures=2)
    feed(front, b'a LOGIN "" x\r\n')
    events = feed(front, b"b AUTHENTICATE PLAIN =\r\n")
    assert events[-2:] == [Send(b"* BYE Too many failed logins\r\n"), Close("too many login failures")]


def test_input_during_login_is_buffered_and_eof_closes():
    front = ImapFront()
    feed(front, b"a LOGIN alice pw\r\n")
    assert feed(front, b"garbage " * 100) == [] and front.buffered == 800
    assert feed(front, b"") == [Close("client closed the connection")]
    assert front.login_failed("AUTHENTICATIONFAILED", "late") == []  # harmless after close
    assert front.login_succeeded("IMAP4rev1") == b""


def test_api_misuse_raises():
    front = ImapFront()
    with pytest.raises(RuntimeError):
        front.login_succeeded(None)
    with pytest.raises(RuntimeError):
        front.login_failed("X", "y")
    with pytest.raises(RuntimeError):
        front.tls_started()


# -- the reader's helpers -----------------------------------------------------------------
@pytest.mark.parametrize("line, result", [
    (b"a LOGIN {5}", (8, 5, True)), (b"a LOGIN {5+}", (8, 5, False)), (b"{0}", (0, 0, True)),
    (b'a "x" {5}', (6, 5, True)), (b'a "x\\" {5}', None), (b"a {5}x", None), (b"a {}", None),
    (b"a {-1}", None), (b"a {5++}", None), (b"a { 5}", None),
])
def test_literal_marker(line, result):
    assert literal_marker(line) == result


def test_arguments_tokens():
    args = Arguments((b'x "q\\"" ', b"lit", b" NIL"))
    assert args.astring() == b"x"
    args.space()
    assert args.astring() == b'q"'
    args.space()
    assert args.nstring() == b"lit"
    args.space()
    assert args.nstring() is None
    args.end()
    with pytest.raises(ParseError):
        Arguments((b"x",)).space()


# -- chunking independence on fixed transcripts -------------------------------------------
TRANSCRIPTS = [
    b"a CAPABILITY\r\nb ID (\"name\" {3}\r\nabc)\r\nc LOGIN {5}\r\nalice {%d+}\r\n%s\r\n"
    % (len(PASSWORD.encode()), PASSWORD.encode()) + b"d LOGIN alice pw\r\ne SELECT INBOX\r\n",
    b"a AUTHENTICATE PLAIN\r\n" + b64(b"\x00alice\x00pw") + b"\r\nb AUTHENTICATE PLAIN\r\n*\r\nc LOGOUT\r\n",
    b"\r\n\r\nx\r\n+ NOOP\r\na LOGIN {9999}\r\nb LOGIN {99+}\r\n" + b"y" * 99 + b"\r\n" + b"z" * 200,
    b"s STARTTLS\r\nb LOGIN injected pw\r\n",
    b"a NOOP" + b" " * 94 + b"\r\nb NOOP" + b" " * 95 + b"\r\n",  # max_line, then max_line + 1
    b"a AUTHENTICATE PLAIN\r\n" + b"A" * 100 + b"\r\nb AUTHENTICATE PLAIN\r\n" + b"A" * 101 + b"\r\n",
]


def drive(front: ImapFront, chunks: list[bytes], *, succeed: bool = False, code: str = "AUTHENTICATIONFAILED",
          text: str = "no", caps: str = "IMAP4rev1") -> list[Event]:
    """Feed chunks like the shell would: answer each Login at once, stop at StartTLS or Close."""
    events: list[Event] = []
    for chunk in chunks:
        if front.state in (State.CLOSED, State.STARTTLS):
            break
        new = front.receive_data(chunk)
        i = 0
        while i < len(new):
            if isinstance(new[i], Login):
                if succeed:
                    new.append(Send(front.login_succeeded(caps, text)))
                else:
                    new += front.login_failed(code, text)
            i += 1
        events += new
    return events


@pytest.mark.parametrize("stream", TRANSCRIPTS)
@pytest.mark.parametrize("succeed", [False, True])
def test_same_events_whatever_the_chunking(stream, succeed):
    def run(chunks):
        front = ImapFront(starttls=True, max_line=100, max_literal=100)
        return drive(front, chunks, succeed=succeed), front.take_pending()

    whole = run([stream])
    assert whole[0]  # something happened
    assert run([stream[i:i + 1] for i in range(len(stream))]) == whole
    for cut in range(1, len(stream)):
        assert run([stream[:cut], stream[cut:]]) == whole, cut


# -- property tests -----------------------------------------------------------------------
FRAGMENTS = [b"a ", b"b1 ", b"LOGIN ", b"login ", b"AUTHENTICATE PLAIN", b" ", b"{3}", b"{3+}", b"{0}",
             b"{40}", b"{40+}", b"{99999999999}", b"\r\n", b"\n", b"\r", b'"', b"\\", b"*", b"+",
             b"AHUAcA==", b"=", b"CAPABILITY", b"STARTTLS", b"ID (", b")", b"NIL", b"alice", b"pw",
             b"\x00", b"\xff", b"LOGOUT", b"NOOP", b"SELECT", b"(", b"]", b"x" * 70]


def _literal(sync: bool) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=40).map(lambda d: b"{%d%s}\r\n%s" % (len(d), b"" if sync else b"+", d))


def _quoted(text: str) -> bytes:
    return b'"' + text.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


ARGUMENTS = st.one_of(
    st.sampled_from([b"alice", b"pw", b"NIL", b"PLAIN", b"=", b"*", b"(", b")", b'""', b"()", b'("name"']),
    st.text(max_size=10).map(_quoted), st.binary(max_size=8), _literal(True), _literal(False),
    st.lists(st.text(max_size=6), min_size=3, max_size=3).map(lambda t: b64("\0".join(t).encode())),
)
COMMANDS = st.builds(
    lambda tag, name, args, end: tag + b" " + name + b"".join(b" " + a for a in args) + end,
    st.sampled_from([b"a", b"B2", b"*", b"+", b"", b"t]"]),
    st.sampled_from([b"LOGIN", b"login", b"AUTHENTICATE PLAIN", b"CAPABILITY", b"NOOP", b"ID", b"STARTTLS",
                     b"LOGOUT", b"SELECT", b"FOO", b"authenticate xoauth2"]),
    st.lists(ARGUMENTS, max_size=4), st.sampled_from([b"\r\n", b"\r\n", b"\n", b""]))
TAGS = st.sampled_from([b"a", b"B2", b"t]", b"0.1"])
ASTRINGS = st.one_of(st.from_regex(rb"\A[a-z0-9@.]{1,8}\Z"), st.text(max_size=10).map(_quoted),
                     _literal(True), _literal(False))
PLAIN = st.lists(st.text(max_size=6), min_size=3, max_size=3).map(lambda t: b64("\0".join(t).encode()))
VALID = st.one_of(  # well-formed commands (with possibly unacceptable credentials)
    st.builds(lambda t, u, p: t + b" LOGIN " + u + b" " + p + b"\r\n", TAGS, ASTRINGS, ASTRINGS),
    st.builds(lambda t, r: t + b" AUTHENTICATE PLAIN " + r + b"\r\n", TAGS, PLAIN),
    st.builds(lambda t, r: t + b" AUTHENTICATE PLAIN\r\n" + r + b"\r\n", TAGS, PLAIN | st.just(b"*")),
    st.builds(lambda t, c: t + b" " + c + b"\r\n", TAGS,
              st.sampled_from([b"CAPABILITY", b"NOOP", b"ID NIL", b'ID ("a" "b" "c" NIL)', b"STARTTLS"])),
)
STREAMS = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(VALID, VALID, VALID, COMMANDS, st.sampled_from(FRAGMENTS), st.binary(max_size=6)),
             max_size=12).map(b"".join),
)
TAG = b"[" + re.escape(bytes(sorted(set(range(0x21, 0x7F)) - set(b'(){%*"\\+')))) + b"]+"
REPLY = re.compile(rb"(\*|\+|" + TAG + rb") [\x20-\x7e]*\r\n")
LIMITS = dict(max_line=64, max_literal=32, max_errors=6, max_login_failures=3)


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in zip(points, points[1:])]


def check_events(events: list[Event]) -> None:
    for n, event in enumerate(events):
        if isinstance(event, Send):
            assert REPLY.fullmatch(event.data), event.data
            assert not event.data.startswith(b"+ ") or event.data in (b"+ \r\n", CONTINUE.data)
        elif isinstance(event, Login):
            assert event.username and event.password and event.tag
            assert not set(event.password) & set("\x00\r\n") and not set(event.username) & set("\x00\r\n")
        elif isinstance(event, (Close, StartTLS)):
            assert n == len(events) - 1  # nothing may follow
        else:
            raise AssertionError(f"unexpected event {event!r}")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=STREAMS, cuts=st.lists(st.integers(min_value=0), max_size=12), starttls=st.booleans(),
       succeed=st.booleans(), code=st.sampled_from(["AUTHENTICATIONFAILED", "", "A]B", "X\r\n"]),
       text=st.text(max_size=20), caps=st.text(max_size=20))
def test_fuzz_chunking_wellformedness_and_memory(stream, cuts, starttls, succeed, code, text, caps):
    """Random streams and chunkings: no exception, well-formed replies, bounded memory, and
    the same events and leftover bytes whatever the chunking."""
    bound = 4 * LIMITS["max_line"] + 2 * LIMITS["max_literal"] + LIMITS["max_line"] + 2

    def run(chunks: list[bytes]):
        front = ImapFront(starttls=starttls, **LIMITS)
        events: list[Event] = []
        for chunk in filter(None, chunks):  # b"" would mean EOF
            events += drive(front, [chunk], succeed=succeed, code=code, text=text, caps=caps)
            if front.state in (State.NOT_AUTHENTICATED, State.AUTHENTICATE_CONTINUE):
                assert front.buffered <= bound
        return events, front.receive_data(b""), front.take_pending()

    whole = run([stream])
    check_events(whole[0])
    assert whole[1] in ([], [Close("client closed the connection")])
    assert isinstance((whole[0] + whole[1])[-1], (Close, StartTLS))
    assert run(chunked(stream, cuts)) == whole
    assert run([stream[i:i + 1] for i in range(len(stream))]) == whole


@settings(max_examples=200, deadline=None)
@given(prefix=STREAMS, after=st.binary(max_size=200))
def test_fuzz_bytes_after_login_reach_take_pending(prefix, after):
    front = ImapFront(**LIMITS)
    drive(front, [prefix])
    if front.state is not State.NOT_AUTHENTICATED or front.buffered:
        return  # the random prefix left the core elsewhere; covered by the other tests
    events = front.receive_data(b"z LOGIN alice pw\r\n" + after)
    assert events[-1] == Login("z", "alice", "pw", "", "LOGIN")
    front.login_succeeded(None)
    assert front.take_pending() == after
