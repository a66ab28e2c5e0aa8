"""Tests for the I/O-free pre-login POP3 core (proxy.pop3.core)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.pop3.core import Close, Login, Pop3Front, StartTLS, State
from tests.fuzz_targets import POP3_LIMITS, pop3_input, pop3_replies
from tests.test_imap_core import b64, feed, lines, logins  # the same helpers serve both cores

PASSWORD = "p a\"s\\s wörd "


# -- greeting and CAPA ----------------------------------------------------------------------
CAPS = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE"]
IMPLEMENTATION = [b"IMPLEMENTATION oauth2-mail-proxy"]


@pytest.mark.parametrize("kwargs, caps", [
    ({}, CAPS + [b"USER", b"SASL PLAIN"] + IMPLEMENTATION),
    ({"starttls": True}, CAPS + [b"USER", b"SASL PLAIN", b"STLS"] + IMPLEMENTATION),
    ({"starttls": True, "tls_active": True}, CAPS + [b"USER", b"SASL PLAIN"] + IMPLEMENTATION),
    ({"starttls": True, "login_requires_tls": True}, CAPS + [b"STLS"] + IMPLEMENTATION),
    ({"login_requires_tls": True, "tls_active": True}, CAPS + [b"USER", b"SASL PLAIN"] + IMPLEMENTATION),
])
def test_greeting_and_capa(kwargs, caps):
    front = Pop3Front(**kwargs)
    assert front.greeting() == b"+OK POP3 proxy ready\r\n"
    assert lines(feed(front, b"CAPA\r\n")) == [b"+OK Capability list follows\r\n" + b"".join(c + b"\r\n" for c in caps)
                                                 + b".\r\n"]
    assert front.state is State.AUTHORIZATION


def test_greeting_text_is_sanitized():
    assert Pop3Front(greeting_text="[IN-USE] hi\r\n-ERR\x00 ü").greeting() == b"+OK IN-USE] hi -ERR ?\r\n"


def test_bare_auth_lists_the_mechanisms():
    assert lines(feed(Pop3Front(), b"AUTH\r\n")) == [b"+OK\r\nPLAIN\r\n.\r\n"]
    assert lines(feed(Pop3Front(login_requires_tls=True), b"AUTH\r\n")) == [b"+OK\r\n.\r\n"]


# -- USER/PASS --------------------------------------------------------------------------------
def test_user_pass_gives_a_login_with_the_password_verbatim():
    front = Pop3Front()
    events = feed(front, b"user alice@firm.de\r\n", b"pass " + PASSWORD.encode() + b"\r\n")
    assert lines(events) == [b"+OK Send the password\r\n"]
    assert logins(events) == [Login("", "alice@firm.de", PASSWORD, "", "USER")]
    assert front.state is State.AUTHENTICATING
    assert PASSWORD not in repr(events)


@pytest.mark.parametrize("stream, reply", [
    (b"PASS secret\r\n", b"-ERR Send USER first\r\n"),
    (b"USER\r\n", b"-ERR Invalid user name\r\n"),
    (b"USER \r\n", b"-ERR Invalid user name\r\n"),
    (b"USER a\x01b\r\n", b"-ERR Invalid user name\r\n"),
    (b"USER \xff\xfe\r\n", b"-ERR Invalid user name\r\n"),
    (b"APOP alice 0123456789abcdef0123456789abcdef\r\n",
     b"-ERR APOP is not supported: use USER and PASS, or AUTH PLAIN\r\n"),
    (b"STAT\r\n", b"-ERR Not logged in\r\n"),
    (b"retr 1\r\n", b"-ERR Not logged in\r\n"),
    (b"NOOP\r\n", b"-ERR Not logged in\r\n"),
    (b"XYZZY\r\n", b"-ERR Unknown command\r\n"),
    (b"\r\n", b"-ERR Unknown command\r\n"),
    (b"US\x00ER a\r\n", b"-ERR Unknown command\r\n"),
    (b"CAPA x\r\n", b"-ERR CAPA takes no argument\r\n"),
    (b"STLS\r\n", b"-ERR STLS is not available\r\n"),
])
def test_errors_answer_one_line_and_go_on(stream, reply):
    front = Pop3Front()
    assert lines(feed(front, stream)) == [reply]
    assert front.errors == 1 and front.state is State.AUTHORIZATION


@pytest.mark.parametrize("password", [b"", b"a\x00b", b"\xff\xfe"])
def test_unusable_passwords_fail_as_a_login(password):
    front = Pop3Front()
    events = feed(front, b"USER alice\r\nPASS " + password + b"\r\n")
    assert lines(events)[-1] == b"-ERR [AUTH] The password is empty or has invalid characters\r\n"
    assert not logins(events) and front.login_failures == 1


def test_pass_uses_up_user():
    front = Pop3Front()
    feed(front, b"USER alice\r\nPASS one\r\n")
    front.login_failed("AUTH", "Wrong password")
    assert lines(feed(front, b"PASS two\r\n")) == [b"-ERR Send USER first\r\n"]


# -- AUTH PLAIN ---------------------------------------------------------------------------------
def test_auth_plain_with_initial_response():
    events = feed(Pop3Front(), b"AUTH PLAIN " + b64(b"\0alice\0" + PASSWORD.encode()) + b"\r\n")
    assert logins(events) == [Login("", "alice", PASSWORD, "", "PLAIN")] and not lines(events)


def test_auth_plain_with_continuation_and_authzid():
    front = Pop3Front()
    assert lines(feed(front, b"auth plain\r\n")) == [b"+ \r\n"]
    assert front.state is State.AUTH_CONTINUE
    events = feed(front, b64(b"alice\0alice\0pw") + b"\r\n")
    assert logins(events) == [Login("", "alice", "pw", "alice", "PLAIN")]


@pytest.mark.parametrize("response, reply, failure", [
    (b"*", b"-ERR Authentication cancelled\r\n", False),
    (b"!!!", b"-ERR Invalid base64 in the SASL response\r\n", False),
    (b"=", b"-ERR [AUTH] Invalid PLAIN credentials\r\n", True),
    (b"", b"-ERR [AUTH] Invalid PLAIN credentials\r\n", True),
    (b64(b"alice\0pw"), b"-ERR [AUTH] Invalid PLAIN credentials\r\n", True),
    (b"RETR 1", b"-ERR Invalid base64 in the SASL response\r\n", False),  # not taken for a command
])
def test_auth_plain_bad_responses(response, reply, failure):
    front = Pop3Front()
    events = feed(front, b"AUTH PLAIN\r\n", response + b"\r\n")
    assert lines(events) == [b"+ \r\n", reply]
    assert (front.login_failures, front.errors) == ((1, 0) if failure else (0, 1))
    assert front.state is State.AUTHORIZATION


@pytest.mark.parametrize("command", [b"AUTH XOAUTH2 dXNlcj0=", b"AUTH CRAM-MD5", b"AUTH LOGIN"])
def test_other_mechanisms_are_refused(command):
    assert lines(feed(Pop3Front(), command + b"\r\n")) == [b"-ERR Unsupported authentication mechanism\r\n"]


# -- STLS ------------------------------------------------------------------------------------------
def test_stls_discards_injected_bytes_and_forgets_user():
    front = Pop3Front(starttls=True)
    events = feed(front, b"USER alice\r\nSTLS\r\nPASS injected\r\n")
    assert lines(events) == [b"+OK Send the password\r\n", b"+OK Begin TLS negotiation now\r\n"]
    assert isinstance(events[-1], StartTLS) and front.state is State.STARTTLS
    assert feed(front, b"PASS more injected\r\n") == []
    front.tls_started()
    assert lines(feed(front, b"PASS pw\r\n")) == [b"-ERR Send USER first\r\n"]
    assert b"STLS" not in lines(feed(front, b"CAPA\r\n"))[0]
    assert lines(feed(front, b"STLS\r\n")) == [b"-ERR STLS is not available\r\n"]


def test_login_requires_tls():
    front = Pop3Front(starttls=True, login_requires_tls=True)
    events = feed(front, b"USER alice\r\nPASS pw\r\nAUTH PLAIN " + b64(b"\0alice\0pw") + b"\r\n")
    assert lines(events) == [b"-ERR Use STLS before logging in\r\n"] * 3
    assert not logins(events)
    feed(front, b"STLS\r\n")
    front.tls_started()
    assert logins(feed(front, b"USER alice\r\nPASS pw\r\n"))


# -- limits ---------------------------------------------------------------------------------------
def test_quit_closes_and_ignores_the_rest():
    front = Pop3Front()
    events = feed(front, b"QUIT\r\nUSER alice\r\n")
    assert lines(events) == [b"+OK Bye\r\n"] and isinstance(events[-1], Close)
    assert front.receive_data(b"USER bob\r\n") == [] and front.state is State.CLOSED


def test_too_many_errors_close_with_one_reply_to_the_last():
    front = Pop3Front(max_errors=3)
    events = feed(front, b"A\r\nB\r\nC\r\nD\r\n")
    assert lines(events) == [b"-ERR Unknown command\r\n"] * 2 + [
        b"-ERR Unknown command (too many invalid commands, closing)\r\n"]
    assert isinstance(events[-1], Close) and front.state is State.CLOSED


def test_too_many_login_failures_close():
    front = Pop3Front(max_login_failures=2)
    feed(front, b"USER a\r\nPASS b\r\nUSER a\r\nPASS c\r\nCAPA\r\n")
    events = front.login_failed("AUTH", "wrong")   # then the pipelined USER and PASS: a second login
    assert lines(events) == [b"-ERR [AUTH] wrong\r\n", b"+OK Send the password\r\n"] and logins(events)
    events = front.login_failed("AUTH", "wrong again")
    assert lines(events) == [b"-ERR [AUTH] wrong again (too many failed logins, closing)\r\n"]
    assert isinstance(events[-1], Close) and front.state is State.CLOSED


@pytest.mark.parametrize("chunk", [b"a" * 1_000_000, b"USER " + b"a" * 9000 + b"\r\n"])
def test_oversized_line_closes_and_frees_memory(chunk):
    front = Pop3Front()
    events = front.receive_data(chunk)
    assert lines(events) == [b"-ERR Line too long\r\n"] and isinstance(events[-1], Close)
    assert front.buffered == 0


def test_line_length_limit_boundary():
    front = Pop3Front(max_line=20)
    assert lines(feed(front, b"USER " + b"a" * 15 + b"\r\n")) == [b"+OK Send the password\r\n"]
    assert lines(feed(front, b"USER " + b"a" * 16 + b"\r\n")) == [b"-ERR Line too long\r\n"]


def test_a_plain_response_of_the_largest_size_fits_the_default_line():
    response = b64(b"\0" + b"u" * 100 + b"\0" + b"p" * 3990)  # 4,092 bytes decoded, the SASL limit
    assert logins(feed(Pop3Front(), b"AUTH PLAIN " + response + b"\r\n"))


# -- after the login -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, reply", [(None, b"+OK Logged in\r\n"), ("User successfully authenticated.",
                                         b"+OK User successfully authenticated.\r\n"),
                                         ("[SYS/TEMP]\r\n-ERR x", b"+OK SYS/TEMP] -ERR x\r\n")])
def test_login_succeeded_and_pipelined_commands_reach_take_pending_unchanged(text, reply):
    front = Pop3Front()
    feed(front, b"USER a\r\nPASS b\r\nSTAT\r\nRETR 1\r\n")
    assert feed(front, b"DELE 1\r\n\xff\r\nQUIT\r\n") == []
    assert front.login_succeeded(text) == reply
    assert front.take_pending() == b"STAT\r\nRETR 1\r\nDELE 1\r\n\xff\r\nQUIT\r\n"
    assert front.state is State.DONE


@pytest.mark.parametrize("code, text, reply", [
    ("AUTH", "Wrong password", b"-ERR [AUTH] Wrong password\r\n"),
    ("SYS/TEMP", "Login timed out\r\n+OK fake", b"-ERR [SYS/TEMP] Login timed out +OK fake\r\n"),
    ("not a code!", "x", b"-ERR x\r\n"),
    ("AUTH", "", b"-ERR [AUTH] Login failed\r\n"),
])
def test_login_failed_sanitizes_and_goes_on(code, text, reply):
    front = Pop3Front()
    feed(front, b"USER a\r\nPASS b\r\nCAPA\r\n")
    events = front.login_failed(code, text)
    assert lines(events)[0] == reply and lines(events)[1].startswith(b"+OK Capability list follows")


def test_api_misuse_raises():
    front = Pop3Front()
    with pytest.raises(RuntimeError):
        front.login_succeeded()
    with pytest.raises(RuntimeError):
        front.tls_started()


def test_eof_closes():
    front = Pop3Front()
    assert isinstance(front.receive_data(b"")[0], Close) and front.state is State.CLOSED


# -- properties (the fuzz driver's checks, with hypothesis) -----------------------------------------
_COMMANDS = st.sampled_from([b"USER alice", b"PASS pw", b"PASS ", b"USER", b"CAPA", b"AUTH", b"AUTH PLAIN",
                             b"AUTH PLAIN " + b64(b"\0alice\0pw"), b"AUTH PLAIN =", b"*", b"STLS", b"QUIT", b"STAT",
                             b"RETR 1", b"APOP a b", b"", b"x" * 80, b64(b"\0alice\0pw")])
_STREAMS = st.lists(st.one_of(_COMMANDS.map(lambda c: c + b"\r\n"), st.binary(max_size=12)), max_size=16).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=_STREAMS, flags=st.integers(0, 255), size=st.integers(0, 40))
def test_fuzz_any_chunking_gives_well_formed_replies_and_bounded_memory(stream, flags, size):
    pop3_input(bytes([flags, size]) + stream)


@settings(max_examples=150, deadline=None)
@given(stream=_STREAMS, size=st.integers(1, 30))
def test_fuzz_same_replies_whatever_the_chunking(stream, size):
    whole, chunked = Pop3Front(**POP3_LIMITS), Pop3Front(**POP3_LIMITS)
    one = pop3_replies(whole, [stream])
    assert pop3_replies(chunked, [stream[i:i + size] for i in range(0, len(stream), size)]) == one
