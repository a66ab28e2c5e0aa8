"""Prometheus metrics (``/metrics`` on the admin listener), with the prometheus-client package.

One :class:`Metrics` object per process (:data:`METRICS`); the listeners, the login sequence
and the token broker update it. Labels are protocols, results and account names (mail
addresses), never anything secret. Names::

    proxy_sessions_open{protocol}                    client connections open now
    proxy_sessions_total{protocol}                   client connections accepted
    proxy_logins_total{protocol,result}              ok, credentials, reauthorize, rejected, unavailable
    proxy_login_duration_seconds{protocol}           histogram, from the login command to the answer
    proxy_token_refreshes_total{result}              ok, failed, reauthorize
    proxy_relayed_bytes_total{protocol,direction}    to_server / to_client, after login (SMTP: messages)
    proxy_token_expiry_timestamp_seconds{account}    when the access token held for an account expires
    proxy_account_needs_authorization{account}       1 while only `proxy authorize` can make the account work
    proxy_token_store_up                             1 while the token store can be reached (PostgreSQL)
    proxy_config_reloads_total{result}               ok, refused
    proxy_config_last_reload_timestamp_seconds       last successful (re)load of the config
    proxy_proxy_protocol_refused_total{listener}     connections from a trusted load balancer closed for
                                                     a missing or invalid PROXY protocol header

The relayed byte counts of open IMAP and POP3 sessions are read when scraped (the relay itself counts
bytes anyway), so the data path pays nothing per packet.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

LOGIN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0)
TO_SERVER, TO_CLIENT = "to_server", "to_client"
PROTOCOLS = ("imap", "smtp", "pop3")  # series present from the start (pop3 stays 0 without its listener)
disable_created_metrics()  # no *_created series: they double the output and nobody here reads them


class RelayedBytes:
    """``proxy_relayed_bytes_total``: finished sessions' bytes plus open sessions' current counts."""

    def __init__(self) -> None:
        self._done: dict[tuple[str, str], int] = defaultdict(int)
        self._live: dict[object, tuple[str, Callable[[], tuple[int, int]]]] = {}

    def add(self, protocol: str, direction: str, count: int) -> None:
        self._done[(protocol, direction)] += count

    def track(self, key: object, protocol: str, read: Callable[[], tuple[int, int]]) -> None:
        """Count an open session; ``read()`` returns its (to server, to client) bytes so far."""
        self._live[key] = (protocol, read)

    def finish(self, key: object) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            protocol, read = entry
            up, down = read()
            self._done[(protocol, TO_SERVER)] += up
            self._done[(protocol, TO_CLIENT)] += down

    def totals(self) -> dict[tuple[str, str], int]:
        totals = defaultdict(int, self._done)
        for protocol, read in list(self._live.values()):
            up, down = read()
            totals[(protocol, TO_SERVER)] += up
            totals[(protocol, TO_CLIENT)] += down
        for protocol in PROTOCOLS:
            for direction in (TO_SERVER, TO_CLIENT):
                totals[(protocol, direction)] += 0
        return totals

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("proxy_relayed_bytes", "Bytes relayed between clients and mail servers "
                                     "after login (SMTP: message data)", labels=["protocol", "direction"])
        for (protocol, direction), count in sorted(self.totals().items()):
            family.add_metric([protocol, direction], count)
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _TokenExpiry:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("proxy_token_expiry_timestamp_seconds",
                                   "Unix time at which the access token held for the account expires "
                                   "(from the token file until the account's first login)", labels=["account"])
        source = self.metrics.token_expiry
        try:
            expiries = list(source()) if source is not None else []
        except Exception:  # a scrape must not fail because of one account's token file
            logging.getLogger("proxy.metrics").exception("token expiry metric unavailable")
            expiries = []
        for account, expires in expiries:
            if expires:
                family.add_metric([account], float(expires))
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _StoreAndAccounts:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        needs = GaugeMetricFamily("proxy_account_needs_authorization", "1 if only `proxy authorize` can make the "
                                  "account work again (not authorized, refused, unreadable)", labels=["account"])
        store = GaugeMetricFamily("proxy_token_store_up", "1 if the token store can be reached now")
        try:
            for account, flag in (self.metrics.accounts_needing_authorization or (lambda: []))():
                needs.add_metric([account], 1.0 if flag else 0.0)
            if self.metrics.store_up is not None:
                store.add_metric([], 1.0 if self.metrics.store_up() else 0.0)
        except Exception:  # a scrape must not fail
            logging.getLogger("proxy.metrics").exception("account and store metrics unavailable")
        yield needs
        yield store

    def describe(self) -> Iterator[Metric]:
        return iter(())


class Metrics:
    """The process's metrics, in their own registry (no default process/platform collectors)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.sessions_open = Gauge("proxy_sessions_open", "Client connections open now", ["protocol"],
                                   registry=registry)
        self.sessions = Counter("proxy_sessions", "Client connections accepted", ["protocol"], registry=registry)
        self.logins = Counter("proxy_logins", "Client logins by result", ["protocol", "result"], registry=registry)
        self.login_seconds = Histogram("proxy_login_duration_seconds", "Time from a client's login command "
                                       "to the proxy's answer", ["protocol"], buckets=LOGIN_BUCKETS,
                                       registry=registry)
        self.token_refreshes = Counter("proxy_token_refreshes", "Access token refreshes by result", ["result"],
                                       registry=registry)
        self.config_reloads = Counter("proxy_config_reloads", "Configuration reloads by result", ["result"],
                                      registry=registry)
        self.config_loaded = Gauge("proxy_config_last_reload_timestamp_seconds",
                                   "Unix time of the last successful configuration (re)load", registry=registry)
        self.proxy_protocol_refused = Counter(
            "proxy_proxy_protocol_refused", "Connections from a trusted load balancer closed for a missing or "
            "invalid PROXY protocol header", ["listener"], registry=registry)
        self.relayed = RelayedBytes()
        registry.register(self.relayed)  # type: ignore[arg-type]
        #: Set by `proxy serve`: returns (account, access token expiry as Unix time or None) pairs.
        self.token_expiry: Callable[[], Iterable[tuple[str, float | None]]] | None = None
        registry.register(_TokenExpiry(self))  # type: ignore[arg-type]
        #: Set by `proxy serve`: (account, needs `proxy authorize`) pairs, and whether the store is up.
        self.accounts_needing_authorization: Callable[[], Iterable[tuple[str, bool]]] | None = None
        self.store_up: Callable[[], bool] | None = None
        registry.register(_StoreAndAccounts(self))  # type: ignore[arg-type]
        for protocol in PROTOCOLS:  # present from the start, so rates work from the first scrape
            self.sessions_open.labels(protocol)
            self.sessions.labels(protocol)
            self.login_seconds.labels(protocol)
            for result in ("ok", "credentials", "reauthorize", "rejected", "unavailable"):
                self.logins.labels(protocol, result)
        for result in ("ok", "failed", "reauthorize"):
            self.token_refreshes.labels(result)
        for result in ("ok", "refused"):
            self.config_reloads.labels(result)

    def session_opened(self, protocol: str) -> None:
        self.sessions.labels(protocol).inc()
        self.sessions_open.labels(protocol).inc()

    def session_closed(self, protocol: str) -> None:
        self.sessions_open.labels(protocol).dec()

    def login(self, protocol: str, result: str, seconds: float) -> None:
        self.logins.labels(protocol, result).inc()
        self.login_seconds.labels(protocol).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


METRICS = Metrics()
