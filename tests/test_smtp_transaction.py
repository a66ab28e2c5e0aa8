"""Unit tests of the post-AUTH mail transaction (proxy/smtp/transaction.py): which lines the
session's own loop takes, and what each command and upstream reply does to the transaction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.smtp.transaction import LOST, Command, Relay, Transaction, parse_command
from proxy.smtp.wire import Reply

OK = Reply(250, (b"2.1.0 Ok",))
REFUSED = Reply(550, (b"5.7.60 SMTP; Client does not have permissions to send as this sender",))


# ------------------------------------------------------------------ which lines the loop takes
@pytest.mark.parametrize("line, extended, expected", [
    (b"MAIL FROM:<a@b>\r\n", True, Command("MAIL", b"FROM:<a@b>")),
    (b"mail FROM:<a@b> SIZE=10 BODY=8BITMIME\r\n", True, Command("MAIL", b"FROM:<a@b> SIZE=10 BODY=8BITMIME")),
    (b"RCPT TO:<c@d>  \r\n", True, Command("RCPT", b"TO:<c@d>")),        # stripped as aiosmtpd does
    (b"RCPT\r\n", True, Command("RCPT", b"")),
    (b"DATA\r\n", True, Command("DATA", b"")),
    (b"DATA\n", True, Command("DATA", b"")),                            # aiosmtpd takes a bare LF too
    (b"data x\r\n", True, Command("DATA", b"x")),
    (b"RSET\r\n", False, Command("RSET", b"")),
    (b"NOOP anything at all\r\n", True, Command("NOOP", b"anything at all")),
    (b"MAIL FROM:<\xc3\xa9@b>\r\n", True, Command("MAIL", b"FROM:<\xc3\xa9@b>")),  # bytes kept as sent
    # left to aiosmtpd, which answers them as before
    (b"EHLO x\r\n", True, None),
    (b"QUIT\r\n", True, None),
    (b"STARTTLS\r\n", True, None),
    (b"AUTH PLAIN\r\n", True, None),
    (b"MAILFROM:<a@b>\r\n", True, None),
    (b"MAIL\tFROM:<a@b>\r\n", True, None),
    (b"\r\n", True, None),
    (b"M\xc3\x81IL FROM:<a>\r\n", True, None),
    (b"VRFY a\r\n", True, None),
    (b"MAIL FROM:<" + b"a" * 2030 + b">\r\n", True, Command("MAIL", b"FROM:<" + b"a" * 2030 + b">")),
    (b"MAIL FROM:<" + b"a" * 2040 + b">\r\n", True, None),           # over 2,048: "500 Command line too long"
    (b"MAIL FROM:<" + b"a" * 600 + b">\r\n", False, None),           # after HELO: 512
    (b"NOOP " + b"x" * 600 + b"\r\n", True, None),
])
def test_parse_command(line: bytes, extended: bool, expected: Command | None) -> None:
    assert parse_command(line, extended) == expected


# ------------------------------------------------------------------ commands
def relay_of(step: Reply | Relay) -> Relay:
    assert isinstance(step, Relay), step
    return step


def open_transaction(tx: Transaction) -> None:
    tx.replied(relay_of(tx.mail(b"FROM:<a@b>")), OK)
    tx.replied(relay_of(tx.rcpt(b"TO:<c@d>", connected=True)), OK)


@pytest.mark.parametrize("arg, expected", [
    (b"", 501), (b"FROM", 501), (b"TO:<a@b>", 501), (b"FROM:<a@b>\rRCPT TO:<x>", 501), (b"FROM:<a\x00@b>", 501),
    (b"FROM:<a@b>", None), (b"from:<a@b> SIZE=1", None), (b"FROM:<>", None),
])
def test_mail_syntax(arg: bytes, expected: int | None) -> None:
    step = Transaction().mail(arg)
    if expected is None:
        assert relay_of(step).line == b"MAIL " + arg
    else:
        assert isinstance(step, Reply) and step.code == expected


def test_mail_relays_and_opens_the_transaction_only_on_the_upstreams_2xx() -> None:
    tx = Transaction()
    relay = relay_of(tx.mail(b"FROM:<a@b>"))
    assert tx.mail_from is None and not tx.open          # nothing before the upstream answered
    assert tx.replied(relay, REFUSED) is REFUSED          # the upstream's own reply goes to the client
    assert tx.mail_from is None and not tx.open
    relay = relay_of(tx.mail(b"FROM:<a@b>"))
    assert tx.replied(relay, OK) is OK
    assert tx.mail_from == b"FROM:<a@b>" and tx.open
    nested = tx.mail(b"FROM:<x@y>")
    assert isinstance(nested, Reply) and nested.code == 503


@pytest.mark.parametrize("mail_reply, recipients", [(OK, 1), (REFUSED, 0)])
def test_pipelined_mail_is_provisional(mail_reply: Reply, recipients: int) -> None:
    """A MAIL sent ahead opens the transaction at once, so the pipelined RCPT goes upstream too
    (the upstream answers it itself if the MAIL failed); a refused MAIL closes it again."""
    tx = Transaction()
    mail = relay_of(tx.mail(b"FROM:<a@b>"))
    tx.sent_ahead(mail)
    rcpt = relay_of(tx.rcpt(b"TO:<c@d>", connected=True))
    tx.replied(mail, mail_reply)
    tx.replied(rcpt, OK if mail_reply is OK else Reply(503, (b"5.5.1 need MAIL",)))
    assert tx.recipients == recipients
    assert (tx.mail_from is not None) == (mail_reply is OK) == tx.open


@pytest.mark.parametrize("setup, connected, arg, expected", [
    ("none", True, b"TO:<c@d>", 503),            # no MAIL
    ("mail", False, b"TO:<c@d>", 503),           # the upstream connection is gone
    ("mail", True, b"", 501),
    ("mail", True, b"FROM:<c@d>", 501),
    ("mail", True, b"TO:<c@d>\r\nDATA", 501),
    ("lost", True, b"TO:<c@d>", 451),            # the rest of a transaction that lost its upstream
    ("mail", True, b"TO:<c@d> NOTIFY=NEVER", None),
])
def test_rcpt(setup: str, connected: bool, arg: bytes, expected: int | None) -> None:
    tx = Transaction()
    if setup in ("mail", "lost"):
        tx.replied(relay_of(tx.mail(b"FROM:<a@b>")), OK)
    if setup == "lost":
        assert tx.lost().code == 451
    step = tx.rcpt(arg, connected)
    if expected is None:
        assert relay_of(step).line == b"RCPT " + arg
    else:
        assert isinstance(step, Reply) and step.code == expected
        if expected == 451:
            assert step.wire() == LOST.encode()


def test_only_accepted_recipients_count() -> None:
    tx = Transaction()
    tx.replied(relay_of(tx.mail(b"FROM:<a@b>")), OK)
    tx.replied(relay_of(tx.rcpt(b"TO:<c@d>", True)), REFUSED)
    assert tx.recipients == 0
    refused = tx.data(b"")
    assert isinstance(refused, Reply) and refused.code == 503
    tx.replied(relay_of(tx.rcpt(b"TO:<e@f>", True)), Reply(251, (b"2.1.5 will forward",)))
    assert tx.recipients == 1 and tx.data(b"") is None


def test_a_reply_for_a_transaction_that_was_reset_changes_nothing() -> None:
    tx = Transaction()
    tx.replied(relay_of(tx.mail(b"FROM:<a@b>")), OK)
    rcpt = relay_of(tx.rcpt(b"TO:<c@d>", True))
    tx.lost()
    tx.replied(rcpt, OK)
    assert tx.recipients == 0 and tx.mail_from is None


@pytest.mark.parametrize("arg, expected", [(b"", None), (b"x", 501)])
def test_data(arg: bytes, expected: int | None) -> None:
    tx = Transaction()
    open_transaction(tx)
    step = tx.data(arg)
    assert (step.code if step else None) == expected


def test_after_the_message_the_next_transaction_starts_empty_but_the_upstream_one_is_open_until_its_reply() -> None:
    tx = Transaction()
    open_transaction(tx)
    tx.message_read()
    assert tx.mail_from is None and tx.recipients == 0
    assert tx.open  # the caller clears it once the upstream answered the end of data
    assert isinstance(tx.mail(b"FROM:<a@b>"), Relay)


def test_lost_connection_answers_the_rest_of_the_transaction_until_a_new_mail_or_reset() -> None:
    tx = Transaction()
    open_transaction(tx)
    assert tx.lost().wire() == LOST.encode()
    assert not tx.open and tx.broken == LOST
    assert tx.data(b"").code == 451
    assert isinstance(tx.mail(b"FROM:<a@b>"), Relay) and tx.broken is None
    tx.lost()
    assert tx.reset() is False and tx.broken is None


def test_reset_says_whether_the_upstream_needs_its_own_rset() -> None:
    tx = Transaction()
    assert tx.reset() is False
    open_transaction(tx)
    assert tx.reset() is True
    assert not tx.open and tx.mail_from is None and tx.recipients == 0


# ------------------------------------------------------------------ properties over any sequence
_REPLIES = st.sampled_from([OK, REFUSED, Reply(421, (b"4.3.2 bye",)), Reply(503, (b"5.5.1 no",))])
_STEPS = st.lists(st.tuples(st.sampled_from(["mail", "rcpt", "data", "reset", "lost", "read", "ahead", "reply"]),
                            st.sampled_from([b"FROM:<a@b>", b"TO:<c@d>", b"", b"x"]), _REPLIES, st.booleans()),
                  max_size=40)


@settings(max_examples=300, deadline=None)
@given(steps=_STEPS)
def test_any_sequence_keeps_the_invariants(steps) -> None:
    """The client's reply is always the upstream's own (never a 2xx it did not give); recipients
    are only those the upstream accepted in the current transaction; DATA goes ahead only with
    at least one and nothing broken."""
    tx = Transaction()
    owed: list[Relay] = []
    for op, arg, reply, connected in steps:
        if op in ("mail", "rcpt", "ahead"):
            step = tx.rcpt(arg, connected) if op == "rcpt" else tx.mail(arg)
            if isinstance(step, Relay):
                owed.append(step)
                if op == "ahead":  # a pipelined MAIL: sent before its reply
                    tx.sent_ahead(step)
            else:
                assert step.code // 100 in (4, 5)
        elif op == "reply" and owed:
            relay = owed.pop(0)
            before = tx.recipients
            assert tx.replied(relay, reply) is reply
            if relay.verb == "RCPT" and tx.recipients > before:
                assert reply.code // 100 == 2 and relay.generation == tx.generation
        elif op == "data":
            step = tx.data(arg)
            assert (step is None) == (tx.recipients > 0 and not tx.broken and not arg)
        elif op == "reset":
            tx.reset()
        elif op == "lost":
            tx.lost()
        elif op == "read":
            tx.message_read()
        assert tx.recipients >= 0
        if tx.mail_from is None:
            assert tx.recipients == 0
        if tx.broken:
            assert tx.mail_from is None and tx.recipients == 0 and not tx.open
