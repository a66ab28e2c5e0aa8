"""The two ways getting a token for a login can fail."""

from __future__ import annotations


class TokenError(Exception):
    """No usable access token. ``reauthorize`` says whether `proxy authorize` is the fix."""

    def __init__(self, message: str, *, reauthorize: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.reauthorize = reauthorize
        self.retry_after = retry_after


class LoginRefused(Exception):
    """The local user name or password is wrong (the message is safe to show)."""
