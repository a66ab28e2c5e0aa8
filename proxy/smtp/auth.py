"""AUTH PLAIN and AUTH LOGIN for the local listener, backed by the shared login sequence.

aiosmtpd's ``authenticator=`` callback is synchronous, but a login here means network I/O
(identity provider, upstream server), so the mechanisms are implemented as async
``auth_<NAME>`` methods, which aiosmtpd picks up from the protocol class. The SASL data is
decoded by :mod:`proxy.sasl` (strict base64, no control characters); a refusal is mapped to
RFC 4954's codes by :func:`~proxy.smtp.wire.login_failure_reply`. The whole login is
answered within ``limits.login_timeout``; a wrong password is slowed down by
:func:`proxy.login.login` and never touches the tokens.
"""

from __future__ import annotations

import logging
import time

from aiosmtpd.smtp import AuthResult, syntax

from ..login import LoginFailed, login
from ..logs import log_event
from ..sasl import (SaslError, SaslSyntaxError, decode_login_step, decode_plain, encode_login_prompt,
                    validate_username)
from .wire import CREDENTIALS_INVALID, login_failure_reply

log = logging.getLogger("proxy.smtp")
_BAD_BASE64 = "501 5.5.2 Invalid base64 in the authentication data"


class SaslAuthMixin:
    """The AUTH side of :class:`~proxy.smtp.session.ProxySMTP` (mixed in before aiosmtpd's SMTP)."""

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:  # noqa: N802
        """aiosmtpd's AUTH, with the mechanism name case-insensitive (RFC 4954)."""
        words = arg.split() if arg else []  # (str.split also splits at \x1c-\x1f, which aiosmtpd keeps)
        arg = " ".join([words[0].upper(), *words[1:]]) if words else ""  # "": aiosmtpd's 501
        await super().smtp_AUTH(arg)  # type: ignore[misc]

    async def auth_PLAIN(self, _: object, args: list[str]) -> AuthResult:  # noqa: N802
        response = await self._sasl_response(b"") if len(args) == 1 else args[1].encode("utf-8", "surrogateescape")
        if response is None:
            return AuthResult(success=False, handled=True)
        try:
            credentials = decode_plain(response)
        except SaslSyntaxError:
            return _refused(_BAD_BASE64)
        except SaslError:
            return _refused(CREDENTIALS_INVALID)
        if credentials.authzid and credentials.authzid.casefold() != credentials.authcid.casefold():
            return _refused("535 5.7.8 Logging in on behalf of another user is not supported")
        return await self._log_in(credentials.authcid, credentials.password)

    async def auth_LOGIN(self, _: object, args: list[str]) -> AuthResult:  # noqa: N802
        if len(args) == 1:
            response = await self._sasl_response(encode_login_prompt("Username:"))
        else:
            response = args[1].encode("utf-8", "surrogateescape")
        if response is None:
            return AuthResult(success=False, handled=True)
        try:
            username = validate_username(decode_login_step(response))
        except SaslSyntaxError:
            return _refused(_BAD_BASE64)
        except SaslError:
            return _refused(CREDENTIALS_INVALID)
        response = await self._sasl_response(encode_login_prompt("Password:"))
        if response is None:
            return AuthResult(success=False, handled=True)
        try:
            password = decode_login_step(response)
        except SaslSyntaxError:
            return _refused(_BAD_BASE64)
        except SaslError:
            return _refused(CREDENTIALS_INVALID)
        return await self._log_in(username, password)

    async def _sasl_response(self, challenge: bytes) -> bytes | None:
        """Send ``334 challenge`` and read the client's line; None if it cancelled or went away."""
        await self.push(b"334 " + challenge)
        try:
            line = await self._reader.readline()
        except ValueError:  # longer than the reader's limit
            await self.push("500 5.5.6 Authentication data too long")
            return None
        if not line.endswith(b"\n"):
            return None  # end of stream
        line = line.rstrip(b"\r\n")
        if line == b"*":
            await self.push("501 5.7.0 Authentication cancelled")
            return None
        return line

    async def _log_in(self, username: str, password: str) -> AuthResult:
        proxy = self.proxy
        started = time.monotonic()
        self._reset_timeout(self._command_timeout)  # the login has its own deadline, longer than the idle one
        try:
            conn, _, account = await login(proxy.broker, proxy.throttle, proxy.login_upstream, username=username,
                                           password=password, source=self.peer.rsplit(":", 1)[0],
                                           timeout=proxy.config.limits.login_timeout, protocol="smtp",
                                           slot=self.slot)
        except LoginFailed as failure:
            self._reset_timeout()  # idle again
            return _refused(login_failure_reply(failure))
        duration = time.monotonic() - started
        log_event(log, "smtp %s login %s ok (%.0f ms)", self.peer, username, duration * 1000, event="login",
                  protocol="smtp", peer=self.peer, account=username, result="ok", duration_s=round(duration, 3))
        self._logged_in(username, account, conn)
        return AuthResult(success=True, auth_data=username)


def _refused(reply: str) -> AuthResult:
    return AuthResult(success=False, handled=False, message=reply)
