"""Shared fixtures: the test bed's real peers, started once per test session.

- ``pki``: a throw-away CA and a server certificate for localhost/127.0.0.1/127.0.0.2/::1.
- ``idp``: the local identity provider (tests/idp.py), serving HTTPS on 127.0.0.1.
- ``sink``: an SMTP sink (tests/sink.py) that keeps every message's exact bytes.
- ``dovecot``: a real Dovecot (tests/dovecot.py) trusting ``idp``'s tokens and relaying to ``sink``.
- ``postgres``: a PostgreSQL cluster (tests/replicas.py), a database per test.
- ``exchange``: a stand-in for Exchange Online's IMAP and SMTP (tests/exchange.py) in front of
  ``dovecot``, answering the way Microsoft does where Dovecot does not.
- ``idp_reset``: use it in any test that changes the identity provider's settings, faults or
  listener, or that counts its requests: it starts from (and leaves) a clean state.

When a test that uses ``dovecot`` fails, Dovecot's log is added to the failure report.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator

import pytest

from tests.dovecot import Dovecot
from tests.exchange import Exchange
from tests.idp import IdentityProvider
from tests.pki import TestPKI, make_test_pki
from tests.replicas import PostgresServer
from tests.sink import SinkServer


def pytest_configure(config: pytest.Config) -> None:
    """Give Ctrl+C (SIGINT) its normal meaning, also for the processes the tests start.

    A non-interactive shell starts background jobs with SIGINT ignored, children inherit that,
    and Python then never raises KeyboardInterrupt: a test that interrupts `proxy authorize`
    would wait for nothing. A handler (unlike "ignored") is reset to the default on exec.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def idp(pki: TestPKI) -> Iterator[IdentityProvider]:
    with IdentityProvider(pki) as server:
        yield server


@pytest.fixture
def idp_reset(idp: IdentityProvider) -> Iterator[IdentityProvider]:
    """The identity provider, running, without faults, with default settings and zeroed counters."""
    idp.start()
    idp.reset()
    yield idp
    idp.start()
    idp.reset()


@pytest.fixture(scope="session")
def sink() -> Iterator[SinkServer]:
    with SinkServer() as server:
        yield server


@pytest.fixture(scope="session")
def dovecot(pki: TestPKI, idp: IdentityProvider, sink: SinkServer) -> Iterator[Dovecot]:
    # Not under pytest's tmp_path: that is private to the current user (0700), and when run as
    # root Dovecot's mail and auth processes run as other users who need to reach the directory.
    workdir = tempfile.mkdtemp(prefix="test-dovecot-")
    server = Dovecot(workdir, pki, idp, sink.port)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster from Debian's packages in a temporary folder (tests/replicas.py);
    ``create_database(name)`` gives each test its own database and role."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def exchange_server(pki: TestPKI, idp: IdentityProvider, dovecot: Dovecot, sink: SinkServer) -> Iterator[Exchange]:
    with Exchange(pki, idp, dovecot, sink) as server:
        yield server


@pytest.fixture
def exchange(exchange_server: Exchange, idp_reset: IdentityProvider, sink: SinkServer) -> Iterator[Exchange]:
    """The Exchange Online stand-in (tests/exchange.py) in front of ``dovecot``, with default
    behaviour and empty records; the sink starts empty."""
    exchange_server.reset()
    sink.reset()
    yield exchange_server
    exchange_server.reset()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the end of Dovecot's (and PostgreSQL's) log to the report of a failed test that used it."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    server = getattr(item, "funcargs", {}).get("dovecot")
    if report.failed and isinstance(server, Dovecot):
        report.sections.append(("Dovecot log (last 20,000 characters)", server.log_text()[-20000:]))
    database = getattr(item, "funcargs", {}).get("postgres")
    if report.failed and isinstance(database, PostgresServer):
        report.sections.append(("PostgreSQL log (last 10,000 characters)", database.log_text()[-10000:]))


# ------------------------------------------------------------------ the SMTP side (tests/test_smtp*.py)
import asyncio  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

from proxy.config import Address, load_config  # noqa: E402
from proxy.smtp.server import SmtpProxy  # noqa: E402
from proxy.tokens.store import open_store  # noqa: E402
from proxy.tls import client_context  # noqa: E402
from proxy.tokens import TokenBroker  # noqa: E402
from tests.harness import authorize, write_config  # noqa: E402

SMTP_USER = "smtp-user@example.com"
SMTP_PASSWORD = "local SMTP password"


class SmtpUnderTest:
    """The proxy's SMTP listener served in-process on a private event loop thread, so blocking
    clients (smtplib, swaks, curl) can talk to it while the test inspects the broker."""

    def __init__(self, config, **options) -> None:
        self.config = replace(config, smtp=replace(config.smtp, listen=Address("127.0.0.1", 0)))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="smtp-proxy", daemon=True)
        self._thread.start()
        self.proxy = self.run(self._start(options))
        self.port: int = self.proxy.server.sockets[0].getsockname()[1]

    async def _start(self, options: dict):
        store = open_store(self.config)
        await store.open()
        self.broker = TokenBroker(self.config, store)
        proxy = SmtpProxy(self.config, self.broker, upstream_tls=client_context(self.config.smtp.ca_file), **options)
        await proxy.start()
        return proxy

    def run(self, coroutine, timeout: float = 30):
        """Run ``coroutine`` on the proxy's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def access_token(self, user: str = SMTP_USER, password: str = SMTP_PASSWORD) -> str | None:
        """The access token the broker currently holds for ``user``."""
        return self.run(self.broker.authenticate(user, password)).access_token

    def close(self) -> None:
        self.run(self.proxy.close())
        self.run(self.broker.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="session")
def smtp_authorized(tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider, pki: TestPKI,
                    dovecot: Dovecot) -> Path:
    """A config directory (upstream: Dovecot's submission service, STARTTLS) whose account SMTP_USER
    was authorized once through the real `proxy authorize` and the fake browser."""
    config_path = write_config(tmp_path_factory.mktemp("smtp"), idp=idp, pki=pki, dovecot=dovecot,
                               accounts=[SMTP_USER], limits={"login_timeout": 5})
    result = authorize(config_path, SMTP_USER, SMTP_PASSWORD, pki)
    assert result.returncode == 0, result.stderr
    return config_path.parent


@pytest.fixture
def smtp_config(smtp_authorized: Path, tmp_path: Path):
    """The authorized configuration, on a private copy of its token store (tests may refresh tokens)."""
    return load_config(shutil.copytree(smtp_authorized, tmp_path / "smtp") / "config.yaml")


@pytest.fixture
def smtp_proxy(smtp_config, sink: SinkServer) -> Iterator[Callable[..., SmtpUnderTest]]:
    """``smtp_proxy(config=None, **SmtpProxy options)`` starts an in-process SMTP listener (closed
    after the test); the sink starts empty."""
    sink.reset()
    started: list[SmtpUnderTest] = []

    def start(config=None, **options) -> SmtpUnderTest:
        started.append(SmtpUnderTest(config or smtp_config, **options))
        return started[-1]

    yield start
    for proxy in started:
        proxy.close()
    sink.reset()
