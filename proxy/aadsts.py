"""Entra ID's ``AADSTSnnnn`` error codes in one table: what each means, what to do, and whether a
refused refresh comes back by itself.

Conditional Access answers many refresh attempts with ``invalid_grant`` that pass on their own:
multi-factor authentication wanted at a new location (50076, 50079, 50078), a policy that
blocks this network or device for now (53003), the sign-in frequency (70043), security
defaults (530035). An account refused with one of those is *not* dead: the broker retries (a
login at most once per ``identity.refresh_retry_on_login``, the background every
``identity.refresh_retry_in_background``) and the refusal text names the code and its meaning.
Only codes that need a person (an expired or revoked refresh token, missing consent, a wrong or
expired client secret, an unknown app, ...) mark the account "run `proxy authorize`". Sources:
Microsoft's Entra error-code reference and /work/shared/notes/m365-facts.md.

Used by the broker (:mod:`proxy.tokens.identity` classifies a refused refresh), :mod:`proxy.hints`
(what to do), `proxy check` and `proxy authorize`. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Code:
    meaning: str          # what Microsoft says, briefly (for refusal texts)
    hint: str             # one sentence: what to do
    passes: bool = False  # a refresh refused with it may work later without a new sign-in


_AUTHORIZE = "run `proxy authorize` again"

CODES: dict[int, Code] = {
    50011: Code("the redirect URI does not match the app registration",
                "The redirect URI does not match the app registration: add the platform \"Mobile and desktop "
                "applications\" with redirect URI http://localhost (docs/azure-setup.md, step 1)."),
    50020: Code("the account belongs to another tenant",
                "The account belongs to another tenant: sign in with an account of the tenant in identity.authority."),
    50034: Code("the user does not exist in this tenant",
                "The user does not exist in this tenant: check the user name and identity.authority."),
    50076: Code("multi-factor authentication is required (for example at a new location)",
                "Multi-factor authentication is required, often because of a new location: this usually passes by "
                f"itself; if it persists, {_AUTHORIZE} and complete it in the browser.", passes=True),
    50078: Code("the multi-factor authentication presented has expired",
                "The multi-factor authentication has expired: this usually passes by itself; if it persists, "
                f"{_AUTHORIZE} and complete it in the browser.", passes=True),
    50079: Code("the user must register for multi-factor authentication",
                "Multi-factor authentication must be set up: the user signs in once in a browser (aka.ms/mfasetup); "
                f"if it persists afterwards, {_AUTHORIZE}.", passes=True),
    50126: Code("wrong user name or password at Microsoft", f"Wrong user name or password at Microsoft: {_AUTHORIZE}."),
    50173: Code("the authorization was revoked (password change or \"Revoke sessions\")",
                f"The authorization was revoked (password change or \"Revoke sessions\"): {_AUTHORIZE}."),
    50194: Code("the app registration is single-tenant but the authority is not the tenant's",
                "The app registration is single-tenant: set identity.authority to "
                "https://login.microsoftonline.com/<tenant-id> (the \"Directory (tenant) ID\"), not .../organizations "
                "or .../common (docs/azure-setup.md, step 1)."),
    53003: Code("access is blocked by a Conditional Access policy",
                "Blocked by a Conditional Access policy (for example this network or device): it passes when the "
                "policy allows it again; otherwise IT must allow this app or this location. The sign-in logs in "
                "Entra ID name the policy.", passes=True),
    530035: Code("access is blocked by the tenant's security defaults",
                 "Blocked by the tenant's security defaults: this usually passes by itself; otherwise IT reviews the "
                 "security defaults (Entra ID → Overview → Properties).", passes=True),
    65001: Code("consent to the app's permissions is missing",
                "Consent is missing: an admin grants it in Entra ID → App registrations → the app → API permissions → "
                "\"Grant admin consent\" (docs/azure-setup.md, step 3); then " + _AUTHORIZE + "."),
    65004: Code("the user declined the consent screen",
                "The user declined the consent screen: run `proxy authorize` again and accept, or let an admin "
                "grant consent for the organization."),
    70000: Code("the sign-in was declined or the grant is invalid",
                f"The sign-in was declined or the grant is invalid: {_AUTHORIZE}."),
    70002: Code("the app registration is not set up for this sign-in",
                "The app registration does not allow this sign-in: it must be a public client (\"Allow public client "
                "flows\": Yes, no client secret) or identity.client_secret must be its secret (docs/azure-setup.md)."),
    70008: Code("the authorization expired from inactivity",
                f"The authorization expired from inactivity: {_AUTHORIZE}."),
    70011: Code("a requested scope is not valid",
                "Invalid scope: check identity.scopes (IMAP.AccessAsUser.All, SMTP.Send, offline_access) or, for "
                "app-only access, identity.app_only.scope (https://outlook.office365.com/.default)."),
    70043: Code("the sign-in frequency set by Conditional Access wants a new sign-in",
                "The sign-in frequency policy wants a new sign-in: it often passes by itself; if it persists, "
                f"{_AUTHORIZE}.", passes=True),
    90002: Code("the tenant in identity.authority does not exist",
                "The tenant in identity.authority does not exist: use https://login.microsoftonline.com/<tenant-id>."),
    500011: Code("Exchange Online is not known in this tenant",
                 "The resource (Exchange Online) is not known in this tenant: the tenant needs an Exchange Online "
                 "licence, and the scopes must name https://outlook.office.com or https://outlook.office365.com."),
    700016: Code("the app is not known in this tenant",
                 "The app is not known in this tenant: check identity.client_id (the \"Application (client) ID\") and "
                 "identity.authority; for another tenant an admin must consent to the app first."),
    700024: Code("the certificate's assertion is not valid at this time",
                 "The certificate's assertion is not valid at this time: check this computer's clock."),
    700027: Code("the app's certificate was not accepted",
                 "The certificate was not accepted: upload its public part under the app's \"Certificates & "
                 "secrets\", and check identity.app_only.certificate_file."),
    700082: Code("the refresh token expired (90 days without use)",
                 f"The refresh token expired (90 days without use): {_AUTHORIZE}."),
    1002012: Code("app-only access needs a /.default scope",
                  "App-only access needs the scope https://outlook.office365.com/.default (identity.app_only.scope)."),
    7000215: Code("the client secret is wrong",
                  "The client secret is wrong: use the secret's Value (not its ID) from the app's \"Certificates & "
                  "secrets\" in identity.client_secret or identity.app_only.client_secret(_file)."),
    7000218: Code("the app registration does not allow public client flows",
                  "The app must allow public client flows for the device code sign-in (Entra ID → the app → "
                  "Authentication → \"Allow public client flows\": Yes), or the request lacks the app's secret."),
    7000222: Code("the client secret has expired",
                  "The client secret has expired: create a new one under the app's \"Certificates & secrets\" and put "
                  "it into identity.client_secret or identity.app_only."),
    9002313: Code("the request or the stored grant is not valid", f"The stored authorization is not valid: {_AUTHORIZE}."),
}

#: The device code flow blocked by Conditional Access ("authentication flows" policy, which
#: Microsoft recommends): only the browser sign-in can work.
DEVICE_CODE_BLOCKED = ("Conditional Access blocks the device code flow here (an \"authentication flows\" policy, "
                       "AADSTS53003): sign in with the browser instead, `proxy authorize --browser` (on a computer "
                       "with a desktop), or ask IT to exclude this app from that policy.")

# OAuth errors without a known AADSTS code after which only a person can help.
_NEEDS_PERSON = frozenset({"invalid_grant", "interaction_required", "consent_required", "login_required",
                           "invalid_client", "unauthorized_client"})
_AADSTS = re.compile(r"AADSTS(\d{5,7})")


def codes_in(result_or_text: dict[str, Any] | str | None) -> list[int]:
    """The AADSTS codes of a token error response (``error_codes``, else the description) or of a text."""
    if isinstance(result_or_text, dict):
        listed = result_or_text.get("error_codes")
        if isinstance(listed, list) and all(isinstance(c, int) for c in listed) and listed:
            return list(listed)
        result_or_text = str(result_or_text.get("error_description") or "")
    return [int(c) for c in _AADSTS.findall(result_or_text or "")]


def lookup(result_or_text: dict[str, Any] | str | None) -> tuple[int, Code] | None:
    """The first AADSTS code in the table that the response or text names."""
    for code in codes_in(result_or_text):
        if code in CODES:
            return code, CODES[code]
    return None


PERSON, PASSES, TRANSIENT = "person", "passes", "transient"


def verdict(result: dict[str, Any]) -> str:
    """What a refused refresh (msal's error result) means for the account:

    - :data:`PERSON`: only a person helps (`proxy authorize`, or IT): the account is dead;
    - :data:`PASSES`: Microsoft refuses for now (a code that passes by itself, or an
      ``invalid_grant`` with a code the table does not know): retry slowly, not dead;
    - :data:`TRANSIENT`: the identity provider had a problem: retry soon.
    """
    found = lookup(result)
    if found is not None:
        return PASSES if found[1].passes else PERSON
    error = result.get("error")
    if error == "invalid_client":
        return PERSON
    if error in _NEEDS_PERSON:
        return PASSES if codes_in(result) else PERSON
    return TRANSIENT


def describe(code: int) -> str:
    """``AADSTS53003 (access is blocked by a Conditional Access policy)``."""
    entry = CODES.get(code)
    return f"AADSTS{code} ({entry.meaning})" if entry else f"AADSTS{code}"
