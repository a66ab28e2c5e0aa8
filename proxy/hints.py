"""What to do about the errors Microsoft 365 and its identity platform give most often.

:func:`hint_for` maps an error text (an ``AADSTSnnnn`` code from the identity provider, an SMTP
reply such as ``535 5.7.139``, an IMAP ``NO``, a POP3 ``-ERR``) to one sentence an admin can act on. Used by
`proxy check` and `proxy authorize`; docs/azure-setup.md explains the settings it names.
"""

from __future__ import annotations

import re
import urllib.parse

# AADSTS code -> what to do (Microsoft's wording of the code is in the error text itself).
AADSTS_HINTS: dict[int, str] = {
    50011: "The redirect URI does not match the app registration: add the platform \"Mobile and desktop "
           "applications\" with redirect URI http://localhost (docs/azure-setup.md, step 2).",
    50020: "The account belongs to another tenant: sign in with an account of the tenant in identity.authority, "
           "or use .../organizations.",
    50034: "The user does not exist in this tenant: check the user name and identity.authority.",
    50076: "Multi-factor authentication is required: run `proxy authorize` again and complete it in the browser.",
    50079: "Multi-factor authentication must be set up: sign in once in a browser, then run `proxy authorize` again.",
    50126: "Wrong user name or password at Microsoft: run `proxy authorize` again.",
    50173: "The authorization was revoked (password change or \"Revoke sessions\"): run `proxy authorize` again.",
    53003: "Blocked by a Conditional Access policy: IT must allow this app (or this computer's location).",
    65001: "Consent is missing: an admin grants it in Entra ID → App registrations → the app → API permissions → "
           "\"Grant admin consent\" (docs/azure-setup.md, step 3).",
    65004: "The user declined the consent screen: run `proxy authorize` again and accept, or let an admin "
           "grant consent for the organization.",
    70000: "The sign-in was declined or the grant is invalid: run `proxy authorize` again.",
    70008: "The authorization expired from inactivity: run `proxy authorize` again.",
    70011: "Invalid scope: check identity.scopes (IMAP.AccessAsUser.All, SMTP.Send, offline_access) or, for "
           "app-only access, identity.app_only.scope (https://outlook.office365.com/.default).",
    90002: "The tenant in identity.authority does not exist: use https://login.microsoftonline.com/<tenant-id>.",
    500011: "The resource (Exchange Online) is not known in this tenant: the tenant needs an Exchange Online "
            "licence, and the scopes must name https://outlook.office.com or https://outlook.office365.com.",
    700016: "The app is not known in this tenant: check identity.client_id (the \"Application (client) ID\") and "
            "identity.authority; for another tenant an admin must consent to the app first.",
    700024: "The certificate's assertion is not valid at this time: check this computer's clock.",
    700027: "The certificate was not accepted: upload its public part under the app's \"Certificates & secrets\", "
            "and check identity.app_only.certificate_file.",
    700082: "The refresh token expired (90 days without use): run `proxy authorize` again.",
    1002012: "App-only access needs the scope https://outlook.office365.com/.default (identity.app_only.scope).",
    7000215: "The client secret is wrong: use the secret's Value (not its ID) from the app's "
             "\"Certificates & secrets\" in identity.app_only.client_secret(_file).",
    7000218: "The app must allow public client flows for the device code sign-in (Entra ID → the app → "
             "Authentication → \"Allow public client flows\": Yes), or the request lacks the app's secret.",
    7000222: "The client secret has expired: create a new one under the app's \"Certificates & secrets\" and put it "
             "into identity.app_only.",
}
_ERROR_HINTS = {
    "invalid_client": "The app's identity was refused: check identity.client_id and the app's secret or certificate.",
    "consent_required": AADSTS_HINTS[65001],
    "interaction_required": "The user must sign in again (for example multi-factor authentication): "
                            "run `proxy authorize` again.",
    "invalid_grant": "The stored authorization no longer works: run `proxy authorize` again.",
    "unauthorized_client": "The app is not allowed to use this sign-in method: check the app registration's "
                           "platform and \"Allow public client flows\" (docs/azure-setup.md).",
}
SMTP_AUTH_DISABLED = ("SMTP AUTH is disabled for the mailbox or the whole tenant. An Exchange admin enables it: "
                      "Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false (and, for the "
                      "tenant, Set-TransportConfig -SmtpClientAuthenticationDisabled $false); it takes effect "
                      "within an hour.")
_AADSTS = re.compile(r"AADSTS(\d{5,7})")


def hint_for(text: str) -> str | None:
    """One sentence on what to do about the error ``text``, or None if there is nothing specific."""
    for match in _AADSTS.finditer(text or ""):
        hint = AADSTS_HINTS.get(int(match.group(1)))
        if hint:
            return hint
    if re.search(r"\b5\.7\.139\b", text or "") or "SmtpClientAuthentication is disabled" in (text or ""):
        return SMTP_AUTH_DISABLED
    error = (text or "").split(":", 1)[0].strip()
    return _ERROR_HINTS.get(error)


def imap_refused_hint(mailbox: str, owner: str, app_only: bool) -> str:
    """Why Microsoft answers ``NO AUTHENTICATE failed.`` (it does not say which of these it is)."""
    if app_only:
        return (f"The app may not open {mailbox}: in Exchange Online PowerShell register the app "
                "(New-ServicePrincipal -AppId <client id> -ObjectId <enterprise app object id>) and grant it "
                f"Add-MailboxPermission -Identity {mailbox} -User <service principal id> -AccessRights FullAccess; "
                "the app also needs the application permission IMAP.AccessAsApp with admin consent. "
                "Changes take up to an hour.")
    shared = mailbox.casefold() != owner.casefold()
    steps = []
    if shared:
        steps.append(f"{owner} needs Full Access to {mailbox} (Add-MailboxPermission -Identity {mailbox} "
                     f"-User {owner} -AccessRights FullAccess)")
    steps.append(f"IMAP must be enabled for {mailbox} (Set-CASMailbox -Identity {mailbox} -ImapEnabled $true)")
    steps.append("the token must carry IMAP.AccessAsUser.All (API permissions + identity.scopes, then "
                 f"`proxy authorize {owner}`)")
    return "Check: " + "; ".join(steps) + "."


def pop3_refused_hint(mailbox: str, owner: str, app_only: bool) -> str:
    """Why Microsoft refuses a POP3 login with a token that works for IMAP (it does not say which)."""
    if app_only:
        return (f"The app may not open {mailbox} by POP: it needs the application permission POP.AccessAsApp with "
                "admin consent, a service principal in Exchange (New-ServicePrincipal) and Add-MailboxPermission "
                f"-Identity {mailbox} -User <service principal id> -AccessRights FullAccess.")
    steps = []
    if mailbox.casefold() != owner.casefold():
        steps.append(f"{owner} needs Full Access to {mailbox} (Add-MailboxPermission -Identity {mailbox} "
                     f"-User {owner} -AccessRights FullAccess)")
    steps.append(f"POP must be enabled for {mailbox} (Set-CASMailbox -Identity {mailbox} -PopEnabled $true)")
    steps.append("the token must carry POP.AccessAsUser.All (an authorization from before POP was configured "
                 f"lacks it: run `proxy authorize {owner}` again; API permissions + identity.scopes)")
    return "Check: " + "; ".join(steps) + "."


def smtp_refused_hint(reply: str, mailbox: str, owner: str, app_only: bool) -> str:
    hint = hint_for(reply)
    if hint:
        return hint.replace("<mailbox>", mailbox)
    if app_only:
        return (f"The app may not send as {mailbox}: it needs the application permission SMTP.SendAsApp with "
                "admin consent, a service principal in Exchange (New-ServicePrincipal) and "
                f"Add-MailboxPermission -Identity {mailbox} -User <service principal id> -AccessRights FullAccess.")
    steps = [SMTP_AUTH_DISABLED.replace("<mailbox>", mailbox)]
    if mailbox.casefold() != owner.casefold():
        steps.append(f"{owner} needs Send As or Full Access on {mailbox}.")
    steps.append(f"The token must carry SMTP.Send (API permissions + identity.scopes, then `proxy authorize {owner}`).")
    return " ".join(steps)


# ------------------------------------------------------------------------------ network and TLS
# One table for `proxy check` and `proxy authorize` (and the token refresh's log line): what a
# failure to reach the identity provider means and what to do. Kept apart from the Microsoft
# error tables above.
_PROXY_STATUS = re.compile(r"Tunnel connection failed: (\d{3}) ?([^'\")\r\n]*)")


def network_problem(exc: BaseException, *, where: str, proxy: object = None,
                    timeout: float | None = None) -> tuple[str, str]:
    """``(problem, what to do)`` for an exception raised while talking HTTPS to ``where`` (a host
    or URL), possibly through the web proxy ``proxy`` (a :class:`proxy.webproxy.WebProxy`).
    Never contains a secret: exception texts are reduced to their kind or a known status."""
    import requests  # here, so the hint tables above stay importable without it

    if isinstance(exc, requests.exceptions.ProxyError) or (proxy is not None and _PROXY_STATUS.search(str(exc))):
        found = _PROXY_STATUS.search(str(exc))
        if found and proxy is not None:
            url = urllib.parse.urlsplit(where if "://" in where else f"https://{where}")
            target = f"{url.hostname}:{url.port or 443}"
            return proxy_refusal(proxy, int(found.group(1)), found.group(2), target), PROXY_TODO
        return (f"cannot reach the web proxy {proxy or ''}".rstrip(),
                "check identity.http_proxy or HTTPS_PROXY (host and port) and that the web proxy runs")
    if isinstance(exc, requests.exceptions.SSLError):
        return ("its TLS certificate is not trusted",
                "if a company web proxy inspects TLS, put its CA into identity.ca_file; otherwise check the "
                "computer's clock and identity.authority")
    if isinstance(exc, requests.exceptions.Timeout):
        return ((f"no answer within {timeout:.0f} s" if timeout else "no answer in time"),
                "check the network and the firewall; where HTTPS must go through a web proxy, set "
                "identity.http_proxy or HTTPS_PROXY; identity.timeout allows more time")
    if isinstance(exc, (requests.exceptions.ConnectionError, OSError)):
        text = str(exc)
        if any(s in text for s in ("NameResolutionError", "Name or service not known", "getaddrinfo failed",
                                   "Temporary failure in name resolution", "nodename nor servname")):
            return ("cannot connect: the host name cannot be resolved (DNS)",
                    "check identity.authority and DNS; where only a web proxy can resolve outside names, set "
                    "identity.http_proxy or HTTPS_PROXY")
        if "Connection refused" in text or "ConnectionRefused" in text or "actively refused" in text:
            return ("cannot connect (connection refused)",
                    "check identity.authority; HTTPS (port 443) to the identity provider must be allowed, or go "
                    "through the web proxy (identity.http_proxy or HTTPS_PROXY)")
        return ("cannot connect", "check identity.authority, DNS, the firewall (HTTPS to login.microsoftonline.com "
                "must be allowed) and the web proxy settings (identity.http_proxy or HTTPS_PROXY)")
    if isinstance(exc, ValueError):
        return (f"it does not answer like an identity provider ({shorten(str(exc), 120)})",
                "check identity.authority: https://login.microsoftonline.com/<tenant-id or organizations>")
    return (f"unexpected error ({exc.__class__.__name__})", "try again; if it persists, run `proxy check`")


PROXY_TODO = "fix the web proxy setting (identity.http_proxy or HTTPS_PROXY) or ask IT to let this traffic through"


def proxy_refusal(proxy: object, status: int, reason: str, target: str) -> str:
    """What a web proxy's refusal to tunnel to ``target`` means (shared by the identity provider's
    HTTPS and the IMAP/SMTP tunnels). ``str(proxy)`` is host:port, never the credentials."""
    answer = f"{status} {reason}".strip()
    source = getattr(proxy, "source", "the proxy setting")
    if status in (401, 407):  # 407 is the rule; some proxies (tinyproxy) answer wrong credentials with 401
        if getattr(proxy, "username", None) is not None:
            return (f"the web proxy {proxy} refused the user name and password in {source} ({answer}); "
                    "check them (only Basic authentication is supported)")
        return (f"the web proxy {proxy} needs a user name and password ({answer}): put them into the proxy URL "
                f"in {source}, http://USER:PASSWORD@{proxy} (only Basic authentication is supported; for a "
                "proxy that only speaks NTLM or Kerberos, ask IT to let this computer through)")
    if status == 403:
        return (f"the web proxy {proxy} does not allow a tunnel to {target} ({answer}): ask IT to allow "
                f"CONNECT to {target}")
    if status in (500, 502, 503, 504):
        return f"the web proxy {proxy} could not reach {target} ({answer})"
    return f"the web proxy {proxy} answered {answer} to CONNECT {target}"


def shorten(text: str, width: int) -> str:
    """``text`` on one line, at most ``width`` characters, cut between words (never mid-word)."""
    import textwrap
    line = " ".join(str(text).split())
    return line if len(line) <= width else textwrap.shorten(line, width=width, placeholder=" ...")
