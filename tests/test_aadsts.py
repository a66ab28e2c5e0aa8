"""Issue 11, item 7: Entra ID's AADSTS codes in one table (proxy/aadsts.py): which refused
refreshes need a person and which pass by themselves, used by the broker, hints, check and authorize."""

from __future__ import annotations

import asyncio

import pytest

from proxy.hints import hint_for
from proxy import aadsts
from proxy.tokens.identity import HttpCache, refresh_refused
from tests.test_token_policy import Clock, FakeProvider, make_broker


def refused(code: int | None, error: str = "invalid_grant", suberror: str | None = None) -> dict:
    """A token error response in Entra ID's shape."""
    result = {"error": error, "error_description": (f"AADSTS{code}: Something. " if code else "Something. ")
              + "Trace ID: 1 Correlation ID: 2 Timestamp: 2024-01-01 12:00:00Z"}
    if code:
        result["error_codes"] = [code]
    if suberror:
        result["suberror"] = suberror
    return result


@pytest.mark.parametrize("result, verdict", [
    # pass by themselves: the account is not dead
    (refused(50076, suberror="basic_action"), aadsts.PASSES),     # MFA at a new location
    (refused(50079, suberror="basic_action"), aadsts.PASSES),     # MFA registration wanted
    (refused(50078), aadsts.PASSES),                              # MFA expired
    (refused(53003), aadsts.PASSES),                              # Conditional Access blocks for now
    (refused(70043, suberror="token_expired"), aadsts.PASSES),    # sign-in frequency
    (refused(530035), aadsts.PASSES),                             # security defaults
    (refused(123456), aadsts.PASSES),                             # a code the table does not know
    # need a person: `proxy authorize` (or IT)
    (refused(700082), aadsts.PERSON),                             # refresh token expired
    (refused(50173), aadsts.PERSON),                              # revoked, password changed
    (refused(65001, suberror="consent_required"), aadsts.PERSON), # consent missing
    (refused(7000215, "invalid_client"), aadsts.PERSON),          # client secret wrong
    (refused(7000222, "invalid_client"), aadsts.PERSON),          # client secret expired
    (refused(700016, "unauthorized_client"), aadsts.PERSON),      # unknown app
    (refused(123456, "invalid_client"), aadsts.PERSON),           # any unknown-client error
    (refused(None), aadsts.PERSON),                               # invalid_grant without a code
    # the identity provider's own trouble: retry soon
    (refused(None, "temporarily_unavailable"), aadsts.TRANSIENT),
])
def test_verdict(result, verdict):
    assert aadsts.verdict(result) == verdict


def test_the_code_comes_from_error_codes_or_the_description():
    assert aadsts.codes_in({"error_codes": [53003, 50097]}) == [53003, 50097]
    assert aadsts.codes_in({"error_description": "AADSTS70043: The refresh token has expired"}) == [70043]
    assert aadsts.codes_in("invalid_grant: AADSTS50173: The provided grant has expired") == [50173]
    assert aadsts.describe(53003) == "AADSTS53003 (access is blocked by a Conditional Access policy)"


def test_refused_refresh_becomes_a_token_error_that_names_the_code_and_its_meaning():
    passing = refresh_refused(refused(53003))
    assert passing.passes and not passing.reauthorize
    assert "AADSTS53003 (access is blocked by a Conditional Access policy)" in str(passing)
    assert "passes by itself" in str(passing) and "proxy authorize" not in str(passing)
    unknown = refresh_refused(refused(123456))
    assert unknown.passes and "AADSTS123456" in str(unknown) and "proxy authorize" in str(unknown)
    dead = refresh_refused(refused(700082))
    assert dead.reauthorize and not dead.passes and "AADSTS700082" in str(dead)
    transient = refresh_refused(refused(None, "temporarily_unavailable"))
    assert not transient.reauthorize and not transient.passes


def test_hints_come_from_the_same_table():
    assert "https://login.microsoftonline.com/<tenant-id>" in hint_for("invalid_request: AADSTS50194: Application "
                                                                       "'x' is not configured as a multi-tenant")
    assert "proxy authorize --browser" in hint_for("invalid_grant: AADSTS53003: Access has been blocked",
                                                   flow="device")
    assert "Conditional Access" in hint_for("invalid_grant: AADSTS53003: Access has been blocked")
    assert "--browser" not in hint_for("invalid_grant: AADSTS53003: Access has been blocked")
    for code, entry in aadsts.CODES.items():
        assert hint_for(f"invalid_grant: AADSTS{code}: text") == entry.hint


def test_broker_retries_refusals_that_pass_by_themselves_slowly_and_keeps_the_account(tmp_path):
    clock, provider = Clock(), FakeProvider()
    broker, grant = make_broker(tmp_path, provider, clock)  # identity.refresh_retry_*: 60 s and 1800 s
    provider.error = refresh_refused(refused(53003))
    clock.now += 30                                         # the token has expired
    with pytest.raises(Exception) as first:
        asyncio.run(broker.access_token(grant, 5))
    assert "AADSTS53003" in str(first.value) and not first.value.reauthorize
    state = grant.state
    assert state.dead is None and provider.calls == 1
    assert (state.backoff, state.login_pause) == (1800.0, 60.0)
    from proxy.tokens import policy
    assert policy.refresh_due_at(state.expires_at, state.lifetime, state.failed_at, state.backoff) == clock.now + 1800
    clock.now += 59
    with pytest.raises(Exception, match="AADSTS53003"):
        asyncio.run(broker.access_token(grant, 5))          # within a minute: not asked again
    assert provider.calls == 1
    clock.now += 1
    provider.error = None
    assert asyncio.run(broker.access_token(grant, 5)) == "token-2"   # a minute later a login tries again
    provider.error = refresh_refused(refused(700082))
    clock.now += 30
    with pytest.raises(Exception) as dead:
        asyncio.run(broker.access_token(grant, 5))
    assert dead.value.reauthorize and "proxy authorize" in str(dead.value)


def test_msal_does_not_replay_refused_refreshes_from_its_cache():
    cache = HttpCache()
    cache["POST https://login/t/oauth2/v2.0/token hash=abc 400"] = "refused"
    cache["GET https://login/t/v2.0/.well-known/openid-configuration hash=x 2xx"] = "metadata"
    assert list(cache) == ["GET https://login/t/v2.0/.well-known/openid-configuration hash=x 2xx"]
