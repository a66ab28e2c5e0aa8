"""Unit tests of the SMTP side's pure pieces: replies, EHLO, sizes, dot-stuffing, reply texts, the
extension cache and the deadlines."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.login import LoginFailed, UpstreamError
from proxy.smtp.capabilities import UpstreamExtensions
from proxy.smtp.server import Timeouts
from proxy.smtp.wire import (DEFAULT_EXTENSIONS, MAX_MESSAGE_SIZE, Reply, advertised_size, data_size_limit, dot_stuff,
                             local_extensions, login_failure_reply, one_line, parse_ehlo, parse_reply_line)


def unstuff_like_aiosmtpd(payload: bytes) -> bytes:
    """What aiosmtpd's DATA loop stores: lines split at CRLF up to a lone dot, one leading dot removed."""
    lines, rest = [], payload
    while True:
        end = rest.index(b"\r\n") + 2
        line, rest = rest[:end], rest[end:]
        if line == b".\r\n":
            assert rest == b"", "data after the end-of-data line"
            return b"".join(lines)
        lines.append(line[1:] if line.startswith(b".") else line)


# ------------------------------------------------------------------ dot-stuffing
@pytest.mark.parametrize("content, payload", [
    (b"", b".\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b"a\r\n.b\r\n..\r\n", b"a\r\n..b\r\n...\r\n.\r\n"),
    (b"a\n.b\r\n", b"a\n.b\r\n.\r\n"),            # a bare LF does not end an SMTP line
    (b"x\r.\r\n", b"x\r.\r\n.\r\n"),              # neither does a bare CR
    (b"caf\xc3\xa9 \xff\x00\r\n", b"caf\xc3\xa9 \xff\x00\r\n.\r\n"),
])
def test_dot_stuff_examples(content: bytes, payload: bytes) -> None:
    assert b"".join(dot_stuff(content, chunk=2)) == payload
    assert b"".join(dot_stuff(content)) == payload


_LINE = (st.binary(max_size=12).map(lambda b: b.replace(b"\r\n", b""))
         | st.sampled_from([b".", b"..", b".x", b"\r", b"\n"]))


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_LINE, max_size=12), chunk=st.integers(1, 20))
def test_dot_stuff_is_the_exact_inverse_of_aiosmtpd(lines: list[bytes], chunk: int) -> None:
    content = b"".join(line + b"\r\n" for line in lines)
    payload = b"".join(dot_stuff(content, chunk=chunk))
    assert payload.endswith(b".\r\n")
    assert unstuff_like_aiosmtpd(payload) == content


def test_dot_stuff_ends_content_without_crlf_on_a_line_of_its_own() -> None:
    assert b"".join(dot_stuff(b"no end")) == b"no end\r\n.\r\n"


# ------------------------------------------------------------------ replies
@pytest.mark.parametrize("line, parsed", [
    (b"250-first\r\n", (250, False, b"first")),
    (b"250 last one\r\n", (250, True, b"last one")),
    (b"250\r\n", (250, True, b"")),
    (b"334 \n", (334, True, b"")),
    (b"550 5.7.60 Client does not have permissions\r\n", (550, True, b"5.7.60 Client does not have permissions")),
])
def test_parse_reply_line(line: bytes, parsed: tuple) -> None:
    assert parse_reply_line(line) == parsed


@pytest.mark.parametrize("line", [b"hello\r\n", b"25 x\r\n", b"2500 x\r\n", b"250x\r\n", b"199 x\r\n", b"250 no end"])
def test_parse_reply_line_refuses_garbage(line: bytes) -> None:
    with pytest.raises(ValueError):
        parse_reply_line(line)


def test_reply_wire_keeps_lines_and_neutralises_control_characters() -> None:
    reply = Reply(550, (b"5.1.1 first", b"bad \x1b[31m\rline\x00"))
    assert reply.wire() == b"550-5.1.1 first\r\n550 bad ?[31m?line?"
    assert reply.text == "5.1.1 first bad [31m line"
    assert Reply(250, (b"",)).wire() == b"250"
    assert Reply.of("451 4.4.2 Try again").wire() == b"451 4.4.2 Try again"


def test_parse_ehlo() -> None:
    reply = Reply(250, (b"upstream.test", b"SIZE 157286400", b"auth xoauth2 OAUTHBEARER", b"8BITMIME", b""))
    assert parse_ehlo(reply) == {"SIZE": "157286400", "AUTH": "xoauth2 OAUTHBEARER", "8BITMIME": ""}


# ------------------------------------------------------------------ extensions and sizes
@pytest.mark.parametrize("size, expected", [
    (None, MAX_MESSAGE_SIZE), ("", MAX_MESSAGE_SIZE), ("0", MAX_MESSAGE_SIZE), ("junk", MAX_MESSAGE_SIZE),
    ("1000", 1000), ("35882577", 35882577), (str(10 * MAX_MESSAGE_SIZE), MAX_MESSAGE_SIZE),
])
def test_advertised_size_follows_the_upstream_within_the_cap(size: str | None, expected: int) -> None:
    assert advertised_size({} if size is None else {"SIZE": size}) == expected
    assert data_size_limit(expected) > expected  # room for dot-stuffing: the upstream judges borderline sizes


def test_local_extensions_offer_only_what_can_be_passed_through() -> None:
    microsoft = {"SIZE": "157286400", "PIPELINING": "", "DSN": "", "ENHANCEDSTATUSCODES": "", "STARTTLS": "",
                 "8BITMIME": "", "BINARYMIME": "", "CHUNKING": "", "SMTPUTF8": "", "AUTH": "LOGIN XOAUTH2"}
    assert local_extensions(microsoft) == ["SIZE 157286400", "8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES",
                                           "PIPELINING", "AUTH LOGIN PLAIN"]
    assert local_extensions({"SIZE": "1000"}) == ["SIZE 1000", "PIPELINING", "AUTH LOGIN PLAIN"]
    assert local_extensions(DEFAULT_EXTENSIONS)[:2] == [f"SIZE {MAX_MESSAGE_SIZE}", "8BITMIME"]


# ------------------------------------------------------------------ AUTH failure replies
@pytest.mark.parametrize("kind, prefix", [
    (LoginFailed.CREDENTIALS, "535 5.7.8 "), (LoginFailed.REAUTHORIZE, "535 5.7.8 "),
    (LoginFailed.REJECTED, "535 5.7.8 "), (LoginFailed.UNAVAILABLE, "454 4.7.0 "),
])
def test_login_failure_reply(kind: str, prefix: str) -> None:
    text = "Run `proxy authorize a@b.c`\r\n250 injected\x00" + "x" * 1000 + " and what to do" + " y" * 2000
    reply = login_failure_reply(LoginFailed(kind, text))
    lines = reply.split("\r\n")
    if kind == LoginFailed.CREDENTIALS:
        assert reply == "535 5.7.8 Authentication credentials invalid"  # nothing about why
        return
    # a long text (a refusal and its advice) goes on several lines of RFC 5321 size, not cut off
    assert 1 < len(lines) <= 4
    assert all(line.startswith(prefix.replace(" ", "-", 1)) for line in lines[:-1]) and lines[-1].startswith(prefix)
    assert all(len(line) <= 510 and line.isprintable() for line in lines)
    assert "proxy authorize a@b.c" in lines[0] and "250 injected" in lines[0]   # never at a line's start
    assert "and what to do" in reply


def test_one_line() -> None:
    assert one_line(" a\r\n\tb  c ") == "a b c"


# ------------------------------------------------------------------ the extension cache
def test_extension_cache_waits_for_the_first_probe_then_answers_from_memory() -> None:
    calls = []

    async def probe() -> dict[str, str]:
        calls.append(1)
        await asyncio.sleep(0.05)
        return {"SIZE": "1000", "DSN": ""}

    async def scenario() -> None:
        cache = UpstreamExtensions(probe, wait=2)
        assert await cache.get() == {"SIZE": "1000", "DSN": ""}
        assert await cache.get() == {"SIZE": "1000", "DSN": ""}
        assert len(calls) == 1
        cache.update({"SIZE": "2000"})  # a real connection's EHLO replaces it
        assert await cache.get() == {"SIZE": "2000"}
        cache.max_age = 0  # stale: answered from memory at once, refreshed in the background
        assert await cache.get() == {"SIZE": "2000"}
        await asyncio.sleep(0.1)
        assert len(calls) == 2 and await cache.get() == {"SIZE": "1000", "DSN": ""}
        await cache.close()

    asyncio.run(scenario())


def test_extension_cache_falls_back_to_defaults_and_does_not_hammer_a_dead_upstream() -> None:
    calls = []

    async def probe() -> dict[str, str]:
        calls.append(1)
        raise UpstreamError("cannot connect")

    async def hang() -> dict[str, str]:
        await asyncio.sleep(10)
        return {}

    async def scenario() -> None:
        cache = UpstreamExtensions(probe, retry_after=60)
        assert await cache.get() == DEFAULT_EXTENSIONS
        assert await cache.get() == DEFAULT_EXTENSIONS
        assert len(calls) == 1
        slow = UpstreamExtensions(hang, wait=0.1, timeout=5)
        started = asyncio.get_running_loop().time()
        assert await slow.get() == DEFAULT_EXTENSIONS
        assert asyncio.get_running_loop().time() - started < 1  # an EHLO never waits long
        await slow.close()

    asyncio.run(scenario())


def test_client_deadline_leaves_room_for_a_relogin_and_a_retried_mail() -> None:
    timeouts = Timeouts()
    assert timeouts.command(25) == 300
    assert timeouts.command(300) >= 300 + 2 * timeouts.reply
