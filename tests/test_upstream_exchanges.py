"""The upstream exchanges as sans-I/O state machines: each server behaviour is a row here, above all
Exchange Online's (/work/shared/notes/m365-facts.md), next to Dovecot's and Google's."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json

import pytest

from proxy.config import AccountConfig
from proxy.imap import xoauth2 as imap
from proxy.login import upstream_user
from proxy.outcomes import Accepted, Failed, Refused, TokenRefused
from proxy.relay import Endpoint, LineTooLong
from proxy.smtp import xoauth2 as smtp
from proxy.smtp.wire import Reply, enhanced_code, send_as_denied, with_advice

EXCHANGE_CAPS = "IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+"
EXCHANGE_CAPS_AFTER = ("IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID UNSELECT CLIENTACCESSRULES "
                       "CLIENTNETWORKPRESENCELOCATION BACKENDAUTHENTICATE CHILDREN IDLE NAMESPACE LITERAL+")
DOVECOT_CAPS = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=XOAUTH2 AUTH=OAUTHBEARER"
TOKEN = "EwB" + "x" * 300
ERROR_CHALLENGE = base64.b64encode(json.dumps({"status": "401", "schemes": "bearer"}).encode())


def xoauth2_b64(user: str, token: str = TOKEN) -> bytes:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


def tags():
    counter = itertools.count(1)
    return lambda: b"P%d" % next(counter)


def run_imap(machine, responses: list[bytes]) -> tuple[list[bytes], object]:
    """Feed ``responses`` (each a line) to ``machine``; what it sent and its outcome."""
    sent, outcome = machine.start()
    out = [sent] if sent else []
    for response in responses:
        if outcome is not None:
            break
        send, outcome = machine.receive(response)
        if send:
            out.append(send)
    return out, outcome


# ------------------------------------------------------------------------------ IMAP greeting
@pytest.mark.parametrize("greeting, expected", [
    # Exchange: no capability code in the banner, so the proxy asks CAPABILITY
    (b"* OK The Microsoft Exchange IMAP4 service is ready. [QU0wUFIwMUNBMDEyMy5ldXJwcmQwMS5wcm9k]\r\n", None),
    (b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] Dovecot ready.\r\n",
     imap.Capabilities(["IMAP4rev1", "SASL-IR", "AUTH=XOAUTH2"])),
    (b"* BYE Too many connections\r\n", Failed("refused the connection: * BYE Too many connections")),
    (b"+OK POP3 server\r\n", Failed("sent an unexpected greeting: +OK POP3 server")),
])
def test_greeting(greeting, expected):
    assert imap.greeting(greeting) == expected


def test_capability_fetch_for_exchanges_banner():
    fetch = imap.CapabilityFetch(b"P1")
    assert fetch.start() == b"P1 CAPABILITY\r\n"
    assert fetch.receive(f"* CAPABILITY {EXCHANGE_CAPS}\r\n".encode()) == (b"", None)
    assert fetch.receive(b"P1 OK CAPABILITY completed.\r\n") == (b"", imap.Capabilities(EXCHANGE_CAPS.split()))
    assert imap.CapabilityFetch(b"P1").receive(b"P1 BAD no\r\n")[1] == Failed("CAPABILITY failed upstream: P1 BAD no")


# ------------------------------------------------------------------------------ IMAP login
@pytest.mark.parametrize("case, caps, responses, sent, outcome", [
    # Exchange: SASL-IR, OK without [CAPABILITY]; the probe's list goes to the client
    ("exchange ok", EXCHANGE_CAPS,
     [b"P1 OK AUTHENTICATE completed.\r\n", f"* CAPABILITY {EXCHANGE_CAPS_AFTER}\r\n".encode(),
      b"P2 OK CAPABILITY completed.\r\n"],
     [b"P1 AUTHENTICATE XOAUTH2 " + xoauth2_b64("a@firm.de") + b"\r\n", b"P2 CAPABILITY\r\n"],
     Accepted(EXCHANGE_CAPS_AFTER)),
    # Exchange: a refused token gets a direct NO, no challenge; no probe is sent
    ("exchange refused", EXCHANGE_CAPS, [b"P1 NO AUTHENTICATE failed.\r\n"],
     [b"P1 AUTHENTICATE XOAUTH2 " + xoauth2_b64("a@firm.de") + b"\r\n"],
     TokenRefused("AUTHENTICATE failed.")),
    # Exchange: the token is fine but its owner may not open the mailbox
    ("exchange not connected", EXCHANGE_CAPS,
     [b"P1 OK AUTHENTICATE completed.\r\n", b"P2 BAD User is authenticated but not connected.\r\n"],
     [b"P1 AUTHENTICATE XOAUTH2 " + xoauth2_b64("a@firm.de") + b"\r\n", b"P2 CAPABILITY\r\n"],
     Refused(Refused.NOT_CONNECTED, "User is authenticated but not connected.")),
    # Dovecot: OK with [CAPABILITY]: the server has said what the probe asks, so none is sent
    ("dovecot ok", DOVECOT_CAPS,
     [f"P1 OK [CAPABILITY {DOVECOT_CAPS} MOVE] Logged in\r\n".encode()],
     [b"P1 AUTHENTICATE XOAUTH2 " + xoauth2_b64("a@firm.de") + b"\r\n"],
     Accepted(f"{DOVECOT_CAPS} MOVE")),
    # an untagged CAPABILITY before the OK counts as well
    ("untagged before ok", DOVECOT_CAPS,
     [b"* CAPABILITY IMAP4rev1 IDLE\r\n", b"P1 OK Logged in\r\n"],
     [b"P1 AUTHENTICATE XOAUTH2 " + xoauth2_b64("a@firm.de") + b"\r\n"],
     Accepted("IMAP4rev1 IDLE")),
    # Dovecot and Google: an error challenge first, answered with an empty line, then NO
    ("dovecot refused", DOVECOT_CAPS, [b"+ " + ERROR_CHALLENGE + b"\r\n", b"P1 NO [AUTHENTICATIONFAILED] Failed\r\n"],
     [b"P1 AUTHENTICATE XOAUTH2 " + xoauth2_b64("a@firm.de") + b"\r\n", b"\r\n"],
     TokenRefused("[AUTHENTICATIONFAILED] Failed", {"status": "401", "schemes": "bearer"})),
    # no SASL-IR: two steps
    ("no sasl-ir", "IMAP4rev1 AUTH=XOAUTH2",
     [b"+ \r\n", b"P1 OK done\r\n", b"* CAPABILITY IMAP4rev1\r\n", b"P2 OK done\r\n"],
     [b"P1 AUTHENTICATE XOAUTH2\r\n", xoauth2_b64("a@firm.de") + b"\r\n", b"P2 CAPABILITY\r\n"],
     Accepted("IMAP4rev1")),
    ("no xoauth2", "IMAP4rev1 AUTH=PLAIN", [], [], Failed("the upstream server does not offer AUTH=XOAUTH2")),
    ("bye", EXCHANGE_CAPS, [b"* BYE Connection closed. 14\r\n"],
     [b"P1 AUTHENTICATE XOAUTH2 " + xoauth2_b64("a@firm.de") + b"\r\n"],
     Failed("the server closed the connection during login: * BYE Connection closed. 14")),
    ("bad", EXCHANGE_CAPS, [b"P1 BAD Command Argument Error. 11\r\n"],
     [b"P1 AUTHENTICATE XOAUTH2 " + xoauth2_b64("a@firm.de") + b"\r\n"],
     Failed("the server refused AUTHENTICATE: BAD Command Argument Error. 11")),
    ("probe refused otherwise", EXCHANGE_CAPS, [b"P1 OK done\r\n", b"P2 NO try later\r\n"],
     [b"P1 AUTHENTICATE XOAUTH2 " + xoauth2_b64("a@firm.de") + b"\r\n", b"P2 CAPABILITY\r\n"],
     Failed("the server refused CAPABILITY after login: NO try later")),
])
def test_imap_xoauth2_login(case, caps, responses, sent, outcome):
    machine = imap.Xoauth2Login(caps.split(), "a@firm.de", TOKEN, tags())
    assert run_imap(machine, responses) == (sent, outcome)


@pytest.mark.parametrize("length, two_step", [(6000, False), (6090, False), (6100, True), (12000, True)])
def test_imap_uses_two_steps_when_the_sasl_ir_line_would_exceed_8_kib(length, two_step):
    token = "EwB" + "t" * (length - 3)
    machine = imap.Xoauth2Login(EXCHANGE_CAPS.split(), "a@firm.de", token, tags())
    first, _ = machine.start()
    response = xoauth2_b64("a@firm.de", token)
    one_line = b"P1 AUTHENTICATE XOAUTH2 " + response + b"\r\n"
    assert machine.two_step is two_step is (len(one_line) > imap.SASL_IR_LIMIT)
    if two_step:
        assert first == b"P1 AUTHENTICATE XOAUTH2\r\n"
        assert machine.receive(b"+ \r\n") == (response + b"\r\n", None)
    else:
        assert first == one_line
    send, outcome = machine.receive(b"P1 OK AUTHENTICATE completed.\r\n")
    assert send == b"P2 CAPABILITY\r\n" and outcome is None


def test_no_outcome_or_failure_text_contains_the_token():
    for responses in ([b"P1 NO AUTHENTICATE failed.\r\n"], [b"P1 OK\r\n", b"P2 BAD User is authenticated but "
                                                            b"not connected.\r\n"], [b"* BYE x\r\n"]):
        _, outcome = run_imap(imap.Xoauth2Login(EXCHANGE_CAPS.split(), "a@firm.de", TOKEN, tags()), responses)
        assert TOKEN not in repr(outcome)
    _, outcome = imap.Xoauth2Login(EXCHANGE_CAPS.split(), "a@firm.de", "bad token\r\n", tags()).start()
    assert outcome == Failed("the access token or user name contains characters XOAUTH2 cannot carry")


# ------------------------------------------------------------------------------ SMTP login
def reply(text: str) -> Reply:
    code, _, rest = text.partition(" ")
    return Reply(int(code), (rest.encode(),))


@pytest.mark.parametrize("final, outcome", [
    ("235 2.7.0 Authentication successful", Accepted()),
    # Exchange: a refused token, directly, no JSON challenge
    ("535 5.7.3 Authentication unsuccessful [AM0PR01 2024-01-01T12:00:00.000Z 08DC]",
     TokenRefused("535 5.7.3 Authentication unsuccessful [AM0PR01 2024-01-01T12:00:00.000Z 08DC]")),
    # Exchange's 5.7.139 texts: none of them is about the token
    ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit "
     "https://aka.ms/smtp_auth_disabled for more information.", "disabled"),
    ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit "
     "https://aka.ms/smtp_auth_disabled for more information.", "disabled"),
    ("535 5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults policy. "
     "Contact your administrator.", "disabled"),
    ("535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated "
     "successfully. Contact your administrator.", "disabled"),
    ("535 5.7.139 Authentication unsuccessful, basic authentication is disabled.", "disabled"),
    # too many concurrent sending connections: temporary
    ("432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information.",
     Failed("the server is busy: 432 4.3.2 Concurrent connections limit exceeded. Visit "
            "https://aka.ms/concurrent_sending for more information.")),
    ("454 4.7.0 Temporary authentication failure", Failed("the server is busy: 454 4.7.0 Temporary authentication "
                                                          "failure")),
    ("504 5.7.4 Unrecognized authentication type", Failed("AUTH XOAUTH2 failed: 504 5.7.4 Unrecognized "
                                                               "authentication type")),
])
def test_smtp_auth_reply_classification(final, outcome):
    machine = smtp.Xoauth2Login({"AUTH": "LOGIN XOAUTH2"}, "a@firm.de", TOKEN)
    assert machine.start() == (b"AUTH XOAUTH2", None)
    assert machine.receive(reply("334 ")) == (xoauth2_b64("a@firm.de"), None)   # always two steps
    got = machine.receive(reply(final))
    if outcome == "disabled":
        assert got == (None, Refused(Refused.SMTP_AUTH_DISABLED, final))
    else:
        assert got == (None, outcome)


def test_smtp_dovecot_error_challenge_then_535():
    machine = smtp.Xoauth2Login({"AUTH": "XOAUTH2"}, "a@firm.de", TOKEN)
    machine.start()
    machine.receive(reply("334 "))
    assert machine.receive(Reply(334, (ERROR_CHALLENGE,))) == (b"", None)
    assert machine.receive(reply("535 5.7.8 Authentication failed")) == (
        None, TokenRefused("535 5.7.8 Authentication failed", {"status": "401", "schemes": "bearer"}))


def test_smtp_without_xoauth2_and_with_a_token_xoauth2_cannot_carry():
    assert smtp.Xoauth2Login({"AUTH": "LOGIN PLAIN"}, "a@firm.de", TOKEN).start() == (
        None, Failed("the server does not offer AUTH XOAUTH2"))
    machine = smtp.Xoauth2Login({"AUTH": "XOAUTH2"}, "a@firm.de", "two words")
    machine.start()
    assert machine.receive(reply("334 "))[1] == Failed(
        "the access token or user name contains characters XOAUTH2 cannot carry")


# ------------------------------------------------------------------------------ SMTP end of DATA
SEND_AS_DENIED = ("554 5.2.252 SendAsDenied; alice@firm.de not allowed to send as archiv@firm.de; "
                  "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process "
                  "message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message. "
                  + "0.35250:0A00D081, " * 100 + "[EndDiagnosticData]")


@pytest.mark.parametrize("text, denied", [
    (SEND_AS_DENIED, True),
    ("550 5.7.60 SMTP; Client does not have permissions to send as this sender", True),
    ("250 2.0.0 OK <id@host> [Hostname=AM0PR01]", False),
    ("550 5.1.1 User unknown", False),
    ("451 4.4.2 later", False),
])
def test_send_as_refusals_are_recognised(text, denied):
    assert send_as_denied(reply(text)) is denied


def test_a_long_permanent_refusal_stays_permanent_with_the_advice_on_rfc_sized_lines():
    refused = reply(SEND_AS_DENIED)
    assert len(SEND_AS_DENIED) > 2000 and enhanced_code(refused) == "5.2.252"
    advised = with_advice(refused, "alice@firm.de may not send as archiv@firm.de: an Exchange admin grants it with "
                                   "Add-RecipientPermission -Identity archiv@firm.de -Trustee alice@firm.de "
                                   "-AccessRights SendAs")
    wire = advised.wire().split(b"\r\n")
    assert [line[:4] for line in wire] == [b"554-", b"554 "]
    assert all(len(line) + 2 <= 512 for line in wire)
    assert wire[0].startswith(b"554-5.2.252 SendAsDenied; alice@firm.de not allowed to send as archiv@firm.de;")
    assert wire[0].endswith(b"...")
    assert wire[1].startswith(b"554 5.2.252 alice@firm.de may not send as") and b"-AccessRights SendAs" in wire[1]


# ------------------------------------------------------------------------------ who logs in upstream
@pytest.mark.parametrize("account, imap_user, smtp_user", [
    (AccountConfig("alice@firm.de"), "alice@firm.de", "alice@firm.de"),
    # a shared mailbox: IMAP opens it with alice's token; SMTP logs in as alice (Send As is checked)
    (AccountConfig("archiv@firm.de", owner="alice@firm.de"), "archiv@firm.de", "alice@firm.de"),
    (AccountConfig("team", mailbox="team@firm.de", owner="alice@firm.de"), "team@firm.de", "alice@firm.de"),
    # app-only: the mailbox the app was given, for both
    (AccountConfig("robot", mailbox="akten@firm.de", flow="client_credentials"), "akten@firm.de", "akten@firm.de"),
])
def test_upstream_user(account, imap_user, smtp_user):
    assert (upstream_user(account, "imap"), upstream_user(account, "smtp")) == (imap_user, smtp_user)


def test_long_reply_lines_are_cut_not_refused():
    async def read(data: bytes) -> list[bytes]:
        endpoint = Endpoint()
        endpoint.data_received(data)
        endpoint.eof_received()
        return [await endpoint.readline_cut(16, 1000) for _ in range(3)]

    lines = asyncio.run(read(b"554 " + b"x" * 500 + b"\r\n250 short\r\n" + b"y" * 40 + b"\n"))
    assert lines == [b"554 " + b"x" * 12 + b"\r\n", b"250 short\r\n", b"y" * 16 + b"\r\n"]
    with pytest.raises(LineTooLong):
        asyncio.run(read(b"z" * 2000 + b"\r\n"))
