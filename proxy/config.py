"""Configuration: load a YAML file, validate it, and turn it into typed, immutable settings.

Every error names the key it is about (``imap.listen: ...``) so an admin can fix the file
without reading code. Relative paths are resolved against the config file's folder, so the
proxy behaves the same whatever directory a service manager starts it in.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .webproxy import ProxyUrlError, WebProxy, proxy_from

DEFAULT_SCOPES = (
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "https://outlook.office.com/SMTP.Send",
    "offline_access",
)
# Added to the default scopes when the config has a pop3 section (POP3 needs it; accounts
# authorized before keep working for IMAP and SMTP, see proxy/tokens/identity.py).
POP_SCOPE = "https://outlook.office.com/POP.AccessAsUser.All"
# msal adds these itself and refuses them in a scope list.
MSAL_RESERVED_SCOPES = frozenset({"offline_access", "openid", "profile"})
# imap.starttls / smtp.starttls: STARTTLS on the plain listener.
STARTTLS_OFF, STARTTLS_ON, STARTTLS_REQUIRED = "off", "on", "required"
# Environment variables PROXY_<SECTION>_<KEY> override these sections' single-value keys
# (see docs/container.md), e.g. PROXY_IMAP_LISTEN=0.0.0.0:1143, PROXY_TOKENS_PATH=/tokens.
ENV_PREFIX = "PROXY_"
ENV_SECTIONS = ("identity", "imap", "smtp", "pop3", "tls", "tokens", "admin", "limits")
# PROXY_* variables that are not config overrides (the command line's own).
ENV_OTHER = ("PROXY_CONFIG", "PROXY_LOG_LEVEL", "PROXY_LOG_FORMAT")
# Microsoft's sign-in hosts (public and national clouds; the list msal knows). Authorities on
# them name a tenant (a GUID, a domain, or organizations/common/consumers) and take GUID client
# ids; other hosts (ADFS, the tests' identity provider) are not held to Microsoft's formats.
MICROSOFT_AUTHORITY_HOSTS = frozenset({
    "login.microsoftonline.com", "login.microsoft.com", "login.windows.net", "sts.windows.net",
    "login-us.microsoftonline.com", "login.microsoftonline.us", "login.usgovcloudapi.net",
    "login.chinacloudapi.cn", "login.partner.microsoftonline.cn", "login.microsoftonline.de",
    "login.sovcloud-identity.de", "login.sovcloud-identity.fr", "login.sovcloud-identity.sg"})
TENANT_ALIASES = ("organizations", "common", "consumers")
_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
_PLACEHOLDER = re.compile(r"<[^<>\n]{1,60}>")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class IdentityConfig:
    authority: str
    client_id: str
    client_secret: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    timeout: float = 10.0
    app_only: AppOnlyConfig | None = None
    http_proxy: WebProxy | None = None  # identity.http_proxy, else HTTPS_PROXY (proxy/webproxy.py)
    # After Microsoft refused a refresh for a reason that passes by itself (Conditional Access,
    # MFA, sign-in frequency: proxy/aadsts.py), a login tries again at most this often,
    # and the background this often (seconds).
    refresh_retry_on_login: float = 60.0
    refresh_retry_in_background: float = 1800.0

    @property
    def msal_scopes(self) -> list[str]:
        """The scopes to hand to msal (without the ones msal adds itself)."""
        return [s for s in self.scopes if s not in MSAL_RESERVED_SCOPES]


@dataclass(frozen=True)
class ListenerConfig:
    """``imap`` / ``smtp`` / ``pop3``: where clients connect, and the upstream server."""

    listen: Address
    upstream: Address
    ca_file: Path | None = None
    allow_plaintext: bool = False
    upstream_tls: str = "implicit"  # "implicit" (IMAPS 993, SMTPS 465, POP3S 995) or "starttls" (SMTP 587)
    starttls: str = STARTTLS_OFF    # on the plain listener: off, on (offered) or required (before login)
    tls_listen: Address | None = None  # a second listener with implicit TLS (IMAPS, SMTPS, POP3S)
    via_http_proxy: bool = False       # reach the upstream through the web proxy (HTTP CONNECT)
    upstream_proxy: WebProxy | None = None  # that proxy, unless NO_PROXY names the upstream host
    # Load balancers (networks) whose connections must start with a PROXY protocol header
    # (proxy/proxyproto.py); empty: none, every connection is a client's own.
    proxy_protocol: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @property
    def uses_tls(self) -> bool:
        return self.starttls != STARTTLS_OFF or self.tls_listen is not None

    @property
    def plaintext_exposed(self) -> bool:
        """Passwords could reach the plain listener in clear from another computer."""
        return not self.listen.is_loopback and self.starttls != STARTTLS_REQUIRED


@dataclass(frozen=True)
class TlsConfig:
    """``tls``: the certificate and key the proxy's own TLS listeners present (``proxy certs``)."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class AdminConfig:
    """``admin``: the HTTP listener for /healthz, /readyz and /metrics (off unless configured).

    ``token``: every request must carry ``Authorization: Bearer <token>``; required when
    ``listen`` is not a loopback address (set it inline, with ``token_file``, or with
    ``PROXY_ADMIN_TOKEN``)."""

    listen: Address
    token: str | None = field(default=None, repr=False)


FLOW_DELEGATED = "delegated"                 # a person signs in (browser or device code)
FLOW_CLIENT_CREDENTIALS = "client_credentials"  # app-only: the proxy fetches tokens with the app's secret
FLOWS = (FLOW_DELEGATED, FLOW_CLIENT_CREDENTIALS)
APP_ONLY_SCOPE = "https://outlook.office365.com/.default"


@dataclass(frozen=True)
class AppOnlyConfig:
    """``identity.app_only``: the confidential app registration used by ``flow: client_credentials``."""

    client_id: str
    authority: str
    scope: str = APP_ONLY_SCOPE
    client_secret: str | None = field(default=None, repr=False)
    private_key: str | None = field(default=None, repr=False)  # PEM, with ``certificate``
    certificate: str | None = None                            # PEM (public)

    @property
    def credential(self) -> str | dict[str, str]:
        """msal's ``client_credential``: the secret, or the key and certificate (PS256, x5t#S256)."""
        if self.client_secret:
            return self.client_secret
        return {"private_key": self.private_key or "", "public_certificate": self.certificate or ""}


@dataclass(frozen=True)
class AccountConfig:
    """One local login. ``mailbox`` is the upstream mailbox (XOAUTH2 ``user=``); ``owner`` is whose
    tokens open it (config key ``token:``): by default both are ``username``. Accounts naming the
    same owner share one token file, one sign-in and the owner's local password. ``flow`` is the
    owner's: ``delegated`` (a person signs in) or ``client_credentials`` (app-only)."""

    username: str
    mailbox: str = ""
    owner: str = ""
    flow: str = FLOW_DELEGATED

    def __post_init__(self) -> None:
        if not self.mailbox:
            object.__setattr__(self, "mailbox", self.username)
        if not self.owner:
            object.__setattr__(self, "owner", self.username)

    @property
    def key(self) -> str:
        """Case-insensitive identity of the account (mail addresses are case-insensitive)."""
        return self.username.casefold()

    @property
    def owner_key(self) -> str:
        return self.owner.casefold()

    @property
    def token_owner(self) -> AccountConfig:
        """The token owner as an account of its own (username = owner, with the owner's flow)."""
        return AccountConfig(self.owner, flow=self.flow)

    @property
    def shared(self) -> bool:
        """True if this login opens a mailbox with someone else's tokens."""
        return self.mailbox.casefold() != self.owner_key


STORE_FOLDER, STORE_POSTGRESQL = "folder", "postgresql"
TOKEN_STORES = (STORE_FOLDER, STORE_POSTGRESQL)


@dataclass(frozen=True)
class TokensConfig:
    """``tokens``: where the sealed token records live (docs/scale-out.md).

    ``store: folder`` (default): one file per account in ``path``. ``store: postgresql``: a table
    in the database ``dsn`` names (``postgresql://user@host:port/database``), shared by several
    replicas; its password in the DSN or, better, in ``dsn_password_file``.
    """

    path: Path
    store: str = STORE_FOLDER
    dsn: str | None = field(default=None, repr=False)
    dsn_password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """The store without any password (for log lines about changed settings)."""
        if self.store == STORE_POSTGRESQL and self.dsn:
            from .tokens.postgres import redact_dsn
            return f"postgresql {redact_dsn(self.dsn)}"
        return f"folder {self.path}"


@dataclass(frozen=True)
class LimitsConfig:
    login_timeout: float = 25.0
    preauth_timeout: float = 60.0
    max_connections: int = 1000
    shutdown_grace: float = 30.0  # seconds open sessions get to finish after SIGTERM
    # Connections that have not logged in (per protocol): at most this many; when full, the oldest
    # idle one is dropped for a new one (see proxy/admission.py). Each is closed after this many
    # seconds without a command.
    max_prelogin_connections: int = 100
    prelogin_idle_timeout: float = 10.0


@dataclass(frozen=True)
class Config:
    identity: IdentityConfig
    imap: ListenerConfig
    smtp: ListenerConfig
    token_path: Path
    accounts: tuple[AccountConfig, ...]
    limits: LimitsConfig = LimitsConfig()
    source: Path | None = None
    tls: TlsConfig | None = None
    admin: AdminConfig | None = None
    pop3: ListenerConfig | None = None  # no POP3 listener without a pop3 section
    tokens: TokensConfig | None = None  # None: the folder at token_path

    @property
    def token_store(self) -> TokensConfig:
        return self.tokens or TokensConfig(path=self.token_path)

    def account(self, username: str) -> AccountConfig | None:
        folded = username.casefold()
        for account in self.accounts:
            if account.key == folded:
                return account
        return None

    def sharing(self, owner: str) -> tuple[AccountConfig, ...]:
        """The accounts that log in with ``owner``'s tokens."""
        return tuple(a for a in self.accounts if a.owner_key == owner.casefold())

    def owner_account(self, name: str) -> AccountConfig | None:
        """The token owner called ``name`` (an account's username or a ``token:`` value), as an
        account of its own (username = owner, with the owner's flow); None if nobody uses it."""
        users = self.sharing(name)
        return users[0].token_owner if users else None


def example_config_text() -> str:
    """The commented example config shipped in the package (``proxy init`` writes it; the
    repository's top-level config.example.yaml is a copy that a test keeps identical)."""
    from importlib import resources
    return resources.files(__package__).joinpath("config.example.yaml").read_text(encoding="utf-8")


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the YAML file at ``path``, with ``PROXY_<SECTION>_<KEY>`` overrides from
    ``environ`` (default: the process environment; pass ``{}`` for none)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file in UTF-8 (save it as UTF-8 text)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if environ is None:
        environ = os.environ
    return parse_config(apply_env_overrides(data, environ), base_dir=path.resolve().parent, source=path,
                        environ=environ)


def parse_config(data: Any, *, base_dir: Path, source: Path | None = None,
                 environ: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed YAML document (as :func:`apply_env_overrides` returns it: an
    error about a value set by a ``PROXY_*`` variable names the variable). ``environ`` supplies
    ``HTTPS_PROXY``/``NO_PROXY`` (default: none)."""
    try:
        return _parse_config(data, base_dir=base_dir, source=source, environ=environ or {})
    except ConfigError as exc:
        raise ConfigError(_name_env_origin(str(exc), getattr(data, "env_origins", {}))) from None


def _parse_config(data: Any, *, base_dir: Path, source: Path | None, environ: Mapping[str, str]) -> Config:
    root = _Section(data, "", base_dir)
    has_pop3 = isinstance(root.data, dict) and "pop3" in root.data  # even empty: POP3 with the defaults
    identity = root.section("identity", required=True)
    scopes = identity.string_list("scopes")
    identity_cfg = IdentityConfig(
        authority=_authority(identity, "authority", required=True),
        client_id=identity.string("client_id", required=True),
        client_secret=identity.string("client_secret"),
        ca_file=identity.path("ca_file", must_exist=True),
        scopes=tuple(scopes or _default_scopes(has_pop3)),
        timeout=identity.number("timeout", 10.0, minimum=1, maximum=60),
        app_only=_app_only(identity.section("app_only"), identity),
        http_proxy=_web_proxy(identity, environ),
        refresh_retry_on_login=identity.number("refresh_retry_on_login", 60.0, minimum=1, maximum=3600),
        refresh_retry_in_background=identity.number("refresh_retry_in_background", 1800.0, minimum=60,
                                                    maximum=86400),
    )
    identity.done()
    _check_client_id("identity.client_id", identity_cfg.client_id, identity_cfg.authority)

    imap_cfg = _listener(root.section("imap"), "127.0.0.1:1143", "outlook.office365.com:993", ("implicit",),
                         web_proxy=identity_cfg.http_proxy)
    smtp_cfg = _listener(root.section("smtp"), "127.0.0.1:1587", "smtp.office365.com:587",
                         ("starttls", "implicit"), web_proxy=identity_cfg.http_proxy)
    if imap_cfg.listen == smtp_cfg.listen:
        raise ConfigError(f"smtp.listen: {smtp_cfg.listen} is already imap.listen")
    pop3 = root.section("pop3")  # read even when absent: a misspelt "pop3" then gets "did you mean"
    pop3_cfg = _listener(pop3, "127.0.0.1:1110", "outlook.office365.com:995", ("implicit",),
                         web_proxy=identity_cfg.http_proxy) if has_pop3 else None
    tls_cfg = _tls_section(root.section("tls"), {"imap": imap_cfg, "smtp": smtp_cfg, "pop3": pop3_cfg})
    admin_cfg = _admin_section(root.section("admin"))
    _check_addresses({"imap.listen": imap_cfg.listen, "imap.tls_listen": imap_cfg.tls_listen,
                      "smtp.listen": smtp_cfg.listen, "smtp.tls_listen": smtp_cfg.tls_listen,
                      "pop3.listen": pop3_cfg.listen if pop3_cfg else None,
                      "pop3.tls_listen": pop3_cfg.tls_listen if pop3_cfg else None,
                      "admin.listen": admin_cfg.listen if admin_cfg else None})

    tokens_cfg = _tokens(root.section("tokens"), base_dir)
    token_path = tokens_cfg.path

    limits = root.section("limits")
    limits_cfg = LimitsConfig(
        login_timeout=limits.number("login_timeout", 25.0, minimum=1, maximum=300),
        preauth_timeout=limits.number("preauth_timeout", 60.0, minimum=1, maximum=3600),
        max_connections=int(limits.number("max_connections", 1000, minimum=1, maximum=1_000_000)),
        shutdown_grace=limits.number("shutdown_grace", 30.0, minimum=0, maximum=3600),
        max_prelogin_connections=int(limits.number("max_prelogin_connections", 100, minimum=1, maximum=1_000_000)),
        prelogin_idle_timeout=limits.number("prelogin_idle_timeout", 10.0, minimum=1, maximum=3600),
    )
    if limits.data.get("max_prelogin_connections") is None:  # the default is a part of a smaller max_connections
        limits_cfg = replace(limits_cfg, max_prelogin_connections=min(limits_cfg.max_prelogin_connections,
                                                                      limits_cfg.max_connections))
    elif limits_cfg.max_prelogin_connections > limits_cfg.max_connections:
        raise ConfigError(f"limits.max_prelogin_connections: {limits_cfg.max_prelogin_connections} is more than "
                          f"limits.max_connections ({limits_cfg.max_connections}); it is a part of it")
    limits.done()

    accounts = []
    seen: set[str] = set()
    for index, item in enumerate(root.list("accounts", required=True)):
        entry = _Section(item, f"accounts[{index}]", base_dir)
        username = entry.string("username", required=True)
        if any(c.isspace() or ord(c) < 32 for c in username):
            raise ConfigError(f"accounts[{index}].username: must not contain spaces or control characters")
        names = {}
        for key in ("mailbox", "token"):
            names[key] = entry.string(key)
            if names[key] is not None and any(c.isspace() or ord(c) < 32 for c in names[key]):
                raise ConfigError(f"accounts[{index}].{key}: must not contain spaces or control characters")
        flow = entry.choice("flow", "", FLOWS)
        if flow and names["token"] and names["token"].casefold() != username.casefold():
            raise ConfigError(f"accounts[{index}].flow: this account uses the tokens of {names['token']}; "
                              "the flow belongs to the token owner (set it there, or drop token:)")
        account = AccountConfig(username=username, mailbox=names["mailbox"] or "", owner=names["token"] or "",
                                flow=flow or FLOW_DELEGATED)
        if account.key in seen:
            raise ConfigError(f"accounts[{index}].username: {username!r} is listed twice")
        seen.add(account.key)
        entry.done()
        accounts.append(account)
    if not accounts:
        raise ConfigError("accounts: list at least one account")
    accounts = _resolve_owners(accounts)
    for index, account in enumerate(accounts):
        if account.flow == FLOW_CLIENT_CREDENTIALS and identity_cfg.app_only is None:
            raise ConfigError(f"accounts[{index}].flow: client_credentials needs identity.app_only "
                              "(the app's client_id and client_secret, client_secret_file or certificate_file)")
    if scopes and has_pop3 and any(a.flow != FLOW_CLIENT_CREDENTIALS for a in accounts) and not any(
            s.casefold().endswith("/pop.accessasuser.all") for s in scopes):
        raise ConfigError(f"identity.scopes: the pop3 section needs {POP_SCOPE} in this list (or drop "
                          "identity.scopes: the default includes it when pop3 is configured)")
    root.done()
    return Config(identity=identity_cfg, imap=imap_cfg, smtp=smtp_cfg, token_path=token_path,
                  accounts=tuple(accounts), limits=limits_cfg, source=source, tls=tls_cfg, admin=admin_cfg,
                  pop3=pop3_cfg, tokens=tokens_cfg)


def _default_scopes(pop3: bool) -> tuple[str, ...]:
    """IMAP and SMTP (and refreshing); POP too when the config has a pop3 section."""
    if not pop3:
        return DEFAULT_SCOPES
    return (*DEFAULT_SCOPES[:-1], POP_SCOPE, DEFAULT_SCOPES[-1])


def _tokens(section: "_Section", base_dir: Path) -> TokensConfig:
    """``tokens``: the store, its folder or its database. The DSN may hold a password, so no
    message here ever repeats it."""
    path = section.path("path") or (base_dir / "tokens")
    store = section.choice("store", STORE_FOLDER, TOKEN_STORES)
    dsn = section.string("dsn")
    password_file = section.path("dsn_password_file", must_exist=True)
    section.done()
    if store != STORE_POSTGRESQL:
        if dsn is not None or password_file is not None:
            key = "dsn" if dsn is not None else "dsn_password_file"
            raise ConfigError(f"tokens.{key}: only used with tokens.store: postgresql (the store is {store})")
        return TokensConfig(path=path)
    if dsn is None:
        raise ConfigError("tokens.dsn: required with tokens.store: postgresql (or $PROXY_TOKENS_DSN), e.g. "
                          "postgresql://proxy@db.example.net:5432/proxy")
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError("tokens.dsn: expected a URL like postgresql://user@host:5432/database")
    try:  # (never repeat the DSN: it may hold a password)
        port = urllib.parse.urlsplit(dsn).port
    except ValueError:
        port = -1
    if port is not None and not 0 < port < 65536:
        raise ConfigError("tokens.dsn: not a valid URL (check the host and the port), expected "
                          "postgresql://user@host:5432/database")
    password = None
    if password_file is not None:
        password = _read(password_file, "tokens.dsn_password_file").strip()
        if not password or "\n" in password:
            raise ConfigError(f"tokens.dsn_password_file: {password_file} must hold the password on one line")
    return TokensConfig(path=path, store=store, dsn=dsn, dsn_password=password)


def _admin_section(section: "_Section") -> AdminConfig | None:
    """``admin``: the listener and its bearer token (required off loopback)."""
    token, token_file = section.string("token"), section.path("token_file", must_exist=True)
    if token is not None and token_file is not None:
        raise ConfigError("admin.token_file: give either admin.token or admin.token_file, not both")
    if token_file is not None:
        token = _read(token_file, "admin.token_file").strip()
    if token is not None and (len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token)):
        raise ConfigError(f"admin.{'token_file' if token_file else 'token'}: the token must be at least 16 "
                          "printable characters without spaces (e.g. `openssl rand -hex 24`)")
    if section.data.get("listen") is None:
        section.done()
        if token is not None:
            raise ConfigError("admin.token: there is no admin.listen to protect")
        return None
    listen = section.address("listen", "")
    section.done()
    if token is None and not listen.is_loopback:
        raise ConfigError(f"admin.listen: {listen} is not a loopback address, so others could read the "
                          "readiness and metrics and load the proxy: set admin.token (or admin.token_file, or "
                          "PROXY_ADMIN_TOKEN) and give it to the scraper as a bearer token, or listen on 127.0.0.1")
    return AdminConfig(listen=listen, token=token)


def _resolve_owners(accounts: list[AccountConfig]) -> list[AccountConfig]:
    """Give each account its token owner's flow; an owner must own its tokens itself."""
    by_key = {a.key: a for a in accounts}
    resolved = []
    for index, account in enumerate(accounts):
        owner = by_key.get(account.owner_key)
        if owner is not None and owner is not account:
            if owner.owner_key != owner.key:
                raise ConfigError(f"accounts[{index}].token: {account.owner} itself uses the tokens of "
                                  f"{owner.owner}; name {owner.owner} here")
            account = AccountConfig(account.username, account.mailbox, owner.username, owner.flow)
        resolved.append(account)
    return resolved


def _app_only(section: "_Section", identity: "_Section") -> AppOnlyConfig | None:
    """``identity.app_only``: client id, tenant authority and one credential (secret or certificate)."""
    if not section.data:
        section.done()
        return None
    name = section.prefix
    authority = _authority(section, "authority") or identity.data.get("authority", "")
    tenant = str(authority).rstrip("/").rsplit("/", 1)[-1].lower()
    if tenant in ("common", "organizations", "consumers"):
        raise ConfigError(f"{name}.authority: app-only access needs your tenant, not {tenant!r}: "
                          "https://login.microsoftonline.com/<tenant-id>")
    secret = section.string("client_secret")
    secret_file = section.path("client_secret_file", must_exist=True)
    cert_file = section.path("certificate_file", must_exist=True)
    key_file = section.path("private_key_file", must_exist=True)
    if sum(x is not None for x in (secret, secret_file, cert_file)) != 1:
        raise ConfigError(f"{name}: give exactly one of client_secret, client_secret_file, certificate_file")
    if key_file is not None and cert_file is None:
        raise ConfigError(f"{name}.private_key_file: only used with certificate_file")
    private_key = certificate = None
    if secret_file is not None:
        secret = _read(secret_file, f"{name}.client_secret_file").strip()
        if not secret:
            raise ConfigError(f"{name}.client_secret_file: {secret_file} is empty")
    if cert_file is not None:
        cert_text = _read(cert_file, f"{name}.certificate_file")
        key_text = _read(key_file, f"{name}.private_key_file") if key_file else cert_text
        certificate = _pem_block(cert_text, "CERTIFICATE", f"{name}.certificate_file")
        private_key = _pem_block(key_text, "PRIVATE KEY", f"{name}.private_key_file" if key_file
                                 else f"{name}.certificate_file (or private_key_file)")
    config = AppOnlyConfig(
        client_id=section.string("client_id") or str(identity.data.get("client_id") or ""),
        authority=str(authority).rstrip("/"), scope=section.string("scope") or APP_ONLY_SCOPE,
        client_secret=secret, private_key=private_key, certificate=certificate)
    if not config.scope.endswith("/.default"):
        raise ConfigError(f"{name}.scope: app-only scopes end in /.default, e.g. {APP_ONLY_SCOPE}")
    section.done()
    _check_client_id(f"{name}.client_id" if section.data.get("client_id") else "identity.client_id",
                     config.client_id, config.authority)
    return config


def _authority(section: "_Section", key: str, required: bool = False) -> str | None:
    """An authority URL (``https://<host>/<tenant>``), with the usual mistakes caught offline:
    an endpoint URL (``.../oauth2/v2.0/token``, ``.../v2.0/.well-known/...``) pasted in its place,
    and, on Microsoft's hosts, a missing or malformed tenant."""
    value = section.https_url(key, required)
    if value is None:
        return None
    name = section._key(key)
    url = urllib.parse.urlsplit(value)
    host = (url.hostname or "").lower()
    segments = [s for s in url.path.split("/") if s]
    lowered = [s.lower() for s in segments]
    endpoint = next((i for i, s in enumerate(lowered) if s in ("oauth2", "v2.0", ".well-known", "discovery")), None)
    if endpoint is not None or url.query or url.fragment:
        base = f"{url.scheme}://{url.netloc}/{'/'.join(segments[:endpoint] if endpoint is not None else segments)}"
        what = ("the authorize endpoint" if "authorize" in lowered else "the token endpoint" if "token" in lowered
                else "the device code endpoint" if "devicecode" in lowered
                else "the OpenID configuration address" if ".well-known" in lowered
                else "the issuer address" if lowered[-1:] == ["v2.0"] else "an endpoint address")
        raise ConfigError(f"{name}: {value!r} is {what}, not the authority; use only the part up to the tenant: "
                          f"{base.rstrip('/')}")
    if host in MICROSOFT_AUTHORITY_HOSTS:
        example = f"https://{host}/<tenant-id> (the Directory (tenant) ID) or https://{host}/organizations"
        if not segments:
            raise ConfigError(f"{name}: {value!r} names no tenant; use {example}")
        if len(segments) > 1:
            raise ConfigError(f"{name}: {value!r} has more than the tenant after the host; use {example}")
        tenant = lowered[0]
        if not (_GUID.match(tenant) or tenant in TENANT_ALIASES or "." in tenant):
            raise ConfigError(f"{name}: {segments[0]!r} is not a tenant: Microsoft's tenant ids are GUIDs "
                              "like 9188040d-6c67-4c5b-b112-36a304b66dad (Entra ID > Overview > Tenant ID), or a "
                              "domain of the tenant (firm.onmicrosoft.com), or organizations")
    return value


def _check_client_id(key: str, client_id: str | None, authority: str | None) -> None:
    """On Microsoft's sign-in hosts a client id is the app registration's GUID."""
    if not client_id or not authority:
        return
    url = urllib.parse.urlsplit(authority)
    if (url.hostname or "").lower() not in MICROSOFT_AUTHORITY_HOSTS:
        return
    if not _GUID.match(client_id):
        raise ConfigError(f"{key}: {client_id!r} is not an Application (client) ID: those are GUIDs like "
                          "1b2c3d4e-0000-4000-8000-00000000abcd; copy it from Entra ID > App registrations > "
                          "your app > Overview (not the secret, not the app's name)")
    if url.path.strip("/").lower() == client_id.lower():
        raise ConfigError(f"{key}: {client_id} is the Directory (tenant) ID of the authority; client_id is the "
                          "Application (client) ID shown beside it")


def _read(path: Path, key: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc.__class__.__name__})") from None


def _pem_block(text: str, label: str, key: str) -> str:
    """The first PEM block whose label ends with ``label`` (e.g. RSA PRIVATE KEY, PRIVATE KEY)."""
    found = re.search(r"-----BEGIN ([A-Z ]*%s)-----.+?-----END \1-----" % label, text, re.S)
    if found is None:
        raise ConfigError(f"{key}: no PEM {label} found")
    return found.group(0)


def _web_proxy(identity: "_Section", environ: Mapping[str, str]) -> WebProxy | None:
    """``identity.http_proxy`` (a URL, or false: none even if the environment names one), else
    ``HTTPS_PROXY``/``NO_PROXY`` from the environment (see proxy/webproxy.py)."""
    value = identity._get("http_proxy", False)
    if value is not None and value is not False and not isinstance(value, str):
        raise ConfigError(f"identity.http_proxy: expected http://host:port or false, got {_kind(value)}")
    try:
        return proxy_from(value, environ)
    except ProxyUrlError as exc:
        text = str(exc)
        if text.startswith("environment variable "):
            variable, _, rest = text[len("environment variable "):].partition(": ")
            raise ConfigError(f"identity.http_proxy (from environment variable {variable}): {rest}") from None
        raise ConfigError(f"identity.http_proxy: {text}") from None


def _listener(section: "_Section", listen: str, upstream: str, tls_modes: tuple[str, ...], *,
              web_proxy: WebProxy | None = None) -> ListenerConfig:
    name = section.prefix
    upstream_address = section.address("upstream", upstream)
    via_http_proxy = section.boolean("via_http_proxy", False)
    if via_http_proxy and web_proxy is None:
        raise ConfigError(f"{name}.via_http_proxy: true, but no web proxy is set: give identity.http_proxy "
                          "(http://host:port) or HTTPS_PROXY in the environment")
    default_tls = "implicit" if upstream_address.port in (465, 993) or len(tls_modes) == 1 else "starttls"
    config = ListenerConfig(
        listen=section.address("listen", listen),
        upstream=upstream_address,
        ca_file=section.path("ca_file", must_exist=True),
        allow_plaintext=section.boolean("allow_plaintext", False),
        upstream_tls=section.choice("upstream_tls", default_tls, tls_modes),
        starttls=_starttls_mode(section),
        tls_listen=section.address("tls_listen", "") if section.data.get("tls_listen") is not None else None,
        via_http_proxy=via_http_proxy,
        upstream_proxy=web_proxy if via_http_proxy and not web_proxy.bypass(upstream_address.host) else None,
        proxy_protocol=_balancers(section),
    )
    if config.plaintext_exposed and not config.allow_plaintext:
        raise ConfigError(
            f"{name}.listen: {config.listen} is not a loopback address; passwords would cross the "
            f"network in clear. Listen on 127.0.0.1, require TLS ({name}.starttls: required, or keep "
            f"{name}.listen on loopback and use {name}.tls_listen for implicit TLS), or set "
            f"{name}.allow_plaintext: true if you really mean it")
    section.done()
    return config


def _balancers(section: "_Section") -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``proxy_protocol``: the load balancers (addresses or CIDR networks) trusted to send a PROXY
    protocol header; a list, or one text with commas (as an environment variable gives it)."""
    key = f"{section.prefix}.proxy_protocol"
    value = section._get("proxy_protocol", False)
    if value is None or value is False or value == []:
        return ()
    if isinstance(value, str):
        value = [entry for entry in re.split(r"[,\s]+", value) if entry]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a list of the load balancers' addresses or networks, for example "
                          f"[10.0.0.5] or [10.0.0.0/24], got {_kind(value)}: a PROXY protocol header is trusted "
                          "from them only")
    networks = []
    for entry in value:
        if isinstance(entry, bool) or not isinstance(entry, (str, int)):
            raise ConfigError(f"{key}: expected addresses or networks such as 10.0.0.5 or 10.0.0.0/24, "
                              f"got {_kind(entry)}")
        text = str(entry).strip()
        try:
            network = ipaddress.ip_network(text)
        except ValueError:
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ConfigError(f"{key}: {text!r} is not an IP address or network (CIDR, such as 10.0.0.0/24); "
                                  "give addresses, not host names: trust must not depend on DNS") from None
            raise ConfigError(f"{key}: {text} has bits set after its prefix length (did you mean {loose}, "
                              f"or the single address {text.split('/')[0]}?)") from None
        if network.prefixlen == 0:
            raise ConfigError(f"{key}: {network} would trust every address, so anyone could claim any client "
                              "address; name the load balancers' addresses or their network")
        networks.append(network)
    return tuple(dict.fromkeys(networks))


def _starttls_mode(section: "_Section") -> str:
    value = section.data.get("starttls")
    section.used.add("starttls")
    if value is None or value is False:
        return STARTTLS_OFF
    if value is True:
        return STARTTLS_ON
    if value == STARTTLS_REQUIRED:
        return STARTTLS_REQUIRED
    raise ConfigError(f"{section.prefix}.starttls: expected true, false or required, got {value!r}")


def _tls_section(section: "_Section", listeners: dict[str, ListenerConfig | None]) -> TlsConfig | None:
    """``tls``: needed when a listener offers TLS; both files must exist."""
    users = [name for name, listener in listeners.items() if listener is not None and listener.uses_tls]
    if not section.data:
        if users:
            raise ConfigError(f"tls: {users[0]} offers TLS (starttls or tls_listen), so tls.cert_file and "
                              "tls.key_file are needed (`proxy certs` creates them)")
        section.done()
        return None
    cert_file = section.path("cert_file", must_exist=True)
    key_file = section.path("key_file", must_exist=True)
    if cert_file is None or key_file is None:
        raise ConfigError(f"tls.{'cert_file' if cert_file is None else 'key_file'}: required in a tls section")
    section.done()
    return TlsConfig(cert_file=cert_file, key_file=key_file)


def _check_addresses(addresses: dict[str, Address | None]) -> None:
    """No two listeners on the same address (port 0, any free port, excepted)."""
    seen: dict[Address, str] = {}
    for key, address in addresses.items():
        if address is None or address.port == 0:
            continue
        if address in seen:
            raise ConfigError(f"{key}: {address} is already {seen[address]}")
        seen[address] = key


def apply_env_overrides(data: Any, environ: Mapping[str, str]) -> Any:
    """A copy of the YAML document with ``PROXY_<SECTION>_<KEY>`` environment variables applied.

    Only single values in the sections of :data:`ENV_SECTIONS` (not the accounts list):
    ``PROXY_IMAP_LISTEN=0.0.0.0:1143`` sets ``imap.listen``. ``true``/``false`` become
    booleans and plain numbers numbers; anything else stays a string. Unknown keys are
    reported by the normal validation, naming the key.
    """
    if not isinstance(data, dict):
        return data
    data = _EnvDocument(data)
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in ENV_OTHER:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
        if section not in ENV_SECTIONS or not key:
            close = difflib.get_close_matches(section, ENV_SECTIONS, n=1, cutoff=0.75)
            if close and key:
                raise ConfigError(f"environment variable {name}: there is no config section {section!r} "
                                  f"(did you mean {ENV_PREFIX}{close[0].upper()}_{key.upper()}?)")
            continue
        current = data.get(section)
        if current is not None and not isinstance(current, dict):
            continue  # the normal validation reports the section itself
        data[section] = {**(current or {}), key: _env_value(raw)}
        data.env_origins[f"{section}.{key}"] = name
    return data


class _EnvDocument(dict):
    """The YAML document with the environment's overrides, and which key came from which variable."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.env_origins: dict[str, str] = {}


def _name_env_origin(message: str, origins: Mapping[str, str]) -> str:
    """``imap.listen: ...`` becomes ``imap.listen (from PROXY_IMAP_LISTEN): ...`` when the
    environment set that key (every message starts with the key it is about)."""
    key, sep, rest = message.partition(": ")
    variable = origins.get(key) if sep else None
    if variable is None or variable in message:
        return message
    section = key.split(".", 1)[0]
    rest = re.sub(r"did you mean ([a-z0-9_]+)\?",
                  lambda m: f"did you mean {ENV_PREFIX}{section.upper()}_{m.group(1).upper()}?", rest)
    return f"{key} (from environment variable {variable}): {rest}"


def _env_value(raw: str) -> Any:
    text = raw.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_address(text: str, key: str) -> Address:
    """Parse ``host:port`` or ``[v6]:port``."""
    text = str(text).strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = text.rpartition(":")
    if not host or not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{key}: expected host:port (for example 127.0.0.1:1143), got {text!r}")
    return Address(host, int(port_text))


class _Section:
    """A mapping being validated; tracks which keys were read so unknown ones are reported."""

    def __init__(self, data: Any, prefix: str, base_dir: Path):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            example = (f" (for example `- username: {data}`)" if re.fullmatch(r"accounts\[\d+\]", prefix)
                       and isinstance(data, str) else "")
            raise ConfigError(f"{prefix or 'config'}: expected a mapping (indented `key: value` lines){example}, "
                              f"got {_kind(data)}")
        self.data, self.prefix, self.base_dir, self.used = data, prefix, base_dir, set()

    def _key(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def _get(self, key: str, required: bool) -> Any:
        self.used.add(key)
        value = self.data.get(key)
        if value is None and required:
            # A misspelt key is reported as what the user typed, before the key it stands for is missed.
            typo = self._typo_of(key)
            if typo is not None:
                raise ConfigError(f"{self._key(typo)}: unknown key (did you mean {key}?)")
            raise ConfigError(f"{self._key(key)}: required" + (" (it is there, but has no value)"
                                                                 if key in self.data else ""))
        return value

    def _typo_of(self, key: str) -> str | None:
        """A key in the file, not read (yet), that looks like a misspelling of ``key``."""
        unread = [str(k) for k in self.data if str(k) not in self.used]
        folded = {_fold(k): k for k in unread}
        if _fold(key) in folded:
            return folded[_fold(key)]
        close = difflib.get_close_matches(key, unread, n=1, cutoff=0.8)
        return close[0] if close else None

    def section(self, key: str, required: bool = False) -> _Section:
        return _Section(self._get(key, required), self._key(key), self.base_dir)

    def list(self, key: str, required: bool = False) -> list:
        value = self._get(key, required)
        if value is not None and not isinstance(value, list):
            raise ConfigError(f"{self._key(key)}: expected a list (lines starting with `- `), got {_kind(value)}")
        return value or []

    def string(self, key: str, required: bool = False) -> str | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise ConfigError(f"{self._key(key)}: expected a text value, got {_kind(value)}")
        if not str(value).strip():
            raise ConfigError(f"{self._key(key)}: is empty")
        placeholder = _PLACEHOLDER.search(str(value))
        if placeholder is not None:
            raise ConfigError(f"{self._key(key)}: still contains the placeholder {placeholder.group(0)}; "
                              "fill in the real value")
        return str(value).strip()

    def string_list(self, key: str) -> list[str] | None:
        value = self._get(key, False)
        if value is None:
            return None
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self._key(key)}: expected a non-empty list of strings, got {_kind(value)}")
        return value

    def https_url(self, key: str, required: bool = False) -> str:
        value = self.string(key, required)
        if value is not None and not value.lower().startswith("https://"):
            raise ConfigError(f"{self._key(key)}: must be an https:// URL, got {value!r}")
        return value.rstrip("/") if value else value

    def number(self, key: str, default: float, *, minimum: float, maximum: float) -> float:
        value = self._get(key, False)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self._key(key)}: expected a number from {minimum} to {maximum}, got {_kind(value)}")
        if not minimum <= value <= maximum:
            raise ConfigError(f"{self._key(key)}: expected a number from {minimum} to {maximum}, got {value!r}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self._key(key)}: expected true or false, got {_kind(value)}")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self._get(key, False)
        if value is None:
            return default
        if value not in choices:
            raise ConfigError(f"{self._key(key)}: expected one of {', '.join(choices)}, got {value!r}")
        return value

    def address(self, key: str, default: str) -> Address:
        value = self._get(key, False)
        return parse_address(default if value is None else value, self._key(key))

    def path(self, key: str, must_exist: bool = False) -> Path | None:
        value = self.string(key)
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.base_dir / path
        if must_exist and not path.is_file():
            raise ConfigError(f"{self._key(key)}: file not found: {path}")
        return path

    def done(self) -> None:
        unknown = sorted(set(map(str, self.data)) - self.used)
        if unknown:
            known = {_fold(k): k for k in self.used}
            close = known.get(_fold(unknown[0])) or next(
                iter(difflib.get_close_matches(unknown[0], sorted(self.used), n=1, cutoff=0.6)), None)
            raise ConfigError(f"{self._key(unknown[0])}: unknown key " + (
                f"(did you mean {close}?)" if close else "(check the spelling; see config.example.yaml)"))


def _fold(key: str) -> str:
    """A key without case, spaces, dashes and underscores (clientId, client-id and client_id match)."""
    return re.sub(r"[\s_-]", "", str(key)).casefold()


def _kind(value: Any) -> str:
    """What the user wrote, in YAML's words, for "expected X, got Y" messages."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{str(value).lower()} (true/false)"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the text {value[:60]!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping (indented key: value lines)"
    return type(value).__name__
