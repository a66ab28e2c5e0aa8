"""Command line: ``proxy [-c CONFIG] COMMAND``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import signal
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
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxy", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default=os.environ.get("PROXY_CONFIG", "config.yaml"),
                        help="YAML config file (default: $PROXY_CONFIG or ./config.yaml)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        type=str.upper, help="log verbosity (default INFO); secrets are never logged")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="log line format (json suits containers)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the proxy (IMAP on 127.0.0.1:1143 by default)",
                                description="Run the proxy until interrupted (Ctrl+C or SIGTERM).")
    serve.set_defaults(func=cmd_serve)

    auth = commands.add_parser(
        "authorize", help="one-time browser sign-in for an account; sets its local password",
        description="Sign in to the identity provider in a browser (OAuth2 code flow with PKCE), "
                    "then store the tokens encrypted with the local password the mail client will use. "
                    "Run it again to renew a revoked authorization or to change the password.")
    auth.add_argument("user", help="account user name as listed in the config (accounts[].username)")
    auth.add_argument("--timeout", type=float, default=30.0,
                      help="seconds to wait for the sign-in to finish (default 30)")
    auth.add_argument("--no-browser", action="store_true",
                      help="print the sign-in address instead of opening a browser")
    auth.add_argument("--password-stdin", action="store_true",
                      help="read the local password from the first line of standard input")
    auth.add_argument("--port", type=int, default=0,
                      help="localhost port for the sign-in redirect (default: any free port)")
    auth.set_defaults(func=cmd_authorize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .logs import setup_logging
    setup_logging(args.log_level, args.log_format)
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


def cmd_authorize(config: Config, args: argparse.Namespace) -> int:
    from .authorize import AuthorizeError, authorize_browser
    account = _account(config, args.user)
    password = read_new_password(account.username, args.password_stdin)
    try:
        meta = authorize_browser(config, account, password, timeout=args.timeout,
                                 open_browser=not args.no_browser, port=args.port)
    except AuthorizeError as exc:
        print(f"proxy: authorization failed: {exc}", file=sys.stderr)
        return 1
    print(f"Authorized {account.username}; tokens stored encrypted in {config.token_path}.", file=sys.stderr)
    print(f"Next: `proxy -c {config.source or 'config.yaml'} serve`, then log in from the mail client "
          f"at {config.imap.listen} as {account.username} with the password you just chose.", file=sys.stderr)
    return 0 if meta else 1


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from .serve import serve
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        print(f"proxy: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
