"""The token side of the proxy, in one place.

- :mod:`.broker`: the token broker (holds each owner's tokens, checks local passwords,
  refreshes ahead of expiry, one refresh at a time);
- :mod:`.policy`: when to refresh, as pure functions of the token's times;
- :mod:`.identity`: the one module that talks to the identity provider (msal);
- :mod:`.store`: the store interface and the sealing of token records, with its engines
  :mod:`.folder` (one file per account, the default);
- :mod:`.state`: what a record holds, and :class:`~.state.TokenStatus`, the one model of an
  account's token state (read by `proxy status`, `proxy check`, ``/readyz`` and the broker);
- :mod:`.errors`: TokenError and LoginRefused.
"""

from .broker import AccountState, LoginGrant, TokenBroker
from .errors import LoginRefused, TokenError

__all__ = ["AccountState", "LoginGrant", "LoginRefused", "TokenBroker", "TokenError"]
