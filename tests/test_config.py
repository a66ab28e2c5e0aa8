"""Config validation: good files load, bad ones fail with an error naming the key."""

from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config, parse_config

BASE = {"identity": {"authority": "https://login.microsoftonline.com/organizations", "client_id": "abc"},
        "accounts": [{"username": "alice@firm.de"}]}


def parse(data, tmp_path=Path(".")):
    return parse_config(data, base_dir=tmp_path)


def test_defaults(tmp_path):
    config = parse(BASE, tmp_path)
    assert str(config.imap.listen) == "127.0.0.1:1143"
    assert str(config.imap.upstream) == "outlook.office365.com:993"
    assert str(config.smtp.listen) == "127.0.0.1:1587"
    assert (str(config.smtp.upstream), config.smtp.upstream_tls) == ("smtp.office365.com:587", "starttls")
    assert parse({**BASE, "smtp": {"upstream": "mail.example:465"}}).smtp.upstream_tls == "implicit"
    assert config.token_path == tmp_path / "tokens"
    assert config.limits.login_timeout < 30
    assert "offline_access" in config.identity.scopes
    assert "offline_access" not in config.identity.msal_scopes
    assert config.account("ALICE@firm.DE").username == "alice@firm.de"
    assert config.account("bob@firm.de") is None


def test_example_config_is_complete_apart_from_placeholders(tmp_path):
    text = Path(__file__).resolve().parent.parent.joinpath("config.example.yaml").read_text()
    path = tmp_path / "config.yaml"
    path.write_text(text.replace("<app registration id>", "11111111-2222-3333-4444-555555555555"))
    config = load_config(path)
    assert config.accounts[0].username == "alice@firm.de"
    assert config.token_path == tmp_path / "tokens"


@pytest.mark.parametrize("patch, key", [
    ({"identity": None}, "identity: required"),
    ({"identity": {"authority": "http://x/y", "client_id": "a"}}, "identity.authority"),
    ({"identity": {"authority": "https://x/y"}}, "identity.client_id: required"),
    ({"identity": {"authority": "https://x/y", "client_id": "<app registration id>"}}, "identity.client_id"),
    ({"imap": {"listen": "1143"}}, "imap.listen"),
    ({"imap": {"listen": "127.0.0.1:99999"}}, "imap.listen"),
    ({"imap": {"listen": "0.0.0.0:1143"}}, "imap.listen"),
    ({"imap": {"upstream": "host"}}, "imap.upstream"),
    ({"imap": {"ca_file": "missing.pem"}}, "imap.ca_file"),
    ({"imap": {"lisen": "127.0.0.1:1"}}, "imap.lisen: unknown key"),
    ({"smtp": {"listen": "10.1.2.3:25"}}, "smtp.listen"),
    ({"smtp": {"upstream_tls": "ssl"}}, "smtp.upstream_tls"),
    ({"smtp": {"listen": "127.0.0.1:1143"}}, "smtp.listen"),
    ({"imap": {"upstream_tls": "starttls"}}, "imap.upstream_tls"),
    ({"accounts": []}, "accounts"),
    ({"accounts": [{"username": "a@b"}, {"username": "A@B"}]}, "accounts[1].username"),
    ({"accounts": [{"user": "a@b"}]}, "accounts[0].username: required"),
    ({"limits": {"login_timeout": 0}}, "limits.login_timeout"),
    ({"limits": {"login_timeout": "fast"}}, "limits.login_timeout"),
    ({"extra": 1}, "extra: unknown key"),
])
def test_errors_name_the_key(patch, key, tmp_path):
    data = {**BASE, **patch}
    with pytest.raises(ConfigError) as info:
        parse(data, tmp_path)
    assert key in str(info.value)


def test_public_listen_needs_explicit_opt_in(tmp_path):
    config = parse({**BASE, "imap": {"listen": "0.0.0.0:1143", "allow_plaintext": True}}, tmp_path)
    assert not config.imap.listen.is_loopback
    assert parse({**BASE, "imap": {"listen": "[::1]:1143"}}, tmp_path).imap.listen.is_loopback


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("identity: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
