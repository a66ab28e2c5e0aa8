"""The upstream IMAP exchanges as sans-I/O state machines over response lines.

Nothing here does I/O: :mod:`proxy.imap.upstream` writes what a machine returns and feeds it
each complete response (a line with its literals) until an outcome comes out. So every way a
server can answer is a row in a unit test (tests/test_upstream_exchanges.py), above all
Exchange Online's (/work/shared/notes/m365-facts.md):

- the greeting: ``* OK`` with or without a ``[CAPABILITY]`` code (Exchange has none), ``* BYE``;
- :class:`CapabilityFetch`: ``CAPABILITY`` when the greeting named none;
- :class:`Xoauth2Login`: ``AUTHENTICATE XOAUTH2`` with the response on the command line
  (SASL-IR) or, when the server lacks SASL-IR or that line would exceed :data:`SASL_IR_LIMIT`
  (Microsoft's tokens can be longer than 4 kB, and servers limit command lines), in two steps
  after ``+``. A refused token gets a direct tagged ``NO`` (Microsoft) or first a ``+ <base64
  JSON>`` error challenge, answered with an empty line (Dovecot, Google). After the tagged
  ``OK`` without capabilities (Exchange's), one ``CAPABILITY`` probe: its list goes into the
  client's OK, and Exchange's ``BAD User is authenticated but not connected.`` to it means the
  token is fine but its owner may not open the mailbox (or, briefly, throttling):
  :class:`~proxy.outcomes.Refused` ``NOT_CONNECTED``. A server that names its capabilities
  with the login (``OK [CAPABILITY ...]`` or an untagged ``* CAPABILITY`` before it: Dovecot)
  gets no probe: it has told what the probe asks, and such servers have no "not connected"
  state (one upstream round trip less per login).

The access token lives only in the bytes returned to send; no outcome or text contains it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Union

from ..outcomes import Accepted, Failed, Outcome, Refused, TokenRefused
from ..sasl import SaslError, parse_xoauth2_error, xoauth2_initial_response
from ..text import server_text

#: Longest ``AUTHENTICATE XOAUTH2 <response>`` line sent in one piece; longer goes in two steps.
SASL_IR_LIMIT = 8 * 1024
_CAPABILITY_CODE = re.compile(rb"\[CAPABILITY ([^\]\r\n]*)\]", re.IGNORECASE)
_NOT_CONNECTED = re.compile(rb"authenticated but not connected", re.IGNORECASE)


@dataclass(frozen=True)
class Capabilities:
    """The answer of :class:`CapabilityFetch` (and of a greeting with a capability code)."""

    names: list[str]


Step = tuple[bytes, Union[Outcome, Capabilities, None]]  # (bytes to send, the outcome once there is one)


def greeting(response: bytes) -> Capabilities | Failed | None:
    """The server's greeting: its capability code's list, None if it has none (ask), or Failed."""
    upper = response.upper()
    if upper.startswith(b"* BYE"):
        return Failed(f"refused the connection: {server_text(response)}")
    if not upper.startswith(b"* OK"):
        return Failed(f"sent an unexpected greeting: {server_text(response)[:100]}")
    found = _CAPABILITY_CODE.search(response)
    return Capabilities(found.group(1).decode("ascii", "replace").split()) if found else None


class CapabilityFetch:
    """``TAG CAPABILITY`` before login."""

    def __init__(self, tag: bytes):
        self.tag, self.names = tag, []

    def start(self) -> bytes:
        return self.tag + b" CAPABILITY\r\n"

    def receive(self, response: bytes) -> Step:
        if response.upper().startswith(b"* CAPABILITY "):
            self.names = response[13:].decode("ascii", "replace").split()
            return b"", None
        if response.upper().startswith(b"* BYE"):
            return b"", Failed(f"closed the connection: {server_text(response)}")
        if not response.startswith(self.tag + b" "):
            return b"", None
        if response[len(self.tag) + 1:].upper().startswith(b"OK"):
            return b"", Capabilities(self.names)
        return b"", Failed(f"CAPABILITY failed upstream: {server_text(response)}")


class Xoauth2Login:
    """``AUTHENTICATE XOAUTH2`` for ``user`` with ``token``, then the post-login probe."""

    def __init__(self, capabilities: Iterable[str], user: str, token: str, next_tag: Callable[[], bytes], *,
                 sasl_ir_limit: int = SASL_IR_LIMIT):
        self._caps = {c.upper() for c in capabilities}
        self._user, self._token, self._next_tag = user, token, next_tag
        self._limit = sasl_ir_limit
        self._tag = b""
        self._response = b""
        self._sent = False
        self._probing = False
        self._details: dict[str, Any] | None = None
        self._login_caps: str | None = None
        self._probe_caps: str | None = None
        self.two_step = False

    def start(self) -> Step:
        if "AUTH=XOAUTH2" not in self._caps:
            return b"", Failed("the upstream server does not offer AUTH=XOAUTH2")
        try:
            self._response = xoauth2_initial_response(self._user, self._token)
        except SaslError:
            return b"", Failed("the access token or user name contains characters XOAUTH2 cannot carry")
        self._tag = self._next_tag()
        line = self._tag + b" AUTHENTICATE XOAUTH2 " + self._response + b"\r\n"
        if "SASL-IR" in self._caps and len(line) <= self._limit:
            self._sent = True
            return line, None
        self.two_step = True
        return self._tag + b" AUTHENTICATE XOAUTH2\r\n", None

    def receive(self, response: bytes) -> Step:
        if self._probing:
            return self._probe_answer(response)
        if response.startswith(b"+"):
            if not self._sent:
                self._sent = True
                return self._response + b"\r\n", None
            # an error challenge (Dovecot, Google): answer with an empty response, the NO follows
            self._details = parse_xoauth2_error(response[1:].strip())
            return b"\r\n", None
        if response.upper().startswith(b"* CAPABILITY "):
            self._login_caps = response[13:].decode("ascii", "replace").strip()
            return b"", None
        if response.upper().startswith(b"* BYE"):
            return b"", Failed(f"the server closed the connection during login: {server_text(response)}")
        if response.startswith(b"*"):
            return b"", None
        if not response.startswith(self._tag + b" "):
            return b"", Failed(f"unexpected response during login: {server_text(response)[:100]}")
        status = response[len(self._tag) + 1:]
        if status.upper().startswith(b"OK"):
            found = _CAPABILITY_CODE.search(status)
            if found:
                self._login_caps = found.group(1).decode("ascii", "replace").strip()
            if self._login_caps is not None:
                # The server named its capabilities with the login (Dovecot does, Exchange never):
                # no probe, one round trip less. Exchange's "not connected" state needs the probe;
                # a server that sends its list here has no such state.
                return b"", Accepted(self._login_caps)
            self._probing, self._tag = True, self._next_tag()
            return self._tag + b" CAPABILITY\r\n", None
        if status.upper().startswith(b"NO"):
            return b"", TokenRefused(server_text(status[2:]), self._details)
        return b"", Failed(f"the server refused AUTHENTICATE: {server_text(status)}")

    def _probe_answer(self, response: bytes) -> Step:
        if response.upper().startswith(b"* CAPABILITY "):
            self._probe_caps = response[13:].decode("ascii", "replace").strip()
            return b"", None
        if response.upper().startswith(b"* BYE"):
            return b"", Failed(f"the server closed the connection after login: {server_text(response)}")
        if not response.startswith(self._tag + b" "):
            return b"", None  # untagged data (or a stray continuation) before the probe's answer
        status = response[len(self._tag) + 1:]
        if status.upper().startswith(b"OK"):
            return b"", Accepted(self._probe_caps)  # (only probed when the login named none)
        if _NOT_CONNECTED.search(status):
            return b"", Refused(Refused.NOT_CONNECTED,
                                server_text(status[3:] if status.upper().startswith(b"BAD") else status[2:]))
        return b"", Failed(f"the server refused CAPABILITY after login: {server_text(status)}")
