"""The POP3 listener: the POP3 parts of the shared asyncio shell (:mod:`proxy.front`).

Per connection the shell greets, feeds the client's bytes to :class:`~proxy.pop3.core.Pop3Front`,
runs the shared login sequence (local password, throttle, deadline, drop-refresh-retry) when
the core produces a ``Login`` (here: POP3S and ``AUTH XOAUTH2`` upstream,
:mod:`proxy.pop3.upstream`), and then pipes the two sockets together: STAT, LIST, UIDL, RETR,
TOP, DELE, RSET, NOOP and QUIT go to the server unparsed, with the relay's backpressure.

Runs only when the config has a ``pop3`` section. TLS towards the client: ``pop3.tls_listen``
(implicit TLS, POP3S) and ``pop3.starttls`` on the plain listener (STLS; ``required``: no USER,
PASS or AUTH before it).
"""

from __future__ import annotations

import logging
import ssl

from ..config import Config, ListenerConfig
from ..front import CoreFront
from ..login import LoginFailed
from . import upstream
from .core import Event, Pop3Front

# RFC 2449/3206 response codes: AUTH when the credentials (or the authorization behind them) are
# the problem, SYS/TEMP when the identity provider or the server is, and trying later may help.
_ERR_CODES = {LoginFailed.CREDENTIALS: "AUTH", LoginFailed.REAUTHORIZE: "AUTH", LoginFailed.REJECTED: "AUTH",
              LoginFailed.UNAVAILABLE: "SYS/TEMP"}


class Pop3Proxy(CoreFront):
    protocol, name = "pop3", "POP3"
    log = logging.getLogger("proxy.pop3")
    busy_reply = b"-ERR [SYS/TEMP] Too many connections to the proxy, try again later\r\n"
    shutdown_reply = b"-ERR [SYS/TEMP] The proxy is shutting down; please reconnect later\r\n"
    timeout_reply = b"-ERR No login within the time allowed\r\n"
    evicted_reply = b"-ERR [SYS/TEMP] Too many connections waiting to log in; closing the oldest idle one\r\n"
    idle_reply = b"-ERR No command within %d s\r\n"

    def __init__(self, config: Config, *args, **kwargs):
        if config.pop3 is None:
            raise ValueError("the config has no pop3 section")
        self._settings = config.pop3
        super().__init__(config, *args, **kwargs)

    @property
    def settings(self) -> ListenerConfig:
        return self._settings

    def reconfigure(self, config: Config, upstream_tls: ssl.SSLContext) -> None:
        """As for the other listeners; a reload that drops the pop3 section needs a restart to stop
        this listener, which keeps its last settings until then."""
        super().reconfigure(config, upstream_tls)
        self._settings = config.pop3 or self._settings

    def new_core(self, *, tls_active: bool, starttls: bool, login_requires_tls: bool) -> Pop3Front:
        return Pop3Front(tls_active=tls_active, starttls=starttls, login_requires_tls=login_requires_tls)

    async def connect_upstream(self) -> upstream.Connection:
        return await upstream.connect(self._settings.upstream, self.upstream_tls, via=self._settings.upstream_proxy)

    async def authenticate_upstream(self, conn: upstream.Connection, user: str, token: str) -> str:
        return await upstream.authenticate(conn, user, token)

    def login_reply(self, core: Pop3Front, result: object) -> bytes:
        return core.login_succeeded(result if isinstance(result, str) else None)

    def login_refusal(self, core: Pop3Front, failure: LoginFailed) -> list[Event]:
        return core.login_failed(_ERR_CODES[failure.kind], failure.text)
