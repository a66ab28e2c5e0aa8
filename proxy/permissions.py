"""Which permissions an access token carries, read (not verified) for diagnosis: `proxy check`
reports missing ones, and a refused login can name the one its protocol needs."""

from __future__ import annotations

import base64
import json

# Per protocol: the delegated permission, then the app-only one.
IMAP_PERMISSIONS = ("IMAP.AccessAsUser.All", "IMAP.AccessAsApp")
SMTP_PERMISSIONS = ("SMTP.Send", "SMTP.SendAsApp")


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
