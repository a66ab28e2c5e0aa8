"""The upstream POP3 login: the pure XOAUTH2 exchange row by row (each way a server answers), then the
POP3 listener against a stand-in of Microsoft's POP3 service built from /work/shared/notes/m365-facts.md
(implicit TLS, ``AUTH XOAUTH2``, ``+ ``, the token on its own line, a direct ``-ERR`` for a refused
token), through the shared login sequence with a scripted token broker."""

from __future__ import annotations

import asyncio
import base64
import poplib
import ssl
import threading
import time
from types import SimpleNamespace

import pytest

from proxy.config import AccountConfig, parse_config
from proxy.login import TokenRejected, UpstreamError
from proxy.pop3 import upstream
from proxy.pop3.server import Pop3Proxy
from proxy.pop3.upstream import XOAuth2Exchange, check_greeting, parse_capa
from proxy.throttle import FailureThrottle
from proxy.tls import client_context
from proxy.tokens import LoginRefused
from tests.harness import free_port

USER, TOKEN = "alice@firm.de", "EwB" + "t" * 300
RESPONSE = base64.b64encode(f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01".encode()) + b"\r\n"
CHALLENGE = b"+ " + base64.b64encode(b'{"status":"401","schemes":"bearer","scope":"mail"}') + b"\r\n"


def run(lines: list[bytes]) -> tuple[list[bytes], XOAuth2Exchange]:
    """Feed server lines; returns what the client sent (AUTH first) and the exchange."""
    exchange = XOAuth2Exchange(USER, TOKEN)
    sent = [exchange.start()]
    for line in lines:
        reply = exchange.receive(line)
        if reply is None:
            break
        sent.append(reply)
    return sent, exchange


# ------------------------------------------------------------------ the exchange, row by row
def test_microsoft_documented_exchange_token_after_the_continuation():
    sent, exchange = run([b"+ \r\n", b"+OK User successfully authenticated.\r\n"])
    assert sent == [b"AUTH XOAUTH2\r\n", RESPONSE] and exchange.text == "User successfully authenticated."


def test_a_token_longer_than_4_kB_still_goes_on_its_own_line():
    exchange = XOAuth2Exchange(USER, "EwB" + "x" * 6000)
    assert exchange.start() == b"AUTH XOAUTH2\r\n"          # never an initial response on the AUTH line
    assert len(exchange.receive(b"+\r\n")) > 8000           # a bare "+" is a continuation too


def test_microsoft_direct_err_is_a_refused_token():
    with pytest.raises(TokenRejected, match="Authentication failure") as info:
        run([b"+ \r\n", b"-ERR Authentication failure: unknown user name or bad password.\r\n"])
    assert info.value.details == {}


def test_dovecot_and_google_error_challenge_is_answered_empty_then_refused_with_details():
    sent = []
    with pytest.raises(TokenRejected) as info:
        exchange = XOAuth2Exchange(USER, TOKEN)
        sent.append(exchange.start())
        for line in (b"+ \r\n", CHALLENGE, b"-ERR [AUTH] Authentication failed.\r\n"):
            sent.append(exchange.receive(line))
    assert sent == [b"AUTH XOAUTH2\r\n", RESPONSE, b"\r\n"]
    assert info.value.details == {"status": "401", "schemes": "bearer", "scope": "mail"}
    assert "[AUTH] Authentication failed." in str(info.value)


@pytest.mark.parametrize("lines, message", [
    ([b"-ERR Unsupported authentication mechanism\r\n"], "does not accept AUTH XOAUTH2"),
    ([b"+OK\r\n"], "unexpected response to AUTH XOAUTH2"),
    ([b"* OK what\r\n"], "unexpected response to AUTH XOAUTH2"),
    ([b"+ \r\n", b"-ERR [SYS/TEMP] Server busy, try later\r\n"], "refused the login for now"),
    ([b"+ \r\n", b"-ERR [IN-USE] Mailbox locked by another session\r\n"], "refused the login for now"),
    ([b"+ \r\n", b"-ERR [login-delay] Wait\r\n"], "refused the login for now"),
    ([b"+ \r\n", b"-ERR [SYS/PERM] Mailbox moved\r\n"], "refused the login for now"),
    ([b"+ \r\n", CHALLENGE, CHALLENGE], "second XOAUTH2 challenge"),
    ([b"+ \r\n", b"hello\r\n"], "unexpected response during login"),
])
def test_answers_that_are_not_about_the_token_keep_it(lines, message):
    with pytest.raises(UpstreamError, match=message):
        run(lines)


def test_server_text_is_printable_and_bounded():
    with pytest.raises(TokenRejected) as info:
        run([b"+ \r\n", b"-ERR \x1b[31mno\x00 " + b"x" * 1000 + b"\r\n"])
    text = str(info.value)
    assert text.isprintable() and len(text) <= 300 and "\x1b" not in text


@pytest.mark.parametrize("line, result", [
    (b"+OK The Microsoft Exchange POP3 service is ready. [TQBOADIAUABSADAA]\r\n",
     "The Microsoft Exchange POP3 service is ready. [TQBOADIAUABSADAA]"),
    (b"+OK\r\n", ""),
])
def test_greeting(line, result):
    assert check_greeting(line, "outlook.office365.com:995") == result


@pytest.mark.parametrize("line, message", [(b"-ERR [SYS/TEMP] busy\r\n", "refused the connection"),
                                           (b"* OK IMAP4rev1\r\n", "unexpected greeting")])
def test_bad_greetings(line, message):
    with pytest.raises(UpstreamError, match=message):
        check_greeting(line, "host:995")


def test_capa_parsing():
    assert parse_capa([b"TOP", b"UIDL", b"SASL PLAIN XOAUTH2", b"user", b""]) == {
        "TOP": [], "UIDL": [], "SASL": ["PLAIN", "XOAUTH2"], "USER": []}


# ------------------------------------------------------------------ a Microsoft stand-in, end to end
class MicrosoftPop3:
    """POP3S on loopback answering like outlook.office365.com:995: greeting, then ``AUTH XOAUTH2``,
    ``+ ``, the response line; tokens in ``accepted`` get ``+OK``, others a direct ``-ERR``. After
    login: STAT and QUIT. Initial responses on the AUTH line longer than 4 kB get a protocol error."""

    def __init__(self, pki, accepted: set[str], refuse_with: bytes = b"-ERR Authentication failure: unknown "
                 b"user name or bad password.\r\n", hang: bool = False):
        self.accepted, self.refuse_with, self.hang = accepted, refuse_with, hang
        self.auth_lines: list[bytes] = []
        self.tokens: list[str] = []
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pki.cert_file, pki.key_file)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK The Microsoft Exchange POP3 service is ready. [TQBOADIAUABSADAA]\r\n")
        logged_in = False
        while line := await reader.readline():
            command = line.rstrip(b"\r\n")
            if command.upper().startswith(b"AUTH XOAUTH2") and not logged_in:
                self.auth_lines.append(command)
                if len(command) > 4096:
                    writer.write(b"-ERR Protocol error. Connection is closed. 10\r\n")
                    break
                writer.write(b"+ \r\n")
                response = base64.b64decode((await reader.readline()).strip())
                token = response.split(b"auth=Bearer ", 1)[1].split(b"\x01", 1)[0].decode()
                self.tokens.append(token)
                if self.hang:
                    await asyncio.sleep(60)  # a server that never answers the login
                if token in self.accepted:
                    logged_in = True
                    writer.write(b"+OK User successfully authenticated.\r\n")
                else:
                    writer.write(self.refuse_with)
            elif command.upper() == b"STAT" and logged_in:
                writer.write(b"+OK 1 42\r\n")
            elif command.upper() == b"QUIT":
                writer.write(b"+OK Microsoft Exchange Server POP3 server signing off.\r\n")
                break
            else:
                writer.write(b"-ERR Protocol error. 14\r\n")
        writer.close()


class ScriptedBroker:
    """Tokens from a list: each reject() moves on to the next (a forced refresh)."""

    def __init__(self, tokens: list[str], password: str = "local password"):
        self.tokens, self.password = list(tokens), password
        self.rejected: list[str] = []
        self.grant = SimpleNamespace(account=AccountConfig(USER), state=SimpleNamespace(granted_scope=None))

    async def authenticate(self, username: str, password: str):
        if username.casefold() != USER or password != self.password:
            raise LoginRefused("unknown user or wrong password")
        return self.grant

    async def access_token(self, grant, timeout: float) -> str:
        return self.tokens[0]

    def reject(self, grant, token: str, protocol: str = "") -> bool:
        self.rejected.append(token)
        if len(self.tokens) > 1:
            self.tokens.pop(0)
            return True
        return False


class Pop3UnderTest:
    """The POP3 listener and the stand-in upstream on a private event loop thread (poplib blocks)."""

    def __init__(self, tmp_path, pki, upstream_server: MicrosoftPop3, broker: ScriptedBroker):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.upstream_port = free_port()
        config = parse_config({"identity": {"authority": "https://127.0.0.1:1/t", "client_id": "c"},
                               "imap": {"listen": f"127.0.0.1:{free_port()}"},
                               "smtp": {"listen": f"127.0.0.1:{free_port()}"},
                               "pop3": {"listen": f"127.0.0.1:{free_port()}",
                                        "upstream": f"localhost:{self.upstream_port}"},
                               "limits": {"login_timeout": 5}, "accounts": [{"username": USER}]}, base_dir=tmp_path)
        self.server = self.call(asyncio.start_server(upstream_server.handle, "127.0.0.1", self.upstream_port,
                                                     ssl=upstream_server.context))
        self.proxy = Pop3Proxy(config, broker, upstream_tls=client_context(pki.ca_file),
                               throttle=FailureThrottle(base=0.0))
        self.call(self.proxy.start())
        self.port = self.proxy.server.sockets[0].getsockname()[1]

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(20)

    def close(self) -> None:
        self.call(self.proxy.close())
        self.server.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def microsoft(tmp_path, pki):
    beds = []

    def start(accepted, tokens, **kwargs) -> tuple[Pop3UnderTest, MicrosoftPop3, ScriptedBroker]:
        server, broker = MicrosoftPop3(pki, set(accepted), **kwargs), ScriptedBroker(tokens)
        beds.append(Pop3UnderTest(tmp_path, pki, server, broker))
        return beds[-1], server, broker

    yield start
    for bed in beds:
        bed.close()


def test_refused_token_is_dropped_refreshed_once_and_retried(microsoft):
    long_token = "EwB" + "y" * 6000  # Microsoft's can exceed 4 kB: still accepted, on its own line
    bed, server, broker = microsoft(accepted={long_token}, tokens=["EwB-stale", long_token])
    client = poplib.POP3("127.0.0.1", bed.port, timeout=20)
    client.user(USER)
    assert client.pass_("local password").startswith(b"+OK User successfully authenticated.")
    assert client.stat() == (1, 42)
    client.quit()
    assert server.tokens == ["EwB-stale", long_token] and broker.rejected == ["EwB-stale"]
    assert server.auth_lines == [b"AUTH XOAUTH2", b"AUTH XOAUTH2"]   # the token never on the AUTH line


def test_token_refused_twice_names_proxy_authorize(microsoft):
    bed, server, broker = microsoft(accepted=set(), tokens=["EwB-one", "EwB-two"])
    client = poplib.POP3("127.0.0.1", bed.port, timeout=20)
    client.user(USER)
    with pytest.raises(poplib.error_proto) as info:
        client.pass_("local password")
    reply = info.value.args[0].decode()
    assert reply.startswith("-ERR [AUTH] The mail server refused the access token (Authentication failure")
    assert f"`proxy authorize {USER}`" in reply
    assert len(server.tokens) == 2
    assert client.capa()  # the session goes on: the client may try again
    client.quit()


def test_server_trouble_keeps_the_token_and_says_try_later(microsoft):
    bed, server, broker = microsoft(accepted=set(), tokens=["EwB-good"],
                                    refuse_with=b"-ERR [SYS/TEMP] Server busy, try again later\r\n")
    client = poplib.POP3("127.0.0.1", bed.port, timeout=20)
    client.user(USER)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\] Mail server problem: .*Server busy"):
        client.pass_("local password")
    assert broker.rejected == [] and server.tokens == ["EwB-good"]   # no refresh for the server's trouble
    client.quit()


def test_a_server_that_never_answers_gets_sys_temp_within_the_login_deadline(microsoft):
    bed, server, broker = microsoft(accepted={"EwB-good"}, tokens=["EwB-good"], hang=True)
    client = poplib.POP3("127.0.0.1", bed.port, timeout=20)
    client.user(USER)
    started = time.monotonic()
    with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\] Login timed out after 5 s"):
        client.pass_("local password")
    assert 4.5 < time.monotonic() - started < 7          # limits.login_timeout: 5 (the client waits 30)
    assert server.tokens == ["EwB-good"] and broker.rejected == []
    client.quit()


def test_wrong_local_password_never_reaches_the_server(microsoft):
    bed, server, broker = microsoft(accepted={"EwB-good"}, tokens=["EwB-good"])
    client = poplib.POP3("127.0.0.1", bed.port, timeout=20)
    client.user(USER)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Unknown user or wrong password"):
        client.pass_("wrong password")
    assert server.tokens == []
    client.quit()


def test_upstream_connect_and_capabilities_over_verified_tls(pki):
    async def scenario():
        port = free_port()

        async def handle(reader, writer):
            writer.write(b"+OK ready\r\n")
            await reader.readline()
            writer.write(b"+OK\r\nTOP\r\nUIDL\r\nSASL PLAIN XOAUTH2\r\nUSER\r\n.\r\n")
            await reader.readline()
            writer.close()

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pki.cert_file, pki.key_file)
        server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=context)
        try:
            from proxy.config import Address
            conn = await upstream.connect(Address("localhost", port), client_context(pki.ca_file))
            assert conn.greeting == "ready"
            assert (await upstream.capabilities(conn))["SASL"] == ["PLAIN", "XOAUTH2"]
            conn.close()
            with pytest.raises(UpstreamError, match="certificate not trusted"):
                await upstream.connect(Address("localhost", port), client_context())
        finally:
            server.close()

    asyncio.run(scenario())
