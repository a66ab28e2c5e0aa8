"""Which permissions an access token carries, read (not verified) for diagnosis: `proxy check`
reports missing ones, and a refused login can name the one its protocol needs."""

from __future__ import annotations

import base64
import json

# Per protocol: the delegated permission, then the app-only one.
IMAP_PERMISSIONS = ("IMAP.AccessAsUser.All", "IMAP.AccessAsApp")
SMTP_PERMISSIONS = ("SMTP.Send", "SMTP.SendAsApp")
POP_PERMISSIONS = ("POP.AccessAsUser.All", "POP.AccessAsApp")
PERMISSIONS = {"imap": IMAP_PERMISSIONS, "smtp": SMTP_PERMISSIONS, "pop3": POP_PERMISSIONS}


def missing_permission(protocol: str, token: str, scope: str | None) -> str | None:
    """The delegated permission ``protocol`` needs if the token is known to lack it (else None)."""
    needed = PERMISSIONS.get(protocol)
    granted = granted_permissions(token, scope)
    if needed is None or granted is None:
        return None
    names = {g.rsplit("/", 1)[-1].casefold() for g in granted}
    return None if any(n.casefold() in names for n in needed) else needed[0]


def granted_permissions(token: str, scope: str | None) -> set[str] | None:
    """The permissions a token carries: the ``scp``/``roles`` claims of a JWT access token (read,
    not verified: for diagnosis only), else the token response's ``scope``; None if unknown or
    only ``/.default`` (which names no permission)."""
    parts = token.split(".")
    if len(parts) == 3:
        try:
            claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
            found = set(str(claims.get("scp") or "").split()) | set(claims.get("roles") or [])
            if found:
                return found
        except (ValueError, TypeError, AttributeError):
            pass
    names = set((scope or "").split()) - {"openid", "profile", "offline_access", "email"}
    if not names or all(n.endswith("/.default") for n in names):
        return None
    return names
