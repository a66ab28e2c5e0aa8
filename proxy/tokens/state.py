"""What a token file holds: the encrypted payload and the clear, non-secret status beside it."""

from __future__ import annotations

import time
from typing import Any

import msal


def token_payload(cache: msal.SerializableTokenCache, home_account_id: str | None,
                  access_token: str | None, expires_at: float | None) -> dict[str, Any]:
    """What goes, encrypted, into a token file."""
    return {"msal_cache": cache.serialize(), "home_account_id": home_account_id,
            "access_token": access_token, "expires_at": expires_at}


def token_meta(username: str, *, expires_at: float | None, has_refresh_token: bool,
               last_refresh: float | None, last_error: str | None, state: str = "ok",
               flow: str | None = None) -> dict[str, Any]:
    """Non-secret status stored in clear (but authenticated) beside the ciphertext.

    ``username`` is the token owner (the file's name); ``proxy status`` shows this without any
    password. It is authenticated only when the file is opened with the key, so it is a display.
    """
    meta = {"account": username, "state": state, "access_token_expires": expires_at,
            "has_refresh_token": has_refresh_token, "last_refresh": last_refresh,
            "last_error": last_error, "updated": time.time()}
    if flow:
        meta["flow"] = flow
    return meta
