"""The test bed works with real peers: msal against the identity provider, Dovecot's IMAP and
submission services validating its tokens, the SMTP sink keeping exact bytes, and the faults
the proxy's tests will rely on."""

from __future__ import annotations

import base64
import html.parser
import imaplib
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import msal
import pytest
import requests

from tests.dovecot import Dovecot
from tests.idp import CONFIDENTIAL_CLIENT_ID, IdentityProvider
from tests.pki import TestPKI
from tests.sink import SinkServer

SCOPES = ["https://outlook.office.com/IMAP.AccessAsUser.All", "https://outlook.office.com/SMTP.Send"]
APP_SCOPE = ["https://outlook.office365.com/.default"]
REDIRECT_URI = "http://localhost:8400"
MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: test bed\r\n"
           b"Message-ID: <testbed@example.com>\r\n\r\nHello,\r\n.a line starting with a dot\r\n"
           b"caf\xc3\xa9 (8-bit)\r\n\r\n-- \r\nAlice\r\n")


# ------------------------------------------------------------------ helpers
class _FormParser(html.parser.HTMLParser):
    """The first form of an HTML page: action, method and the inputs that have a name."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.method = "get"
        self.fields: dict[str, str] = {}
        self._done = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        if tag == "form" and self.action is None:
            self.action, self.method = attributes.get("action", ""), attributes.get("method", "get").lower()
        elif tag == "input" and self.action is not None and not self._done and attributes.get("name"):
            self.fields[attributes["name"]] = attributes.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        self._done = self._done or tag == "form"


def parse_form(page: str) -> _FormParser:
    parser = _FormParser()
    parser.feed(page)
    assert parser.action is not None, f"no form in {page[:300]!r}"
    return parser


def make_app(idp: IdentityProvider, **kwargs: object) -> msal.PublicClientApplication:
    return msal.PublicClientApplication(idp.client_id, authority=idp.authority(), instance_discovery=False,
                                        http_client=idp.http_session(), **kwargs)


def browser_sign_in(idp: IdentityProvider, auth_uri: str, redirect_uri: str) -> dict[str, str]:
    """Play the browser: open the sign-in page, submit it, and catch what goes to ``redirect_uri``."""
    http = idp.http_session()
    page = http.get(auth_uri, timeout=10)
    assert page.status_code == 200, page.text
    form = parse_form(page.text)
    assert form.method == "post" and "username" in form.fields
    answer = http.post(urllib.parse.urljoin(auth_uri, form.action), data=form.fields, allow_redirects=False,
                       timeout=10)
    if answer.status_code == 302:  # response_mode=query
        location = answer.headers["Location"]
        assert location.startswith(redirect_uri + "?")
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))
    assert answer.status_code == 200, answer.text  # response_mode=form_post: an auto-submitting form
    redirect = parse_form(answer.text)
    assert (redirect.action, redirect.method) == (redirect_uri, "post")
    assert "document.forms[0].submit()" in answer.text
    return redirect.fields


def sign_in(idp: IdentityProvider, user: str = "alice@example.com",
            response_mode: str = "form_post") -> tuple[msal.PublicClientApplication, dict]:
    """The authorization code flow with PKCE, as ``proxy authorize`` runs it; returns msal's result."""
    app = make_app(idp)
    flow = app.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT_URI, login_hint=user,
                                       response_mode=response_mode)
    result = app.acquire_token_by_auth_code_flow(flow, browser_sign_in(idp, flow["auth_uri"], REDIRECT_URI))
    assert "access_token" in result, result
    return app, result


def xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def imap_login(dovecot: Dovecot, pki: TestPKI, user: str, token: str) -> imaplib.IMAP4_SSL:
    """XOAUTH2 login over IMAPS; answers Dovecot's ``+ <base64 JSON>`` error challenge with an empty line."""
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    imap = imaplib.IMAP4_SSL(dovecot.imap_host, dovecot.imap_port, ssl_context=context, timeout=10)
    try:
        imap.authenticate("XOAUTH2", lambda challenge: b"" if challenge else xoauth2(user, token))
    except BaseException:
        imap.shutdown()
        raise
    return imap


def submission(dovecot: Dovecot, pki: TestPKI) -> smtplib.SMTP:
    """A submission connection after STARTTLS and the second EHLO."""
    smtp = smtplib.SMTP(dovecot.submission_host, dovecot.submission_port, timeout=10)
    smtp.starttls(context=ssl.create_default_context(cafile=str(pki.ca_file)))
    smtp.ehlo()
    return smtp


# ------------------------------------------------------------------ (a)-(c) msal against the identity provider
@pytest.mark.filterwarnings("ignore:response_mode=:UserWarning")  # msal recommends form_post
@pytest.mark.parametrize("response_mode", ["form_post", "query"])
def test_auth_code_flow_with_pkce_then_refresh_rotates(idp_reset: IdentityProvider, response_mode: str) -> None:
    idp = idp_reset
    app = make_app(idp)
    flow = app.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT_URI, login_hint="alice@example.com",
                                       response_mode=response_mode)
    request = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(flow["auth_uri"]).query))
    assert request["code_challenge_method"] == "S256"
    result = app.acquire_token_by_auth_code_flow(flow, browser_sign_in(idp, flow["auth_uri"], REDIRECT_URI))

    assert result["token_type"] == "Bearer" and set(result["scope"].split()) == set(SCOPES)
    claims = result["id_token_claims"]
    assert claims["preferred_username"] == "alice@example.com" and claims["aud"] == idp.client_id
    assert claims["nonce"] == request["nonce"]
    assert idp.introspect(result["access_token"])["username"] == "alice@example.com"
    [account] = app.get_accounts()
    assert account["username"] == "alice@example.com"

    refreshed = app.acquire_token_silent(SCOPES, account, force_refresh=True)
    assert refreshed and refreshed["token_source"] == "identity_provider"
    assert refreshed["access_token"] != result["access_token"]
    assert refreshed["refresh_token"] != result["refresh_token"]  # rotation
    assert idp.count("token:authorization_code") == 1 and idp.count("token:refresh_token") == 1
    # Like Microsoft, the previous refresh token stays valid.
    assert "access_token" in idp.token({"grant_type": "refresh_token", "client_id": idp.client_id,
                                        "refresh_token": result["refresh_token"]})


def test_sign_in_page_prefers_next_user_and_deny_next_reaches_the_redirect(idp_reset: IdentityProvider) -> None:
    idp = idp_reset
    idp.set_next_user("dave@example.com")
    _, result = sign_in(idp, user="alice@example.com")
    assert result["id_token_claims"]["preferred_username"] == "dave@example.com"

    idp.deny_next()
    app = make_app(idp)
    flow = app.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT_URI, response_mode="form_post")
    answer = browser_sign_in(idp, flow["auth_uri"], REDIRECT_URI)
    assert answer["error"] == "access_denied" and answer["state"] == flow["state"]
    assert app.acquire_token_by_auth_code_flow(flow, answer)["error"] == "access_denied"


def test_protocol_errors_have_microsofts_shape(idp_reset: IdentityProvider) -> None:
    idp = idp_reset
    http = idp.http_session()
    authorize = f"{idp.authority()}/oauth2/v2.0/authorize"
    page = http.get(authorize, params={"client_id": idp.client_id, "response_type": "code", "scope": "openid",
                                       "redirect_uri": "https://evil.example/cb"}, timeout=10)
    assert page.status_code == 400 and "AADSTS50011" in page.text
    page = http.get(authorize, params={"client_id": "nope", "redirect_uri": REDIRECT_URI}, timeout=10)
    assert page.status_code == 400 and "AADSTS700016" in page.text

    app = make_app(idp)
    flow = app.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT_URI, response_mode="form_post")
    answer = browser_sign_in(idp, flow["auth_uri"], REDIRECT_URI)
    token_url = f"{idp.authority()}/oauth2/v2.0/token"
    form = {"grant_type": "authorization_code", "client_id": idp.client_id, "code": answer["code"],
            "redirect_uri": REDIRECT_URI, "code_verifier": "wrong"}
    error = http.post(token_url, data=form, timeout=10)
    assert error.status_code == 400
    assert error.json()["error"] == "invalid_grant" and error.json()["error_codes"] == [501481]
    assert error.json()["error_description"].startswith("AADSTS501481: ")
    assert http.post(token_url, data={**form, "code_verifier": flow["code_verifier"]}, timeout=10).ok
    replay = http.post(token_url, data={**form, "code_verifier": flow["code_verifier"]}, timeout=10)
    assert replay.json()["error_codes"] == [54005]

    secret = {"grant_type": "client_credentials", "client_id": CONFIDENTIAL_CLIENT_ID, "client_secret": "wrong",
              "scope": APP_SCOPE[0]}
    bad_secret = http.post(token_url, data=secret, timeout=10)
    assert bad_secret.status_code == 401 and bad_secret.json()["error"] == "invalid_client"
    assert bad_secret.json()["error_codes"] == [7000215]


def test_revoked_or_expired_refresh_token_gives_invalid_grant(idp_reset: IdentityProvider) -> None:
    idp = idp_reset
    app, result = sign_in(idp, user="erin@example.com")
    idp.revoke("erin@example.com")
    [account] = app.get_accounts()
    failed = app.acquire_token_silent_with_error(SCOPES, account, force_refresh=True)
    assert failed["error"] == "invalid_grant" and failed["error_codes"] == [50173]
    assert idp.introspect(result["access_token"]) == {"active": False}

    app, _ = sign_in(idp, user="frank@example.com")
    idp.expire_refresh_tokens("frank@example.com")
    failed = app.acquire_token_silent_with_error(SCOPES, app.get_accounts()[0], force_refresh=True)
    assert failed["error"] == "invalid_grant" and "AADSTS700082" in failed["error_description"]


def test_conditional_access_refusals_and_microsofts_token_lifetimes(idp_reset: IdentityProvider) -> None:
    idp = idp_reset
    idp.set_access_token_lifetime(3600, jitter=1800)            # Microsoft: 60-90 minutes
    app, result = sign_in(idp, user="gail@example.com")
    lifetimes = {result["expires_in"]}
    [account] = app.get_accounts()
    idp.refuse_refresh(53003, count=1)                          # blocked by Conditional Access, once
    failed = app.acquire_token_silent_with_error(SCOPES, account, force_refresh=True)
    assert failed["error"] == "invalid_grant" and failed["error_codes"] == [53003]
    assert failed["error_description"].startswith("AADSTS53003: Access has been blocked by Conditional Access")
    assert "suberror" not in failed and failed["trace_id"] and failed["correlation_id"]
    idp.refuse_refresh(70043)                                   # sign-in frequency, until cleared
    for _ in range(2):
        failed = msal.PublicClientApplication(idp.client_id, authority=idp.authority(), instance_discovery=False,
                                              http_client=idp.http_session(), token_cache=app.token_cache
                                              ).acquire_token_silent_with_error(SCOPES, account, force_refresh=True)
        assert failed["error_codes"] == [70043] and failed["suberror"] == "token_expired"
    idp.refuse_refresh(None)
    for _ in range(6):                                          # the refresh token survived the refusals
        fresh = make_app(idp, token_cache=app.token_cache).acquire_token_silent_with_error(
            SCOPES, account, force_refresh=True)
        lifetimes.add(fresh["expires_in"])
    assert all(3600 <= lifetime <= 5400 for lifetime in lifetimes) and len(lifetimes) > 1
    info = idp.access_token_info(fresh["access_token"])
    assert info["user"] == "gail@example.com" and info["expires_at"] - info["issued_at"] == pytest.approx(
        fresh["expires_in"], abs=1)


def test_single_tenant_app_and_blocked_device_flow(idp_reset: IdentityProvider) -> None:
    idp = idp_reset
    idp.register_client("one-tenant", single_tenant=True)
    app = msal.PublicClientApplication("one-tenant", authority=idp.authority("organizations"),
                                       instance_discovery=False, http_client=idp.http_session())
    flow = app.initiate_device_flow(SCOPES)
    assert flow["error_codes"] == [50194] and "not configured as a multi-tenant" in flow["error_description"]
    tenant_app = msal.PublicClientApplication("one-tenant", authority=idp.authority(), instance_discovery=False,
                                              http_client=idp.http_session())
    idp.block_device_flow()
    flow = tenant_app.initiate_device_flow(SCOPES)
    idp.approve_device(flow["user_code"], "hal@example.com")
    assert tenant_app.acquire_token_by_device_flow(flow)["error_codes"] == [53003]


def test_device_code_flow(idp_reset: IdentityProvider) -> None:
    idp = idp_reset
    app = make_app(idp)
    flow = app.initiate_device_flow(SCOPES)
    assert flow["user_code"] in flow["message"] and flow["verification_uri"] == f"{idp.url}/devicelogin"
    pending = app.acquire_token_by_device_flow(flow, exit_condition=lambda _: True)  # one poll
    assert pending["error"] == "authorization_pending"
    idp.approve_device(flow["user_code"], "carol@example.com")
    result = app.acquire_token_by_device_flow(flow)
    assert result["id_token_claims"]["preferred_username"] == "carol@example.com"
    assert "refresh_token" in result and idp.count("token:device_code") == 2

    declined = app.initiate_device_flow(SCOPES)
    idp.decline_device(declined["user_code"])
    assert app.acquire_token_by_device_flow(declined)["error"] == "authorization_declined"


def test_client_credentials(idp_reset: IdentityProvider) -> None:
    idp = idp_reset
    common = dict(authority=idp.authority(), instance_discovery=False, http_client=idp.http_session())
    app = msal.ConfidentialClientApplication(CONFIDENTIAL_CLIENT_ID, client_credential=idp.client_secret, **common)
    result = app.acquire_token_for_client(APP_SCOPE)
    assert result["token_type"] == "Bearer" and "refresh_token" not in result
    assert idp.introspect(result["access_token"])["client_id"] == CONFIDENTIAL_CLIENT_ID
    assert idp.count("token:client_credentials") == 1

    wrong = msal.ConfidentialClientApplication(CONFIDENTIAL_CLIENT_ID, client_credential="wrong", **common)
    assert wrong.acquire_token_for_client(APP_SCOPE)["error"] == "invalid_client"


# ------------------------------------------------------------------ (d) Dovecot IMAP
def test_imap_xoauth2_login_and_byte_exact_fetch(dovecot: Dovecot, pki: TestPKI, idp: IdentityProvider) -> None:
    user = "fetch@example.com"
    dovecot.deliver(user, MESSAGE)
    before = idp.count("introspect:active")
    imap = imap_login(dovecot, pki, user, idp.mint_access_token(user))
    try:
        status, counts = imap.select("INBOX", readonly=True)
        assert status == "OK" and counts[0]
        status, fetched = imap.fetch(counts[0].decode(), "(BODY.PEEK[])")  # the newest message
        assert status == "OK" and isinstance(fetched[0], tuple) and fetched[0][1] == MESSAGE
    finally:
        imap.logout()
    assert idp.count("introspect:active") == before + 1


@pytest.mark.parametrize("case", ["unknown token", "another user's token", "revoked token", "expired token"])
def test_imap_refuses_bad_tokens(dovecot: Dovecot, pki: TestPKI, idp: IdentityProvider, case: str) -> None:
    token = {"unknown token": "not-a-token",
             "another user's token": idp.mint_access_token("mallory@example.com"),
             "revoked token": idp.mint_access_token("revoked@example.com"),
             "expired token": idp.mint_access_token("alice@example.com", lifetime=-1)}[case]
    user = "revoked@example.com" if case == "revoked token" else "alice@example.com"
    if case == "revoked token":
        idp.revoke(user)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap_login(dovecot, pki, user, token)


# ------------------------------------------------------------------ (e) Dovecot submission
def test_submission_starttls_auth_xoauth2_and_byte_exact_relay(dovecot: Dovecot, pki: TestPKI,
                                                                idp: IdentityProvider, sink: SinkServer) -> None:
    sink.reset()
    with smtplib.SMTP(dovecot.submission_host, dovecot.submission_port, timeout=10) as plain:
        plain.ehlo()
        assert plain.has_extn("starttls")
        assert plain.esmtp_features.get("auth", "").split() == []  # Dovecot shows a bare "AUTH" line
    smtp = submission(dovecot, pki)
    try:
        assert set(smtp.esmtp_features["auth"].split()) == {"XOAUTH2", "OAUTHBEARER"}
        assert smtp.docmd("AUTH", "XOAUTH2") == (334, b"")
        token = idp.mint_access_token("alice@example.com")
        code, text = smtp.docmd(base64.b64encode(xoauth2("alice@example.com", token)).decode())
        assert code == 235, text
        smtp.sendmail("alice@example.com", ["bob@example.org", "carol@example.org"], MESSAGE)
    finally:
        smtp.quit()
    [received] = sink.wait_for_messages(1)
    assert received.mail_from == "alice@example.com"
    assert received.rcpt_tos == ["bob@example.org", "carol@example.org"]
    assert received.data_after_received() == MESSAGE  # Dovecot prepends one Received: header


def test_submission_needs_two_step_auth_for_long_tokens(dovecot: Dovecot, pki: TestPKI,
                                                        idp_reset: IdentityProvider) -> None:
    idp_reset.set_access_token_length(5000)  # Microsoft's can exceed 4,096 characters
    response = base64.b64encode(xoauth2("alice@example.com", idp_reset.mint_access_token("alice@example.com")))
    smtp = submission(dovecot, pki)
    try:
        assert smtp.docmd("AUTH", "XOAUTH2 " + response.decode())[0] == 500  # line too long
    finally:
        smtp.close()
    smtp = submission(dovecot, pki)
    try:
        assert smtp.docmd("AUTH", "XOAUTH2")[0] == 334
        assert smtp.docmd(response.decode())[0] == 235
    finally:
        smtp.quit()


def test_sink_refusals(sink: SinkServer) -> None:
    sink.reset()
    sink.refuse_recipient("nobody@example.org")
    with smtplib.SMTP(sink.host, sink.port, timeout=10) as smtp:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            smtp.sendmail("a@example.com", ["nobody@example.org"], MESSAGE)
        assert refused.value.recipients["nobody@example.org"][0] == 550
        sink.refuse_messages()
        with pytest.raises(smtplib.SMTPDataError) as rejected:
            smtp.sendmail("a@example.com", ["b@example.org"], MESSAGE)
        assert rejected.value.smtp_code == 554
    assert sink.messages == []
    sink.reset()


# ------------------------------------------------------------------ (f) faults
def test_fault_500_raises_in_msal_and_is_replayed(idp_reset: IdentityProvider) -> None:
    idp = idp_reset
    app, _ = sign_in(idp)
    [account] = app.get_accounts()
    idp.set_fault("500", count=1)
    for _ in range(2):  # the second call is answered from msal's throttle cache (5 s)
        with pytest.raises(msal.exceptions.MsalServiceError, match="500"):
            app.acquire_token_silent_with_error(SCOPES, account, force_refresh=True)
    assert idp.count("token:refresh_token") == 1


def test_fault_429_with_retry_after(idp_reset: IdentityProvider) -> None:
    idp = idp_reset
    app, _ = sign_in(idp)
    [account] = app.get_accounts()
    idp.set_fault("429", retry_after=30, count=1)
    for _ in range(2):  # msal obeys Retry-After: the second call does not reach the server
        result = app.acquire_token_silent_with_error(SCOPES, account, force_refresh=True)
        assert result["error"] == "temporarily_unavailable"
    assert idp.count("token:refresh_token") == 1

    idp.set_fault("429", retry_after=7)
    response = idp.http_session().post(f"{idp.authority()}/oauth2/v2.0/token", data={}, timeout=10)
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"


def test_fault_hang(idp_reset: IdentityProvider) -> None:
    idp = idp_reset
    app = msal.ConfidentialClientApplication(CONFIDENTIAL_CLIENT_ID, client_credential=idp.client_secret,
                                             authority=idp.authority(), instance_discovery=False,
                                             http_client=idp.http_session())
    idp.set_fault("hang")
    with pytest.raises(requests.exceptions.ReadTimeout):  # msal passes timeout= to the HTTP client
        app.acquire_token_for_client(APP_SCOPE, timeout=0.5)

    token_url = f"{idp.authority()}/oauth2/v2.0/token"
    form = {"grant_type": "client_credentials", "client_id": CONFIDENTIAL_CLIENT_ID,
            "client_secret": idp.client_secret, "scope": APP_SCOPE[0]}
    http = idp.http_session()
    outcome: list[requests.Response] = []
    waiter = threading.Thread(target=lambda: outcome.append(http.post(token_url, data=form, timeout=10)))
    waiter.start()
    deadline = time.monotonic() + 5
    while idp.count("token") < 2 and time.monotonic() < deadline:  # until the second request hangs
        time.sleep(0.01)
    idp.clear_faults()  # released: answered normally
    waiter.join(timeout=10)
    assert outcome and outcome[0].status_code == 200

    idp.set_fault("hang", hang_max=0.2)
    assert http.post(token_url, data=form, timeout=10).status_code == 504


def test_stop_start_same_port(idp_reset: IdentityProvider) -> None:
    idp = idp_reset
    port, discovery = idp.port, f"{idp.authority()}/v2.0/.well-known/openid-configuration"
    http = idp.http_session()
    assert http.get(discovery, timeout=10).ok  # leaves a kept-alive connection in the pool
    idp.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        http.get(discovery, timeout=10)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with pytest.raises(requests.exceptions.ConnectionError):
        make_app(idp)  # msal fetches the discovery document when built
    idp.start()
    assert idp.port == port
    assert http.get(discovery, timeout=10).json()["token_endpoint"].startswith(idp.url)
    make_app(idp)


def test_discovery_fault(idp_reset: IdentityProvider) -> None:
    idp_reset.set_fault("500", endpoint="discovery", count=1)
    with pytest.raises(msal.exceptions.MsalServiceError, match="500"):
        make_app(idp_reset)
    make_app(idp_reset)


def test_http_controls_for_other_processes(idp_reset: IdentityProvider) -> None:
    idp = idp_reset
    http = idp.http_session()
    mint = http.post(f"{idp.url}/_test/mint_access_token", json={"user": "zoe@example.com"}, timeout=10)
    assert idp.introspect(mint.json()["result"])["username"] == "zoe@example.com"
    http.post(f"{idp.url}/_test/set_fault", json={"kind": "500", "count": 1}, timeout=10).raise_for_status()
    assert http.post(f"{idp.authority()}/oauth2/v2.0/token", data={}, timeout=10).status_code == 500
    assert http.get(f"{idp.url}/_test/counters", timeout=10).json()["result"]["token"] == 1
    http.post(f"{idp.url}/_test/allow_delegation", json={"owner": "zoe@example.com", "mailbox": "shared@example.com"},
              timeout=10).raise_for_status()
    allowed = http.get(f"{idp.url}/delegation", params={"owner": "zoe@example.com", "mailbox": "shared@example.com"},
                       timeout=10)
    assert allowed.json() == {"allowed": True}
    assert http.post(f"{idp.url}/_test/no_such_control", json={}, timeout=10).status_code == 404

    http.post(f"{idp.url}/_test/stop_for", json={"seconds": 0.3}, timeout=10).raise_for_status()
    with pytest.raises(ConnectionRefusedError):  # down when the answer arrives ...
        socket.create_connection(("127.0.0.1", idp.port), timeout=5).close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # ... and back on the same port soon after
        try:
            socket.create_connection(("127.0.0.1", idp.port), timeout=5).close()
            break
        except ConnectionRefusedError:
            time.sleep(0.05)
    assert http.get(f"{idp.authority()}/v2.0/.well-known/openid-configuration", timeout=10).ok


def test_standalone_idp(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, "-m", "tests.idp", "--port", "0", "--dir", str(tmp_path)],
                               stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        url = process.stdout.readline().strip()  # type: ignore[union-attr]
        assert url.startswith("https://127.0.0.1:")
        http = requests.Session()
        http.trust_env, http.verify = False, str(tmp_path / "ca.pem")
        assert http.get(f"{url}/common/v2.0/.well-known/openid-configuration", timeout=10).ok
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
