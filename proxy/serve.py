"""`proxy serve`: start the listeners and run until told to stop."""

from __future__ import annotations

import asyncio
import logging
import signal

from .config import Config
from .imap.server import ImapProxy
from .smtp.server import SmtpProxy
from .store import TokenStore
from .throttle import FailureThrottle
from .tls import client_context
from .tokens import TokenBroker

log = logging.getLogger("proxy")


async def serve(config: Config, *, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    """Run the proxy until ``stop`` is set or SIGINT/SIGTERM arrives."""
    store = TokenStore(config.token_path)
    broker = TokenBroker(config, store)
    throttle = FailureThrottle()  # one for both listeners: guessing over SMTP slows IMAP logins too
    imap = ImapProxy(config, broker, upstream_tls=client_context(config.imap.ca_file), throttle=throttle)
    smtp = SmtpProxy(config, broker, upstream_tls=client_context(config.smtp.ca_file), throttle=throttle)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows: Ctrl+C raises instead
            pass
    await imap.start()
    await smtp.start()
    for account in config.accounts:
        authorized = store.stamp(account.username) is not None
        log.info("account %s: %s", account.username,
                 "authorized" if authorized else f"NOT authorized yet (run `proxy authorize {account.username}`)")
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await imap.close()
        await smtp.close()
        await broker.close()
