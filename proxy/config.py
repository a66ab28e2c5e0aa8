"""Configuration: load a YAML file, validate it, and turn it into typed, immutable settings.

Every error names the key it is about (``imap.listen: ...``) so an admin can fix the file
without reading code. Relative paths are resolved against the config file's folder, so the
proxy behaves the same whatever directory a service manager starts it in.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_SCOPES = (
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "https://outlook.office.com/SMTP.Send",
    "offline_access",
)
# msal adds these itself and refuses them in a scope list.
MSAL_RESERVED_SCOPES = frozenset({"offline_access", "openid", "profile"})
# imap.starttls / smtp.starttls: STARTTLS on the plain listener.
STARTTLS_OFF, STARTTLS_ON, STARTTLS_REQUIRED = "off", "on", "required"
# Environment variables PROXY_<SECTION>_<KEY> override these sections' single-value keys
# (see docs/container.md), e.g. PROXY_IMAP_LISTEN=0.0.0.0:1143, PROXY_TOKENS_PATH=/tokens.
ENV_PREFIX = "PROXY_"
ENV_SECTIONS = ("identity", "imap", "smtp", "tls", "tokens", "admin", "limits")


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

    @property
    def msal_scopes(self) -> list[str]:
        """The scopes to hand to msal (without the ones msal adds itself)."""
        return [s for s in self.scopes if s not in MSAL_RESERVED_SCOPES]


@dataclass(frozen=True)
class ListenerConfig:
    """``imap`` / ``smtp``: where clients connect, and the upstream server."""

    listen: Address
    upstream: Address
    ca_file: Path | None = None
    allow_plaintext: bool = False
    upstream_tls: str = "implicit"  # "implicit" (IMAPS 993, SMTPS 465) or "starttls" (SMTP 587)
    starttls: str = STARTTLS_OFF    # on the plain listener: off, on (offered) or required (before login)
    tls_listen: Address | None = None  # a second listener with implicit TLS (IMAPS, SMTPS)

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
    """``admin``: the HTTP listener for /healthz, /readyz and /metrics (off unless configured)."""

    listen: Address


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


@dataclass(frozen=True)
class LimitsConfig:
    login_timeout: float = 25.0
    preauth_timeout: float = 60.0
    max_connections: int = 1000
    shutdown_grace: float = 30.0  # seconds open sessions get to finish after SIGTERM


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


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the YAML file at ``path``, with ``PROXY_<SECTION>_<KEY>`` overrides from
    ``environ`` (default: the process environment; pass ``{}`` for none)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if environ is None:
        environ = os.environ
    return parse_config(apply_env_overrides(data, environ), base_dir=path.resolve().parent, source=path)


def parse_config(data: Any, *, base_dir: Path, source: Path | None = None) -> Config:
    """Validate an already-parsed YAML document."""
    root = _Section(data, "", base_dir)
    identity = root.section("identity", required=True)
    identity_cfg = IdentityConfig(
        authority=identity.https_url("authority", required=True),
        client_id=identity.string("client_id", required=True),
        client_secret=identity.string("client_secret"),
        ca_file=identity.path("ca_file", must_exist=True),
        scopes=tuple(identity.string_list("scopes") or DEFAULT_SCOPES),
        timeout=identity.number("timeout", 10.0, minimum=1, maximum=60),
        app_only=_app_only(identity.section("app_only"), identity),
    )
    identity.done()

    imap_cfg = _listener(root.section("imap"), "127.0.0.1:1143", "outlook.office365.com:993", ("implicit",))
    smtp_cfg = _listener(root.section("smtp"), "127.0.0.1:1587", "smtp.office365.com:587",
                         ("starttls", "implicit"))
    if imap_cfg.listen == smtp_cfg.listen:
        raise ConfigError(f"smtp.listen: {smtp_cfg.listen} is already imap.listen")
    tls_cfg = _tls_section(root.section("tls"), {"imap": imap_cfg, "smtp": smtp_cfg})
    admin = root.section("admin")
    admin_cfg = AdminConfig(listen=admin.address("listen", "")) if admin.data.get("listen") is not None else None
    admin.done()
    _check_addresses({"imap.listen": imap_cfg.listen, "imap.tls_listen": imap_cfg.tls_listen,
                      "smtp.listen": smtp_cfg.listen, "smtp.tls_listen": smtp_cfg.tls_listen,
                      "admin.listen": admin_cfg.listen if admin_cfg else None})

    tokens = root.section("tokens")
    token_path = tokens.path("path") or (base_dir / "tokens")
    tokens.done()

    limits = root.section("limits")
    limits_cfg = LimitsConfig(
        login_timeout=limits.number("login_timeout", 25.0, minimum=1, maximum=300),
        preauth_timeout=limits.number("preauth_timeout", 60.0, minimum=1, maximum=3600),
        max_connections=int(limits.number("max_connections", 1000, minimum=1, maximum=1_000_000)),
        shutdown_grace=limits.number("shutdown_grace", 30.0, minimum=0, maximum=3600),
    )
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
    root.done()
    return Config(identity=identity_cfg, imap=imap_cfg, smtp=smtp_cfg, token_path=token_path,
                  accounts=tuple(accounts), limits=limits_cfg, source=source, tls=tls_cfg, admin=admin_cfg)


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
    authority = section.https_url("authority") or identity.data.get("authority", "")
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
    return config


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


def _listener(section: "_Section", listen: str, upstream: str, tls_modes: tuple[str, ...]) -> ListenerConfig:
    name = section.prefix
    upstream_address = section.address("upstream", upstream)
    default_tls = "implicit" if upstream_address.port in (465, 993) or len(tls_modes) == 1 else "starttls"
    config = ListenerConfig(
        listen=section.address("listen", listen),
        upstream=upstream_address,
        ca_file=section.path("ca_file", must_exist=True),
        allow_plaintext=section.boolean("allow_plaintext", False),
        upstream_tls=section.choice("upstream_tls", default_tls, tls_modes),
        starttls=_starttls_mode(section),
        tls_listen=section.address("tls_listen", "") if section.data.get("tls_listen") is not None else None,
    )
    if config.plaintext_exposed and not config.allow_plaintext:
        raise ConfigError(
            f"{name}.listen: {config.listen} is not a loopback address; passwords would cross the "
            f"network in clear. Listen on 127.0.0.1, require TLS ({name}.starttls: required, or keep "
            f"{name}.listen on loopback and use {name}.tls_listen for implicit TLS), or set "
            f"{name}.allow_plaintext: true if you really mean it")
    section.done()
    return config


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


def _tls_section(section: "_Section", listeners: dict[str, ListenerConfig]) -> TlsConfig | None:
    """``tls``: needed when a listener offers TLS; both files must exist."""
    users = [name for name, listener in listeners.items() if listener.uses_tls]
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
    data = dict(data)
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
        if section not in ENV_SECTIONS or not key:
            continue
        current = data.get(section)
        if current is not None and not isinstance(current, dict):
            continue  # the normal validation reports the section itself
        data[section] = {**(current or {}), key: _env_value(raw)}
    return data


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
            raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {type(data).__name__}")
        self.data, self.prefix, self.base_dir, self.used = data, prefix, base_dir, set()

    def _key(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def _get(self, key: str, required: bool) -> Any:
        self.used.add(key)
        value = self.data.get(key)
        if value is None and required:
            raise ConfigError(f"{self._key(key)}: required")
        return value

    def section(self, key: str, required: bool = False) -> _Section:
        return _Section(self._get(key, required), self._key(key), self.base_dir)

    def list(self, key: str, required: bool = False) -> list:
        value = self._get(key, required)
        if value is not None and not isinstance(value, list):
            raise ConfigError(f"{self._key(key)}: expected a list")
        return value or []

    def string(self, key: str, required: bool = False) -> str | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
            raise ConfigError(f"{self._key(key)}: expected a non-empty string")
        if str(value).startswith("<"):
            raise ConfigError(f"{self._key(key)}: still the placeholder {value!r}; fill in the real value")
        return str(value).strip()

    def string_list(self, key: str) -> list[str] | None:
        value = self._get(key, False)
        if value is None:
            return None
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self._key(key)}: expected a non-empty list of strings")
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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= value <= maximum:
            raise ConfigError(f"{self._key(key)}: expected a number from {minimum} to {maximum}, got {value!r}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self._key(key)}: expected true or false, got {value!r}")
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
            raise ConfigError(f"{self._key(unknown[0])}: unknown key (check the spelling; "
                              f"see config.example.yaml)")
