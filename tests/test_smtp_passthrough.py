"""What Dovecot cannot show: a scripted upstream (implicit TLS, like port 465) that offers DSN,
SMTPUTF8 and a SIZE limit and keeps a byte-exact transcript, to check that the proxy advertises
what it can pass through, relays MAIL/RCPT parameters and message bytes verbatim, retries a
MAIL whose idle connection was closed, and handles Dovecot-style token refusals."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import socket
import ssl
import threading
import time
from dataclasses import replace

import pytest

from proxy.config import Address
from tests.conftest import SMTP_PASSWORD, SMTP_USER

EXTENSIONS = [b"SIZE 1000000", b"8BITMIME", b"SMTPUTF8", b"DSN", b"ENHANCEDSTATUSCODES", b"CHUNKING", b"PIPELINING",
              b"AUTH XOAUTH2"]
ERROR_CHALLENGE = base64.b64encode(b'{"status":"401","schemes":"bearer","scope":"mail"}')


class FakeSubmission:
    """A scripted submission server. ``commands`` holds every command line as received (the token
    line as ``<token for USER>``), ``payloads`` every message's DATA bytes up to the final dot."""

    def __init__(self, pki) -> None:
        self.commands: list[bytes] = []
        self.payloads: list[bytes] = []
        self.connections = self.open = 0
        self.refuse_tokens = False
        self.close_at_next_mail = False
        self.watch_pipelining = False
        self.pipelined: list[bool] = []  # (with watch_pipelining) per MAIL: had the next command come already?
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pki.cert_file, pki.key_file)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._session, "127.0.0.1", 0, ssl=context), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._end_sessions(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _end_sessions(self) -> None:
        """Stop listening and end the sessions still open (the proxy under test may not have closed
        its upstream connections yet): a session task left pending in a stopped loop is destroyed
        later, wherever the garbage collector happens to run, with an error in that test's log."""
        self.server.close()
        sessions = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        try:
            await self._dialogue(reader, writer)
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            writer.close()

    async def _dialogue(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 fake.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            self.commands.append(line)
            if verb == b"EHLO":
                writer.write(b"250-fake.test\r\n" + b"".join(b"250-%s\r\n" % e for e in EXTENSIONS[:-1])
                             + b"250 %s\r\n" % EXTENSIONS[-1])
            elif verb == b"AUTH":
                writer.write(b"334 \r\n")
                token = base64.b64decode(await reader.readline())
                self.commands.append(b"<token for %s>" % token.split(b"\x01")[0][5:])
                if self.refuse_tokens:
                    writer.write(b"334 " + ERROR_CHALLENGE + b"\r\n")
                    assert await reader.readline() == b"\r\n"
                    writer.write(b"535 5.7.8 Authentication failed\r\n")
                else:
                    writer.write(b"235 2.7.0 Accepted\r\n")
            elif verb == b"MAIL" and self.close_at_next_mail:
                self.close_at_next_mail = False
                writer.write(b"421 4.4.2 fake.test idle too long, closing\r\n")
                break
            elif verb == b"MAIL" and self.watch_pipelining:
                await asyncio.sleep(0.3)  # a proxy that waits for this reply sends nothing meanwhile
                self.pipelined.append(b"\n" in reader._buffer)
                writer.write(b"250 2.0.0 OK\r\n")
            elif verb == b"MAIL" and b"SIZE=2000000" in line:
                writer.write(b"552 5.3.4 Message size exceeds fixed limit\r\n")
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                writer.write(b"250 2.0.0 OK\r\n")
            elif verb == b"DATA":
                writer.write(b"354 Go ahead\r\n")
                payload = b""
                while not payload.endswith(b"\r\n.\r\n") and payload != b".\r\n":
                    payload += await reader.readline()
                self.payloads.append(payload)
                writer.write(b"250 2.0.0 Queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                break
            else:
                writer.write(b"500 5.5.1 Unknown command\r\n")
        await writer.drain()


@pytest.fixture
def fake(pki):
    server = FakeSubmission(pki)
    yield server
    server.close()


@pytest.fixture
def proxy(smtp_proxy, smtp_config, fake):
    return smtp_proxy(replace(smtp_config, smtp=replace(smtp_config.smtp, upstream=Address("127.0.0.1", fake.port),
                                                           upstream_tls="implicit")))


def command(sock: socket.socket, replies, line: bytes) -> list[bytes]:
    sock.sendall(line + b"\r\n")
    lines = [replies.readline()]
    while lines[-1][3:4] == b"-":
        lines.append(replies.readline())
    return lines


def test_extensions_parameters_and_bytes_pass_through_verbatim(proxy, fake) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        replies = sock.makefile("rb")
        assert replies.readline().startswith(b"220 ")
        ehlo = [line[4:].strip() for line in command(sock, replies, b"EHLO client.test")[1:]]
        assert ehlo == [b"SIZE 1000000", b"8BITMIME", b"SMTPUTF8", b"DSN", b"ENHANCEDSTATUSCODES", b"PIPELINING",
                        b"AUTH LOGIN PLAIN"]  # no CHUNKING, STARTTLS or the upstream's AUTH
        plain = base64.b64encode(f"\0{SMTP_USER}\0{SMTP_PASSWORD}".encode())
        assert command(sock, replies, b"AUTH PLAIN " + plain)[0].startswith(b"235 ")
        mail = "MAIL FROM:<Jörg@Exämple.com> SIZE=1234 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ314159".encode()
        rcpt = b"RCPT TO:<Bob@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob@Example.org"
        assert command(sock, replies, mail) == [b"250 2.0.0 OK\r\n"]
        assert command(sock, replies, rcpt) == [b"250 2.0.0 OK\r\n"]
        payload = (b"Subject: exact\r\n\r\nbare\nLF, bare\rCR, \x00 and \xff\r\n..\r\n...stuffed\r\n..\x85\r\n"
                   + b"y" * 50_000 + b"\r\n.\r\n")
        assert command(sock, replies, b"DATA")[0].startswith(b"354 ")
        sock.sendall(payload)
        assert replies.readline() == b"250 2.0.0 Queued\r\n"
        assert command(sock, replies, b"MAIL FROM:<a@example.com> SIZE=2000000") == [
            b"552 5.3.4 Message size exceeds fixed limit\r\n"]  # the upstream's own words
        assert command(sock, replies, b"QUIT")[0].startswith(b"221 ")
    assert fake.payloads == [payload]
    assert mail + b"\r\n" in fake.commands and rcpt + b"\r\n" in fake.commands
    assert fake.commands.count(b"<token for %s>" % SMTP_USER.encode()) == 1


def test_a_mail_on_a_connection_the_upstream_closed_is_retried_on_a_new_one(proxy, fake) -> None:
    client = smtplib.SMTP("127.0.0.1", proxy.port, timeout=30)
    client.login(SMTP_USER, SMTP_PASSWORD)
    fake.close_at_next_mail = True
    connections = fake.connections
    assert client.sendmail(SMTP_USER, ["bob@example.org"], b"Subject: retried\r\n\r\nhi\r\n") == {}
    client.quit()
    assert fake.connections == connections + 1
    assert fake.payloads == [b"Subject: retried\r\n\r\nhi\r\n.\r\n"]


def test_token_refused_with_an_error_challenge_is_refreshed_once_then_names_proxy_authorize(
        proxy, fake, idp_reset) -> None:
    fake.refuse_tokens = True
    client = smtplib.SMTP("127.0.0.1", proxy.port, timeout=30)
    client.ehlo("client.test")
    code, text = client.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{SMTP_USER}\0{SMTP_PASSWORD}".encode()).decode())
    assert code == 535 and text.startswith(b"5.7.8 ") and b"proxy authorize" in text and b"\r" not in text
    assert fake.commands.count(b"<token for %s>" % SMTP_USER.encode()) == 2  # refreshed once, retried once
    assert idp_reset.count("token:refresh_token") == 1
    client.close()


@pytest.mark.parametrize("during_a_transaction", [False, True])
def test_client_going_away_ends_the_upstream_session(proxy, fake, during_a_transaction: bool) -> None:
    client = smtplib.SMTP("127.0.0.1", proxy.port, timeout=30)
    client.login(SMTP_USER, SMTP_PASSWORD)
    if during_a_transaction:
        assert client.mail(SMTP_USER)[0] == 250
    baseline = fake.open
    client.close()  # no QUIT: the client just disconnects
    deadline = time.monotonic() + 5
    while fake.open >= baseline and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.open == baseline - 1
    # A transaction in progress is aborted (no QUIT that could let the server act on it).
    assert (fake.commands[-1] == b"QUIT\r\n") is not during_a_transaction


def test_pipelined_mail_and_rcpt_go_upstream_without_waiting_for_replies(proxy, fake) -> None:
    """RFC 2920: the upstream offers PIPELINING, so a client's pipelined MAIL and RCPTs are passed
    on at once; the replies come back to the client in order, then DATA goes as usual."""
    fake.watch_pipelining = True
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        replies = sock.makefile("rb")
        assert replies.readline().startswith(b"220 ")
        command(sock, replies, b"EHLO client.test")
        plain = base64.b64encode(f"\0{SMTP_USER}\0{SMTP_PASSWORD}".encode())
        assert command(sock, replies, b"AUTH PLAIN " + plain)[0].startswith(b"235 ")
        sock.sendall(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n")
        assert [replies.readline()[:4] for _ in range(4)] == [b"250 ", b"250 ", b"250 ", b"354 "]
        sock.sendall(b"Subject: pipelined\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        assert replies.readline() == b"250 2.0.0 Queued\r\n" and replies.readline().startswith(b"221 ")
    assert fake.pipelined == [True]
    assert [c.split(b":")[0] for c in fake.commands if c[:4] in (b"MAIL", b"RCPT", b"DATA")] == [
        b"MAIL FROM", b"RCPT TO", b"RCPT TO", b"DATA\r\n"]
    assert fake.payloads == [b"Subject: pipelined\r\n\r\nhi\r\n.\r\n"]
