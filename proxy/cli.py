"""Command line: ``proxy [-c CONFIG] COMMAND``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys

from . import __version__
from .config import Config, ConfigError, load_config

log = logging.getLogger("proxy")

DESCRIPTION = """\
Local IMAP proxy for mail clients that only know user name + password, in front of mail
servers that only accept OAuth2 (Microsoft 365). The client logs in to the proxy with a
local password; the proxy logs in upstream with XOAUTH2 and then passes every byte through.

First time:
  cp config.example.yaml config.yaml        # fill in identity.client_id and the accounts
  proxy -c config.yaml authorize alice@firm.de
  proxy -c config.yaml serve
then point the mail client at 127.0.0.1:1143 (no TLS), user alice@firm.de, the local password.

Looking after it:
  proxy status                 token state of every account (no password needed)
  proxy check alice@firm.de    test config, sign-in, IMAP and SMTP end to end, with advice
  proxy forget alice@firm.de   delete an account's stored tokens (revoke: and how to end them at Microsoft)
  proxy certs                  a local CA and certificate for TLS to the mail client (tls: in the config)
  proxy health                 ask a running proxy's admin listener (admin.listen) whether all is well
"""

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_LOG_FORMATS = ("text", "json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxy", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default=os.environ.get("PROXY_CONFIG", "config.yaml"),
                        help="YAML config file (default: $PROXY_CONFIG or ./config.yaml)")
    parser.add_argument("--log-level", default=os.environ.get("PROXY_LOG_LEVEL", "INFO").upper(),
                        choices=_LOG_LEVELS, type=str.upper,
                        help="log verbosity (default: $PROXY_LOG_LEVEL or INFO); secrets are never logged")
    parser.add_argument("--log-format", default=os.environ.get("PROXY_LOG_FORMAT", "text").lower(),
                        choices=_LOG_FORMATS,
                        help="log line format (default: $PROXY_LOG_FORMAT or text; json suits containers)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the proxy (IMAP on 127.0.0.1:1143 by default)",
                                description="Run the proxy until interrupted (Ctrl+C or SIGTERM).")
    serve.set_defaults(func=cmd_serve)

    auth = commands.add_parser(
        "authorize", help="one-time sign-in for an account (browser or device code); sets its local password",
        description="Get an account's tokens and store them encrypted with the local password the mail "
                    "client will use. Browser sign-in (OAuth2 code flow with PKCE) where a browser can "
                    "open; otherwise, or with --device, the device code flow: open the printed address on "
                    "any device and enter the code. Accounts with flow: client_credentials need no "
                    "sign-in (the app's secret or certificate gets the tokens); this only sets their "
                    "local password. An account with token: OWNER is authorized by signing in as OWNER, "
                    "and logs in with OWNER's local password. Run it again to renew a revoked "
                    "authorization or to change the password.")
    auth.add_argument("user", help="account user name as listed in the config (accounts[].username), "
                                   "or a token owner named by accounts[].token")
    auth.add_argument("--timeout", type=float, default=None,
                      help="seconds to wait for the sign-in to finish (default 30 for the browser; for "
                           "--device the code's own lifetime, 15 min at Microsoft)")
    auth.add_argument("--device", action="store_true",
                      help="device code flow: print an address and a code to enter on any device (for "
                           "servers and containers without a browser)")
    auth.add_argument("--browser", action="store_true",
                      help="use the browser sign-in even where no display is detected")
    auth.add_argument("--no-browser", action="store_true",
                      help="browser sign-in, but print the address instead of opening a browser")
    auth.add_argument("--password-stdin", action="store_true",
                      help="read the local password from the first line of standard input")
    auth.add_argument("--port", type=int, default=0,
                      help="localhost port for the sign-in redirect (default: any free port)")
    auth.set_defaults(func=cmd_authorize)

    status = commands.add_parser(
        "status", help="one line per account: mailbox, token owner, flow, token state (no secrets)",
        description="Show each account's mailbox, token owner and flow, and its token state as stored: "
                    "access token valid until, refresh token present, last refresh, last error. Needs no "
                    "password and shows no secret. A running `proxy serve` updates the state at each refresh.")
    status.add_argument("--json", action="store_true", help="print a JSON list instead of text lines")
    status.set_defaults(func=cmd_status)

    check = commands.add_parser(
        "check", help="diagnose the setup end to end, without a mail client",
        description="Check, in order: the config, that the identity provider answers, that a token can be "
                    "obtained, and that the upstream IMAP and SMTP servers are reachable over TLS and accept "
                    "the token with XOAUTH2. Each failure says what is wrong and what to do (AADSTS errors, "
                    "SMTP AUTH disabled, IMAP disabled, missing permissions). Without USER only the parts "
                    "that need no password. Exit status 0 when everything works, 1 otherwise.")
    check.add_argument("user", nargs="?", help="account to test the token and the logins of")
    check.add_argument("--password-stdin", action="store_true",
                       help="read the token owner's local password from standard input (else it is asked)")
    check.set_defaults(func=cmd_check)

    for name, summary, text in (
            ("forget", "delete an account's stored tokens (on this computer only)",
             "Delete the token file of USER (or of the token owner USER). The accounts that used it cannot "
             "log in until `proxy authorize` runs again; a running proxy stops refreshing them. The "
             "authorization itself stays valid at Microsoft: use `proxy revoke` to also learn how to end it."),
            ("revoke", "delete an account's stored tokens and show how to end the authorization at Microsoft",
             "Delete the token file of USER like `proxy forget`, then print the steps that end the "
             "authorization at Microsoft as well (the proxy cannot do it: Microsoft has no endpoint for it). "
             "Use it when a computer is lost or a person leaves.")):
        command = commands.add_parser(name, help=summary, description=text)
        command.add_argument("user", help="account user name or token owner")
        command.set_defaults(func=cmd_forget, revoke=name == "revoke")

    certs = commands.add_parser(
        "certs", help="create a local CA and a server certificate for the TLS listeners",
        description="Create in DIR (default: certs/ beside the config file) a local CA (ca.pem, ca.key) and a "
                    "server certificate (server.pem, server.key) for localhost, 127.0.0.1, ::1 and the --name "
                    "values, for tls.cert_file / tls.key_file. Keys are written readable by the owner only. The "
                    "CA is name-constrained to these names, so trusting it cannot vouch for any other server. "
                    "Prints how to make the mail client's computer trust the CA. Does not need a config file.")
    certs.add_argument("--dir", help="folder for the files (default: certs/ beside the config file)")
    certs.add_argument("--name", action="append", default=[], metavar="NAME",
                       help="another host name or IP address clients use to reach the proxy (repeatable)")
    certs.add_argument("--days", type=int, default=825, help="server certificate validity (default 825 days)")
    certs.add_argument("--force", action="store_true", help="replace existing files")
    certs.set_defaults(func=cmd_certs, needs_config=False)

    health = commands.add_parser(
        "health", help="ask a running proxy's admin listener whether it is healthy (or ready)",
        description="GET /healthz (or /readyz with --ready) from the admin listener of a running `proxy serve` "
                    "(admin.listen in the config) and print the answer. Exit status 0 if healthy (ready), "
                    "1 otherwise. Used as the container's HEALTHCHECK.")
    health.add_argument("--ready", action="store_true", help="ask /readyz: every account has a usable token")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    health.set_defaults(func=cmd_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level not in _LOG_LEVELS:  # a bad $PROXY_LOG_LEVEL (argparse checks only what is typed)
        parser.error(f"invalid log level {args.log_level!r} (from $PROXY_LOG_LEVEL?): "
                     f"choose from {', '.join(_LOG_LEVELS)}")
    if args.log_format not in _LOG_FORMATS:
        parser.error(f"invalid log format {args.log_format!r} (from $PROXY_LOG_FORMAT?): "
                     f"choose from {', '.join(_LOG_FORMATS)}")
    from .logs import setup_logging
    setup_logging(args.log_level, args.log_format)
    if not getattr(args, "needs_config", True):
        return args.func(None, args)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return args.func(config, args)
    except KeyboardInterrupt:
        print("\nproxy: interrupted", file=sys.stderr)
        return 130


def _account(config: Config, user: str):
    account = config.account(user)
    if account is None:
        names = ", ".join(a.username for a in config.accounts)
        raise SystemExit(f"proxy: {user} is not in the config's accounts (configured: {names})")
    return account


def read_new_password(user: str, from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        print(f"Choose the local password the mail client will use for {user}.", file=sys.stderr)
        password = getpass.getpass("Local password: ")
        if getpass.getpass("Repeat it: ") != password:
            raise SystemExit("proxy: the two passwords differ; nothing was changed")
    if len(password) < 8:
        raise SystemExit("proxy: the local password must have at least 8 characters; nothing was changed")
    if password != password.strip() or any(ord(c) < 32 for c in password):
        raise SystemExit("proxy: the local password must not start or end with spaces or contain "
                         "control characters; nothing was changed")
    return password


def _owner(config: Config, user: str):
    """The token owner that ``user`` (an account or a ``token:`` value) stands for."""
    account = config.account(user)
    owner = config.owner_account(account.owner if account is not None else user)
    if owner is None:
        names = ", ".join(a.username for a in config.accounts)
        raise SystemExit(f"proxy: {user} is not in the config's accounts (configured: {names})")
    if account is not None and account.owner_key != account.key:
        print(f"{account.username} opens {account.mailbox} with the tokens of {owner.username}: "
              f"this is about {owner.username}.", file=sys.stderr)
    return owner


def cmd_authorize(config: Config, args: argparse.Namespace) -> int:
    from .authorize import (AuthorizeError, authorize_app_only, authorize_browser, authorize_device,
                            browser_unavailable)
    from .config import FLOW_CLIENT_CREDENTIALS
    owner = _owner(config, args.user)
    users = ", ".join(a.username for a in config.sharing(owner.username))
    app_only = owner.flow == FLOW_CLIENT_CREDENTIALS
    if app_only and (args.device or args.browser or args.no_browser):
        raise SystemExit(f"proxy: {owner.username} uses app-only access (flow: client_credentials): nobody "
                         "signs in, so --device, --browser and --no-browser do not apply")
    if args.device and (args.browser or args.no_browser):
        raise SystemExit("proxy: choose either --device or the browser sign-in (--browser, --no-browser)")
    device = args.device
    if not app_only and not device and not args.browser and not args.no_browser:
        reason = browser_unavailable()
        if reason:
            print(f"Using the device code flow: {reason}. (--browser forces the browser sign-in.)", file=sys.stderr)
            device = True
    password = read_new_password(users, args.password_stdin)
    try:
        if app_only:
            meta = authorize_app_only(config, owner, password)
        elif device:
            meta = authorize_device(config, owner, password, timeout=args.timeout)
        else:
            meta = authorize_browser(config, owner, password, timeout=args.timeout or 30.0,
                                     open_browser=not args.no_browser, port=args.port)
    except AuthorizeError as exc:
        print(f"proxy: authorization failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nproxy: sign-in cancelled; nothing was stored", file=sys.stderr)
        return 130
    print(f"Authorized {owner.username}; tokens stored encrypted in {config.token_path}.", file=sys.stderr)
    print(f"Next: `proxy -c {config.source or 'config.yaml'} serve`, then log in from the mail client "
          f"at {config.imap.listen} as {users.replace(', ', ' or ')} with the password you just chose.",
          file=sys.stderr)
    return 0 if meta else 1


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    from .admin import status_lines, status_rows
    rows = status_rows(config)
    if args.json:
        import json
        print(json.dumps(rows, indent=1))
    else:
        for line in status_lines(rows):
            print(line)
    return 0


def cmd_check(config: Config, args: argparse.Namespace) -> int:
    from .check import run_check
    return asyncio.run(run_check(config, args.user, password_stdin=args.password_stdin))


def cmd_forget(config: Config, args: argparse.Namespace) -> int:
    from .admin import forget
    return forget(config, args.user, revoke=args.revoke)


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from .serve import serve
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        print(f"proxy: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_certs(config: None, args: argparse.Namespace) -> int:
    from pathlib import Path

    from .certs import create_local_certs
    directory = Path(args.dir) if args.dir else Path(args.config).expanduser().resolve().parent / "certs"
    try:
        certs, names = create_local_certs(directory, args.name, force=args.force, days=args.days)
    except FileExistsError as exc:
        print(f"proxy: nothing written: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"proxy: --name: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"proxy: cannot write to {directory}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(CERTS_DONE.format(ca=certs.ca_file, ca_key=certs.ca_key_file, cert=certs.cert_file, key=certs.key_file,
                            names=", ".join(names)))
    return 0


CERTS_DONE = """Created (keys readable by the owner only):
  {ca}       the local CA: clients must trust this one
  {ca_key}       its key: keep it secret (it can only vouch for the names below)
  {cert}   the proxy's certificate for {names}
  {key}   its key

Use them in the config:
  tls:
    cert_file: {cert}
    key_file: {key}
  imap:
    starttls: required         # or true (offered), and/or tls_listen: 127.0.0.1:1993 (IMAPS)
  smtp:
    starttls: required         # or true, and/or tls_listen: 127.0.0.1:1465 (SMTPS)

Make the mail client's computer trust the CA (ca.pem, never the server certificate or a key):
  Windows (the certificate store Windows mail clients use):
    certutil -addstore -f Root ca.pem          (as administrator: for all users)
    certutil -user -addstore -f Root ca.pem    (for the current user only)
    or copy it to ca.crt, double-click it > Install Certificate > "Trusted Root Certification Authorities"
  Debian, Ubuntu:
    sudo cp {ca} /usr/local/share/ca-certificates/oauth2-mail-proxy.crt && sudo update-ca-certificates
  Fedora, RHEL:
    sudo trust anchor {ca}
  Test it: curl --cacert {ca} imaps://127.0.0.1:1993 -u USER
"""


def cmd_health(config: Config, args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request
    if config.admin is None:
        print("proxy: admin.listen is not set in the config (or $PROXY_ADMIN_LISTEN): no admin listener to ask",
              file=sys.stderr)
        return 2
    address = config.admin.listen
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{address.port}/{'readyz' if args.ready else 'healthz'}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP proxy
    try:
        with opener.open(url, timeout=args.timeout) as response:
            print(response.read().decode("utf-8", "replace").strip())
            return 0
    except urllib.error.HTTPError as exc:
        print(exc.read().decode("utf-8", "replace").strip())
        return 1
    except (OSError, ValueError) as exc:
        print(f"proxy: {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
