"""Config validation: good files load, bad ones fail with an error naming the key."""

from pathlib import Path

import pytest
import yaml

from proxy.config import ConfigError, load_config, parse_config

CLIENT_ID = "1b2c3d4e-0000-4000-8000-00000000abcd"
BASE = {"identity": {"authority": "https://login.microsoftonline.com/organizations", "client_id": CLIENT_ID},
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
    # refusals that pass by themselves (Conditional Access, MFA): a login retries once a minute,
    # the background every 30 minutes
    assert (config.identity.refresh_retry_on_login, config.identity.refresh_retry_in_background) == (60, 1800)
    custom = parse({**BASE, "identity": {**BASE["identity"], "refresh_retry_on_login": 120,
                                         "refresh_retry_in_background": 600}})
    assert (custom.identity.refresh_retry_on_login, custom.identity.refresh_retry_in_background) == (120, 600)


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
    ({"identity": {**BASE["identity"], "refresh_retry_on_login": 0}}, "identity.refresh_retry_on_login"),
    ({"identity": {**BASE["identity"], "refresh_retry_in_background": "often"}}, "identity.refresh_retry_in_background"),
    ({"identity": {**BASE["identity"], "refresh_retry_in_background": 10}}, "identity.refresh_retry_in_background"),
    ({"limits": {"login_timeout": 0}}, "limits.login_timeout"),
    ({"limits": {"login_timeout": "fast"}}, "limits.login_timeout"),
    ({"extra": 1}, "extra: unknown key"),
    ({"limits": {"max_prelogin_connections": 0}}, "limits.max_prelogin_connections"),
    ({"limits": {"max_connections": 50, "max_prelogin_connections": 60}}, "limits.max_prelogin_connections"),
    ({"limits": {"prelogin_idle_timeout": 0.5}}, "limits.prelogin_idle_timeout"),
    ({"admin": {"listen": "0.0.0.0:9090"}}, "admin.listen: 0.0.0.0:9090 is not a loopback address"),
    ({"admin": {"listen": "0.0.0.0:9090", "token": "short"}}, "admin.token: the token must be at least 16"),
    ({"admin": {"token": "0123456789abcdef0123"}}, "admin.token: there is no admin.listen"),
    ({"admin": {"listen": "127.0.0.1:9090", "token_file": "missing"}}, "admin.token_file"),
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


# ------------------------------------------------------------------ what the user typed, named as typed
TENANT_ID = "9188040d-6c67-4c5b-b112-36a304b66dad"
MS = "https://login.microsoftonline.com"


@pytest.mark.parametrize("identity, message", [
    # a misspelt required key is an unknown key (with the right name), not a missing one
    ({"authority": f"{MS}/organizations", "clientid": CLIENT_ID},
     "identity.clientid: unknown key (did you mean client_id?)"),
    ({"authority": f"{MS}/organizations", "ClientId": CLIENT_ID},
     "identity.ClientId: unknown key (did you mean client_id?)"),
    ({"authorty": f"{MS}/organizations", "client_id": CLIENT_ID},
     "identity.authorty: unknown key (did you mean authority?)"),
    ({"authority": f"{MS}/organizations", "client_id": CLIENT_ID, "time_out": 5},
     "identity.time_out: unknown key (did you mean timeout?)"),
    ({"authority": f"{MS}/organizations", "client_id": None},
     "identity.client_id: required (it is there, but has no value)"),
    ({"authority": f"{MS}/organizations"}, "identity.client_id: required"),
    # placeholders and endpoint addresses pasted as the authority
    ({"authority": f"{MS}/<tenant-id>", "client_id": CLIENT_ID},
     "identity.authority: still contains the placeholder <tenant-id>"),
    ({"authority": f"{MS}/{TENANT_ID}/oauth2/v2.0/authorize", "client_id": CLIENT_ID},
     f"identity.authority: '{MS}/{TENANT_ID}/oauth2/v2.0/authorize' is the authorize endpoint, not the "
     f"authority; use only the part up to the tenant: {MS}/{TENANT_ID}"),
    ({"authority": f"{MS}/{TENANT_ID}/oauth2/v2.0/token", "client_id": CLIENT_ID},
     f"is the token endpoint, not the authority; use only the part up to the tenant: {MS}/{TENANT_ID}"),
    ({"authority": f"{MS}/organizations/v2.0/.well-known/openid-configuration", "client_id": CLIENT_ID},
     f"is the OpenID configuration address, not the authority; use only the part up to the tenant: "
     f"{MS}/organizations"),
    ({"authority": f"{MS}/{TENANT_ID}/v2.0", "client_id": CLIENT_ID}, "is the issuer address"),
    ({"authority": "https://idp.example/t/oauth2/authorize?client_id=x", "client_id": "x"},
     "use only the part up to the tenant: https://idp.example/t"),
    ({"authority": MS, "client_id": CLIENT_ID}, f"identity.authority: '{MS}' names no tenant"),
    ({"authority": f"{MS}/kanzlei", "client_id": CLIENT_ID}, "identity.authority: 'kanzlei' is not a tenant"),
    ({"authority": f"{MS}/{TENANT_ID}/extra", "client_id": CLIENT_ID}, "has more than the tenant"),
    # client ids on Microsoft's hosts are GUIDs
    ({"authority": f"{MS}/organizations", "client_id": "kanzlei-proxy"},
     "identity.client_id: 'kanzlei-proxy' is not an Application (client) ID"),
    ({"authority": f"{MS}/organizations", "client_id": "Xy8Q~abcdefghijklmnopqrstuvwxyz0123456"},
     "is not an Application (client) ID"),                                   # the secret pasted instead
    ({"authority": f"{MS}/{TENANT_ID}", "client_id": TENANT_ID}, "is the Directory (tenant) ID"),
    ({"authority": f"{MS}/{TENANT_ID}", "client_id": CLIENT_ID,
      "app_only": {"client_id": "robot", "client_secret": "s"}},
     "identity.app_only.client_id: 'robot' is not an Application (client) ID"),
    ({"authority": f"{MS}/organizations", "client_id": CLIENT_ID,
      "app_only": {"authority": f"{MS}/{TENANT_ID}/oauth2/v2.0/token", "client_secret": "s"}},
     "identity.app_only.authority: "),
])
def test_identity_mistakes_are_caught_offline(identity, message):
    with pytest.raises(ConfigError) as info:
        parse({**BASE, "identity": identity})
    assert message in str(info.value)
    assert str(info.value).startswith(message.split(":")[0] if message.startswith("identity") else "identity")


@pytest.mark.parametrize("authority, client_id", [
    (f"{MS}/organizations", CLIENT_ID),
    (f"{MS}/{TENANT_ID.upper()}", CLIENT_ID.upper()),
    (f"{MS}/firm.onmicrosoft.com", CLIENT_ID),
    (f"{MS}/common/", CLIENT_ID),
    ("https://login.microsoftonline.us/organizations", CLIENT_ID),
    # other identity providers (ADFS, the tests' own) are not held to Microsoft's id formats
    ("https://127.0.0.1:8443/test-tenant", "test-client"),
    ("https://adfs.firm.de/adfs", "proxy"),
])
def test_good_authorities_and_client_ids(authority, client_id):
    identity = parse({**BASE, "identity": {"authority": authority, "client_id": client_id}}).identity
    assert identity.authority == authority.rstrip("/") and identity.client_id == client_id


@pytest.mark.parametrize("patch, message", [
    ({"identity": {"authority": f"{MS}/organizations", "client_id": ["a"]}},
     "identity.client_id: expected a text value, got a list"),
    ({"limits": {"login_timeout": "fast"}}, "limits.login_timeout: expected a number from 1 to 300, got the text 'fast'"),
    ({"limits": {"login_timeout": True}}, "limits.login_timeout: expected a number from 1 to 300, got true"),
    ({"imap": {"allow_plaintext": "yes"}}, "imap.allow_plaintext: expected true or false, got the text 'yes'"),
    ({"accounts": "alice@firm.de"}, "accounts: expected a list (lines starting with `- `), got the text"),
    ({"accounts": ["alice@firm.de"]}, "accounts[0]: expected a mapping (indented `key: value` lines) "
                                      "(for example `- username: alice@firm.de`), got the text 'alice@firm.de'"),
    ({"identity": f"{MS}/organizations"}, "identity: expected a mapping"),
    ({"tokens": "./tokens"}, "tokens: expected a mapping"),
    ({"imap": {"listen": 1143}}, "imap.listen: expected host:port"),
    ({"accounts": [{"username": ""}]}, "accounts[0].username: is empty"),
])
def test_wrong_types_are_reported_as_wrong_types(patch, message):
    with pytest.raises(ConfigError) as info:
        parse({**BASE, **patch})
    assert message in str(info.value) and "required" not in str(info.value)


def test_errors_from_environment_variables_name_the_variable(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cases = {
        "PROXY_LIMITS_LOGIN_TIMEOUT": ("fast", "limits.login_timeout (from environment variable "
                                               "PROXY_LIMITS_LOGIN_TIMEOUT): expected a number"),
        "PROXY_IMAP_LISTEN": ("0.0.0.0:1143", "imap.listen (from environment variable PROXY_IMAP_LISTEN): "
                                              "0.0.0.0:1143 is not a loopback address"),
        "PROXY_IDENTITY_CLIENTID": (CLIENT_ID, "identity.clientid (from environment variable "
                                               "PROXY_IDENTITY_CLIENTID): unknown key (did you mean "
                                               "PROXY_IDENTITY_CLIENT_ID?)"),
        "PROXY_IDENTTY_CLIENT_ID": (CLIENT_ID, "environment variable PROXY_IDENTTY_CLIENT_ID: there is no config "
                                               "section 'identty' (did you mean PROXY_IDENTITY_CLIENT_ID?)"),
        "PROXY_IDENTITY_AUTHORITY": (f"{MS}/<tenant-id>", "identity.authority (from environment variable "
                                                          "PROXY_IDENTITY_AUTHORITY): still contains the placeholder"),
    }
    for name, (value, message) in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(path, {name: value})
        assert message in str(info.value), name
    # the command line's own variables and other programs' are not config keys
    assert load_config(path, {"PROXY_LOG_LEVEL": "DEBUG", "PROXY_CONFIG": "x", "OTHER_IMAP_LISTEN": "x"})
    # a YAML error in the same key is not blamed on the environment
    path.write_text(yaml.safe_dump({**BASE, "limits": {"login_timeout": "fast"}}))
    with pytest.raises(ConfigError, match=r"^limits\.login_timeout: expected a number"):
        load_config(path, {})


# ------------------------------------------------------------------ pop3 (optional section)
IMAP_SMTP_SCOPES = ("https://outlook.office.com/IMAP.AccessAsUser.All", "https://outlook.office.com/SMTP.Send",
                    "offline_access")
POP = "https://outlook.office.com/POP.AccessAsUser.All"


def test_no_pop3_section_no_pop3_listener_and_no_pop_scope(tmp_path):
    config = parse(BASE, tmp_path)
    assert config.pop3 is None and config.identity.scopes == IMAP_SMTP_SCOPES


@pytest.mark.parametrize("section", [None, {}, {"listen": "127.0.0.1:1110"}])
def test_pop3_defaults_and_the_pop_scope(section, tmp_path):
    config = parse({**BASE, "pop3": section}, tmp_path)   # even an empty "pop3:" turns it on
    assert (str(config.pop3.listen), str(config.pop3.upstream)) == ("127.0.0.1:1110", "outlook.office365.com:995")
    assert config.pop3.upstream_tls == "implicit" and config.pop3.tls_listen is None
    assert config.identity.scopes == (*IMAP_SMTP_SCOPES[:2], POP, "offline_access")
    assert config.identity.msal_scopes == [*IMAP_SMTP_SCOPES[:2], POP]
    assert config.identity.app_only is None                # app-only: POP.AccessAsApp comes with .default


def test_pop3_settings_and_tls_listeners(tmp_path):
    from proxy.certs import create_local_certs
    certs, _ = create_local_certs(tmp_path / "certs")
    tls = {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)}
    config = parse({**BASE, "tls": tls, "pop3": {"listen": "0.0.0.0:1110", "starttls": "required",
                                                 "tls_listen": "0.0.0.0:1995", "upstream": "pop.example:995",
                                                 "ca_file": str(certs.cert_file)}}, tmp_path)
    assert config.pop3.starttls == "required" and config.pop3.tls_listen.port == 1995
    assert not config.pop3.plaintext_exposed and config.pop3.ca_file == certs.cert_file


@pytest.mark.parametrize("patch, key", [
    ({"pop3": {"listen": "0.0.0.0:1110"}}, "pop3.listen: 0.0.0.0:1110 is not a loopback address"),
    ({"pop3": {"listen": "127.0.0.1:1143"}}, "pop3.listen: 127.0.0.1:1143 is already imap.listen"),
    ({"pop3": {"upstream_tls": "starttls"}}, "pop3.upstream_tls: expected one of implicit"),
    ({"pop3": {"starttls": True}}, "tls: pop3 offers TLS"),
    ({"pop3": {"tls_listen": "127.0.0.1:1995"}}, "tls: pop3 offers TLS"),
    ({"pop3": {"lisen": "127.0.0.1:1110"}}, "pop3.lisen: unknown key"),
    ({"pop3": {"ca_file": "missing.pem"}}, "pop3.ca_file: file not found"),
    ({"pop3": "yes"}, "pop3: expected a mapping"),
    ({"pop": {}}, "pop: unknown key (did you mean pop3?)"),
    ({"pop3": {}, "identity": {**BASE["identity"], "scopes": list(IMAP_SMTP_SCOPES)}},
     "identity.scopes: the pop3 section needs https://outlook.office.com/POP.AccessAsUser.All"),
])
def test_pop3_errors_name_the_key(patch, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        parse({**BASE, **patch}, tmp_path)
    assert key in str(info.value)


def test_explicit_scopes_with_pop_and_app_only_accounts(tmp_path):
    scopes = [*IMAP_SMTP_SCOPES[:2], "https://outlook.office365.com/POP.AccessAsUser.All", "offline_access"]
    config = parse({**BASE, "pop3": {}, "identity": {**BASE["identity"], "scopes": scopes}}, tmp_path)
    assert config.identity.scopes == tuple(scopes)
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    app_only = {**BASE, "pop3": {}, "accounts": [{"username": "robot@firm.de", "flow": "client_credentials"}],
                "identity": {"authority": f"{MS}/{TENANT_ID}", "client_id": BASE["identity"]["client_id"],
                             "scopes": list(IMAP_SMTP_SCOPES),  # not used by app-only accounts: no error
                             "app_only": {"client_secret_file": str(secret)}}}
    assert parse(app_only, tmp_path).pop3 is not None


def test_pop3_from_the_environment(tmp_path):
    from proxy.config import apply_env_overrides
    data = apply_env_overrides(BASE, {"PROXY_POP3_LISTEN": "127.0.0.1:2110"})
    assert str(parse(data, tmp_path).pop3.listen) == "127.0.0.1:2110"


def test_limits_and_admin_token(tmp_path):
    config = parse(BASE, tmp_path)
    assert (config.limits.max_prelogin_connections, config.limits.prelogin_idle_timeout) == (100, 10)
    assert parse({**BASE, "limits": {"max_connections": 20}}).limits.max_prelogin_connections == 20
    (tmp_path / "admin-token").write_text("0123456789abcdef-from-a-file\n")
    admin = parse({**BASE, "admin": {"listen": "0.0.0.0:9090", "token_file": "admin-token"}}, tmp_path).admin
    assert admin.token == "0123456789abcdef-from-a-file" and "from-a-file" not in repr(admin)
    assert parse({**BASE, "admin": {"listen": "127.0.0.1:9090"}}).admin.token is None
