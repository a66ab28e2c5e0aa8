"""The SMTP side when the upstream connection fails: a TCP link between the proxy and Dovecot's
submission service cuts or stalls the connection in the middle of a message. The client must
get a 4xx (never a 250, never a dropped connection), nothing must be delivered, and the same
session must send the next message over a new upstream connection."""

from __future__ import annotations

import logging
import smtplib
import socket
import threading
import time
from dataclasses import replace

import pytest

from proxy.config import Address
from proxy.smtp.server import Timeouts
from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.harness import TcpForwarder

BIG = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1000  # 1 MB
SMALL = b"Subject: small\r\n\r\nafter the failure\r\n"


class Link(TcpForwarder):
    """A TCP relay to ``target`` that a test can break. ``arm(n, "cut")`` aborts every connection once
    more than ``n`` bytes went upstream; ``arm(n, "stall")`` holds them instead; ``cut_all()`` drops
    the current connections (as an upstream idle timeout would)."""

    def __init__(self, target: tuple[str, int]):
        self._limit: int | None = None
        self._mode = "cut"
        self._sent = 0
        self._released = threading.Event()
        super().__init__(*target)

    def arm(self, after: int, mode: str) -> None:
        with self._lock:
            self._limit, self._mode, self._sent = after, mode, 0

    def close(self) -> None:
        self._released.set()
        self.stop()

    def _pump(self, src: socket.socket, dst: socket.socket, to_target: bool) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    if to_target and self._limit is not None:
                        self._sent += len(data)
                        tripped = self._sent > self._limit
                    else:
                        tripped = False
                    mode = self._mode
                if tripped and mode == "stall":
                    self._released.wait()
                    return
                if tripped:
                    self._limit = None
                    self.cut_all()
                    return
                dst.sendall(data)
        except OSError:
            pass


@pytest.fixture
def link(dovecot):
    link = Link((dovecot.submission_host, dovecot.submission_port))
    yield link
    link.close()


def through(link: Link, config):
    """``config`` with the upstream reached through ``link`` (the test CA's certificate names 127.0.0.1)."""
    return replace(config, smtp=replace(config.smtp, upstream=Address("127.0.0.1", link.port)))


def logged_in(proxy) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", proxy.port, timeout=30)
    client.login(SMTP_USER, SMTP_PASSWORD)
    return client


def test_connection_cut_mid_message_gives_451_and_the_next_message_goes_through(
        smtp_proxy, smtp_config, link, sink, caplog) -> None:
    caplog.set_level(logging.INFO, logger="proxy.smtp")
    proxy = smtp_proxy(through(link, smtp_config))
    client = logged_in(proxy)
    connections = link.connections
    link.arm(200_000, "cut")
    with pytest.raises(smtplib.SMTPDataError) as failed:
        client.sendmail(SMTP_USER, ["bob@example.org"], BIG)
    assert failed.value.smtp_code == 451 and failed.value.smtp_error.startswith(b"4.4.2 ")
    assert client.sendmail(SMTP_USER, ["bob@example.org"], SMALL) == {}  # same session: logs in again
    assert link.connections == connections + 1
    time.sleep(0.3)
    assert [m.data_after_received() for m in sink.messages] == [SMALL]  # the cut message never arrived
    client.quit()
    deadline = time.monotonic() + 5
    while "session end" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "mail server connection failed (the mail server closed the connection)" in caplog.text
    assert "1 message(s) sent, 1 failed" in caplog.text


def test_stalled_upstream_gives_451_before_the_client_would_give_up(smtp_proxy, smtp_config, link, sink) -> None:
    proxy = smtp_proxy(through(link, smtp_config), timeouts=Timeouts(reply=2, final=1.5))
    client = logged_in(proxy)
    link.arm(2_000, "stall")  # MAIL, RCPT and DATA pass; the message body is held
    started = time.monotonic()
    with pytest.raises(smtplib.SMTPDataError) as failed:
        client.sendmail(SMTP_USER, ["bob@example.org"], BIG)
    assert failed.value.smtp_code == 451
    assert 1.5 <= time.monotonic() - started < 1.5 + 1.5
    assert client.noop()[0] == 250  # the client's connection is still there
    link.close()  # Dovecot now sees its connection end without the final dot
    time.sleep(0.3)
    assert sink.messages == []


def test_upstream_connection_dropped_while_idle_is_replaced_transparently(
        smtp_proxy, smtp_config, link, sink) -> None:
    proxy = smtp_proxy(through(link, smtp_config))
    client = logged_in(proxy)
    connections = link.connections
    assert client.sendmail(SMTP_USER, ["bob@example.org"], SMALL) == {}
    link.cut_all()
    time.sleep(0.1)
    assert client.sendmail(SMTP_USER, ["carol@example.org"], SMALL) == {}
    assert link.connections == connections + 1
    assert [m.rcpt_tos for m in sink.wait_for_messages(2)] == [["bob@example.org"], ["carol@example.org"]]
    client.quit()


def test_upstream_unreachable_at_auth_gives_454(smtp_proxy, smtp_config, link) -> None:
    proxy = smtp_proxy(through(link, smtp_config))
    link.close()
    client = smtplib.SMTP("127.0.0.1", proxy.port, timeout=30)
    client.user, client.password = SMTP_USER, SMTP_PASSWORD
    client.ehlo("client.test")
    with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
        client.auth("PLAIN", client.auth_plain)
    assert failed.value.smtp_code == 454 and b"Mail server unreachable" in failed.value.smtp_error
    client.quit()


def test_dot_after_a_bare_line_break_late_in_a_streamed_message_delivers_nothing(smtp_proxy, sink) -> None:
    """The message is passed on as it arrives, so most of it reached the upstream before the bare LF
    and dot near its end: the proxy drops the upstream connection before any end of data, the
    client gets 550, nothing is delivered, and the session goes on with a fresh connection."""
    proxy = smtp_proxy()
    client = logged_in(proxy)
    smuggled = BIG + b"tail\n.\r\nMAIL FROM:<evil@example.org>\r\n" + b"z" * 100 + b"\r\n"
    with pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail(SMTP_USER, ["bob@example.org"], smuggled)
    assert refused.value.smtp_code == 550 and refused.value.smtp_error.startswith(b"5.6.0 Message not sent")
    assert client.sendmail(SMTP_USER, ["bob@example.org"], SMALL) == {}
    client.quit()
    assert [m.data_after_received() for m in sink.wait_for_messages(1)] == [SMALL]
    time.sleep(0.3)
    assert len(sink.messages) == 1
