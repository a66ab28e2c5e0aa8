"""A local identity provider speaking the Microsoft identity platform v2.0 shapes, over HTTPS.

Real msal code runs against it: discovery, the authorization code flow with PKCE (a sign-in
page, then a 302 or an auto-submitting form_post page), refresh with rotation (strict on request:
a redeemed refresh token is revoked at once), the device code
flow and client credentials. It also answers the resource owner password credentials grant
(``grant_type=password``, which the benchmark's second baseline, emailproxy, uses) for users
given a password with ``set_user_password``. Dovecot's oauth2 passdb validates its access tokens at
``/introspect``. Tests steer it with methods (lifetimes, revocation, faults, outages, counters),
or from other processes with ``POST /_test/<method>`` and a JSON object of keyword arguments
(``GET /_test/counters``).

Standalone, for benchmarks: ``python -m tests.idp --port N --dir D`` prints its URL and writes
``D/ca.pem``. Tokens are opaque random strings kept in memory; the id_token is an HS256 JWT that
nobody verifies. This is test code: it logs nothing and keeps no real secret.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import html
import http.server
import json
import re
import secrets
import signal
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.pki import TestPKI, make_test_pki

if TYPE_CHECKING:
    import requests

DEFAULT_CLIENT_ID = "test-client"        # public client, pre-registered
CONFIDENTIAL_CLIENT_ID = "test-app"      # confidential client (client credentials), pre-registered
TENANT_ID = "9188040d-6c67-4c5b-b112-36a304b66dad"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
OIDC_SCOPES = {"openid", "profile", "offline_access", "email"}
_LOOPBACK_REDIRECT = re.compile(r"^http://(localhost|127\.0\.0\.1)(:\d{1,5})?(/[^?#]*)?$")
_CONTROLS = {"reset", "reset_counters", "counters", "set_access_token_lifetime", "set_access_token_length",
             "refuse_refresh", "block_device_flow",
             "set_next_user", "deny_next", "revoke", "expire_access_tokens", "expire_refresh_tokens",
             "set_fault", "clear_faults", "mint_access_token", "approve_device", "decline_device",
             "allow_delegation", "register_client", "stop_for", "grant_admin_consent",
             "set_strict_rotation", "refresh_log",
             "set_user_password"}

# AADSTS code -> (OAuth error, description), as Microsoft words them.
_AADSTS: dict[int, tuple[str, str]] = {
    50011: ("invalid_request", "The redirect URI '{uri}' specified in the request does not match the redirect "
                               "URIs configured for the application '{client}'."),
    50034: ("invalid_request", "The user account '{user}' does not exist in the directory."),
    50076: ("invalid_grant", "Due to a configuration change made by your administrator, or because you moved to a new "
                             "location, you must use multi-factor authentication to access "
                             "'00000002-0000-0ff1-ce00-000000000000'."),
    50078: ("invalid_grant", "Presented multi-factor authentication has expired due to policies configured by your "
                             "administrator, you must refresh your multi-factor authentication to access "
                             "'00000002-0000-0ff1-ce00-000000000000'."),
    50079: ("invalid_grant", "Due to a configuration change made by your administrator, or because you moved to a new "
                             "location, you must enroll in multi-factor authentication to access "
                             "'00000002-0000-0ff1-ce00-000000000000'."),
    50126: ("invalid_grant", "Error validating credentials due to invalid username or password."),
    50194: ("invalid_request", "Application '{client}'(Mail proxy) is not configured as a multi-tenant application. "
                               "Usage of the /common endpoint is not supported for such applications created after "
                               "'10/15/2018'. Use a tenant-specific endpoint or configure the application to be "
                               "multi-tenant."),
    53003: ("invalid_grant", "Access has been blocked by Conditional Access policies. The access policy does not "
                             "allow token issuance."),
    70043: ("invalid_grant", "The refresh token has expired or is invalid due to sign-in frequency checks by "
                             "conditional access. The token was issued on 2024-01-01T08:00:00Z and the maximum "
                             "allowed lifetime for this request is 3600."),
    530035: ("invalid_grant", "Access has been blocked by security defaults. This is due to the request using legacy "
                              "auth or being deemed unsafe by security defaults policies."),
    50173: ("invalid_grant", "The provided grant has expired due to it being revoked, a fresh auth token is "
                             "needed. The user might have changed or reset their password."),
    54005: ("invalid_grant", "OAuth2 Authorization code was already redeemed, please retry with a new valid code "
                             "or use an existing refresh token."),
    70000: ("authorization_declined", "The user declined the sign-in."),
    70003: ("unsupported_grant_type", "The app requested an unsupported grant type '{grant}'."),
    70008: ("invalid_grant", "The provided authorization code or refresh token has expired due to inactivity. "
                             "Send a new interactive authorization request for this user and resource."),
    70016: ("authorization_pending", "OAuth 2.0 device flow error. Authorization is pending. Continue polling."),
    70019: ("expired_token", "Verification code expired."),
    65001: ("invalid_grant", "The user or administrator has not consented to use the application with ID "
                             "'{client}' named '{client}'. Send an interactive authorization request for this "
                             "user and resource."),
    90033: ("temporarily_unavailable", "A transient error has occurred. Please try again."),
    501481: ("invalid_grant", "The Code_Verifier does not match the code_challenge supplied in the authorization "
                              "request."),
    700016: ("invalid_client", "Application with identifier '{client}' was not found in the directory "
                               "'Test Tenant'."),
    700027: ("invalid_client", "Client assertion failed signature validation."),
    700082: ("invalid_grant", "The refresh token has expired due to inactivity."),
    1002012: ("invalid_scope", "The provided value for scope {scope} is not valid. Client credential flows must "
                               "have a scope value with /.default suffixed to the resource identifier."),
    7000215: ("invalid_client", "Invalid client secret provided. Ensure the secret being sent in the request is "
                                "the client secret value, not the client secret ID."),
    7000222: ("invalid_client", "The provided client secret keys for app '{client}' are expired. Visit the Azure "
                                "portal to create new keys for your app."),
    7000218: ("invalid_client", "The request body must contain the following parameter: 'client_assertion' or "
                                "'client_secret'."),
    9002313: ("invalid_grant", "Invalid request. Request is malformed or invalid."),
}

# The suberror Microsoft adds to some of them (https://learn.microsoft.com/entra/identity-platform/reference-error-codes).
_SUBERRORS = {50076: "basic_action", 50079: "basic_action", 70043: "token_expired", 65001: "consent_required"}


class OAuthError(Exception):
    """An error answered in Microsoft's JSON shape: ``error``, ``AADSTSnnn: …`` description, codes."""

    def __init__(self, code: int, status: int = 400, suberror: str | None = None, **details: str):
        self.error, text = _AADSTS[code]
        super().__init__(f"AADSTS{code}: {text.format(**details)}")
        self.code, self.status = code, status
        self.suberror = suberror or _SUBERRORS.get(code)

    def body(self) -> dict[str, Any]:
        trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
        body = {"error": self.error,
                "error_description": f"{self} Trace ID: {trace} Correlation ID: {correlation} Timestamp: {stamp}",
                "error_codes": [self.code], "timestamp": stamp, "trace_id": trace, "correlation_id": correlation,
                "error_uri": f"https://login.microsoftonline.com/error?code={self.code}"}
        if self.suberror:
            body["suberror"] = self.suberror
        return body


@dataclass
class Client:
    """An app registration. A client with a secret is confidential and must authenticate."""

    client_id: str
    secret: str | None = None
    public_flows: bool = True                 # "Allow public client flows" (device code)
    redirect_uris: tuple[str, ...] = ()       # besides http://localhost:<any port> for public clients
    certificate: str | None = None            # PEM: the client authenticates with a signed JWT assertion
    single_tenant: bool = False               # refused at .../common and .../organizations (AADSTS50194)


@dataclass
class _Token:
    """An access or refresh token: whose, for which client, until when."""

    user: str
    client_id: str
    scope: str
    expires_at: float
    revoked: bool = False
    family: str = ""        # refresh tokens: the sign-in they descend from
    redeemed: bool = False  # refresh tokens: used once already
    issued_at: float = field(default_factory=time.time)


@dataclass
class _AuthCode:
    client_id: str
    redirect_uri: str
    challenge: str
    method: str
    nonce: str
    scopes: list[str]
    user: str
    expires_at: float
    used: bool = False


@dataclass
class _DeviceCode:
    client_id: str
    scopes: list[str]
    user_code: str
    expires_at: float
    user: str | None = None
    declined: bool = False
    redeemed: bool = False


@dataclass(eq=False)
class _Fault:
    kind: str                    # "hang" or an HTTP status code such as "500" or "429"
    remaining: int | None        # None: until cleared
    retry_after: int
    hang_max: float
    released: threading.Event = field(default_factory=threading.Event)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _oid(user: str) -> str:
    """A stable object id per user name (like Entra's oid)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "user:" + user.lower()))


class IdentityProvider:
    """The identity provider; ``start()`` serves it on ``url`` in background threads. Thread-safe."""

    def __init__(self, pki: TestPKI, *, host: str = "127.0.0.1", port: int = 0,
                 client_secret: str = "test-secret", default_user: str = "alice@example.com"):
        self.pki, self.host, self.port = pki, host, port
        self.client_secret = client_secret      # of the pre-registered confidential client "test-app"
        self.default_user = default_user        # the sign-in page's user without login_hint or next user
        self.device_interval = 1                # seconds between msal's device-flow polls
        self._lock = threading.RLock()
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(pki.cert_file, pki.key_file)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._delegations: set[tuple[str, str]] = set()
        # Delegated permissions a user consented to for an app at sign-in, and those an admin granted
        # for everyone: a refresh asking for any other gets AADSTS65001 (incremental consent).
        self._consents: dict[tuple[str, str], set[str]] = {}
        self._admin_consents: dict[str, set[str]] = {}
        self._access: dict[str, _Token] = {}
        self._refresh: dict[str, _Token] = {}
        self._codes: dict[str, _AuthCode] = {}
        self._devices: dict[str, _DeviceCode] = {}     # by device_code
        self._passwords: dict[str, str] = {}           # user (lower case) -> password, for grant_type=password
        self._counters: Counter[str] = Counter()
        self._faults: dict[str, _Fault] = {}
        self._spent_faults: list[_Fault] = []           # count-limited faults used up, maybe still hanging
        self.reset()

    # ----------------------------------------------------------------- addresses
    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def authority(self, tenant: str = "test-tenant") -> str:
        """The authority URL to give msal (with ``instance_discovery=False``)."""
        return f"{self.url}/{tenant}"

    @property
    def ca_file(self) -> Path:
        return self.pki.ca_file

    @property
    def introspection_url(self) -> str:
        return f"{self.url}/introspect"

    @property
    def client_id(self) -> str:
        return DEFAULT_CLIENT_ID

    def http_session(self) -> requests.Session:
        """A requests session trusting the test CA; proxy/CA environment variables are ignored."""
        import requests  # only here: the server itself needs nothing beyond the standard library

        session = requests.Session()
        session.trust_env = False  # REQUESTS_CA_BUNDLE would silently override verify
        session.verify = str(self.ca_file)
        return session

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Listen (on the same port as before, after a ``stop()``) and serve in a thread."""
        if self._server is not None:
            return
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True,
                                        name=f"idp:{self.port}")
        self._thread.start()

    def stop(self, spare: socket.socket | None = None) -> None:
        """Close the listener and drop open connections (but ``spare``): connections are refused
        until ``start()``. Hanging requests end (with a 504 to a dropped connection)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stopped = True
        server.shutdown()
        server.server_close()
        server.drop_connections(spare)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def stop_for(self, seconds: float) -> None:
        """An outage: stop now, start again after ``seconds``."""
        self.stop()
        threading.Timer(seconds, self.start).start()

    def __enter__(self) -> IdentityProvider:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- test controls
    def reset(self) -> None:
        """Back to defaults: no faults, zero counters, default lifetimes and clients (tokens stay valid)."""
        with self._lock:
            self.clear_faults()
            self._counters.clear()
            self.access_token_lifetime = 3600
            self.access_token_jitter = 0
            self.access_token_length = 256
            self._refresh_refusal: tuple[int, int | None, str | None] | None = None
            self._device_flow_blocked = False
            self.refresh_token_lifetime = 90 * 86400
            self.strict_rotation = False
            self.refuse_reuse = True
            self._refresh_log: list[dict[str, Any]] = []
            self._next_user: str | None = None
            self._deny_next = False
            self._clients = {DEFAULT_CLIENT_ID: Client(DEFAULT_CLIENT_ID),
                             CONFIDENTIAL_CLIENT_ID: Client(CONFIDENTIAL_CLIENT_ID, self.client_secret, False)}

    def reset_counters(self) -> None:
        with self._lock:
            self._counters.clear()
            self._refresh_log.clear()

    def counters(self) -> dict[str, int]:
        """Requests seen, by endpoint (``token``, ``introspect``, ``discovery``, ``authorize``, ``login``,
        ``devicecode``, ``delegation``), as ``token:<grant>`` (``authorization_code``, ``refresh_token``,
        ``device_code``, ``client_credentials``) and as ``introspect:active``/``introspect:inactive``;
        ``invalid_grant``: token requests answered with that error; ``token:reused_refresh_token``:
        redemptions of an already redeemed refresh token (answered ``invalid_grant`` in strict mode)."""
        with self._lock:
            return dict(self._counters)

    def count(self, key: str) -> int:
        with self._lock:
            return self._counters[key]

    def set_access_token_lifetime(self, seconds: int, jitter: int = 0) -> None:
        """New access tokens live ``seconds`` plus a random 0..``jitter`` seconds (Microsoft's live
        60–90 min: ``set_access_token_lifetime(3600, 1800)``)."""
        self.access_token_lifetime, self.access_token_jitter = int(seconds), int(jitter)

    def refuse_refresh(self, code: int | None, count: int | None = None, suberror: str | None = None) -> None:
        """Answer refresh-token grants with ``invalid_grant`` AADSTS ``code`` (e.g. 53003 Conditional
        Access, 50076 MFA, 70043 sign-in frequency, 700082), for the next ``count`` (None: until
        cleared with ``code=None``). The refresh token itself stays valid, as at Microsoft."""
        if code is not None and code not in _AADSTS:
            raise ValueError(f"unknown AADSTS code {code}")
        with self._lock:
            self._refresh_refusal = None if code is None else (int(code), count, suberror)

    def block_device_flow(self, blocked: bool = True) -> None:
        """Conditional Access "authentication flows": the device code sign-in gets AADSTS53003."""
        with self._lock:
            self._device_flow_blocked = blocked

    def access_token_info(self, token: str) -> dict[str, Any] | None:
        """What the identity provider knows about an access token (for stand-ins of mail servers):
        ``user`` (an app's client id for app-only tokens), ``scope``, ``issued_at``, ``expires_at``,
        ``revoked``; None for an unknown token. Not counted as a request."""
        with self._lock:
            record = self._access.get(token)
            if record is None:
                return None
            return {"user": record.user, "client_id": record.client_id, "scope": record.scope,
                    "issued_at": record.issued_at, "expires_at": record.expires_at, "revoked": record.revoked}

    def set_strict_rotation(self, strict: bool = True, refuse_reuse: bool = True) -> None:
        """Watch for refresh tokens redeemed twice, so any double refresh by two processes shows
        (``token:reused_refresh_token``, ``reused`` in :meth:`refresh_log`). With ``refuse_reuse``
        the second redemption gets ``invalid_grant`` (stricter than Microsoft); without, it is
        answered as Microsoft does, whose old refresh tokens stay valid, and only recorded."""
        with self._lock:
            self.strict_rotation = bool(strict)
            self.refuse_reuse = bool(refuse_reuse)

    def refresh_log(self) -> list[dict[str, Any]]:
        """Every refresh_token grant so far: ``time``, ``user``, ``family`` (the sign-in it descends
        from) and ``result`` ("ok" or the AADSTS error code)."""
        with self._lock:
            return [dict(entry) for entry in self._refresh_log]

    def set_access_token_length(self, length: int) -> None:
        """Length of new access tokens in characters (Microsoft's can exceed 4,096)."""
        self.access_token_length = max(16, int(length))

    def set_next_user(self, user: str | None) -> None:
        """Prefill the next sign-in page with ``user`` (wins over login_hint; used once)."""
        with self._lock:
            self._next_user = user

    def deny_next(self) -> None:
        """The next sign-in answers ``error=access_denied`` to the redirect URI."""
        with self._lock:
            self._deny_next = True

    def register_client(self, client_id: str, secret: str | None = None, public_flows: bool = True,
                        redirect_uris: list[str] | tuple[str, ...] = (), certificate: str | None = None,
                        single_tenant: bool = False) -> None:
        """Add an app registration; with ``certificate`` (PEM) it authenticates with a JWT client
        assertion signed by the matching key (msal's certificate credential); ``single_tenant``: it
        works only at a tenant's own authority (AADSTS50194 at .../common and .../organizations)."""
        with self._lock:
            self._clients[client_id] = Client(client_id, secret, public_flows, tuple(redirect_uris), certificate,
                                              single_tenant)

    def grant_admin_consent(self, client_id: str, scopes: list[str]) -> None:
        """An admin grants ``scopes`` for all users of ``client_id`` ("Grant admin consent")."""
        with self._lock:
            self._admin_consents.setdefault(client_id, set()).update(s.casefold() for s in scopes)

    def revoke(self, user: str) -> None:
        """Revoke all of ``user``'s tokens (like a password reset): refresh gets AADSTS50173."""
        with self._lock:
            for token in [*self._access.values(), *self._refresh.values()]:
                if token.user.lower() == user.lower():
                    token.revoked = True

    def expire_access_tokens(self) -> None:
        with self._lock:
            for token in self._access.values():
                token.expires_at = min(token.expires_at, time.time() - 1)

    def expire_refresh_tokens(self, user: str | None = None) -> None:
        """Expire refresh tokens (of ``user``, or all): refresh gets AADSTS700082."""
        with self._lock:
            for token in self._refresh.values():
                if user is None or token.user.lower() == user.lower():
                    token.expires_at = min(token.expires_at, time.time() - 1)

    def set_fault(self, kind: str | int | None, endpoint: str = "token", count: int | None = None,
                  retry_after: int = 5, hang_max: float = 30.0) -> None:
        """Make ``endpoint`` ("token", "discovery", "introspect", "devicecode", …) fail.

        ``kind``: None (clear), an HTTP status such as "500" or "503", "429" (these two with
        ``Retry-After: retry_after``), or "hang": block until the fault is cleared (then answer
        normally), the listener stops, or ``hang_max`` seconds pass (then answer 504).
        ``count`` limits the fault to the next K requests.
        """
        if kind is not None and kind != "hang" and not 400 <= int(kind) <= 599:
            raise ValueError(f"unknown fault {kind!r}")
        with self._lock:
            old = self._faults.pop(endpoint, None)
            if old is not None:
                old.released.set()
            if kind is not None:
                self._faults[endpoint] = _Fault(str(kind), count, int(retry_after), float(hang_max))

    def clear_faults(self) -> None:
        """Clear every fault; hanging requests go on normally."""
        with self._lock:
            for fault in [*self._faults.values(), *self._spent_faults]:
                fault.released.set()
            self._faults.clear()
            self._spent_faults.clear()

    def mint_access_token(self, user: str, lifetime: int | None = None,
                          scope: str = "https://outlook.office.com/IMAP.AccessAsUser.All "
                                       "https://outlook.office.com/SMTP.Send",
                          client_id: str = DEFAULT_CLIENT_ID, length: int | None = None) -> str:
        """A valid access token for ``user`` without any flow (for tests of the upstream servers)."""
        return self._new_access_token(user, client_id, scope, lifetime, length)

    def issued_tokens(self) -> list[str]:
        """Every access and refresh token issued so far (tests check that none leaks into logs)."""
        with self._lock:
            return [*self._access, *self._refresh]

    def approve_device(self, user_code: str, username: str) -> None:
        """``username`` signs in on the device login page and enters ``user_code``."""
        self._find_device(user_code).user = username

    def decline_device(self, user_code: str) -> None:
        self._find_device(user_code).declined = True

    def set_user_password(self, user: str, password: str | None) -> None:
        """Let ``user`` sign in with ``password`` through the password grant (None: no longer)."""
        with self._lock:
            if password is None:
                self._passwords.pop(user.lower(), None)
            else:
                self._passwords[user.lower()] = password

    def allow_delegation(self, owner: str, mailbox: str, allowed: bool = True) -> None:
        """Let ``owner``'s token open ``mailbox`` (answered at ``/delegation``)."""
        with self._lock:
            key = (owner.lower(), mailbox.lower())
            (self._delegations.add if allowed else self._delegations.discard)(key)

    # ----------------------------------------------------------------- endpoint logic
    def discovery(self, tenant: str) -> dict[str, Any]:
        """The OpenID configuration (msal reads authorization, token and device endpoints)."""
        base = f"{self.url}/{tenant}"
        return {"issuer": f"{self.url}/{TENANT_ID}/v2.0",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "introspection_endpoint": self.introspection_url,
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "form_post"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
                "code_challenge_methods_supported": ["plain", "S256"]}

    def _check_authorize(self, params: dict[str, str], tenant: str = "") -> Client:
        """Validate client_id and redirect_uri; problems here get an error page, not a redirect."""
        client = self._clients.get(params.get("client_id", ""))
        if client is None:
            raise OAuthError(700016, client=params.get("client_id", ""))
        _check_tenant(client, tenant)
        uri = params.get("redirect_uri", "")
        if uri not in client.redirect_uris and not (client.secret is None and _LOOPBACK_REDIRECT.match(uri)):
            raise OAuthError(50011, uri=uri, client=client.client_id)
        return client

    def sign_in_page(self, tenant: str, params: dict[str, str]) -> str:
        """The HTML sign-in form; hidden fields carry the authorization request."""
        self._check_authorize(params, tenant)
        with self._lock:
            user, self._next_user = self._next_user, None
        user = user or params.get("login_hint") or self.default_user
        names = ("client_id", "redirect_uri", "scope", "state", "nonce", "code_challenge", "code_challenge_method",
                 "response_mode", "response_type")
        hidden = "".join(f'<input type="hidden" name="{n}" value="{html.escape(params[n])}">'
                         for n in names if n in params)
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>Sign in to your account</title></head>"
                f"<body><h1>Sign in</h1><p>to continue to {html.escape(params['client_id'])}</p>"
                f'<form method="post" action="/{html.escape(tenant)}/login">{hidden}'
                f'<input type="text" id="username" name="username" value="{html.escape(user)}">'
                f'<input type="submit" id="signin" value="Sign in"></form></body></html>')

    def sign_in(self, params: dict[str, str]) -> tuple[str, dict[str, str]]:
        """The sign-in form was posted: the redirect URI and the parameters to send to it."""
        client = self._check_authorize(params)
        user = params.get("username", "").strip()
        if "@" not in user:
            raise OAuthError(50034, user=user)
        answer = {"state": params["state"]} if "state" in params else {}
        with self._lock:
            deny, self._deny_next = self._deny_next, False
        if deny:
            return params["redirect_uri"], {"error": "access_denied", **answer, "error_description":
                                            "AADSTS65004: User declined to consent to access the app."}
        if params.get("response_type", "code") != "code":
            return params["redirect_uri"], {"error": "unsupported_response_type", **answer}
        code = "1.AQ" + secrets.token_urlsafe(48)
        with self._lock:
            self._codes[code] = _AuthCode(client.client_id, params["redirect_uri"], params.get("code_challenge", ""),
                                          params.get("code_challenge_method", "plain"), params.get("nonce", ""),
                                          params.get("scope", "").split(), user, time.time() + 600)
        return params["redirect_uri"], {"code": code, **answer, "session_state": str(uuid.uuid4())}

    def _check_client(self, form: dict[str, str], authorization: str | None) -> Client:
        """The calling client, authenticated by its secret (HTTP Basic or in the body) if it has one."""
        client_id, secret = form.get("client_id", ""), form.get("client_secret")
        if authorization and authorization.startswith("Basic "):
            user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
            client_id, secret = urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(password)
        client = self._clients.get(client_id)
        if client is None:
            raise OAuthError(700016, client=client_id)
        if client.certificate is not None:
            self._check_assertion(client, form.get("client_assertion_type", ""), form.get("client_assertion", ""))
            return client
        if client.secret is not None and secret is None:
            raise OAuthError(7000218)
        if client.secret is not None and not hmac.compare_digest(secret or "", client.secret):
            raise OAuthError(7000215, status=401)
        return client

    def _check_assertion(self, client: Client, kind: str, assertion: str) -> None:
        """A JWT client assertion (RFC 7523) signed by the key of the client's certificate."""
        import jwt  # PyJWT comes with msal
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        if kind != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" or not assertion:
            raise OAuthError(7000218)
        cert = x509.load_pem_x509_certificate(client.certificate.encode())
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, cert.public_key(), algorithms=["PS256", "RS256"],
                                options={"verify_aud": False, "require": ["exp", "aud", "iss", "sub"]})
        except jwt.PyJWTError:
            raise OAuthError(700027, status=401) from None
        thumbprints = {_b64url(cert.fingerprint(hashes.SHA256())), _b64url(cert.fingerprint(hashes.SHA1()))}
        given = {str(header.get("x5t#S256", "")).rstrip("="), str(header.get("x5t", "")).rstrip("=")}
        audience = str(claims.get("aud", ""))
        if (not thumbprints & given or claims.get("iss") != client.client_id or claims.get("sub") != client.client_id
                or not (audience.startswith(self.url + "/") and audience.endswith("/oauth2/v2.0/token"))):
            raise OAuthError(700027, status=401)

    def token(self, form: dict[str, str], authorization: str | None = None, tenant: str = "") -> dict[str, Any]:
        """The token endpoint (raises OAuthError)."""
        client = self._check_client(form, authorization)
        _check_tenant(client, tenant)
        grant, scopes, now = form.get("grant_type", ""), form.get("scope", "").split(), time.time()
        with self._lock:
            if grant == "authorization_code":
                code = self._codes.get(form.get("code", ""))
                if code is None or code.client_id != client.client_id:
                    raise OAuthError(9002313)
                if code.used:
                    raise OAuthError(54005)
                if code.expires_at < now:
                    raise OAuthError(70008)
                if form.get("redirect_uri") != code.redirect_uri:
                    raise OAuthError(50011, uri=form.get("redirect_uri", ""), client=client.client_id)
                verifier = form.get("code_verifier", "")
                expected = _b64url(hashlib.sha256(verifier.encode()).digest()) if code.method == "S256" else verifier
                if code.challenge and not hmac.compare_digest(expected, code.challenge):
                    raise OAuthError(501481)
                code.used = True
                self._consent(code.user, client.client_id, code.scopes)
                return self._user_tokens(code.user, client.client_id, scopes or code.scopes, code.nonce)
            if grant == "refresh_token":
                old = self._refresh.get(form.get("refresh_token", ""))
                if old is None or old.client_id != client.client_id:
                    raise OAuthError(9002313)
                entry = {"time": now, "user": old.user, "family": old.family, "result": "ok"}
                self._refresh_log.append(entry)
                if old.redeemed and self.strict_rotation:
                    entry["result"] = "reused"
                    self._counters["token:reused_refresh_token"] += 1
                    if self.refuse_reuse:
                        raise OAuthError(70008)
                if old.revoked:
                    entry["result"] = "50173"
                    raise OAuthError(50173)
                if old.expires_at < now:
                    entry["result"] = "700082"
                    raise OAuthError(700082)
                wanted = {s.casefold() for s in scopes if s not in OIDC_SCOPES}
                if wanted - self._consents.get((old.user.lower(), client.client_id), set()) \
                        - self._admin_consents.get(client.client_id, set()):
                    entry["result"] = "65001"
                    raise OAuthError(65001, client=client.client_id)
                if self._refresh_refusal is not None:
                    code, count, suberror = self._refresh_refusal
                    if count is not None:
                        self._refresh_refusal = (code, count - 1, suberror) if count > 1 else None
                    entry["result"] = str(code)
                    raise OAuthError(code, suberror=suberror, client=client.client_id)
                old.redeemed = True
                return self._user_tokens(old.user, client.client_id, scopes or old.scope.split(), family=old.family)
            if grant == DEVICE_GRANT:
                device = self._devices.get(form.get("device_code", ""))
                if device is None or device.client_id != client.client_id or device.redeemed:
                    raise OAuthError(9002313)
                if device.expires_at < now:
                    raise OAuthError(70019)
                if device.declined:
                    raise OAuthError(70000)
                if device.user is None:
                    raise OAuthError(70016)
                if self._device_flow_blocked:
                    raise OAuthError(53003)
                device.redeemed = True
                self._consent(device.user, client.client_id, device.scopes)
                return self._user_tokens(device.user, client.client_id, device.scopes)
            if grant == "password":
                # Resource owner password credentials (Microsoft's "ROPC"): a public client needs
                # "Allow public client flows"; a wrong password or an unknown user is AADSTS50126.
                if client.secret is None and client.certificate is None and not client.public_flows:
                    raise OAuthError(7000218)
                user, password = form.get("username", ""), form.get("password", "")
                known = self._passwords.get(user.lower())
                if known is None or not hmac.compare_digest(known.encode(), password.encode()):
                    raise OAuthError(50126)
                return self._user_tokens(user, client.client_id, scopes)
            if grant == "client_credentials":
                if client.secret is None and client.certificate is None:
                    raise OAuthError(7000218)
                if len(scopes) != 1 or not scopes[0].endswith("/.default"):
                    raise OAuthError(1002012, scope=" ".join(scopes))
                lifetime = self._lifetime()
                return {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime,
                        "access_token": self._new_access_token(client.client_id, client.client_id, scopes[0],
                                                               lifetime)}
        raise OAuthError(70003, grant=grant)

    def device_code(self, form: dict[str, str], tenant: str = "") -> dict[str, Any]:
        """The device authorization endpoint."""
        client = self._clients.get(form.get("client_id", ""))
        if client is None:
            raise OAuthError(700016, client=form.get("client_id", ""))
        _check_tenant(client, tenant)
        if not client.public_flows:
            raise OAuthError(7000218)
        user_code = "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(9))
        device_code = "DAQABAAEAAA" + secrets.token_urlsafe(48)
        with self._lock:
            self._devices[device_code] = _DeviceCode(client.client_id, form.get("scope", "").split(), user_code,
                                                     time.time() + 900)
        uri = f"{self.url}/devicelogin"
        return {"user_code": user_code, "device_code": device_code, "verification_uri": uri, "expires_in": 900,
                "interval": self.device_interval,
                "message": f"To sign in, use a web browser to open the page {uri} and enter the code {user_code} "
                           "to authenticate."}

    def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662 introspection, as Dovecot's oauth2 passdb reads it."""
        with self._lock:
            record = self._access.get(token)
            active = record is not None and not record.revoked and record.expires_at > time.time()
            self._counters["introspect:active" if active else "introspect:inactive"] += 1
            if record is None or not active:
                return {"active": False}
            return {"active": True, "username": record.user, "email": record.user, "scope": record.scope,
                    "client_id": record.client_id, "token_type": "Bearer", "exp": int(record.expires_at),
                    "sub": _oid(record.user)}

    def delegation(self, owner: str, mailbox: str) -> bool:
        with self._lock:
            return (owner.lower(), mailbox.lower()) in self._delegations

    # ----------------------------------------------------------------- bookkeeping
    def _find_device(self, user_code: str) -> _DeviceCode:
        with self._lock:
            for device in self._devices.values():
                if device.user_code == user_code.strip().upper():
                    return device
        raise KeyError(f"no device code with user code {user_code!r}")

    def _consent(self, user: str, client_id: str, scopes: list[str]) -> None:
        """The user consented to ``scopes`` on the sign-in page (consent adds up, as at Microsoft)."""
        self._consents.setdefault((user.lower(), client_id), set()).update(
            s.casefold() for s in scopes if s not in OIDC_SCOPES)

    def _new_access_token(self, user: str, client_id: str, scope: str, lifetime: int | None = None,
                          length: int | None = None) -> str:
        with self._lock:
            length = length or self.access_token_length
            token = ("EwB" + secrets.token_urlsafe(length))[:length]
            lifetime = self.access_token_lifetime if lifetime is None else lifetime
            self._access[token] = _Token(user, client_id, scope, time.time() + lifetime)
            return token

    def _lifetime(self) -> int:
        """The lifetime of the next access token (with the configured jitter)."""
        with self._lock:
            return self.access_token_lifetime + (secrets.randbelow(self.access_token_jitter + 1)
                                                 if self.access_token_jitter else 0)

    def _user_tokens(self, user: str, client_id: str, scopes: list[str], nonce: str = "",
                     family: str = "") -> dict[str, Any]:
        """A token response for a user: access token, new refresh token, id_token and client_info."""
        resource = " ".join(s for s in scopes if s not in OIDC_SCOPES) or " ".join(scopes)
        now, lifetime = int(time.time()), self._lifetime()
        response: dict[str, Any] = {
            "token_type": "Bearer", "scope": resource, "expires_in": lifetime, "ext_expires_in": lifetime,
            "access_token": self._new_access_token(user, client_id, resource, lifetime)}
        if "offline_access" in scopes:
            refresh = "0.AX" + secrets.token_urlsafe(48)
            with self._lock:
                self._refresh[refresh] = _Token(user, client_id, " ".join(scopes), now + self.refresh_token_lifetime,
                                                family=family or secrets.token_hex(6))
            response["refresh_token"] = refresh
        claims = {"ver": "2.0", "iss": f"{self.url}/{TENANT_ID}/v2.0", "sub": _oid(user + client_id),
                  "aud": client_id, "exp": now + 3600, "iat": now, "nbf": now, "oid": _oid(user), "tid": TENANT_ID,
                  "preferred_username": user, "name": user.split("@")[0].title(), "email": user}
        if nonce:
            claims["nonce"] = nonce
        header = _b64url(json.dumps({"typ": "JWT", "alg": "HS256"}).encode())
        payload = _b64url(json.dumps(claims).encode())
        signature = _b64url(hmac.new(b"test-idp", f"{header}.{payload}".encode(), hashlib.sha256).digest())
        response["id_token"] = f"{header}.{payload}.{signature}"
        response["client_info"] = _b64url(json.dumps({"uid": _oid(user), "utid": TENANT_ID}).encode())
        return response

    def _take_fault(self, endpoint: str) -> _Fault | None:
        with self._lock:
            fault = self._faults.get(endpoint)
            if fault is not None and fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._spent_faults.append(self._faults.pop(endpoint))
            return fault


def _check_tenant(client: Client, tenant: str) -> None:
    """A single-tenant app registration works only at its tenant's own authority."""
    if client.single_tenant and tenant in ("common", "organizations", "consumers"):
        raise OAuthError(50194, client=client.client_id)


class _Server(http.server.ThreadingHTTPServer):
    """The HTTPS listener: TLS handshakes run in the per-connection threads; open connections are
    tracked so that ``stop()`` can drop them."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], idp: IdentityProvider):
        self.idp = idp
        self.stopped = False
        self.connections: set[ssl.SSLSocket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request = self.idp._context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return  # a port probe, or a client that does not trust the test CA
        with self._connections_lock:
            self.connections.add(request)
        try:
            super().finish_request(request, client_address)
        finally:
            with self._connections_lock:
                self.connections.discard(request)

    def drop_connections(self, spare: socket.socket | None = None) -> None:
        with self._connections_lock:
            for connection in self.connections - {spare}:
                try:
                    socket.socket.shutdown(connection, socket.SHUT_RDWR)  # the fd itself, no TLS goodbye
                except OSError:
                    pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # connections dropped by stop() or by clients are expected


class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes requests to the IdentityProvider (HTTP/1.1 with keep-alive)."""

    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 60
    _ROUTES = {"v2.0/.well-known/openid-configuration": "discovery", "oauth2/v2.0/authorize": "authorize",
               "login": "login", "oauth2/v2.0/token": "token", "oauth2/v2.0/devicecode": "devicecode"}

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def _send(self, status: int, body: str | dict[str, Any], content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> None:
        idp = self.server.idp
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""
        parts = url.path.strip("/").split("/")
        tenant = parts[0]
        if tenant == "_test" and len(parts) == 2 and parts[1] in _CONTROLS:
            return self._control(parts[1], json.loads(body or b"{}") if method == "POST" else query)
        endpoint = url.path[1:] if url.path in ("/introspect", "/delegation", "/devicelogin") else \
            self._ROUTES.get("/".join(parts[1:]))
        if endpoint is None:
            return self._send(404, {"error": "not_found", "error_description": f"no route for {url.path}"})
        form = dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
        with idp._lock:
            idp._counters[endpoint] += 1
            if endpoint == "token":
                grant = form.get("grant_type", "")
                idp._counters["token:" + ("device_code" if grant == DEVICE_GRANT else grant)] += 1
        if self._fault(endpoint):
            return
        try:
            if endpoint == "discovery" and method == "GET":
                self._send(200, idp.discovery(tenant))
            elif endpoint == "authorize" and method == "GET":
                self._send(200, idp.sign_in_page(tenant, query), "text/html")
            elif endpoint == "login" and method == "POST":
                self._redirect(*idp.sign_in(form), response_mode=form.get("response_mode", "query"))
            elif endpoint == "token" and method == "POST":
                self._send(200, idp.token(form, self.headers.get("Authorization"), tenant))
            elif endpoint == "devicecode" and method == "POST":
                self._send(200, idp.device_code(form, tenant))
            elif endpoint == "introspect":
                bearer = self.headers.get("Authorization", "")
                token = form.get("token") or query.get("access_token") or query.get("token") or (
                    bearer[7:] if bearer.startswith("Bearer ") else "")
                self._send(200, idp.introspect(token))
            elif endpoint == "delegation":
                self._send(200, {"allowed": idp.delegation(query.get("owner", ""), query.get("mailbox", ""))})
            elif endpoint == "devicelogin":
                self._device_login(method, form)
            else:
                self._send(405, {"error": "method_not_allowed"})
        except OAuthError as exc:
            if exc.error == "invalid_grant" and endpoint == "token":
                with idp._lock:
                    idp._counters["invalid_grant"] += 1
            if endpoint in ("authorize", "login", "devicelogin"):
                self._send(exc.status, f"<!doctype html><title>Sign-in error</title><p>{html.escape(str(exc))}</p>",
                           "text/html")
            else:
                self._send(exc.status, exc.body())
        except Exception as exc:  # a bug here must show in the tests, not as a dropped connection
            self._send(500, {"error": "server_error", "error_description": f"test IdP failure: {exc!r}"})

    def _fault(self, endpoint: str) -> bool:
        """Apply a fault injected on ``endpoint``; True if that answered the request."""
        fault = self.server.idp._take_fault(endpoint)
        if fault is None:
            return False
        if fault.kind == "hang":
            deadline = time.monotonic() + fault.hang_max
            while not fault.released.wait(0.05):
                if self.server.stopped or time.monotonic() > deadline:
                    self._send(504, OAuthError(90033, status=504).body())
                    return True
            return False  # cleared: answer normally
        status = int(fault.kind)
        headers = {"Retry-After": str(fault.retry_after)} if status in (429, 503) else {}
        self._send(status, OAuthError(90033, status=status).body(), headers=headers)
        return True

    def _redirect(self, redirect_uri: str, answer: dict[str, str], response_mode: str) -> None:
        """The authorization response: a 302 (query) or a self-submitting form (form_post)."""
        if response_mode == "form_post":
            fields = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                             for k, v in answer.items())
            self._send(200, f"<!doctype html><html><head><title>Working...</title></head>"
                            f'<body onload="document.forms[0].submit()">'
                            f'<form method="post" action="{html.escape(redirect_uri)}">{fields}'
                            f"<noscript><p>Script is disabled. Click Submit to continue.</p>"
                            f'<input type="submit" value="Submit"></noscript></form></body></html>', "text/html")
        else:
            separator = "&" if "?" in redirect_uri else "?"
            self._send(302, "", "text/plain", {"Location": redirect_uri + separator + urllib.parse.urlencode(answer)})

    def _device_login(self, method: str, form: dict[str, str]) -> None:
        """A tiny page to approve a device code in a browser."""
        if method == "POST":
            try:
                self.server.idp.approve_device(form.get("user_code", ""), form.get("username", ""))
            except KeyError as exc:
                return self._send(400, f"<p>{html.escape(str(exc))}</p>", "text/html")
            return self._send(200, "<p>You have signed in. You may now close this window.</p>", "text/html")
        self._send(200, '<form method="post"><input name="user_code"><input name="username">'
                        '<input type="submit" value="Next"></form>', "text/html")

    def _control(self, name: str, kwargs: dict[str, Any]) -> None:
        """``/_test/<name>``: call that IdentityProvider method with the JSON object as keyword arguments."""
        idp = self.server.idp
        try:
            if name == "stop_for":  # the listener is closed before the answer goes out
                idp.stop(spare=self.connection)
                threading.Timer(float(kwargs.get("seconds", 1)), idp.start).start()
                self.close_connection = True
                result: Any = None
            else:
                result = getattr(idp, name)(**kwargs)
            self._send(200, {"result": result})
        except (TypeError, ValueError, KeyError) as exc:
            self._send(400, {"error": exc.__class__.__name__, "error_description": str(exc)})


def main() -> None:
    """Run standalone until SIGTERM or Ctrl-C: prints the URL, writes ca.pem to ``--dir``."""
    parser = argparse.ArgumentParser(description="Local test identity provider (Microsoft v2.0 shapes).")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--dir", required=True, help="directory for ca.pem and the server certificate")
    args = parser.parse_args()
    idp = IdentityProvider(make_test_pki(args.dir), host=args.host, port=args.port)
    idp.start()
    print(idp.url, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    idp.stop()


if __name__ == "__main__":
    main()
