"""What the upstream submission server supports, known before any client has logged in.

A client's EHLO comes before its AUTH, so before the proxy opens that user's upstream
connection; yet the EHLO answer must already say which extensions the client may use
(SIZE, 8BITMIME, SMTPUTF8, DSN). The proxy therefore remembers the upstream's EHLO keywords:

- when the listener starts, a background probe connects (TCP, EHLO, STARTTLS, EHLO; no
  login, so no token is needed), QUITs, and stores the keywords;
- every per-user upstream connection refreshes them for free (its EHLO after STARTTLS);
- an EHLO that finds them older than ``max_age`` starts a new probe in the background and is
  answered from the old value meanwhile. Only while nothing at all is known does an EHLO wait
  for the probe, at most ``wait`` seconds;
- if nothing could be learned, :data:`~proxy.smtp.wire.DEFAULT_EXTENSIONS` are offered. The
  upstream still has the last word: whatever a client uses that it does not support gets the
  upstream's own refusal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from ..login import UpstreamError
from .wire import DEFAULT_EXTENSIONS

log = logging.getLogger("proxy.smtp")


class UpstreamExtensions:
    """A cache of the upstream's EHLO keywords, refreshed by ``probe`` (an awaitable factory)."""

    def __init__(self, probe: Callable[[], Awaitable[dict[str, str]]], *, timeout: float = 10.0,
                 max_age: float = 3600.0, wait: float = 3.0, retry_after: float = 60.0):
        self._probe, self.timeout, self.max_age, self.wait = probe, timeout, max_age, wait
        self.retry_after = retry_after
        self._known: dict[str, str] | None = None
        self._learned_at = 0.0
        self._retry_at = 0.0  # after a failed probe, do not try again before this
        self._task: asyncio.Task | None = None

    def update(self, extensions: Mapping[str, str]) -> None:
        """Remember keywords seen on a real upstream connection."""
        self._known = dict(extensions)
        self._learned_at = time.monotonic()

    def refresh(self) -> None:
        """Start a background probe unless one is running."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def get(self) -> Mapping[str, str]:
        """The keywords to build an EHLO answer from (never raises, never waits long)."""
        now = time.monotonic()
        if (self._known is None or now - self._learned_at > self.max_age) and now >= self._retry_at:
            self.refresh()
        if self._known is None and self._task is not None and not self._task.done():
            await asyncio.wait([self._task], timeout=self.wait)
        return self._known if self._known is not None else DEFAULT_EXTENSIONS

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        try:
            self.update(await asyncio.wait_for(self._probe(), self.timeout))
        except Exception as exc:  # noqa: BLE001 - a failed probe only means defaults are offered
            self._retry_at = time.monotonic() + self.retry_after
            if isinstance(exc, asyncio.TimeoutError):
                reason = f"no answer within {self.timeout:.0f} s"
            else:
                reason = str(exc) if isinstance(exc, UpstreamError) else exc.__class__.__name__
            if self._known is None:
                log.warning("smtp: cannot learn the mail server's extensions (%s); offering defaults", reason)
            else:
                log.info("smtp: re-checking the mail server's extensions failed (%s); keeping the last ones",
                         reason)
