"""The admin HTTP listener: ``/healthz``, ``/readyz`` and ``/metrics`` (off unless ``admin.listen`` is set).

A deliberately small HTTP/1.1 server on asyncio streams: GET and HEAD only, one request per
connection, bounded request size and time. It shares the proxy's event loop, so its answers
reflect the listeners' real state. Nothing it serves is secret: listener states, account names
with their readiness, and the Prometheus metrics (see :mod:`proxy.metrics`); no file paths.
With ``admin.token`` (required off loopback) every request needs ``Authorization: Bearer <token>``,
else 401.

- ``/healthz``: 200 while the process runs and every listener is bound and accepting
  (503 during shutdown). For liveness probes and the container HEALTHCHECK.
- ``/readyz``: 200 if this replica can serve (listeners bound, the token store read once since
  start), 503 otherwise; the JSON body also lists each account's token state (never a reason
  for 503: see proxy/service.py).
- ``/metrics``: the Prometheus text format.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from .config import Address
from .metrics import Metrics

log = logging.getLogger("proxy.admin")
_MAX_REQUEST = 8192
_REQUEST_TIMEOUT = 10.0

Check = Callable[[], "tuple[bool, dict] | Awaitable[tuple[bool, dict]]"]


class AdminServer:
    def __init__(self, address: Address, *, health: Check, ready: Check, metrics: Metrics,
                 token: str | None = None):
        self.address = address
        self.token = token  # if set, every request needs "Authorization: Bearer <token>"
        self.health, self.ready, self.metrics = health, ready, metrics
        self.server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.address.host, self.address.port,
                                                 limit=_MAX_REQUEST)
        names = ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in self.server.sockets)
        log.info("admin HTTP listening on %s (/healthz, /readyz, /metrics)", names)

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1] if self.server else 0

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            status, content_type, body, head = await asyncio.wait_for(self._request(reader), _REQUEST_TIMEOUT)
            challenge = 'WWW-Authenticate: Bearer realm="proxy"\r\n' if status == HTTPStatus.UNAUTHORIZED else ""
            writer.write(f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n{challenge}Connection: close\r\n\r\n"
                         .encode("ascii") + (b"" if head else body))
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError):
            pass
        except Exception:  # never let a scrape take anything down
            log.exception("admin: request failed")
        finally:
            writer.close()
            if task is not None:
                self._connections.discard(task)

    async def _request(self, reader: asyncio.StreamReader) -> tuple[HTTPStatus, str, bytes, bool]:
        request_line = (await reader.readline()).decode("latin-1").strip()
        size = len(request_line)
        authorization = ""
        while True:  # headers: only Authorization matters
            line = await reader.readline()
            size += len(line)
            if size > _MAX_REQUEST:
                return _text(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request too large\n")
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "authorization":
                authorization = value.strip()
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _text(HTTPStatus.BAD_REQUEST, "bad request\n")
        method, target = parts[0], parts[1].split("?", 1)[0]
        if self.token is not None and not _bearer_matches(authorization, self.token):
            return _text(HTTPStatus.UNAUTHORIZED, "a bearer token is required (admin.token)\n")
        if method not in ("GET", "HEAD"):
            return _text(HTTPStatus.METHOD_NOT_ALLOWED, "GET or HEAD only\n")
        head = method == "HEAD"
        if target == "/metrics":
            body, content_type = self.metrics.exposition()
            return HTTPStatus.OK, content_type, body, head
        if target in ("/healthz", "/readyz"):
            answer = (self.health if target == "/healthz" else self.ready)()
            ok, details = await answer if inspect.isawaitable(answer) else answer
            body = json.dumps({"status": "ok" if ok else "fail", **details}, indent=1, sort_keys=True) + "\n"
            status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            return status, "application/json", body.encode("utf-8"), head
        return (*_text(HTTPStatus.NOT_FOUND, "not found: try /healthz, /readyz or /metrics\n")[:3], head)


def _bearer_matches(authorization: str, token: str) -> bool:
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _text(status: HTTPStatus, text: str) -> tuple[HTTPStatus, str, bytes, bool]:
    return status, "text/plain; charset=utf-8", text.encode("utf-8"), False
