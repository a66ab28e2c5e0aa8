"""A stand-in for Exchange Online's IMAP and SMTP front ends, for tests.

Built from the documented behaviours in /work/shared/notes/m365-facts.md (Microsoft's
documentation and public protocol logs), not from what the proxy happens to do. It checks
tokens itself, against the test identity provider (as Exchange checks Entra's tokens), and
keeps Exchange's banners and wording:

IMAP (implicit TLS; ``imap_address``), in front of the test Dovecot:

- banner ``* OK The Microsoft Exchange IMAP4 service is ready. [<base64 host>]`` without a
  capability code; Exchange's pre-login CAPABILITY list;
- AUTHENTICATE XOAUTH2 with SASL-IR or in two steps (``+ `` then the response); a command line
  longer than ``max_command_line`` (on-premises ``MaxCommandSize``: 10,240) gets ``BAD``;
- a refused token (unknown, expired, revoked, no IMAP permission): a *direct*
  ``TAG NO AUTHENTICATE failed.``, no challenge;
- ``TAG OK AUTHENTICATE completed.`` without a ``[CAPABILITY]`` code; CAPABILITY after login
  adds MOVE and Exchange's own atoms;
- a token whose owner (person or app) may not open the ``user=`` mailbox (no
  ``idp.allow_delegation``): the login is OK, then every command gets ``TAG BAD User is
  authenticated but not connected.`` and after the second one ``* BYE Connection closed. 14``
  (``missing_rights = "no"``: the other reported shape, a plain ``NO AUTHENTICATE failed.``);
  ``not_connected_logins = N``: the next N logins get that even with the right (throttling);
- the session ends when the login token expires: the next command gets
  ``* BYE Session invalidated - AccessTokenExpired``;
- otherwise the session is relayed to Dovecot, logged in as the mailbox.

SMTP (STARTTLS; ``smtp_address``), answering itself and delivering to the sink:

- greeting ``220 <host> Microsoft ESMTP MAIL Service ready at <date>``; AUTH only after STARTTLS;
- a refused token: a direct ``535 5.7.3 Authentication unsuccessful [...]``; so is a shared
  mailbox as the AUTH identity (``user=`` someone else's mailbox), even with a delegate's token;
  app-only tokens log in as the mailbox the app was given (``idp.allow_delegation(app, box)``);
- ``smtp_auth_disabled[mailbox or "*"] = variant``: the ``535 5.7.139`` texts (:data:`DISABLED`);
- more than ``max_smtp_sessions`` (3) authenticated sessions per mailbox: ``432 4.3.2``;
- Send As checked at the end of DATA: MAIL FROM must be the AUTH identity or granted with
  :meth:`allow_send_as`, else a one-line ``554 5.2.252 SendAsDenied`` of ``diagnostic_length``
  bytes (about 2 kB at Microsoft) or, with ``send_as_reply = "550"``, ``550 5.7.60``;
- every accepted message is delivered to the sink and filed in the sender's "Sent Items".

Everything it saw is in ``imap_logins`` / ``smtp_logins`` / ``events`` for the tests to check.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import re
import smtplib
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

HOST = "AM0PR01MB1234.eurprd01.prod.exchangelabs.com"
IMAP_CAPABILITIES = "IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+"
IMAP_CAPABILITIES_AFTER_LOGIN = ("IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID UNSELECT "
                                 "CLIENTACCESSRULES CLIENTNETWORKPRESENCELOCATION BACKENDAUTHENTICATE CHILDREN IDLE "
                                 "NAMESPACE LITERAL+")
SMTP_EXTENSIONS = ["SIZE 157286400", "PIPELINING", "DSN", "ENHANCEDSTATUSCODES", "AUTH LOGIN XOAUTH2", "8BITMIME",
                   "BINARYMIME", "CHUNKING", "SMTPUTF8"]
NOT_CONNECTED = b"User is authenticated but not connected."
#: The 535 5.7.139 texts Microsoft sends (none of them is about the token).
DISABLED = {
    "tenant": "Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. "
              "Visit https://aka.ms/smtp_auth_disabled for more information.",
    "mailbox": "Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. "
               "Visit https://aka.ms/smtp_auth_disabled for more information.",
    "security defaults": "Authentication unsuccessful, user is locked by your organization's security defaults "
                         "policy. Contact your administrator.",
    "criteria": "Authentication unsuccessful, the request did not meet the criteria to be authenticated "
                "successfully. Contact your administrator.",
    "basic": "Authentication unsuccessful, basic authentication is disabled.",
}
_XOAUTH2 = re.compile(rb"\Auser=([^\x01]*)\x01auth=Bearer ([^\x01]+)\x01\x01\Z")
_CONTINUATION_LIMIT = 64 * 1024


@dataclass
class LoginRecord:
    """One login attempt as the stand-in saw it."""

    protocol: str                 # "imap" or "smtp"
    user: str                     # XOAUTH2 user=
    owner: str | None             # whose token it was (an app's client id for app-only), None if unknown
    result: str                   # "ok", "refused", "not connected", "disabled", "shared identity", "busy", "too long"
    two_step: bool = False        # the response came after a "+ " / "334 " continuation
    line_length: int = 0          # length of the longest line of the exchange
    token_lifetime: float = 0.0   # the token's whole lifetime, and what was left of it at the login
    token_left: float = 0.0


class Exchange:
    """The stand-in; ``start()`` serves IMAP on ``imap_address`` and SMTP on ``smtp_address``."""

    def __init__(self, pki, idp, dovecot=None, sink=None, *, host: str = "127.0.0.1", smtp_host: str = "127.0.0.2"):
        self.pki, self.idp, self.dovecot, self.sink = pki, idp, dovecot, sink
        self.host, self.smtp_host = host, smtp_host
        self.imap_port = self.smtp_port = 0
        self._server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_tls.load_cert_chain(pki.cert_file, pki.key_file)
        self._backend_tls = ssl.create_default_context(cafile=str(pki.ca_file))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._lock = threading.Lock()
        self.reset()

    # ----------------------------------------------------------------- addresses, lifecycle
    @property
    def imap_address(self) -> str:
        return f"{self.host}:{self.imap_port}"

    @property
    def smtp_address(self) -> str:
        return f"{self.smtp_host}:{self.smtp_port}"

    def reset(self) -> None:
        """Default behaviour, empty records."""
        with self._lock:
            self.missing_rights = "not connected"
            self.not_connected_logins = 0
            self.expire_sessions = True
            self.max_command_line = 10240
            self.smtp_auth_disabled: dict[str, str] = {}
            self.send_as: set[tuple[str, str]] = set()
            self.send_as_reply = "554"
            self.diagnostic_length = 2000
            self.max_smtp_sessions = 3
            self.file_sent_items = True
            self.imap_logins: list[LoginRecord] = []
            self.smtp_logins: list[LoginRecord] = []
            self.events: list[str] = []
            self._smtp_sessions: dict[str, int] = {}

    def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="exchange-stand-in", daemon=True).start()

        async def listen() -> None:
            imap = await asyncio.start_server(self._imap_session, self.host, 0, ssl=self._server_tls,
                                              limit=_CONTINUATION_LIMIT)
            smtp = await asyncio.start_server(self._smtp_session, self.smtp_host, 0, limit=_CONTINUATION_LIMIT)
            self._servers = [imap, smtp]
            self.imap_port = imap.sockets[0].getsockname()[1]
            self.smtp_port = smtp.sockets[0].getsockname()[1]

        asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def close() -> None:
            for server in self._servers:
                server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)

    def __enter__(self) -> Exchange:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- test controls
    def allow_send_as(self, trustee: str, address: str) -> None:
        """``Add-RecipientPermission -Identity address -Trustee trustee -AccessRights SendAs``."""
        with self._lock:
            self.send_as.add((trustee.lower(), address.lower()))

    def disable_smtp_auth(self, variant: str | None, mailbox: str = "*") -> None:
        """Answer AUTH for ``mailbox`` (``*``: everyone) with the 535 5.7.139 text ``variant``."""
        with self._lock:
            if variant is None:
                self.smtp_auth_disabled.pop(mailbox.lower(), None)
            else:
                self.smtp_auth_disabled[mailbox.lower()] = DISABLED[variant]

    def smtp_sessions(self, mailbox: str) -> int:
        """Authenticated SMTP sessions of ``mailbox`` open now."""
        with self._lock:
            return self._smtp_sessions.get(mailbox.lower(), 0)

    def _note(self, text: str) -> None:
        with self._lock:
            self.events.append(text)

    def _token(self, token: str, permission: str) -> dict[str, Any] | None:
        """What Exchange learns from a token: owner and expiry, if it is valid for ``permission``."""
        info = self.idp.access_token_info(token)
        if info is None or info["expires_at"] <= time.time() or info["revoked"]:
            return None
        if permission not in info["scope"] and not info["scope"].endswith("/.default"):
            return None
        return info

    def _may_open(self, owner: str, mailbox: str) -> bool:
        return owner.lower() == mailbox.lower() or self.idp.delegation(owner, mailbox)

    # ----------------------------------------------------------------- IMAP
    async def _imap_session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            host = base64.b64encode(HOST.encode()).decode()
            writer.write(f"* OK The Microsoft Exchange IMAP4 service is ready. [{host}]\r\n".encode())
            while True:
                line = await _read_line(reader)
                if line is None:
                    return
                tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
                command, _, argument = rest.partition(b" ")
                verb = command.upper()
                if len(line) > self.max_command_line:
                    self._record("imap", "", None, "too long", line_length=len(line))
                    writer.write(tag + b" BAD Command Argument Error. 11\r\n")
                elif verb == b"CAPABILITY":
                    writer.write(f"* CAPABILITY {IMAP_CAPABILITIES}\r\n".encode() + tag + b" OK CAPABILITY completed.\r\n")
                elif verb == b"NOOP":
                    writer.write(tag + b" OK NOOP completed.\r\n")
                elif verb == b"ID":
                    writer.write(b"* ID NIL\r\n" + tag + b" OK ID completed.\r\n")
                elif verb == b"LOGOUT":
                    writer.write(b"* BYE Microsoft Exchange Server IMAP4 server signing off.\r\n" + tag
                                 + b" OK LOGOUT completed.\r\n")
                    return
                elif verb == b"AUTHENTICATE" and argument.split(b" ")[0].upper() == b"XOAUTH2":
                    if await self._imap_authenticate(reader, writer, tag, argument, len(line)):
                        return
                elif verb in (b"AUTHENTICATE", b"LOGIN"):
                    writer.write(tag + b" NO " + verb + b" failed.\r\n")
                else:
                    writer.write(tag + b" BAD Command Error. 10\r\n")
                await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _imap_authenticate(self, reader, writer, tag: bytes, argument: bytes, length: int) -> bool:
        """One AUTHENTICATE XOAUTH2; True if the session is over (it went on to the mailbox)."""
        parts = argument.split(b" ")
        two_step = len(parts) == 1
        if two_step:
            writer.write(b"+ \r\n")
            response = await _read_line(reader)
            if response is None:
                return True
            length = max(length, len(response))
            response = response.rstrip(b"\r\n")
        else:
            response = parts[1]
        user, token = _decode_xoauth2(response)
        info = self._token(token, "IMAP.AccessAsUser.All") if token else None
        owner = info["user"] if info else None
        if info is None:
            self._record("imap", user, owner, "refused", two_step, length)
            writer.write(tag + b" NO AUTHENTICATE failed.\r\n")
            return False
        with self._lock:
            throttled = self.not_connected_logins > 0
            self.not_connected_logins -= throttled
        if not self._may_open(owner, user) or throttled:
            if self.missing_rights == "no" and not throttled:
                self._record("imap", user, owner, "refused", two_step, length)
                writer.write(tag + b" NO AUTHENTICATE failed.\r\n")
                return False
            self._record("imap", user, owner, "not connected", two_step, length)
            writer.write(tag + b" OK AUTHENTICATE completed.\r\n")
            await self._not_connected(reader, writer)
            return True
        self._record("imap", user, owner, "ok", two_step, length, info)
        backend = await self._backend(user)
        writer.write(tag + b" OK AUTHENTICATE completed.\r\n")
        await self._relay(reader, writer, backend, info["expires_at"])
        return True

    async def _not_connected(self, reader, writer) -> None:
        for count in (1, 2):
            line = await _read_line(reader)
            if line is None:
                return
            writer.write(line.split(b" ", 1)[0] + b" BAD " + NOT_CONNECTED + b"\r\n")
        writer.write(b"* BYE Connection closed. 14\r\n")
        await writer.drain()

    async def _backend(self, mailbox: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A Dovecot session logged in as ``mailbox`` (with a token of its own: the stand-in has
        already checked the client's token and rights, as Exchange does)."""
        reader, writer = await asyncio.open_connection(self.dovecot.imap_host, self.dovecot.imap_port,
                                                       ssl=self._backend_tls, server_hostname=self.dovecot.imap_host)
        await reader.readline()
        token = self.idp.mint_access_token(mailbox, lifetime=86400, length=256)
        writer.write(b"B1 AUTHENTICATE XOAUTH2 " + base64.b64encode(
            f"user={mailbox}\x01auth=Bearer {token}\x01\x01".encode()) + b"\r\n")
        while True:
            line = await reader.readline()
            if line.startswith(b"B1 "):
                if not line.startswith(b"B1 OK"):
                    raise ConnectionError(f"backend login failed: {line!r}")
                return reader, writer
            if not line:
                raise ConnectionError("backend closed")

    async def _relay(self, reader, writer, backend, expires_at: float) -> None:
        """Pass the session on to Dovecot until one side closes or the login token expires."""
        back_reader, back_writer = backend

        async def upward() -> None:
            while data := await reader.read(65536):
                if self.expire_sessions and time.time() >= expires_at:
                    self._note("imap session invalidated: AccessTokenExpired")
                    writer.write(b"* BYE Session invalidated - AccessTokenExpired\r\n")
                    await writer.drain()
                    return
                command = re.fullmatch(rb"(\S+) CAPABILITY\r\n", data, re.IGNORECASE)
                if command:
                    writer.write(f"* CAPABILITY {IMAP_CAPABILITIES_AFTER_LOGIN}\r\n".encode() + command.group(1)
                                 + b" OK CAPABILITY completed.\r\n")
                    continue
                back_writer.write(data)
                await back_writer.drain()

        async def downward() -> None:
            while data := await back_reader.read(65536):
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(upward()), asyncio.ensure_future(downward())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            back_writer.close()

    # ----------------------------------------------------------------- SMTP
    async def _smtp_session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _SmtpSession()
        try:
            date = email.utils.formatdate(localtime=False)
            writer.write(f"220 {HOST} Microsoft ESMTP MAIL Service ready at {date}\r\n".encode())
            while True:
                line = await _read_line(reader)
                if line is None:
                    return
                reply = await self._smtp_command(session, reader, writer, line.rstrip(b"\r\n"))
                if reply is None:
                    return
                if reply:
                    writer.write(reply.encode() + b"\r\n")
                    await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            if session.user is not None:
                with self._lock:
                    self._smtp_sessions[session.user.lower()] -= 1
            writer.close()

    async def _smtp_command(self, session: _SmtpSession, reader, writer, line: bytes) -> str | None:
        verb, _, argument = line.decode("utf-8", "replace").partition(" ")
        verb = verb.upper()
        if verb in ("EHLO", "HELO"):
            keywords = SMTP_EXTENSIONS if session.tls else \
                [k for k in SMTP_EXTENSIONS if not k.startswith("AUTH")] + ["STARTTLS"]
            if verb == "HELO":
                return f"250 {HOST} Hello [{self.smtp_host}]"
            return "\r\n".join([f"250-{HOST} Hello [{self.smtp_host}]"] + [f"250-{k}" for k in keywords[:-1]]
                               + [f"250 {keywords[-1]}"])
        if verb == "STARTTLS" and not session.tls:
            writer.write(b"220 2.0.0 SMTP server ready\r\n")
            await writer.drain()
            await writer.start_tls(self._server_tls)
            session.tls = True
            return ""
        if verb == "AUTH":
            return await self._smtp_auth(session, reader, writer, argument, len(line))
        if verb == "QUIT":
            writer.write(b"221 2.0.0 Service closing transmission channel\r\n")
            await writer.drain()
            return None
        if verb == "NOOP":
            return "250 2.0.0 OK"
        if verb == "RSET":
            session.mail_from, session.recipients = None, []
            return "250 2.0.0 Resetting"
        if session.user is None:
            return "530 5.7.57 Client not authenticated to send mail. [" + HOST + "]"
        if verb == "MAIL":
            found = re.match(r"(?i)FROM:\s*<([^>]*)>", argument)
            if found is None:
                return "501 5.5.4 Invalid arguments"
            session.mail_from, session.recipients = found.group(1), []
            return "250 2.1.0 Sender OK"
        if verb == "RCPT":
            found = re.match(r"(?i)TO:\s*<([^>]+)>", argument)
            if found is None or session.mail_from is None:
                return "503 5.5.1 Bad sequence of commands" if found else "501 5.5.4 Invalid arguments"
            session.recipients.append(found.group(1))
            return "250 2.1.5 Recipient OK"
        if verb == "DATA":
            if not session.recipients:
                return "503 5.5.1 Bad sequence of commands"
            writer.write(b"354 Start mail input; end with <CRLF>.<CRLF>\r\n")
            await writer.drain()
            data = await _read_message(reader)
            if data is None:
                return None
            return await self._submit(session, data)
        return "500 5.3.3 Unrecognized command"

    async def _smtp_auth(self, session: _SmtpSession, reader, writer, argument: str, length: int) -> str | None:
        mechanism, _, initial = argument.partition(" ")
        if not session.tls or mechanism.upper() not in ("XOAUTH2", "LOGIN"):
            return "504 5.7.4 Unrecognized authentication type"
        if session.user is not None:
            return "503 5.5.1 Bad sequence of commands"
        if mechanism.upper() == "LOGIN":
            return "535 5.7.139 Authentication unsuccessful, basic authentication is disabled. [" + HOST + "]"
        two_step = not initial
        if two_step:
            writer.write(b"334 \r\n")
            await writer.drain()
            line = await _read_line(reader)
            if line is None:
                return None
            length = max(length, len(line))
            initial = line.rstrip(b"\r\n").decode("ascii", "replace")
        user, token = _decode_xoauth2(initial.encode())
        info = self._token(token, "SMTP.Send") if token else None
        owner = info["user"] if info else None
        app_only = info is not None and info["scope"].endswith("/.default")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        unsuccessful = f"535 5.7.3 Authentication unsuccessful [{HOST} {stamp} 08DC{time.time_ns() % 10**12:012X}]"
        if info is None:
            self._record("smtp", user, owner, "refused", two_step, length)
            return unsuccessful
        if owner.lower() != user.lower() and not (app_only and self.idp.delegation(owner, user)):
            self._record("smtp", user, owner, "shared identity", two_step, length)  # a shared mailbox as identity
            return unsuccessful
        disabled = self.smtp_auth_disabled.get(user.lower()) or self.smtp_auth_disabled.get("*")
        if disabled:
            self._record("smtp", user, owner, "disabled", two_step, length)
            return f"535 5.7.139 {disabled} [{HOST}]"
        with self._lock:
            if self._smtp_sessions.get(user.lower(), 0) >= self.max_smtp_sessions:
                busy = True
            else:
                busy = False
                self._smtp_sessions[user.lower()] = self._smtp_sessions.get(user.lower(), 0) + 1
        if busy:
            self._record("smtp", user, owner, "busy", two_step, length)
            return ("432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for "
                    f"more information. [Hostname={HOST}]")
        self._record("smtp", user, owner, "ok", two_step, length)
        session.user = user
        return "235 2.7.0 Authentication successful"

    async def _submit(self, session: _SmtpSession, data: bytes) -> str:
        sender, recipients = session.mail_from or "", session.recipients
        session.mail_from, session.recipients = None, []
        if sender.lower() != session.user.lower() and (session.user.lower(), sender.lower()) not in self.send_as:
            self._note(f"send as denied: {session.user} as {sender}")
            if self.send_as_reply == "550":
                return f"550 5.7.60 SMTP; Client does not have permissions to send as this sender [Hostname={HOST}]"
            return _send_as_denied(session.user, sender, self.diagnostic_length)
        loop = asyncio.get_running_loop()
        if self.sink is not None:
            await loop.run_in_executor(None, _deliver, self.sink, sender, recipients, data)
        if self.dovecot is not None and self.file_sent_items:
            await loop.run_in_executor(None, self._file_sent, session.user, data)
        self._note(f"submitted: {session.user} as {sender}")
        return f"250 2.0.0 OK <{time.time_ns()}@{HOST}> [Hostname={HOST}]"

    def _file_sent(self, user: str, data: bytes) -> None:
        """Exchange files every message sent by SMTP AUTH in the sender's Sent Items."""
        self.dovecot.deliver(user, data, mailbox="Sent Items", create=True)

    def _record(self, protocol: str, user: str, owner: str | None, result: str, two_step: bool = False,
                line_length: int = 0, info: dict[str, Any] | None = None) -> None:
        record = LoginRecord(protocol, user, owner, result, two_step, line_length)
        if info is not None:
            record.token_lifetime = info["expires_at"] - info["issued_at"]
            record.token_left = info["expires_at"] - time.time()
        with self._lock:
            (self.imap_logins if protocol == "imap" else self.smtp_logins).append(record)


@dataclass
class _SmtpSession:
    tls: bool = False
    user: str | None = None
    mail_from: str | None = None
    recipients: list[str] | None = None

    def __post_init__(self) -> None:
        self.recipients = []


async def _read_line(reader: asyncio.StreamReader) -> bytes | None:
    """One line (None at the end of the stream); lines beyond the reader's limit end the session."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        raise ConnectionError("line too long") from None
    return line


async def _read_message(reader: asyncio.StreamReader) -> bytes | None:
    lines = []
    while True:
        line = await _read_line(reader)
        if line is None:
            return None
        if line == b".\r\n":
            return b"".join(lines)
        lines.append(line[1:] if line.startswith(b".") else line)


def _decode_xoauth2(response: bytes) -> tuple[str, str]:
    try:
        found = _XOAUTH2.match(base64.b64decode(response, validate=True))
    except (binascii.Error, ValueError):
        return "", ""
    if found is None:
        return "", ""
    return found.group(1).decode("utf-8", "replace"), found.group(2).decode("ascii", "replace")


def _send_as_denied(user: str, sender: str, length: int) -> str:
    """Microsoft's one-line SendAsDenied reply, padded with diagnostic data to ``length`` bytes."""
    head = (f"554 5.2.252 SendAsDenied; {user} not allowed to send as {sender}; "
            "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process "
            "message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message. ")
    tail = f"[EndDiagnosticData] [Hostname={HOST}]"
    diagnostics, index = [], 0
    while len(head) + sum(map(len, diagnostics)) + len(tail) < length:
        diagnostics.append(f"{index % 4}.{35250 + index * 17}:{index * 2654435761 % 2**32:08X}, ")
        index += 1
    return head + "".join(diagnostics) + tail


def _deliver(sink, sender: str, recipients: list[str], data: bytes) -> None:
    with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
        client.sendmail(sender, recipients, data)
