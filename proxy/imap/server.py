"""The IMAP listener: the IMAP parts of the shared asyncio shell (:mod:`proxy.front`).

Per connection the shell greets, feeds the client's bytes to :class:`~proxy.imap.core.ImapFront`,
runs the shared login sequence when the core produces a ``Login`` (here: IMAPS and
``AUTHENTICATE XOAUTH2`` upstream, :mod:`proxy.imap.upstream`), answers the client with the
upstream's capabilities, and pipes the two sockets together.

TLS towards the client: ``imap.tls_listen`` accepts implicit TLS (IMAPS); ``imap.starttls``
offers STARTTLS on the plain listener (``required``: LOGINDISABLED until TLS is up).
"""

from __future__ import annotations

import logging

from ..config import ListenerConfig
from ..front import CoreFront
from ..login import LoginFailed
from . import upstream
from .core import Event, ImapFront

_NO_CODES = {LoginFailed.CREDENTIALS: "AUTHENTICATIONFAILED", LoginFailed.REAUTHORIZE: "AUTHENTICATIONFAILED",
             LoginFailed.REJECTED: "AUTHENTICATIONFAILED", LoginFailed.UNAVAILABLE: "UNAVAILABLE"}


class ImapProxy(CoreFront):
    protocol, name = "imap", "IMAP"
    log = logging.getLogger("proxy.imap")
    busy_reply = b"* BYE Too many connections to the proxy, try again later\r\n"
    shutdown_reply = b"* BYE The proxy is shutting down; please reconnect later\r\n"
    timeout_reply = b"* BYE No login within the time allowed\r\n"
    evicted_reply = b"* BYE Too many connections waiting to log in; closing the oldest idle one\r\n"
    idle_reply = b"* BYE No command within %d s\r\n"

    @property
    def settings(self) -> ListenerConfig:
        return self.config.imap

    def new_core(self, *, tls_active: bool, starttls: bool, login_requires_tls: bool) -> ImapFront:
        return ImapFront(id_fields={"name": "oauth2-mail-proxy"}, tls_active=tls_active, starttls=starttls,
                         login_requires_tls=login_requires_tls)

    async def connect_upstream(self) -> upstream.Connection:
        settings = self.config.imap
        return await upstream.connect(settings.upstream, self.upstream_tls, via=settings.upstream_proxy)

    async def authenticate_upstream(self, conn: upstream.Connection, user: str, token: str) -> str | None:
        return await upstream.authenticate(conn, user, token)

    def login_reply(self, core: ImapFront, result: object) -> bytes:
        return core.login_succeeded(result if isinstance(result, str) else None)

    def login_refusal(self, core: ImapFront, failure: LoginFailed) -> list[Event]:
        return core.login_failed(_NO_CODES[failure.kind], failure.text)
