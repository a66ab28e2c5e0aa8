"""Hostile input before authentication: property tests (hypothesis) and a bounded fuzzer run (atheris)
over the IMAP and POP3 cores, the SMTP front (aiosmtpd with the proxy's AUTH, in memory), the SASL
decoders and the PROXY protocol header parser.

The drivers and the properties they check live in tests/fuzz_targets.py: no exception escapes,
every reply line is well formed, each command line gets a reply, memory per connection is
bounded. The IMAP and POP3 cores' own tests are in tests/test_imap_core.py and tests/test_pop3_core.py."""

from __future__ import annotations

import asyncio
import base64
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.smtp.session import ProxySMTP
from tests import fuzz_targets
from tests.fuzz_targets import (SMTP_PASSWORD, SMTP_USER, imap_input, pop3_input, proxyproto_input, sasl_input,
                                smtp_session)

ROOT = Path(__file__).resolve().parent.parent


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def run_smtp(chunks: list[bytes], **kwargs):
    return asyncio.run(smtp_session(chunks, **kwargs))


def codes(run) -> list[int]:
    return [code for code, _ in run.replies()]


# ------------------------------------------------------------------ SMTP: fixed transcripts
def test_smtp_in_memory_session_logs_in_and_relays() -> None:
    plain = b64(f"\0{SMTP_USER}\0{SMTP_PASSWORD}".encode())
    run = run_smtp([b"EHLO client\r\n", b"AUTH PLAIN " + plain + b"\r\n", b"MAIL FROM:<a@example.org>\r\n",
                    b"RCPT TO:<b@example.org>\r\n", b"DATA\r\n", b"..dot\r\nbody\r\n.\r\n", b"QUIT\r\n"],
                   each_line_answered=True)
    assert codes(run) == [220, 250, 235, 250, 250, 354, 250, 221]
    assert run.messages == [b".dot\r\nbody\r\n"] and run.closed


@pytest.mark.parametrize("line, reply", [
    (b"FOO\rBAR\r\n", b'500 Error: command "FOO?BAR" not recognized\r\n'),   # a bare CR is not echoed
    (b"\x1b[2J\r\n", b'500 Error: command "?[2J" not recognized\r\n'),        # nor a terminal escape
    (b"\x00\r\n", b'500 Error: command "?" not recognized\r\n'),
    (b"\xff\xfe\r\n", b"500 Error: bad syntax\r\n"),
    (b"AUTH \x1d\r\n", b"501 Not enough value\r\n"),  # Python's str.split() takes \x1d for a space
    (b"AUTH PLAIN =\r\n", b"535 5.7.8 Authentication credentials invalid\r\n"),
    (b"AUTH PLAIN !!!\r\n", b"501 5.5.2 Invalid base64 in the authentication data\r\n"),
    (b"AUTH PLAIN " + b64(b"\0" + SMTP_USER.encode() + b"\0pw\0x") + b"\r\n",
     b"535 5.7.8 Authentication credentials invalid\r\n"),
    (b"AUTH PLAIN " + b64(b"\0" + SMTP_USER.encode() + b"\0\xff\xfe") + b"\r\n",
     b"535 5.7.8 Authentication credentials invalid\r\n"),
    (b"AUTH PLAIN " + b"A" * 20000 + b"\r\n", b"500 Command line too long\r\n"),
    (b"MAIL FROM:<a@example.org>\r\n", b"530 5.7.0 Authentication required\r\n"),
])
def test_smtp_malformed_commands_get_well_formed_replies(line: bytes, reply: bytes) -> None:
    run = run_smtp([b"EHLO client\r\n", line, b"NOOP\r\n"], line_limit=ProxySMTP.line_length_limit,
                   each_line_answered=True)
    assert run.replies()[2][1] == [reply]
    assert codes(run)[-1] == 250  # and the session goes on


def test_smtp_auth_login_steps_accept_nothing_malformed() -> None:
    user, password = b64(SMTP_USER.encode()), b64(SMTP_PASSWORD.encode())
    run = run_smtp([b"EHLO c\r\n", b"AUTH LOGIN\r\n", b"!!\r\n", b"AUTH LOGIN\r\n", user + b"\r\n", b"*\r\n",
                    b"AUTH LOGIN " + user + b"\r\n", b64(b"a\0b") + b"\r\n",
                    b"AUTH LOGIN " + user + b"\r\n", password + b"\r\n", b"AUTH LOGIN\r\n"],
                   line_limit=ProxySMTP.line_length_limit)
    assert codes(run) == [220, 250, 334, 501, 334, 334, 501, 334, 535, 334, 235, 503]


def test_smtp_vrfy_with_a_malformed_address_is_answered() -> None:
    """aiosmtpd's own VRFY let the email package's IndexError escape (``VRFY c@``)."""
    plain = b64(f"\0{SMTP_USER}\0{SMTP_PASSWORD}".encode())
    run = run_smtp([b"EHLO c\r\n", b"VRFY c@\r\n", b"AUTH PLAIN " + plain + b"\r\n", b"VRFY c@\r\n",
                    b"VRFY\r\n", b"NOOP\r\n"], each_line_answered=True)
    assert codes(run) == [220, 250, 530, 235, 252, 501, 250]
    assert run.upstream_lines == [b"NOOP"]  # the upstream connection survived


@pytest.mark.parametrize("line", [b"MAIL FROM:<a@b> SIZE=10\rRCPT TO:<c@d>\r\n", b"MAIL FROM:<a\x00@b>\r\n",
                                  b"RCPT TO:<c@d>\rDATA\r\n", b"RCPT TO:<c@d> NOTIFY=NEVER\x1b\r\n"])
def test_smtp_control_characters_in_mail_or_rcpt_are_not_relayed(line: bytes) -> None:
    """A bare CR relayed upstream could end the command early there, and the upstream's extra
    reply would then answer the proxy's next command (a 250 for the wrong thing)."""
    plain = b64(f"\0{SMTP_USER}\0{SMTP_PASSWORD}".encode())
    first = [b"MAIL FROM:<a@b>\r\n"] if line.startswith(b"RCPT") else []
    run = run_smtp([b"EHLO c\r\n", b"AUTH PLAIN " + plain + b"\r\n", *first, line], each_line_answered=True)
    assert run.replies()[-1][1][0].startswith(b"501 5.5.4 Syntax: ")
    assert run.upstream_lines == [b"MAIL FROM:<a@b>"] * len(first)


@pytest.mark.parametrize("body", [b"first\n.\r\nMAIL FROM:<evil@example.org>\r\n", b"\n.\r\n",
                                  b"x\r.\r\nRSET\r\n", b"a\n.\nb\r\n"])
def test_smtp_dot_after_a_bare_line_break_is_refused_not_relayed(body: bytes) -> None:
    plain = b64(f"\0{SMTP_USER}\0{SMTP_PASSWORD}".encode())
    run = run_smtp([b"EHLO c\r\nAUTH PLAIN " + plain + b"\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n",
                    b"Subject: s\r\n\r\n" + body + b".\r\n", b"NOOP\r\n"])
    assert run.replies()[-2][1][0].startswith(b"550 5.6.0 Message not sent")
    # Nothing delivered: the upstream connection was dropped before any end of data reached it.
    assert run.messages == [] and run.upstream_lines[-1:] == [b"DATA"] and codes(run)[-1] == 250


@settings(max_examples=300, deadline=None)
@given(content=st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n", b"\r\n."]), max_size=20).map(b"".join))
def test_smtp_lone_dot_check_matches_its_definition(content: bytes) -> None:
    from proxy.smtp import data

    assert data.has_lone_dot(content) == bool(data.LONE_DOT.search(content))


def test_smtp_endless_line_keeps_memory_bounded() -> None:
    """A client sends 8 MiB without a line break: aiosmtpd holds at most twice its 256 KiB line
    limit, then answers 500 once the line ends, and the session goes on."""
    chunk = b"X" * 65536
    run = run_smtp([b"EHLO c\r\n", *[chunk] * 128, b"\r\n", b"NOOP\r\n"], line_limit=ProxySMTP.line_length_limit)
    assert run.max_buffered <= 2 * ProxySMTP.line_length_limit + len(chunk)
    assert codes(run) == [220, 250, 500, 250]


def test_smtp_lines_before_auth_are_bounded_to_4_kib() -> None:
    """Before AUTH nothing needs long lines: a client that has not logged in made the proxy buffer
    up to 256 KiB per connection (issue 12). Now 4 KiB; after AUTH the 256 KiB limit applies."""
    from proxy.smtp.session import PRELOGIN_LINE_LIMIT

    chunk = b"X" * 4096
    run = run_smtp([b"EHLO c\r\n", *[chunk] * 64, b"\r\n", b"NOOP " + b"n" * 300 + b"\r\n"],
                   line_limit=ProxySMTP.line_length_limit)
    assert PRELOGIN_LINE_LIMIT == 4096
    assert run.max_buffered <= 2 * PRELOGIN_LINE_LIMIT + len(chunk)
    assert codes(run) == [220, 250, 500, 250]
    plain = b64(f"\0{SMTP_USER}\0{SMTP_PASSWORD}".encode())
    run = run_smtp([b"EHLO c\r\nAUTH PLAIN " + plain + b"\r\n", *[chunk] * 16, b"\r\n", b"NOOP\r\n"],
                   line_limit=ProxySMTP.line_length_limit)
    assert codes(run) == [220, 250, 235, 500, 250]
    assert run.max_buffered > 2 * PRELOGIN_LINE_LIMIT + len(chunk)   # the login raised the limit


def test_smtp_endless_data_line_keeps_memory_bounded() -> None:
    plain = b64(f"\0{SMTP_USER}\0{SMTP_PASSWORD}".encode())
    chunk = b"Y" * 65536
    run = run_smtp([b"EHLO c\r\nAUTH PLAIN " + plain + b"\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n",
                    *[chunk] * 128, b"\r\n.\r\n", b"NOOP\r\n"], line_limit=ProxySMTP.line_length_limit)
    assert run.max_buffered <= 2 * ProxySMTP.line_length_limit + len(chunk)
    assert codes(run)[-2:] == [500, 250] and run.messages == []  # refused, nothing relayed


# ------------------------------------------------------------------ SMTP: properties
_ARG = st.one_of(
    st.sampled_from([b"", b"<a@example.org>", b"FROM:<a@example.org>", b"TO:<b@example.org>", b"PLAIN", b"LOGIN",
                     b"plain", b"XOAUTH2", b"=", b"*", b"SIZE=99999999", b"NOTIFY=NEVER", b"BODY=8BITMIME"]),
    st.binary(max_size=12),
    st.lists(st.text(max_size=8), min_size=3, max_size=3).map(lambda t: b64("\0".join(t).encode())),
    st.just(b64(f"\0{SMTP_USER}\0{SMTP_PASSWORD}".encode())),
    st.sampled_from([SMTP_USER, SMTP_PASSWORD, "wrong"]).map(lambda t: b64(t.encode())),
)
_LINE = st.builds(
    lambda verb, args, end: verb + b"".join(b" " + a for a in args) + end,
    st.sampled_from([b"EHLO", b"HELO", b"AUTH", b"auth", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"QUIT",
                     b"VRFY", b"HELP", b"STARTTLS", b"BDAT", b"", b".", b"*", b"X" * 400]),
    st.lists(_ARG, max_size=3), st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r"]))
_STREAM = st.lists(st.one_of(_LINE, _LINE, _LINE, st.binary(max_size=20)), max_size=14)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=_STREAM)
def test_fuzz_smtp_every_command_line_gets_a_well_formed_reply(lines: list[bytes]) -> None:
    chunks = [line for line in b"".join(lines).splitlines(keepends=True)]
    run_smtp(chunks, each_line_answered=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=_STREAM, size=st.integers(min_value=1, max_value=64))
def test_fuzz_smtp_any_chunking(lines: list[bytes], size: int) -> None:
    stream = b"".join(lines)
    run_smtp([stream[i:i + size] for i in range(0, len(stream), size)])


# ------------------------------------------------------------------ IMAP, POP3 and SASL: the fuzz drivers
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400) | st.sampled_from(fuzz_targets.SEEDS["imap"]))
def test_fuzz_imap_driver(data: bytes) -> None:
    imap_input(data)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400) | st.sampled_from(fuzz_targets.SEEDS["pop3"]))
def test_fuzz_pop3_driver(data: bytes) -> None:
    pop3_input(data)


def test_pop3_hostile_transcript() -> None:
    """Credentials in odd places, controls, a flood: one reply per line, and nothing of it echoed."""
    password = b"correct horse battery"
    stream = (b"USER alice\x00\r\nUSER \x1b[2Jalice\r\nPASS " + password + b"\r\nPASS " + password
              + b"\r\nAUTH PLAIN " + b64(b"\0alice\0" + password) + b"!\r\nAUTH " + password + b"\r\n"
              + password + b"\r\n")
    from proxy.pop3.core import Pop3Front
    from tests.fuzz_targets import POP3_LIMITS, pop3_replies
    replies = pop3_replies(Pop3Front(**{**POP3_LIMITS, "max_line": 200}), stream.splitlines(keepends=True),
                           one_per_line=True)
    assert all(password not in reply and b64(password) not in reply for reply in replies), replies
    pop3_input(b"\x00\x00" + stream + b"\r\n" * 20)


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(
    st.binary(max_size=64), st.binary(max_size=3000).map(b64),
    st.lists(st.binary(max_size=20), min_size=1, max_size=4).map(lambda p: b64(b"\0".join(p))),
    st.text(max_size=30).map(lambda t: b64(t.encode()) + b"\r\n")))
def test_fuzz_sasl_decoders(data: bytes) -> None:
    sasl_input(data)


_V1_WORDS = st.sampled_from([b"PROXY", b"TCP4", b"TCP6", b"UNKNOWN", b"1.2.3.4", b"01.2.3.4", b"::1", b"fe80::1%0",
                             b"2001:db8::7", b"0", b"65535", b"65536", b"007", b"", b"\xff"])


@settings(max_examples=400, deadline=None)
@given(data=st.one_of(
    st.binary(max_size=200), st.sampled_from(fuzz_targets.SEEDS["proxyproto"]),
    st.builds(lambda words, end, rest: b" ".join(words) + end + rest, st.lists(_V1_WORDS, max_size=7),
              st.sampled_from([b"\r\n", b"\r", b"\n", b""]), st.binary(max_size=8)),
    st.builds(lambda head, length, body: b"\r\n\r\n\x00\r\nQUIT\n" + head + length.to_bytes(2, "big") + body,
              st.binary(min_size=2, max_size=2), st.integers(0, 1100), st.binary(max_size=80))))
def test_fuzz_proxyproto_driver(data: bytes) -> None:
    proxyproto_input(data)


def test_seeds_pass_the_drivers() -> None:
    for seed in fuzz_targets.SEEDS["imap"]:
        imap_input(seed)
    for seed in fuzz_targets.SEEDS["sasl"]:
        sasl_input(seed)
    for seed in fuzz_targets.SEEDS["smtp"]:
        fuzz_targets.smtp_input(seed)
    for seed in fuzz_targets.SEEDS["pop3"]:
        pop3_input(seed)
    for seed in fuzz_targets.SEEDS["proxyproto"]:
        proxyproto_input(seed)


# ------------------------------------------------------------------ atheris, for a bounded time
FUZZ_SECONDS = int(os.environ.get("FUZZ_SECONDS", "20"))


@pytest.mark.timeout(FUZZ_SECONDS * 2 + 150)
@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.machine() != "x86_64",
                    reason="atheris ships wheels for Linux x86-64 only")
def test_atheris_fuzzers_find_nothing(tmp_path: Path) -> None:
    """Each target runs FUZZ_SECONDS (default 20) under libFuzzer, all side by side; a crash,
    a timeout (10 s for one input) or more than 1 GiB of memory fails the test with the input."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.fail("atheris is missing: pip install -e '.[test]'")
    runs = {}
    for target in fuzz_targets.TARGETS:
        corpus, dictionary = tmp_path / f"{target}-corpus", tmp_path / f"{target}.dict"
        fuzz_targets.write_seeds(target, str(corpus), str(dictionary))
        log = open(tmp_path / f"{target}.log", "wb")
        command = [sys.executable, "-m", "tests.fuzz_targets", target, f"-max_total_time={FUZZ_SECONDS}",
                   "-timeout=10", "-rss_limit_mb=1024", "-max_len=4096", f"-dict={dictionary}",
                   f"-artifact_prefix={tmp_path}/{target}-", "-print_final_stats=1", str(corpus)]
        runs[target] = (subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log)
    failures = []
    deadline = time.monotonic() + FUZZ_SECONDS * 2 + 120  # start-up and instrumentation included
    for target, (process, log) in runs.items():
        try:
            process.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        output = (tmp_path / f"{target}.log").read_text(errors="replace")
        if process.returncode != 0 or "Done " not in output:
            artifacts = [p.name for p in tmp_path.glob(f"{target}-*")]
            failures.append(f"--- {target}: exit {process.returncode}, artifacts {artifacts}\n{output[-6000:]}")
    assert not failures, "\n".join(failures)
