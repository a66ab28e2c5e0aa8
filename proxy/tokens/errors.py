"""The two ways getting a token for a login can fail."""

from __future__ import annotations


class TokenError(Exception):
    """No usable access token. ``reauthorize`` says whether `proxy authorize` is the fix;
    ``passes``: Microsoft refused for now for a reason that passes by itself (Conditional
    Access, MFA, sign-in frequency; see :mod:`proxy.aadsts`), so retry slowly, the account is not dead."""

    def __init__(self, message: str, *, reauthorize: bool = False, retry_after: float | None = None,
                 passes: bool = False):
        super().__init__(message)
        self.reauthorize = reauthorize
        self.retry_after = retry_after
        self.passes = passes


class LoginRefused(Exception):
    """The local user name or password is wrong (the message is safe to show)."""
