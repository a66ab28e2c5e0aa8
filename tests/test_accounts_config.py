"""Issue 4 without peers: the new account keys (mailbox, token, flow, identity.app_only), the
choice of the default sign-in flow, the advice for Microsoft's error texts, and the reading of
a token's permissions."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from proxy.authorize import browser_unavailable
from proxy.permissions import granted_permissions
from proxy.config import FLOW_CLIENT_CREDENTIALS, FLOW_DELEGATED, ConfigError, parse_config
from proxy.hints import hint_for, imap_refused_hint, smtp_refused_hint

TENANT = "https://login.microsoftonline.com/9188040d-6c67-4c5b-b112-36a304b66dad"
PUBLIC_APP = "0b7a1c2d-3e4f-4a5b-8c6d-7e8f9a0b1c2d"    # Microsoft client ids are GUIDs (checked offline)
ROBOT_APP = "5f6e7d8c-9b0a-4c1d-9e2f-3a4b5c6d7e8f"


def parse(accounts, app_only=None, authority=TENANT, base_dir=Path(".")):
    identity = {"authority": authority, "client_id": PUBLIC_APP}
    if app_only is not None:
        identity["app_only"] = app_only
    return parse_config({"identity": identity, "accounts": accounts}, base_dir=base_dir)


def test_mailbox_token_owner_and_flow_are_resolved():
    config = parse([{"username": "Alice@firm.de"},
                    {"username": "archiv@firm.de", "token": "alice@FIRM.de"},
                    {"username": "team@firm.de", "mailbox": "team-box@firm.de", "token": "it@firm.de"},
                    {"username": "robot@firm.de", "mailbox": "akten@firm.de", "flow": "client_credentials"}],
                   app_only={"client_secret": "s3cret-value"})
    alice, archiv, team, robot = config.accounts
    assert (alice.mailbox, alice.owner, alice.flow, alice.shared) == ("Alice@firm.de", "Alice@firm.de",
                                                                     FLOW_DELEGATED, False)
    assert (archiv.mailbox, archiv.owner, archiv.shared) == ("archiv@firm.de", "Alice@firm.de", True)
    assert (team.mailbox, team.owner, team.flow) == ("team-box@firm.de", "it@firm.de", FLOW_DELEGATED)
    assert (robot.mailbox, robot.owner, robot.flow) == ("akten@firm.de", "robot@firm.de", FLOW_CLIENT_CREDENTIALS)
    assert [a.username for a in config.sharing("alice@firm.de")] == ["Alice@firm.de", "archiv@firm.de"]
    assert config.owner_account("IT@firm.de").username == "it@firm.de"   # an owner that is no account
    assert config.owner_account("nobody@firm.de") is None
    app = config.identity.app_only
    assert (app.client_id, app.authority, app.scope) == (PUBLIC_APP, TENANT, "https://outlook.office365.com/.default")
    assert app.credential == "s3cret-value" and "s3cret" not in repr(config)


@pytest.mark.parametrize("accounts, app_only, authority, key", [
    ([{"username": "a@x.de"}, {"username": "b@x.de", "token": "a@x.de", "flow": "client_credentials"}], None,
     TENANT, "accounts[1].flow"),
    ([{"username": "a@x.de", "token": "c@x.de"}, {"username": "b@x.de", "token": "a@x.de"}], None, TENANT,
     "accounts[1].token"),
    ([{"username": "a@x.de", "mailbox": "a b@x.de"}], None, TENANT, "accounts[0].mailbox"),
    ([{"username": "a@x.de", "flow": "password"}], None, TENANT, "accounts[0].flow"),
    ([{"username": "a@x.de", "flow": "client_credentials"}], None, TENANT, "accounts[0].flow"),
    ([{"username": "a@x.de"}], {"client_secret": "s"}, "https://login.microsoftonline.com/organizations",
     "identity.app_only.authority"),
    ([{"username": "a@x.de"}], {"client_secret": "s", "certificate_file": "junk.pem"}, TENANT, "identity.app_only"),
    ([{"username": "a@x.de"}], {"client_secret": "s", "scope": "https://outlook.office365.com/IMAP.AccessAsApp"},
     TENANT, "identity.app_only.scope"),
    ([{"username": "a@x.de"}], {"client_secret_file": "missing.txt"}, TENANT, "identity.app_only.client_secret_file"),
    ([{"username": "a@x.de"}], {"certificate_file": "junk.pem"}, TENANT, "identity.app_only.certificate_file"),
])
def test_bad_account_settings_name_the_key(accounts, app_only, authority, key, tmp_path):
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError) as info:
        parse(accounts, app_only, authority, tmp_path)
    assert str(info.value).startswith(key + ":"), info.value


def test_app_only_credentials_from_files(tmp_path):
    (tmp_path / "secret.txt").write_text("  from-a-file \n")
    config = parse([{"username": "a@x.de", "flow": "client_credentials"}],
                   {"client_id": ROBOT_APP, "client_secret_file": "secret.txt"}, base_dir=tmp_path)
    assert config.identity.app_only.credential == "from-a-file"
    assert config.identity.app_only.client_id == ROBOT_APP
    pem = ("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
           "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n")
    (tmp_path / "app.pem").write_text(pem)
    app = parse([{"username": "a@x.de"}], {"certificate_file": "app.pem"}, base_dir=tmp_path).identity.app_only
    assert app.credential == {"private_key": "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----",
                              "public_certificate": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"}
    assert "MIIE" not in repr(app)


def test_device_flow_is_chosen_where_no_browser_can_open():
    assert browser_unavailable({}, "linux") == ("no graphical display here (DISPLAY and WAYLAND_DISPLAY are unset) "
                                                "and BROWSER is not set")
    assert browser_unavailable({"BROWSER": "firefox %s"}, "linux") is None      # the user's explicit choice
    assert browser_unavailable({"BROWSER": ""}, "linux") is not None
    # with a display (or on Windows/macOS) it depends on whether Python finds a browser at all
    for env, platform in (({"DISPLAY": ":0"}, "linux"), ({"WAYLAND_DISPLAY": "wayland-0"}, "linux"), ({}, "win32")):
        reason = browser_unavailable(env, platform)
        assert reason is None or reason == "Python finds no web browser on this computer"


def test_advice_for_microsofts_errors():
    assert "Grant admin consent" in hint_for("invalid_grant: AADSTS65001: The user or administrator has not consented")
    assert "client_id" in hint_for("invalid_client: AADSTS700016: Application with identifier 'x' was not found")
    assert "Value (not its ID)" in hint_for("AADSTS7000215: Invalid client secret provided.")
    assert "Allow public client flows" in hint_for("invalid_client: AADSTS7000218: The request body must contain")
    assert "proxy authorize" in hint_for("invalid_grant: AADSTS700082: The refresh token has expired")
    assert "http://localhost" in hint_for("AADSTS50011: The redirect URI 'x' specified in the request does not match")
    smtp = hint_for("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.")
    assert "Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false" in smtp
    assert "-Identity box@firm.de" in smtp_refused_hint("535 5.7.139 Authentication unsuccessful", "box@firm.de",
                                                        "a@firm.de", False)
    assert hint_for("something nobody knows") is None
    assert "ImapEnabled $true" in imap_refused_hint("a@firm.de", "a@firm.de", False)
    shared = imap_refused_hint("archiv@firm.de", "a@firm.de", False)
    assert "Add-MailboxPermission -Identity archiv@firm.de -User a@firm.de -AccessRights FullAccess" in shared
    assert "New-ServicePrincipal" in imap_refused_hint("archiv@firm.de", "robot", True)


def test_permissions_are_read_from_jwt_claims_or_the_scope_field():
    def jwt(claims):
        part = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        return f"eyJ0eXAiOiJKV1QifQ.{part}.signature"

    assert granted_permissions(jwt({"scp": "IMAP.AccessAsUser.All SMTP.Send"}), None) == {
        "IMAP.AccessAsUser.All", "SMTP.Send"}
    assert granted_permissions(jwt({"roles": ["IMAP.AccessAsApp"]}), None) == {"IMAP.AccessAsApp"}
    assert granted_permissions("opaque", "https://outlook.office.com/IMAP.AccessAsUser.All offline_access") == {
        "https://outlook.office.com/IMAP.AccessAsUser.All"}
    assert granted_permissions("opaque", "https://outlook.office365.com/.default") is None   # names nothing
    assert granted_permissions("opaque", None) is None
