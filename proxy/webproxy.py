"""A web proxy in the way: where the proxy settings come from, and HTTP CONNECT tunnels.

Many firm networks let HTTPS out only through a web proxy. The identity provider is reached
through it by :class:`proxy.tokens.identity.HttpSession` (requests does the CONNECT there);
the IMAP and SMTP upstreams go through it when ``imap.via_http_proxy`` / ``smtp.via_http_proxy``
is true, with :func:`open_connection` here (one helper for every upstream protocol: IMAP, SMTP,
and POP3 later). The tunnel is plain TCP through the proxy; TLS runs inside it end to end, with
the mail server's certificate verified as without a proxy, and IMAP keeps its low-memory TLS
endpoint (proxy/tlsendpoint.py).

The setting: ``identity.http_proxy`` in the config wins; without it ``HTTPS_PROXY`` (or
``https_proxy``) from the environment, with ``NO_PROXY`` naming hosts reached directly.
``identity.http_proxy: false`` ignores the environment. A user name and password in the proxy
URL (``http://user:password@proxy:3128``) are sent as Basic authentication; they are secrets:
:class:`WebProxy` never shows them (``str()`` is ``host:port``), nothing logs them.
"""

from __future__ import annotations

import asyncio
import base64
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .hints import proxy_refusal
from .logs import register_secret

MAX_RESPONSE_HEAD = 16 * 1024


class ProxyUrlError(ValueError):
    """A proxy URL that cannot be used (the message never contains the password)."""


@dataclass(frozen=True)
class WebProxy:
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    source: str = "identity.http_proxy"  # or the environment variable it came from
    no_proxy: str = field(default="", repr=False)  # NO_PROXY (only with a proxy from the environment)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL for requests, with the credentials: never log or show it."""
        auth = ""
        if self.username is not None:
            auth = urllib.parse.quote(self.username, safe="") + ":" + urllib.parse.quote(self.password or "", safe="")
            auth += "@"
        return f"http://{auth}{self}"

    def bypass(self, host: str) -> bool:
        """True if ``host`` is reached directly (``NO_PROXY``)."""
        return bool(self.no_proxy) and bool(urllib.request.proxy_bypass_environment(host, {"no": self.no_proxy}))

    def connect_request(self, host: str, port: int) -> bytes:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if self.username is not None:
            credentials = f"{self.username}:{self.password or ''}".encode("utf-8")
            lines.append("Proxy-Authorization: Basic " + base64.b64encode(credentials).decode("ascii"))
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def parse_proxy_url(text: str, source: str, no_proxy: str = "") -> WebProxy:
    """``http://[user:password@]host:port`` (``host:port`` alone means http). Raises ProxyUrlError."""
    text = text.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port
    except ValueError:
        raise ProxyUrlError("expected http://host:port (or http://user:password@host:port)") from None
    if url.scheme.lower() != "http":
        raise ProxyUrlError(f"only http:// web proxies are supported (the tunnel inside is TLS), not {url.scheme}://")
    if not url.hostname or port is None:
        raise ProxyUrlError("expected http://host:port with the proxy's port (often 3128 or 8080)")
    if url.path not in ("", "/") or url.query:
        raise ProxyUrlError("expected only http://host:port, without a path")
    username = urllib.parse.unquote(url.username) if url.username is not None else None
    password = urllib.parse.unquote(url.password) if url.password is not None else None
    register_secret(password)  # a safety net: it is never logged, but should it ever be, it is masked
    return WebProxy(url.hostname, port, username, password, source, no_proxy)


def proxy_from(setting: Any, environ: Mapping[str, str]) -> WebProxy | None:
    """The web proxy for the identity provider: the config's ``identity.http_proxy`` (a URL, or
    False for none at all), else ``https_proxy``/``HTTPS_PROXY`` with ``no_proxy``/``NO_PROXY``.
    Raises ProxyUrlError naming where the bad value came from."""
    if setting is False:
        return None
    if setting:
        return parse_proxy_url(str(setting), "identity.http_proxy")
    for name in ("https_proxy", "HTTPS_PROXY"):
        value = (environ.get(name) or "").strip()
        if value:
            no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
            try:
                return parse_proxy_url(value, name, no_proxy)
            except ProxyUrlError as exc:
                raise ProxyUrlError(f"environment variable {name}: {exc}") from None
    return None


# ------------------------------------------------------------------------------ CONNECT
def _upstream_error(text: str) -> Exception:
    from .login import UpstreamError  # here: proxy.login imports the config, which imports this module
    return UpstreamError(text)


class _Connect(asyncio.Protocol):
    """Sends the CONNECT request and reads the proxy's answer (its head, bounded)."""

    def __init__(self, request: bytes):
        self.request = request
        self.head = bytearray()
        self.extra = bytearray()  # bytes after the answer's head: already the tunnel's
        self.answer: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            self.extra += data
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > MAX_RESPONSE_HEAD:
                self.answer.set_exception(_upstream_error("the web proxy sent an oversized answer to CONNECT"))
            return
        self.extra += self.head[end + 4:]
        status_line = bytes(self.head[:self.head.find(b"\r\n")])
        parts = status_line.split(b" ", 2)
        try:
            if not parts[0].startswith(b"HTTP/"):
                raise ValueError
            status = int(parts[1])
        except (ValueError, IndexError):
            self.answer.set_exception(_upstream_error("the web proxy's answer to CONNECT is not HTTP"))
            return
        reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        self.answer.set_result((status, "".join(c for c in reason if c.isprintable())[:100].strip()))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(_upstream_error("the web proxy closed the connection before answering CONNECT"))


async def open_connection(protocol_factory: Callable[[], asyncio.BaseProtocol], host: str, port: int,
                          via: WebProxy | None) -> tuple[asyncio.Transport, Any]:
    """``loop.create_connection(protocol_factory, host, port)``, through an HTTP CONNECT tunnel
    of ``via`` when it is set (and ``host`` is not in its NO_PROXY). Raises OSError for a
    direct connection, UpstreamError with what to do for the tunnel."""
    loop = asyncio.get_running_loop()
    if via is None or via.bypass(host):
        return await loop.create_connection(protocol_factory, host, port)  # type: ignore[return-value]
    try:
        transport, handshake = await loop.create_connection(lambda: _Connect(via.connect_request(host, port)),
                                                            via.host, via.port)
    except OSError as exc:
        raise _upstream_error(f"cannot connect to the web proxy {via} from {via.source} "
                            f"({exc.strerror or exc.__class__.__name__})") from None
    try:
        status, reason = await handshake.answer
        if status // 100 != 2:
            raise _upstream_error(proxy_refusal(via, status, reason, f"{host}:{port}"))
        protocol = protocol_factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if handshake.extra:
            protocol.data_received(bytes(handshake.extra))  # type: ignore[attr-defined]
    except BaseException:
        transport.abort()
        raise
    return transport, protocol  # type: ignore[return-value]
