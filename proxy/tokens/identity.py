"""The one module that talks to the identity provider, through msal.

Everything msal-specific lives here: building the applications (with our own HTTP session,
because msal has no network timeout and ``REQUESTS_CA_BUNDLE`` would silently override
``verify``), the silent refresh of a delegated account, the app-only token request (used by
the broker, `proxy authorize` and `proxy check` alike), and the sign-in flows of `proxy
authorize`. All of it is blocking: callers run it off the event loop. Errors come out as
:class:`~proxy.tokens.errors.TokenError` with Microsoft's error code and the first line of its
description, never a token.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import msal
import requests

from ..config import POP_SCOPE, IdentityConfig
from ..hints import shorten
from ..webproxy import WebProxy
from ..logs import register_secret
from .. import aadsts
from .errors import TokenError

# Scopes added to the defaults after accounts were authorized (POP, with a pop3 section): if the
# identity provider refuses a refresh for them (the user never consented: AADSTS65001), the
# refresh is asked again without them, so IMAP and SMTP keep working until `proxy authorize`.
OPTIONAL_SCOPES = frozenset({POP_SCOPE.casefold()})
_CONSENT_ERRORS = frozenset({65001, 70011})  # consent missing; scope not valid for the app


class HttpSession(requests.Session):
    """A requests session with a default timeout that ignores the environment, with the web
    proxy passed explicitly.

    msal has no network timeout of its own, and this machine's kind of environment sets
    REQUESTS_CA_BUNDLE, which would silently override ``verify``: so ``trust_env`` is off, and
    the one thing wanted from the environment, the web proxy (HTTPS_PROXY, NO_PROXY, already
    resolved with ``identity.http_proxy`` into ``proxy`` by the config), is applied per request
    here. The proxy's credentials travel in its URL to requests and never into a message.
    """

    def __init__(self, timeout: float, verify: str | bool, proxy: WebProxy | None = None):
        super().__init__()
        self.trust_env = False
        self.verify = verify
        self._timeout = timeout
        self._proxy = proxy

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs.setdefault("timeout", self._timeout)
        kwargs["proxies"] = self.proxies_for(url)
        return super().request(method, url, *args, **kwargs)

    def proxies_for(self, url: str) -> dict[str, str]:
        """requests' ``proxies`` for ``url``: the web proxy unless NO_PROXY names the host."""
        host = urllib.parse.urlsplit(url).hostname or ""
        if self._proxy is None or self._proxy.bypass(host):
            return {}
        return {"https": self._proxy.url, "http": self._proxy.url}


def http_session(identity: IdentityConfig) -> HttpSession:
    """The HTTP session for talking to ``identity``'s authority (timeout, CA file, web proxy)."""
    return HttpSession(identity.timeout, str(identity.ca_file) if identity.ca_file else True,
                       getattr(identity, "http_proxy", None))


def make_msal_app(identity: IdentityConfig, cache: msal.SerializableTokenCache,
                  http_cache: dict | None = None) -> msal.ClientApplication:
    """Build the msal application (blocking: it fetches the authority's metadata)."""
    common = dict(authority=identity.authority, token_cache=cache, http_client=http_session(identity),
                  instance_discovery=False, http_cache=http_cache)
    if identity.client_secret:
        return msal.ConfidentialClientApplication(identity.client_id, client_credential=identity.client_secret,
                                                  **common)
    return msal.PublicClientApplication(identity.client_id, **common)


def make_app_only_msal_app(identity: IdentityConfig, http_cache: dict | None = None) -> msal.ConfidentialClientApplication:
    """The confidential app of ``identity.app_only`` (blocking: it fetches the authority's metadata).

    Each call gets an empty token cache, so ``acquire_token_for_client`` always asks the identity
    provider: the broker keeps the app-only token itself and calls this only to refresh it.
    """
    app_only = identity.app_only
    if app_only is None:
        raise TokenError("identity.app_only is not configured")
    if app_only.client_secret:
        register_secret(app_only.client_secret)
    return msal.ConfidentialClientApplication(
        app_only.client_id, client_credential=app_only.credential, authority=app_only.authority,
        token_cache=msal.TokenCache(), http_client=http_session(identity), instance_discovery=False,
        http_cache=http_cache)


def describe_msal_error(result: dict[str, Any]) -> str:
    """Microsoft's error code and the first line of its description (never contains tokens)."""
    description = str(result.get("error_description") or "").strip().splitlines()
    return f"{result.get('error')}: {shorten(description[0], 300)}" if description else str(result.get("error"))


def refresh_delegated(app: msal.ClientApplication, identity: IdentityConfig,
                      home_account_id: str | None) -> dict[str, Any]:
    """Blocking: redeem the refresh token in ``app``'s cache for a new access token.

    Returns msal's result (with ``access_token``; ``scopes_not_granted`` lists the optional
    scopes left out because they were refused); raises TokenError, with ``reauthorize`` set when
    only a new sign-in helps.
    """
    try:
        accounts = [a for a in app.get_accounts()
                    if a.get("home_account_id") == home_account_id] or app.get_accounts()
        if not accounts:
            raise TokenError("no account in the stored authorization", reauthorize=True)
        scopes = identity.msal_scopes
        result = app.acquire_token_silent_with_error(scopes, account=accounts[0], force_refresh=True)
        dropped = [s for s in scopes if s.casefold() in OPTIONAL_SCOPES]
        if result is not None and dropped and _consent_missing(result):
            retry = app.acquire_token_silent_with_error([s for s in scopes if s not in dropped],
                                                        account=accounts[0], force_refresh=True)
            if retry is not None and "access_token" in retry:
                result = dict(retry, scopes_not_granted=dropped)
    except TokenError:
        raise
    except Exception as exc:
        raise transport_error(exc, identity) from None
    if result is None:
        raise TokenError("no refresh token stored", reauthorize=True)
    if "access_token" not in result:
        raise refresh_refused(result)
    return result


def _consent_missing(result: dict[str, Any]) -> bool:
    """The refresh was refused because a scope was never consented to (not because the grant died)."""
    codes = result.get("error_codes") or []
    return (bool(_CONSENT_ERRORS.intersection(c for c in codes if isinstance(c, int)))
            or "consent_required" in (result.get("error"), result.get("suberror")))


def refresh_refused(result: dict[str, Any]) -> TokenError:
    """The TokenError for a refresh the identity provider refused, classified by :func:`aadsts.verdict`."""
    text = describe_msal_error(result)
    verdict = aadsts.verdict(result)
    if verdict == aadsts.PERSON:
        return TokenError(text, reauthorize=True)
    if verdict == aadsts.TRANSIENT:
        return TokenError(text)
    found = aadsts.lookup(result)
    if found is not None:
        return TokenError(f"Microsoft does not issue a new token for now: {aadsts.describe(found[0])}; this usually "
                          "passes by itself, no new authorization is needed", passes=True)
    return TokenError(f"Microsoft does not issue a new token for now ({text}); the proxy keeps trying; if this "
                      "persists, run `proxy authorize` again", passes=True)


def fetch_app_only_token(identity: IdentityConfig, http_cache: dict | None = None) -> dict[str, Any]:
    """Blocking: a new app-only token with the app's own credential (there is no refresh token).

    The one app-only request of the proxy: the broker, `proxy authorize` and `proxy check` use it.
    """
    try:
        app = make_app_only_msal_app(identity, http_cache)
        result = app.acquire_token_for_client([identity.app_only.scope])
    except TokenError:
        raise
    except Exception as exc:
        raise transport_error(exc, identity) from None
    if "access_token" not in result:
        raise TokenError(f"the app's credentials were refused: {describe_msal_error(result)}; "
                         "check identity.app_only")
    return result


def transport_error(exc: Exception, identity: IdentityConfig | None = None) -> TokenError:
    """A TokenError for an exception raised while talking to the identity provider (the words of
    the advice table that `proxy check` and `proxy authorize` use)."""
    if isinstance(exc, (requests.RequestException, OSError)):
        from ..hints import network_problem
        problem, _ = network_problem(exc, where=identity.authority if identity else "the identity provider",
                                     proxy=getattr(identity, "http_proxy", None),
                                     timeout=identity.timeout if identity else None)
        return TokenError(f"identity provider unreachable ({exc.__class__.__name__}: {problem})")
    # msal raises MsalServiceError on HTTP 5xx, ValueError on bad metadata or a bad key
    return TokenError(f"identity provider error ({exc.__class__.__name__}: {shorten(str(exc), 120)})")


class HttpCache(dict):
    """msal's ``http_cache`` without its replay of HTTP 400 answers.

    msal answers a repeated request that got a 400 (``invalid_grant`` and the like) from this
    cache for 60 s without asking. The broker decides itself when to retry a refused refresh
    (identity.refresh_retry_on_login / _in_background), so such entries are not kept; msal still
    honours Retry-After after 429 and 5xx.
    """

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, str) and key.endswith(" 400"):
            return
        super().__setitem__(key, value)


# ------------------------------------------------------------------------------ the token cache
def new_cache(serialized: str | None = None) -> msal.SerializableTokenCache:
    """msal's token cache, empty or from what a token file stored."""
    cache = msal.SerializableTokenCache()
    if serialized:
        cache.deserialize(serialized)
    return cache


def has_refresh_token(cache: msal.TokenCache) -> bool:
    return bool(cache.find(msal.TokenCache.CredentialType.REFRESH_TOKEN))


def cached_home_account_id(cache: msal.TokenCache) -> str | None:
    """The signed-in account's id in msal's cache (to pick it for silent refreshes)."""
    accounts = cache.find(msal.TokenCache.CredentialType.ACCOUNT)
    return accounts[0].get("home_account_id") if accounts else None


def signed_in_identity(result: dict[str, Any]) -> tuple[str | None, str | None]:
    """Who signed in, from msal's result of a sign-in: the id token's ``preferred_username`` and
    ``oid`` (msal has already checked the id token's issuer, audience, nonce and lifetime)."""
    claims = result.get("id_token_claims") or {}
    username, oid = claims.get("preferred_username"), claims.get("oid")
    return (username if isinstance(username, str) and username else None,
            oid if isinstance(oid, str) and oid else None)


# ------------------------------------------------------------------------------ sign-in flows
def begin_browser_sign_in(app: msal.ClientApplication, identity: IdentityConfig, redirect_uri: str,
                          login_hint: str) -> dict[str, Any]:
    """The authorization code flow with PKCE: msal's flow dict (``auth_uri``, ``state``, ...)."""
    return app.initiate_auth_code_flow(identity.msal_scopes, redirect_uri=redirect_uri, login_hint=login_hint,
                                       response_mode="form_post", prompt="select_account")


def finish_browser_sign_in(app: msal.ClientApplication, flow: dict[str, Any],
                           response: dict[str, str]) -> dict[str, Any]:
    """Redeem the redirect's code (msal checks state and nonce); raises ValueError if it does not match."""
    return app.acquire_token_by_auth_code_flow(flow, response)


def begin_device_sign_in(app: msal.ClientApplication, identity: IdentityConfig) -> dict[str, Any] | None:
    """The device code flow's first step; None if ``app`` cannot do it (a confidential client)."""
    if not hasattr(app, "initiate_device_flow"):
        return None
    return app.initiate_device_flow(scopes=identity.msal_scopes)


def finish_device_sign_in(app: msal.ClientApplication, flow: dict[str, Any], exit_condition) -> dict[str, Any]:
    """Poll until the user approved, declined, the code expired or ``exit_condition(flow)`` is true."""
    return app.acquire_token_by_device_flow(flow, exit_condition=exit_condition)
