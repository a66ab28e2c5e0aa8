"""What to do about the errors Microsoft 365 and its identity platform give: one place for the advice.

- :func:`hint_for` maps an error text (an ``AADSTSnnnn`` code, whose meaning and advice come
  from the one table in :mod:`proxy.aadsts`; an SMTP reply such as ``535 5.7.139``; an
  OAuth error; a POP3 ``-ERR``) to one sentence an admin can act on. Used by `proxy check` and `proxy authorize`.
- The refusal texts the mail client sees when the mail server refuses a login, and `proxy
  check` prints for the same case: a refused token (:func:`imap_refused_hint`,
  :func:`smtp_refused_hint`, :func:`pop3_refused_hint`), Exchange's
  "authenticated but not connected" (:func:`not_connected_hint`), SMTP AUTH disabled
  (:func:`smtp_auth_disabled_hint`), Send As refused at the end of a message
  (:func:`send_as_hint`).

docs/azure-setup.md explains the settings they name.
"""

from __future__ import annotations

import re
import urllib.parse

from .aadsts import DEVICE_CODE_BLOCKED, lookup

_ERROR_HINTS = {
    "invalid_client": "The app's identity was refused: check identity.client_id and the app's secret or certificate.",
    "consent_required": "Consent is missing: an admin grants it in Entra ID → App registrations → the app → API "
                        "permissions → \"Grant admin consent\" (docs/azure-setup.md, step 3).",
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
# The 535 5.7.139 texts (Microsoft's wording) -> what to do. None of them is about the token.
_SMTP_DISABLED_VARIANTS = (
    (re.compile(r"disabled for the tenant", re.I),
     "SMTP AUTH is disabled for the whole tenant. An Exchange admin enables it for this mailbox: Set-CASMailbox "
     "-Identity <mailbox> -SmtpClientAuthenticationDisabled $false (the mailbox's setting wins), or for everyone: "
     "Set-TransportConfig -SmtpClientAuthenticationDisabled $false; it takes effect within an hour."),
    (re.compile(r"disabled for the mailbox", re.I),
     "SMTP AUTH is disabled for the mailbox <mailbox>. An Exchange admin enables it: Set-CASMailbox -Identity "
     "<mailbox> -SmtpClientAuthenticationDisabled $false; it takes effect within an hour."),
    (re.compile(r"security defaults", re.I),
     "The tenant's security defaults block SMTP AUTH for <mailbox>. IT turns security defaults off (Entra ID → "
     "Overview → Properties → Manage security defaults) and protects sign-ins with Conditional Access instead."),
    (re.compile(r"did not meet the criteria", re.I),
     "A Conditional Access or authentication policy refused SMTP AUTH for <mailbox>: IT finds the reason in the "
     "sign-in logs of Entra ID; SMTP AUTH must also be enabled (Set-CASMailbox -Identity <mailbox> "
     "-SmtpClientAuthenticationDisabled $false)."),
    (re.compile(r"basic auth", re.I),
     "Microsoft took this for a password login (basic authentication), which is disabled. Check that "
     "smtp.upstream is smtp.office365.com:587 and that SMTP AUTH is enabled for <mailbox> (Set-CASMailbox "
     "-Identity <mailbox> -SmtpClientAuthenticationDisabled $false)."),
)
_SMTP_DISABLED = re.compile(r"\b5\.7\.139\b|SmtpClientAuthentication is disabled")


def hint_for(text: str, *, flow: str | None = None) -> str | None:
    """One sentence on what to do about the error ``text``, or None if there is nothing specific.

    ``flow="device"``: the text comes from the device code sign-in (some codes mean something
    else there).
    """
    text = text or ""
    found = lookup(text)
    if found is not None:
        code, entry = found
        if code == 53003 and flow == "device":
            return DEVICE_CODE_BLOCKED
        return entry.hint
    if _SMTP_DISABLED.search(text):
        return smtp_auth_disabled_hint(text)
    error = text.split(":", 1)[0].strip()
    return _ERROR_HINTS.get(error)


def smtp_auth_disabled_hint(reply: str, mailbox: str = "<mailbox>") -> str:
    """What to do about a ``535 5.7.139`` (chosen by its text) for the SMTP identity ``mailbox``."""
    for pattern, hint in _SMTP_DISABLED_VARIANTS:
        if pattern.search(reply):
            return hint.replace("<mailbox>", mailbox)
    return SMTP_AUTH_DISABLED.replace("<mailbox>", mailbox)


def imap_refused_hint(mailbox: str, owner: str, app_only: bool) -> str:
    """Why Microsoft answers ``NO AUTHENTICATE failed.`` (it does not say which of these it is)."""
    if app_only:
        return _app_mailbox_permission(mailbox, "IMAP.AccessAsApp")
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


def smtp_refused_hint(reply: str, user: str, owner: str, app_only: bool) -> str:
    """What to do when the SMTP server refused the token for the SMTP identity ``user``."""
    hint = hint_for(reply)
    if hint:
        return hint.replace("<mailbox>", user)
    if app_only:
        return (f"The app may not send as {user}: it needs the application permission SMTP.SendAsApp with "
                "admin consent, a service principal in Exchange (New-ServicePrincipal) and "
                f"Add-MailboxPermission -Identity {user} -User <service principal id> -AccessRights FullAccess.")
    return (f"{SMTP_AUTH_DISABLED.replace('<mailbox>', user)} The token must carry SMTP.Send (API permissions + "
            f"identity.scopes, then `proxy authorize {owner}`).")


def not_connected_hint(mailbox: str, owner: str, app_only: bool) -> str:
    """Exchange accepted the token but does not open ``mailbox`` ("User is authenticated but not connected")."""
    transient = ("(Exchange also says this briefly after many logins in a row and while a new mailbox is being "
                 "set up; then it passes by itself.)")
    if app_only:
        return _app_mailbox_permission(mailbox, "IMAP.AccessAsApp") + " " + transient
    if mailbox.casefold() != owner.casefold():
        return (f"{owner} may not open {mailbox}: an Exchange admin grants Full Access with Add-MailboxPermission "
                f"-Identity {mailbox} -User {owner} -AccessRights FullAccess (takes up to an hour). {transient}")
    return (f"Microsoft accepted the token but did not open {mailbox}: check that `proxy authorize {owner}` signed "
            f"in as {owner} itself (not another account) and that the mailbox exists and has a licence. {transient}")


def send_as_hint(trustee: str, address: str) -> str:
    """Exchange refused to send as ``address`` for the SMTP identity ``trustee`` (SendAsDenied)."""
    return (f"{trustee} may not send as {address}: an Exchange admin grants it with Add-RecipientPermission "
            f"-Identity {address} -Trustee {trustee} -AccessRights SendAs (takes up to an hour).")


def _app_mailbox_permission(mailbox: str, permission: str) -> str:
    return (f"The app may not open {mailbox}: in Exchange Online PowerShell register the app "
            "(New-ServicePrincipal -AppId <client id> -ObjectId <enterprise app object id>) and grant it "
            f"Add-MailboxPermission -Identity {mailbox} -User <service principal id> -AccessRights FullAccess; "
            f"the app also needs the application permission {permission} with admin consent. "
            "Changes take up to an hour.")


# ------------------------------------------------------------------------------ network and TLS
# One table for `proxy check` and `proxy authorize` (and the token refresh's log line): what a
# failure to reach the identity provider means and what to do. Kept apart from the Microsoft
# error tables (proxy/aadsts.py and the SMTP texts above).
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
