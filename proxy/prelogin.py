"""What the pure pre-login cores share (:mod:`proxy.imap.core`, :mod:`proxy.pop3.core`).

A connection's life around the login is the same in both protocols: commands are read in a
"ready" state (IMAP's NOT_AUTHENTICATED, POP3's AUTHORIZATION), a login moves it to
AUTHENTICATING until the shell reports the outcome, STARTTLS waits for the handshake (and drops
what the client sent before it), DONE hands the pipelined bytes over for the relay, and CLOSED
ignores everything. :class:`PreloginCore` keeps that life and the TLS flags; each protocol's
core parses its commands (``_process``) and words its replies. No I/O here.
"""

from __future__ import annotations

from typing import Any

from .events import Event
from .lines import LineReader


class PreloginCore:
    """The base of a protocol's pre-login core; see the module docstring."""

    _states: Any  # the protocol's State enum, with CLOSED, STARTTLS, AUTHENTICATING and DONE
    _ready: Any   # its state in which commands are read

    def __init__(self, reader: LineReader, *, starttls: bool, tls_active: bool, login_requires_tls: bool) -> None:
        self._reader = reader
        self.starttls = starttls
        self.tls_active = tls_active
        self.login_requires_tls = login_requires_tls
        self._state = self._ready

    @property
    def state(self) -> Any:
        return self._state

    @property
    def buffered(self) -> int:
        """Bytes held by the core (unparsed input, and a partial command)."""
        return self._reader.buffered

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the client (``b""`` at end of stream); return the events."""
        states = self._states
        if self._state is states.CLOSED:
            return []
        if not data:
            return self._close([], "client closed the connection")
        if self._state is states.STARTTLS:
            return []  # plaintext sent before the handshake: discarded
        self._reader.feed(data)
        if self._state in (states.AUTHENTICATING, states.DONE):
            return []  # kept for after the login, unparsed
        return self._process()

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS completed; commands are read again."""
        if self._state is self._states.CLOSED:
            return
        self._expect(self._states.STARTTLS)
        self._reader.take_rest()
        self.tls_active = True
        self._state = self._ready

    def take_pending(self) -> bytes:
        """After the login succeeded: the bytes received after the login command, unparsed."""
        return self._reader.take_rest()

    # -- for the protocol cores -------------------------------------------------------------
    def _process(self, out: list[Event] | None = None) -> list[Event]:
        raise NotImplementedError

    def _close(self, out: list[Event], reason: str, *reply: str) -> list[Event]:
        raise NotImplementedError

    def _end_login(self, state: Any) -> bool:
        """Leave AUTHENTICATING for ``state``; False if the connection was closed meanwhile."""
        if self._state is self._states.CLOSED:
            return False
        self._expect(self._states.AUTHENTICATING)
        self._state = state
        return True

    def _start_tls(self) -> None:
        """The go-ahead for STARTTLS was sent: wait for the handshake, dropping what came before it."""
        self._state = self._states.STARTTLS
        self._reader.take_rest()  # anything sent before the handshake is injected: drop it

    @property
    def _starttls_offered(self) -> bool:
        return self.starttls and not self.tls_active

    @property
    def _login_disabled(self) -> bool:
        return self.login_requires_tls and not self.tls_active

    def _expect(self, state: Any) -> None:
        if self._state is not state:
            raise RuntimeError(f"not allowed while {self._state.value}")
