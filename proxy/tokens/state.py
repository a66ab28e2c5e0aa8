"""What a token record holds, and the one model of an account's token state.

A record holds the encrypted payload (:func:`token_payload`) and a clear, non-secret status
(:func:`token_meta`). :class:`TokenStatus` is how that status is read, everywhere: `proxy
status`, `proxy check`, ``/readyz`` and ``/metrics``, and the broker itself (which adds what
it holds in memory once a login unlocked the account).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import msal

from ..config import FLOW_CLIENT_CREDENTIALS, AccountConfig, Config
from .store import NoTokens, Sealed, StoreError, StoreUnavailable, TokenStore
# The states an account's tokens can be in.
OK = "ok"
NOT_AUTHORIZED = "not_authorized"            # no record: `proxy authorize` has not run
NEEDS_AUTHORIZATION = "needs_authorization"  # the identity provider refused the refresh token
UNREADABLE = "unreadable"                    # the record is corrupt or cannot be read
REFRESH_FAILING = "refresh_failing"          # held in memory, the last refresh failed, no usable token
STORE_UNAVAILABLE = "store_unavailable"      # the store cannot be reached (the database is down)
STATES = (OK, NOT_AUTHORIZED, NEEDS_AUTHORIZATION, UNREADABLE, REFRESH_FAILING, STORE_UNAVAILABLE)


def token_payload(cache: msal.SerializableTokenCache, home_account_id: str | None,
                  access_token: str | None, expires_at: float | None,
                  lifetime: float | None = None) -> dict[str, Any]:
    """What goes, encrypted, into a token record (``lifetime``: the access token's, as issued, so
    that every process sharing the record times the next refresh alike)."""
    return {"msal_cache": cache.serialize(), "home_account_id": home_account_id,
            "access_token": access_token, "expires_at": expires_at, "lifetime": lifetime}


def token_meta(username: str, *, expires_at: float | None, has_refresh_token: bool,
               last_refresh: float | None, last_error: str | None, state: str = OK,
               flow: str | None = None) -> dict[str, Any]:
    """Non-secret status stored in clear (but authenticated) beside the ciphertext.

    ``username`` is the token owner (the record's name); ``proxy status`` shows this without any
    password. It is authenticated only when the record is opened with the key, so it is a display.
    """
    meta = {"account": username, "state": state, "access_token_expires": expires_at,
            "has_refresh_token": has_refresh_token, "last_refresh": last_refresh,
            "last_error": last_error, "updated": time.time()}
    if flow:
        meta["flow"] = flow
    return meta


@dataclass(frozen=True)
class TokenStatus:
    """An account's token state, from its record's clear status or from a running broker."""

    state: str
    access_token_expires: float | None = None
    has_refresh_token: bool | None = None
    last_refresh: float | None = None
    last_error: str | None = None
    flow: str | None = None
    held: bool = False  # a running proxy holds the tokens unlocked in memory

    @classmethod
    def from_meta(cls, meta: dict[str, Any], flow: str | None = None) -> TokenStatus:
        """The status a record's clear ``meta`` describes (``flow``: the config's, if known)."""
        expires = meta.get("access_token_expires")
        refresh = meta.get("last_refresh")
        state = meta.get("state")
        return cls(state=state if state in STATES else OK,
                   access_token_expires=float(expires) if _number(expires) else None,
                   has_refresh_token=bool(meta.get("has_refresh_token")),
                   last_refresh=float(refresh) if _number(refresh) else None,
                   last_error=str(meta["last_error"]) if meta.get("last_error") else None,
                   flow=flow or meta.get("flow"))

    @classmethod
    def missing(cls, flow: str | None = None) -> TokenStatus:
        return cls(NOT_AUTHORIZED, flow=flow)

    @classmethod
    def failed(cls, error: Exception, flow: str | None = None, *, unavailable: bool = False) -> TokenStatus:
        return cls(STORE_UNAVAILABLE if unavailable else UNREADABLE, last_error=str(error), flow=flow)

    def held_as(self, **changes: Any) -> TokenStatus:
        return replace(self, held=True, **changes)

    @property
    def app_only(self) -> bool:
        return self.flow == FLOW_CLIENT_CREDENTIALS

    @property
    def needs_authorization(self) -> bool:
        """Only `proxy authorize` helps (the record is missing, refused, unreadable or holds no
        refresh token for an expired access token)."""
        if self.state in (NOT_AUTHORIZED, NEEDS_AUTHORIZATION, UNREADABLE):
            return True
        if self.state == OK and not self.held and not self.app_only and not self.has_refresh_token:
            return (self.access_token_expires or 0) <= time.time() + 60
        return False

    def problem(self, owner: str) -> str | None:
        """What is wrong, with what to do, in one line; None if the tokens are fine."""
        if self.state == NOT_AUTHORIZED:
            return f"not authorized yet (run `proxy authorize {owner}`)"
        if self.state == NEEDS_AUTHORIZATION:
            return f"the stored authorization no longer works ({self.last_error}); run `proxy authorize {owner}`"
        if self.state == UNREADABLE:
            return f"{self.last_error}"
        if self.state == STORE_UNAVAILABLE:
            return f"token store unreachable ({self.last_error})"
        if self.state == REFRESH_FAILING:
            return f"token refresh failing: {self.last_error}"
        if self.needs_authorization:
            return f"no refresh token stored (run `proxy authorize {owner}`)"
        return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


async def stored_status(store: TokenStore, owner: AccountConfig) -> TokenStatus:
    """An owner's token state as its stored record's clear status says (no password needed)."""
    try:
        found = (await store.read_many([owner.username]))[owner.key]
    except StoreUnavailable as exc:
        return TokenStatus.failed(exc, owner.flow, unavailable=True)
    return _status(found, owner)


async def owner_statuses(config: Config, store: TokenStore) -> dict[str, TokenStatus]:
    """The stored token state of every token owner in the config, by case-folded owner name."""
    owners = {a.owner_key: a.token_owner for a in config.accounts}
    try:
        found = await store.read_many([o.username for o in owners.values()])
    except StoreUnavailable as exc:
        return {key: TokenStatus.failed(exc, owner.flow, unavailable=True) for key, owner in owners.items()}
    return {key: _status(found[key], owner) for key, owner in owners.items()}


def _status(found: Sealed | StoreError, owner: AccountConfig) -> TokenStatus:
    if isinstance(found, NoTokens):
        return TokenStatus.missing(owner.flow)
    if isinstance(found, StoreError):
        return TokenStatus.failed(found, owner.flow)
    return TokenStatus.from_meta(found.meta, owner.flow)
