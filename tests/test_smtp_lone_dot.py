"""The SMTP front's check for a dot after a bare CR or LF (SMTP smuggling) is the regular
expression's exact equivalent, only faster (it runs over every relayed message)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from proxy.smtp.data import LONE_DOT as _LONE_DOT, has_lone_dot as _has_lone_dot


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n."]), max_size=12).map(b"".join))
def test_fast_check_matches_the_regular_expression(content):
    assert _has_lone_dot(content) == bool(_LONE_DOT.search(content))


def test_examples():
    assert not _has_lone_dot(b"line\r\n..stuffed\r\n.\r\n")
    assert _has_lone_dot(b"line\n.\r\n") and _has_lone_dot(b"\n.") and _has_lone_dot(b"a\r.b")
    assert not _has_lone_dot(b"") and not _has_lone_dot(b"\r\n\r\n")
