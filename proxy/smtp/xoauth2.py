"""The upstream SMTP login (AUTH XOAUTH2) as a sans-I/O state machine over replies.

:mod:`proxy.smtp.upstream` sends what :class:`Xoauth2Login` returns and feeds it each complete
reply. The login is always in two steps (``AUTH XOAUTH2``, ``334``, then the token line):
Dovecot refuses long AUTH lines and Microsoft's tokens can exceed 4,096 characters. How the
final reply is read (:func:`classify`) decides what the proxy does next, so each of Microsoft's
answers (/work/shared/notes/m365-facts.md) is a row in tests/test_upstream_exchanges.py:

- ``235``: logged in;
- ``535 5.7.139`` (SMTP AUTH disabled for the tenant or the mailbox, security defaults, basic
  authentication disabled, "did not meet the criteria"): not about the token, so no refresh and
  no retry: :class:`~proxy.outcomes.Refused` ``SMTP_AUTH_DISABLED``;
- any other ``535`` (Microsoft's direct ``5.7.3``, or Dovecot's and Google's ``334 <base64
  JSON>`` error challenge, answered with an empty line, then ``535``): the token was refused.
  (Exchange also answers ``5.7.3`` to a shared mailbox as the identity, even with a delegate's
  token; the proxy never sends one: :func:`proxy.login.upstream_user`.)
- ``4xx`` (``432 4.3.2`` too many concurrent connections, ``454``): busy, try later;
- anything else: :class:`Failed`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

from ..outcomes import Accepted, Failed, Outcome, Refused, TokenRefused
from ..sasl import SaslError, parse_xoauth2_error, xoauth2_initial_response
from .wire import Reply, enhanced_code

Step = tuple[Union[bytes, None], Union[Outcome, None]]  # (line to send without CRLF, or None; the outcome)


def classify(reply: Reply, details: dict[str, Any] | None = None) -> Outcome:
    """What the final reply to AUTH XOAUTH2 means (see the module's table)."""
    text = f"{reply.code} {reply.text}"
    if reply.code == 235:
        return Accepted()
    if reply.code // 100 == 5 and enhanced_code(reply) == "5.7.139":
        return Refused(Refused.SMTP_AUTH_DISABLED, text)
    if reply.code == 535:
        return TokenRefused(text, details)
    if reply.code // 100 == 4:
        return Failed(f"the server is busy: {text}")
    return Failed(f"AUTH XOAUTH2 failed: {text}")


class Xoauth2Login:
    """``AUTH XOAUTH2`` as ``user`` with ``token``."""

    def __init__(self, extensions: Mapping[str, str], user: str, token: str):
        self._offered = "XOAUTH2" in extensions.get("AUTH", "").upper().split()
        self._user, self._token = user, token
        self._state = "start"
        self._details: dict[str, Any] | None = None

    def start(self) -> Step:
        if not self._offered:
            return None, Failed("the server does not offer AUTH XOAUTH2")
        self._state = "auth"
        return b"AUTH XOAUTH2", None

    def receive(self, reply: Reply) -> Step:
        if reply.code == 334 and self._state == "auth":
            try:
                response = xoauth2_initial_response(self._user, self._token)
            except SaslError:
                return None, Failed("the access token or user name contains characters XOAUTH2 cannot carry")
            self._state = "response"
            return response, None
        if reply.code == 334 and self._state == "response":
            # an error challenge (Dovecot, Google): answer with an empty line, the 535 follows
            self._details = parse_xoauth2_error(b"".join(reply.lines))
            self._state = "challenge"
            return b"", None
        if reply.code == 334:
            return None, Failed("AUTH XOAUTH2: unexpected 334")
        return None, classify(reply, self._details)
