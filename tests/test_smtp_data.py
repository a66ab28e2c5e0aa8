"""proxy/smtp/data.py: the DATA payload read in bulk gives the upstream exactly what aiosmtpd's line
reader followed by dot_stuff() gave it, whatever the chunking, with the same limits and the same
refusal of a dot after a bare CR or LF."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from proxy.smtp.data import LINE_TOO_LONG, LONE_DOT, LONE_DOT_FOUND, OK, TOO_BIG, DataStream, has_lone_dot
from proxy.smtp.wire import dot_stuff


def reference(payload: bytes, size_limit: int | None, line_limit: int) -> tuple[str, bytes, int, bytes]:
    """What the proxy did before: aiosmtpd's DATA loop (lines split at CRLF up to a lone dot, one
    leading dot removed, limits), then the lone-dot check, then dot_stuff(). Returns (verdict,
    bytes sent upstream before the final dot, aiosmtpd's byte count, bytes after the end)."""
    lines, rest, size, verdict = [], payload, 0, OK
    while True:
        end = rest.index(b"\r\n") + 2
        line, rest = rest[:end], rest[end:]
        if line == b".\r\n":
            break
        size += len(line)
        if verdict == OK and size_limit and size > size_limit:
            verdict = TOO_BIG
        if verdict == OK and len(line) > line_limit:
            verdict = LINE_TOO_LONG
        lines.append(line[1:] if line.startswith(b".") else line)
    content = b"".join(lines)
    if verdict == OK and LONE_DOT.search(content):
        verdict = LONE_DOT_FOUND
    sent = b"".join(dot_stuff(content))[:-3] if verdict == OK else b""
    return verdict, sent, size, rest


def run(payload: bytes, cuts: list[int], size_limit: int | None = None, line_limit: int = 1000):
    stream = DataStream(size_limit, line_limit)
    out, start = bytearray(), 0
    for cut in sorted(set(cuts)) + [len(payload)]:
        if stream.done:
            break
        if cut > start:
            out += stream.feed(payload[start:cut])
            start = cut
    assert stream.done
    return stream, bytes(out), payload[start:]


_PIECE = st.sampled_from([b".", b"..", b"\r\n", b"\r", b"\n", b"a", b"bc", b".\r\n", b"\r\n.", b"\r\n..", b"x" * 7])
_BODY = st.lists(_PIECE, max_size=30).map(b"".join)


@settings(max_examples=1000, deadline=None)
@given(body=_BODY, cuts=st.lists(st.integers(0, 200), max_size=8), line_limit=st.integers(3, 40),
       size_limit=st.one_of(st.none(), st.integers(1, 120)), after=st.sampled_from([b"", b"MAIL FROM:<a@b>\r\n"]))
def test_same_bytes_limits_and_refusals_as_aiosmtpd_then_dot_stuff(body, cuts, line_limit, size_limit, after):
    payload = body + b"\r\n.\r\n" + after  # the first CRLF.CRLF ends it: maybe already inside body
    verdict, sent, size, rest = reference(payload, size_limit, line_limit)
    stream, out, unread = run(payload, cuts, size_limit, line_limit)
    assert stream.rest + unread == rest
    if verdict == OK:
        assert (stream.verdict, out, stream.size) == (OK, sent, size)
        assert stream.content_size == len(sent) - sent.count(b"\r\n..") - sent.startswith(b"..")
    else:
        assert stream.verdict != OK
        # nothing after the offending chunk went out, and what went out holds no end of data for any server
        assert not has_lone_dot(b"\r\n" + out) and b"\r\n.\r\n" not in b"\r\n" + out


def test_examples():
    stream = DataStream(None, 1000)
    assert stream.feed(b".\r\n") == b"" and stream.done and stream.rest == b""
    stream = DataStream(None, 1000)
    assert stream.feed(b"..a\r\n.b\r\nc\r\n.") == b"..a\r\nb\r\n" and not stream.done
    assert stream.feed(b"\r\nQUIT\r\n") == b"c\r\n" and stream.done and stream.rest == b"QUIT\r\n"
    stream = DataStream(None, 1000)
    assert stream.feed(b"a\nb\r\n") == b"a"                    # four bytes held back: the end may follow
    assert stream.feed(b".x\n.\r\n.\r\n") == b"" and stream.verdict == LONE_DOT_FOUND and stream.done
    stream = DataStream(10, 1000)
    stream.feed(b"0123456789\r\n.\r\n")
    assert stream.verdict == TOO_BIG and stream.size == 12


def test_lone_dot_fast_check_matches_the_regular_expression_examples():
    assert not has_lone_dot(b"line\r\n..stuffed\r\n.\r\n")
    assert has_lone_dot(b"line\n.\r\n") and has_lone_dot(b"\n.") and has_lone_dot(b"a\r.b")
    assert not has_lone_dot(b"") and not has_lone_dot(b"\r\n\r\n")
