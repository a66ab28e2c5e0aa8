"""Tests for proxy.sasl: XOAUTH2 encoding, PLAIN and LOGIN decoding, error challenges."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.sasl import (MAX_RESPONSE, PlainCredentials, SaslError, SaslSyntaxError, decode_login_step,
                        decode_plain, encode_login_prompt, parse_xoauth2_error, validate_password,
                        validate_username, xoauth2_initial_response)

PASSWORD = "s3cret-Pässwörd"


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


# -- XOAUTH2 ------------------------------------------------------------------------------
def test_xoauth2_initial_response_exact_bytes():
    got = xoauth2_initial_response("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg")
    # The example from Google's XOAUTH2 documentation.
    assert got == (b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhk"
                   b"SFJoZG1semRHRXVZMjl0Q2cBAQ==")
    assert b"\n" not in got and got.isascii()


def test_xoauth2_decodes_to_the_documented_layout():
    raw = base64.b64decode(xoauth2_initial_response("ü@example.com", "tok"))
    assert raw == "user=ü@example.com\x01auth=Bearer tok\x01\x01".encode()


@pytest.mark.parametrize("user, token", [("a\x01b", "Zq9"), ("", "Zq9"), ("u\r\n", "Zq9"), ("u", "Zq9\x01"),
                                         ("u", ""), ("u", "Zq9 x")])
def test_xoauth2_refuses_injection(user, token):
    with pytest.raises(SaslError) as info:
        xoauth2_initial_response(user, token)
    assert "Zq9" not in str(info.value)


# -- PLAIN --------------------------------------------------------------------------------
def test_decode_plain_ok():
    creds = decode_plain(b64(b"\x00alice@example.com\x00" + PASSWORD.encode()))
    assert creds == PlainCredentials("", "alice@example.com", PASSWORD)


def test_decode_plain_with_authzid_and_line_terminator():
    creds = decode_plain(b64(b"boss\x00alice\x00pw") + b"\r\n")
    assert (creds.authzid, creds.authcid, creds.password) == ("boss", "alice", "pw")


def test_plain_credentials_repr_hides_password():
    creds = decode_plain(b64(b"\x00alice\x00" + PASSWORD.encode()))
    assert PASSWORD not in repr(creds) and "alice" in repr(creds)
    assert "password=" not in repr(creds)


def test_decode_plain_password_may_contain_spaces_and_quotes():
    assert decode_plain(b64(b'\x00u\x00 a "b" \\c ')).password == ' a "b" \\c '


@pytest.mark.parametrize("data, syntax", [
    (b"", False),                           # empty response
    (b"=", False),                          # SASL-IR spelling of an empty response
    (b"AHUAcA", True),                      # missing padding
    (b"AHUAcA=", True),                     # wrong padding
    (b"AHUA cA==", True),                   # inner space
    (b"AHUAcA==\x00", True),                # junk after
    (b"AH=AcA==", True),                    # padding in the middle
    (b"AHUAcB==", True),                    # non-zero padding bits (non canonical)
    (b"*", True),
    (b"\xff\xfe", True),
])
def test_decode_plain_invalid_base64(data, syntax):
    with pytest.raises(SaslError) as info:
        decode_plain(data)
    assert isinstance(info.value, SaslSyntaxError) is syntax
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("raw", [
    b"alice\x00" + PASSWORD.encode(),                   # one NUL
    b"\x00alice\x00" + PASSWORD.encode() + b"\x00",     # three NULs
    b"\x00\x00" + PASSWORD.encode(),                    # empty authcid
    b"\x00alice\x00",                                   # empty password
    b"\x00alice\x00" + PASSWORD.encode() + b"\xff",     # not UTF-8
    b"\x00al\x01ice\x00" + PASSWORD.encode(),           # control character in the user name
    b"\x00alice\x00" + PASSWORD.encode() + b"\r\n",     # line break in the password
    b"a\nb\x00alice\x00" + PASSWORD.encode(),           # control character in authzid
    b"\x00alice\x00" + PASSWORD.encode() * 500,         # too long
], ids=["one-nul", "three-nuls", "no-authcid", "no-password", "utf8", "ctl-user", "crlf-password",
        "ctl-authzid", "too-long"])
def test_decode_plain_invalid_messages_never_leak(raw):
    with pytest.raises(SaslError) as info:
        decode_plain(b64(raw))
    assert not isinstance(info.value, SaslSyntaxError)
    message = str(info.value)
    assert PASSWORD not in message and "alice" not in message and b64(raw).decode() not in message
    assert len(message) < 60


def test_decode_plain_size_limit_is_about_4k():
    ok = b"\x00u\x00" + b"p" * (MAX_RESPONSE - 3)
    assert len(decode_plain(b64(ok)).password) == MAX_RESPONSE - 3
    with pytest.raises(SaslError, match="too long"):
        decode_plain(b64(ok + b"p"))
    with pytest.raises(SaslError, match="too long"):
        decode_plain(b"A" * 10_000_000)


@given(st.text(min_size=1).filter(lambda s: "\x00" not in s and not any(c in s for c in "\r\n")),
       st.text(min_size=1).filter(lambda s: not any(ord(c) < 32 or c == "\x7f" for c in s)))
def test_decode_plain_roundtrip(password, user):
    creds = decode_plain(b64(f"\x00{user}\x00{password}".encode()))
    assert (creds.authcid, creds.password) == (user, password)
    assert repr(creds) == repr(PlainCredentials("", user, "other"))  # repr ignores the password


@given(st.binary(max_size=200))
def test_decode_plain_only_raises_sasl_error(data):
    try:
        creds = decode_plain(data)
    except SaslError:
        return
    assert creds.authcid and creds.password


# -- LOGIN mechanism ----------------------------------------------------------------------
def test_login_prompts():
    assert encode_login_prompt("Username:") == b"VXNlcm5hbWU6"
    assert encode_login_prompt("Password:") == b"UGFzc3dvcmQ6"


def test_decode_login_step():
    assert decode_login_step(b64("bob@example.com".encode())) == "bob@example.com"
    assert decode_login_step(b64(PASSWORD.encode()) + b"\r\n") == PASSWORD


@pytest.mark.parametrize("data", [b"", b"=", b"!!!!", b64(b"a\x00b"), b64(b"\xc3"), b64(b"x\ny"),
                                  b64(b"p" * (MAX_RESPONSE + 1))],
                         ids=["empty", "=", "junk", "nul", "utf8", "lf", "long"])
def test_decode_login_step_errors(data):
    with pytest.raises(SaslError):
        decode_login_step(data)


def test_validators():
    assert validate_username("a b@c") == "a b@c"
    assert validate_password("p\tq") == "p\tq"
    for bad in ("", "a\x00", "a\x7f", "a\tb"):
        with pytest.raises(SaslError):
            validate_username(bad)
    for bad in ("", "a\x00", "a\r", "a\n"):
        with pytest.raises(SaslError):
            validate_password(bad)


# -- XOAUTH2 error challenges -------------------------------------------------------------
def test_parse_xoauth2_error():
    details = {"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"}
    challenge = b64(json.dumps(details).encode())
    assert parse_xoauth2_error(challenge) == details
    assert parse_xoauth2_error(b"  " + challenge + b"\r\n") == details
    assert parse_xoauth2_error(challenge.rstrip(b"=")) == details  # padding left out


@pytest.mark.parametrize("challenge", [b"", b"=", b"not base64!", b64(b"[1, 2]"), b64(b"{bad json"),
                                       b64(b"\xff\xfe"), b64(b"[" * 100_000), b"A" * 1_000_000, None,
                                       "eyJ9", 42])
def test_parse_xoauth2_error_garbage_is_none(challenge):
    assert parse_xoauth2_error(challenge) is None


@given(st.binary(max_size=300))
def test_parse_xoauth2_error_never_raises(data):
    result = parse_xoauth2_error(data)
    assert result is None or isinstance(result, dict)
