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
from .system import current_user, default_config_path, is_windows, safe_console

log = logging.getLogger("proxy")

DESCRIPTION = """\
Local IMAP and SMTP proxy for mail clients that only know user name + password, in front of
mail servers that only accept OAuth2 (Microsoft 365). The client logs in to the proxy with a
local password (IMAP on 127.0.0.1:1143, SMTP on 127.0.0.1:1587); the proxy logs in upstream
with XOAUTH2 and then passes every byte through.

First time:
  proxy init config.yaml                    # the commented example; fill in client_id and the accounts
  proxy -c config.yaml authorize alice@firm.de
  proxy -c config.yaml serve
then point the mail client at IMAP 127.0.0.1:1143 and SMTP 127.0.0.1:1587 (no TLS), user
alice@firm.de, the local password. -c works before or after the command.

Looking after it:
  proxy status                 token state of every account (no password needed)
  proxy check alice@firm.de    test config, sign-in, IMAP and SMTP end to end, with advice
  proxy forget alice@firm.de   delete an account's stored tokens (revoke: and how to end them at Microsoft)
  proxy certs                  a local CA and certificate for TLS to the mail client (tls: in the config)
  proxy health                 ask a running proxy's admin listener (admin.listen) whether all is well
"""

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_LOG_FORMATS = ("text", "json")


def _global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """-c, --log-level and --log-format, accepted before the command and after it (where they are
    SUPPRESSed, so a value given before the command is not reset to the default)."""
    def default(value: str) -> str:
        return value if defaults else argparse.SUPPRESS
    parser.add_argument("-c", "--config",
                        default=default(os.environ.get("PROXY_CONFIG") or default_config_path()),
                        help=f"YAML config file (default: $PROXY_CONFIG or {default_config_path()})")
    parser.add_argument("--log-level", default=default(os.environ.get("PROXY_LOG_LEVEL", "INFO").upper()),
                        choices=_LOG_LEVELS, type=str.upper,
                        help="log verbosity (default: $PROXY_LOG_LEVEL or INFO); secrets are never logged")
    parser.add_argument("--log-format", default=default(os.environ.get("PROXY_LOG_FORMAT", "text").lower()),
                        choices=_LOG_FORMATS,
                        help="log line format (default: $PROXY_LOG_FORMAT or text; json suits containers)")


def _number(kind, minimum: float, maximum: float, what: str):
    """An argparse type: a number in [minimum, maximum] (argparse turns the error into usage + exit 2)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not minimum <= value <= maximum:  # also refuses nan
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_seconds = _number(float, 0.1, 86400, "seconds from 0.1 to 86400")
_port = _number(int, 0, 65535, "a port from 0 to 65535 (0: any free port)")
_days = _number(int, 1, 36500, "a number of days from 1 to 36500")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxy", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _global_options(parser, defaults=True)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_parser = commands.add_parser

    def add_command(name: str, **kwargs):
        return add_parser(name, parents=[common], **kwargs)
    commands.add_parser = add_command  # every command takes -c etc. after its name too

    init = commands.add_parser(
        "init", help="write the commented example config (then fill in client_id and the accounts)",
        description="Write the commented example config (the same text as config.example.yaml) to PATH "
                    f"(default: -c, $PROXY_CONFIG or {default_config_path()}), creating its folder, and print "
                    "the next steps. Never overwrites an existing file.")
    init.add_argument("path", nargs="?", help="where to write it (default: the -c path)")
    init.set_defaults(func=cmd_init, needs_config=False)

    serve = commands.add_parser(
        "serve", help="run the proxy (IMAP on 127.0.0.1:1143, SMTP on 127.0.0.1:1587 by default)",
        description="Run the proxy until interrupted (Ctrl+C, or SIGTERM; a second one ends open sessions at "
                    "once). SIGHUP, or saving the config file, reloads the config.")
    serve.add_argument("--log-file", metavar="PATH",
                       help="append the log to PATH (UTF-8) instead of the console: for a Windows task or "
                            "service, which has no console")
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
    auth.add_argument("--timeout", type=_seconds, default=None,
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
    auth.add_argument("--port", type=_port, default=0,
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
    certs.add_argument("--days", type=_days, default=825, help="server certificate validity (default 825 days)")
    certs.add_argument("--force", action="store_true", help="replace existing files")
    certs.set_defaults(func=cmd_certs, needs_config=False)

    health = commands.add_parser(
        "health", help="ask a running proxy's admin listener whether it is healthy (or ready)",
        description="GET /healthz (or /readyz with --ready) from the admin listener of a running `proxy serve` "
                    "(admin.listen in the config) and print the answer. Exit status 0 if healthy (ready), "
                    "1 otherwise. Used as the container's HEALTHCHECK.")
    health.add_argument("--ready", action="store_true",
                        help="ask /readyz: the listeners are bound and the token store was read since start")
    health.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to wait for the answer (default 5)")
    health.set_defaults(func=cmd_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    safe_console(sys.stdout, sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level not in _LOG_LEVELS:  # a bad $PROXY_LOG_LEVEL (argparse checks only what is typed)
        parser.error(f"invalid log level {args.log_level!r} (from $PROXY_LOG_LEVEL?): "
                     f"choose from {', '.join(_LOG_LEVELS)}")
    if args.log_format not in _LOG_FORMATS:
        parser.error(f"invalid log format {args.log_format!r} (from $PROXY_LOG_FORMAT?): "
                     f"choose from {', '.join(_LOG_FORMATS)}")
    from .logs import setup_logging
    try:
        setup_logging(args.log_level, args.log_format, log_file=getattr(args, "log_file", None))
    except OSError as exc:
        print(f"proxy: cannot write the log file {args.log_file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        if not getattr(args, "needs_config", True):
            return args.func(None, args)
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"proxy: configuration error: {exc}", file=sys.stderr)
            if not os.path.exists(args.config):
                print(f"(create one with `proxy init {args.config}`)", file=sys.stderr)
            return 2
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


class UsageError(SystemExit):
    """A problem with how the command was called: the message, then exit status 2."""

    def __init__(self, message: str):
        print(message, file=sys.stderr)
        super().__init__(2)


def require_terminal(what: str) -> None:
    """Refuse to prompt when standard input is not a terminal (a pipe, a service, a script):
    getpass would read the pipe or fail with a traceback."""
    stdin = sys.stdin
    if stdin is None or not stdin.isatty():
        raise UsageError(f"proxy: standard input is not a terminal, so {what} cannot be typed here. Pass it on "
                         "standard input with --password-stdin (one line), or run the command in a console "
                         "window (on Windows not Git Bash's mintty; `winpty` helps there)")


def read_new_password(user: str, from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline() if sys.stdin is not None else ""
        if not line:
            raise UsageError("proxy: --password-stdin: standard input is empty (expected the password on one line)")
        password = line.rstrip("\r\n")
    else:
        require_terminal("the local password")
        print(f"Choose the local password the mail client will use for {user}.", file=sys.stderr)
        try:
            password = getpass.getpass("Local password: ")
            repeated = getpass.getpass("Repeat it: ")
        except EOFError:
            raise SystemExit("\nproxy: no password entered; nothing was changed") from None
        if repeated != password:
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
    from .authorize import AuthorizeError, browser_unavailable, check_token_store
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
    # Everything that can be refused is refused before the sign-in (nobody should do MFA for nothing):
    # the password's source, the token store, then the password itself.
    password = read_new_password(users, True) if args.password_stdin else None
    if password is None:
        require_terminal("the local password")
    try:
        created = check_token_store(config)
    except AuthorizeError as exc:
        print(f"proxy: {exc}; nothing was signed in", file=sys.stderr)
        return 1
    try:
        meta = _sign_in(config, args, owner, users, app_only, device, password)
    finally:
        if created:  # a folder made for tokens that never came goes again (rmdir: only if empty)
            try:
                config.token_path.rmdir()
            except OSError:
                pass
    if meta is None:
        return 1
    from .tokens.store import open_store
    print(f"Authorized {owner.username}; tokens stored encrypted in {open_store(config).describe()}.",
          file=sys.stderr)
    print(f"Next: `proxy -c {config.source or 'config.yaml'} serve`, then log in from the mail client "
          f"(IMAP {config.imap.listen}, SMTP {config.smtp.listen}) as {users.replace(', ', ' or ')} with the "
          "password you just chose.", file=sys.stderr)
    return 0 if meta else 1


def _sign_in(config: Config, args: argparse.Namespace, owner, users: str, app_only: bool, device: bool,
             password: str | None) -> dict | None:
    """The sign-in itself (after every check that can refuse); None if it failed (already said)."""
    from .authorize import AuthorizeError, authorize_app_only, authorize_browser, authorize_device
    if password is None:
        password = read_new_password(users, False)
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
        return None
    except KeyboardInterrupt:
        print("\nproxy: sign-in cancelled; nothing was stored", file=sys.stderr)
        raise SystemExit(130) from None
    return meta


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    from .admin import status_lines, status_rows
    rows = asyncio.run(status_rows(config))
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
    return asyncio.run(forget(config, args.user, revoke=args.revoke))


def cmd_init(config: None, args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import example_config_text
    path = Path(args.path or args.config).expanduser()
    if path.is_dir():
        path = path / "config.yaml"
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True)
        # O_EXCL: never overwrite, even if the file appears between a check and the write.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    except FileExistsError:
        if path.parent.is_dir():
            print(f"proxy: {path} already exists; nothing was written (edit it, or give another path)",
                  file=sys.stderr)
            return 1
        print(f"proxy: cannot create {path}: {path.parent} is not a folder", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"proxy: cannot create {path} as user {current_user()}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
        handle.write(example_config_text())
    shown = path.resolve()  # Microsoft Store Python writes %LOCALAPPDATA% elsewhere: show where it really is
    config_arg = f'"{shown}"' if " " in str(shown) else str(shown)
    private = "" if is_windows() else " (readable by you only)"  # Windows: the folder's access list decides
    print(INIT_DONE.format(path=shown, c=config_arg, private=private), file=sys.stderr)
    return 0


INIT_DONE = """Wrote the example config to {path}{private}.
Next:
  1. Fill in identity.client_id (and identity.authority with your tenant) from the Azure app
     registration (docs/azure-setup.md), and list the mailboxes under accounts.
  2. proxy -c {c} check                  # the config and the identity provider, no password needed
  3. proxy -c {c} authorize alice@firm.de   # once per account: sign in, choose the local password
  4. proxy -c {c} serve                  # then IMAP 127.0.0.1:1143, SMTP 127.0.0.1:1587 in the mail client
Always on: contrib/oauth2-mail-proxy.service (Linux, systemd) or docs/windows.md (Windows)."""


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from .serve import serve
    from .tokens.store import StoreError
    try:
        asyncio.run(serve(config))
    except (OSError, StoreError) as exc:  # StoreError: e.g. the PostgreSQL driver is not installed
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
    request = urllib.request.Request(url)
    if config.admin.token:
        request.add_header("Authorization", f"Bearer {config.admin.token}")
    try:
        with opener.open(request, timeout=args.timeout) as response:
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
