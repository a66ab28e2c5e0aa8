"""`proxy status`, `proxy forget` and `proxy revoke`: look after the stored tokens without a password.

(The admin *HTTP* listener is proxy/adminhttp.py; this module is the command-line side.)

The status comes from the clear, non-secret ``meta`` of each token record (see proxy/tokens/store.py),
read as :class:`~proxy.tokens.state.TokenStatus`: expiry of the access token, whether a refresh
token is held, last refresh, last error, state. Nothing here decrypts a record, so nothing here
can show a secret. Both work the same on either store (folder or PostgreSQL).

``forget`` deletes a token owner's record. ``revoke`` does the same and then prints how to end
the authorization at Microsoft, which the proxy cannot do itself: Microsoft's identity platform
has no endpoint to revoke a refresh token (an admin revokes the user's sessions in Entra ID).
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Any

from .config import FLOW_CLIENT_CREDENTIALS, Config
from .tokens.state import NOT_AUTHORIZED, STORE_UNAVAILABLE, UNREADABLE, TokenStatus, owner_statuses
from .tokens.store import StoreError, open_store


async def status_rows(config: Config) -> list[dict[str, Any]]:
    """One dict per account: its mailbox, token owner, flow and the owner's stored token state."""
    store = open_store(config)
    try:
        await store.open()
        statuses = await owner_statuses(config, store)
    except StoreError as exc:
        statuses = {a.owner_key: TokenStatus.failed(exc, a.flow, unavailable=True) for a in config.accounts}
    finally:
        await store.close()
    rows = []
    for account in config.accounts:
        status = statuses[account.owner_key]
        read = status.state not in (NOT_AUTHORIZED, UNREADABLE, STORE_UNAVAILABLE)
        rows.append({"account": account.username, "mailbox": account.mailbox, "owner": account.owner,
                     "flow": account.flow, "state": status.state, "access_token_expires": status.access_token_expires,
                     "refresh_token": status.has_refresh_token if read else None,
                     "last_refresh": status.last_refresh, "last_error": status.last_error})
    return rows


def status_lines(rows: list[dict[str, Any]], now: float | None = None) -> list[str]:
    """``key=value`` text, one line per account (greppable, no secrets)."""
    now = time.time() if now is None else now
    lines = []
    for row in rows:
        parts = [row["account"], f"mailbox={row['mailbox']}", f"owner={row['owner']}", f"flow={row['flow']}"]
        state = row["state"]
        if state == "not_authorized":
            parts.append(f"state=not-authorized (run `proxy authorize {row['owner']}`)")
        elif state in (UNREADABLE, STORE_UNAVAILABLE):
            parts.append(f"state={state.replace('_', '-')} ({row['last_error']})")
        else:
            if state == "needs_authorization":
                parts.append(f"state=needs-authorization (run `proxy authorize {row['owner']}`)")
            else:
                parts.append(f"state={state}")
            expires = row["access_token_expires"]
            if expires:
                left = float(expires) - now
                relative = f"in {_duration(left)}" if left > 0 else "expired; renewed at the next login"
                parts.append(f"valid_until={_time(expires)} ({relative})")
            else:
                parts.append("valid_until=-")
            if row["flow"] == FLOW_CLIENT_CREDENTIALS:
                parts.append("refresh_token=not-needed (app-only)")
            else:
                parts.append(f"refresh_token={'yes' if row['refresh_token'] else 'NO'}")
            parts.append(f"last_refresh={_time(row['last_refresh']) if row['last_refresh'] else '-'}")
            parts.append(f"last_error={row['last_error'] or '-'}")
        lines.append("  ".join(parts))
    return lines


async def forget(config: Config, user: str, *, revoke: bool = False, out=sys.stdout) -> int:
    """Delete the token record of ``user`` (an account that owns its tokens, or a token owner)."""
    command = "revoke" if revoke else "forget"
    account = config.account(user)
    if account is not None and account.owner_key != account.key:
        sharing = ", ".join(a.username for a in config.sharing(account.owner))
        print(f"proxy: {account.username} has no tokens of its own: it opens {account.mailbox} with the tokens "
              f"of {account.owner}, which {sharing} use. To delete them (this stops all of these accounts): "
              f"`proxy {command} {account.owner}`", file=sys.stderr)
        return 1
    owner = config.owner_account(account.owner if account else user)
    name = owner.username if owner else user
    store = open_store(config)
    path = store.where(name)
    try:
        await store.open()
        if owner is None and store.peek(name) is None:
            names = ", ".join(a.username for a in config.accounts)
            print(f"proxy: {user} is not in the config's accounts and has no stored tokens (configured: {names})",
                  file=sys.stderr)
            return 2
        deleted = await store.delete(name)
    except (OSError, StoreError) as exc:
        print(f"proxy: cannot delete {path}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    users = ", ".join(a.username for a in config.sharing(name)) or f"{name} (no longer in the config)"
    if deleted:
        print(f"Deleted the stored tokens of {name}: {path}", file=out)
        print(f"Logins through the proxy stop for: {users}. `proxy authorize {name}` signs in again.", file=out)
    else:
        print(f"No tokens were stored for {name} (no {path}); nothing deleted.", file=out)
    if revoke:
        print(revoke_steps(name, owner is not None and owner.flow == FLOW_CLIENT_CREDENTIALS), file=out)
    elif deleted:
        print("The authorization itself stays valid at Microsoft until it expires; `proxy revoke` shows how "
              "to end it there.", file=out)
    return 0


def revoke_steps(name: str, app_only: bool) -> str:
    if app_only:
        return ("App-only tokens cannot be revoked one by one. To end this access at Microsoft, an admin deletes "
                "the app's client secret or certificate (Entra ID → App registrations → the app → Certificates & "
                "secrets) or removes its mailbox permission (Remove-MailboxPermission). Tokens already issued "
                "stay valid until they expire (at most 90 minutes).")
    return (f"To end the authorization at Microsoft as well (otherwise its refresh token stays valid for up to "
            f"90 days, on any computer holding a copy):\n"
            f"  - Entra admin center → Users → {name} → \"Revoke sessions\", or in PowerShell: "
            f"Revoke-MgUserSignInSession -UserId {name}\n"
            f"  - or a password change of {name} (revokes all refresh tokens);\n"
            f"  - to stop the app for everyone: Entra ID → Enterprise applications → the app → Properties → "
            f"\"Enabled for users to sign in?\": No.\n"
            f"Access tokens already issued stay valid until they expire (at most 90 minutes).")


def _time(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(float(stamp)).astimezone().isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
