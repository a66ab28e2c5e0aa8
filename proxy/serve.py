"""`proxy serve`: start the listeners and run until told to stop.

SIGTERM/SIGINT: graceful shutdown (:meth:`proxy.service.Runtime.shutdown`), then return;
a second signal ends the open sessions at once. SIGHUP (where it exists) reloads the config,
as does a change of the config file on disk.
"""

from __future__ import annotations

import asyncio
import logging

from .accept import raise_open_file_limit
from .config import Config
from .hardening import disable_core_dumps, exposed_secrets
from .imap.server import ImapProxy
from .pop3.server import Pop3Proxy
from .smtp.server import SmtpProxy
from .tokens.state import UNREADABLE
from .tokens.store import open_store
from .throttle import FailureThrottle
from .service import Runtime, make_server_tls
from .system import install_stop_handlers
from .tls import client_context
from .tokens import TokenBroker

log = logging.getLogger("proxy")


async def serve(config: Config, *, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    """Run the proxy until ``stop`` is set or SIGINT/SIGTERM arrives, then shut down gracefully."""
    raise_open_file_limit()  # two descriptors per session: the usual soft limit of 1,024 caps it near 500
    hardened = disable_core_dumps()  # a crash must not write tokens to disk
    if hardened:
        log.info("process hardening: %s", ", ".join(hardened))
    for warning in exposed_secrets(config):
        log.warning(warning)
    store = open_store(config)
    store.check_private()  # StoreError: a token folder or file others could tamper with is refused
    await store.open(watch=True)  # PostgreSQL: connects in the background if the database is down now
    broker = TokenBroker(config, store)
    throttle = FailureThrottle()  # one for all listeners: guessing over SMTP slows IMAP logins too
    server_tls = make_server_tls(config)  # the proxy's own TLS listeners (tls: cert_file, key_file)
    imap = ImapProxy(config, broker, upstream_tls=client_context(config.imap.ca_file), throttle=throttle,
                     server_tls=server_tls)
    smtp = SmtpProxy(config, broker, upstream_tls=client_context(config.smtp.ca_file), throttle=throttle,
                     server_tls=server_tls)
    pop3 = Pop3Proxy(config, broker, upstream_tls=client_context(config.pop3.ca_file), throttle=throttle,
                     server_tls=server_tls) if config.pop3 is not None else None
    runtime = Runtime(config, store=store, broker=broker, imap=imap, smtp=smtp, server_tls=server_tls, pop3=pop3)
    stop = stop or asyncio.Event()
    force = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop_signal() -> None:
        (force if stop.is_set() else stop).set()

    # SIGINT/SIGTERM stop, SIGHUP reloads; on Windows Ctrl+C and Ctrl+Break stop (no SIGHUP there:
    # the config file watcher covers reloads). proxy/system.py has both branches.
    remove_handlers = install_stop_handlers(loop, on_stop_signal, runtime.request_reload)
    graceful = False
    log.info("token store: %s", store.describe())
    if await runtime.read_stored():
        for account in config.accounts:
            status = runtime.account_status(account.owner)
            if problem := status.problem(account.owner):  # that account's logins will say so; the others are served
                log.log(logging.ERROR if status.state == UNREADABLE else logging.INFO,
                        "account %s: %s", account.username, problem)
            else:
                log.info("account %s: authorized", account.username)
    else:
        log.warning("token store %s not reachable yet (%s): not ready until it is (logins wait for it)",
                    store.describe(), store.last_error or "unknown")
    try:
        await imap.start()
        await smtp.start()
        if pop3 is not None:
            await pop3.start()
        await runtime.start()
    except BaseException:
        await runtime.shutdown(0)
        raise
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        graceful = True
    finally:
        await runtime.shutdown(runtime.config.limits.shutdown_grace if graceful else 0, force)
        remove_handlers()
