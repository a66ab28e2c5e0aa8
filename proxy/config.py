"""Configuration: load a YAML file, validate it, and turn it into typed, immutable settings.

Every error names the key it is about (``imap.listen: ...``) so an admin can fix the file
without reading code. Relative paths are resolved against the config file's folder, so the
proxy behaves the same whatever directory a service manager starts it in.
"""

from __future__ import annotations

import ipaddress
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

    @property
    def msal_scopes(self) -> list[str]:
        """The scopes to hand to msal (without the ones msal adds itself)."""
        return [s for s in self.scopes if s not in MSAL_RESERVED_SCOPES]


@dataclass(frozen=True)
class ListenerConfig:
    listen: Address
    upstream: Address
    ca_file: Path | None = None
    allow_plaintext: bool = False
    upstream_tls: str = "implicit"  # "implicit" (IMAPS 993, SMTPS 465) or "starttls" (SMTP 587)


@dataclass(frozen=True)
class AccountConfig:
    username: str

    @property
    def key(self) -> str:
        """Case-insensitive identity of the account (mail addresses are case-insensitive)."""
        return self.username.casefold()


@dataclass(frozen=True)
class LimitsConfig:
    login_timeout: float = 25.0
    preauth_timeout: float = 60.0
    max_connections: int = 1000


@dataclass(frozen=True)
class Config:
    identity: IdentityConfig
    imap: ListenerConfig
    smtp: ListenerConfig
    token_path: Path
    accounts: tuple[AccountConfig, ...]
    limits: LimitsConfig = LimitsConfig()
    source: Path | None = None

    def account(self, username: str) -> AccountConfig | None:
        folded = username.casefold()
        for account in self.accounts:
            if account.key == folded:
                return account
        return None


def load_config(path: str | Path) -> Config:
    """Read and validate the YAML file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, base_dir=path.resolve().parent, source=path)


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
    )
    identity.done()

    imap_cfg = _listener(root.section("imap"), "127.0.0.1:1143", "outlook.office365.com:993", ("implicit",))
    smtp_cfg = _listener(root.section("smtp"), "127.0.0.1:1587", "smtp.office365.com:587",
                         ("starttls", "implicit"))
    if imap_cfg.listen == smtp_cfg.listen:
        raise ConfigError(f"smtp.listen: {smtp_cfg.listen} is already imap.listen")

    tokens = root.section("tokens")
    token_path = tokens.path("path") or (base_dir / "tokens")
    tokens.done()

    limits = root.section("limits")
    limits_cfg = LimitsConfig(
        login_timeout=limits.number("login_timeout", 25.0, minimum=1, maximum=300),
        preauth_timeout=limits.number("preauth_timeout", 60.0, minimum=1, maximum=3600),
        max_connections=int(limits.number("max_connections", 1000, minimum=1, maximum=1_000_000)),
    )
    limits.done()

    accounts = []
    seen: set[str] = set()
    for index, item in enumerate(root.list("accounts", required=True)):
        entry = _Section(item, f"accounts[{index}]", base_dir)
        username = entry.string("username", required=True)
        if any(c.isspace() or ord(c) < 32 for c in username):
            raise ConfigError(f"accounts[{index}].username: must not contain spaces or control characters")
        account = AccountConfig(username=username)
        if account.key in seen:
            raise ConfigError(f"accounts[{index}].username: {username!r} is listed twice")
        seen.add(account.key)
        entry.done()
        accounts.append(account)
    if not accounts:
        raise ConfigError("accounts: list at least one account")
    root.done()
    return Config(identity=identity_cfg, imap=imap_cfg, smtp=smtp_cfg, token_path=token_path,
                  accounts=tuple(accounts), limits=limits_cfg, source=source)


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
    )
    if not config.listen.is_loopback and not config.allow_plaintext:
        raise ConfigError(
            f"{name}.listen: {config.listen} is not a loopback address; passwords would cross the "
            f"network in clear. Listen on 127.0.0.1, or set {name}.allow_plaintext: true if you "
            "really mean it")
    section.done()
    return config


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
