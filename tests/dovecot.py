"""A real Dovecot 2.3 as the tests' upstream mail server (the role Microsoft 365 plays in production).

``Dovecot(workdir, pki, idp, sink_port).start()`` writes a self-contained ``dovecot.conf`` into
``workdir`` (own ``base_dir``, ``state_dir`` and log file; nothing under /etc/dovecot or /run is
touched) and runs ``dovecot -F -c <conf>`` in the foreground as a child process:

- IMAP with implicit TLS on 127.0.0.1 (``imap_host``/``imap_port``);
- POP3 with implicit TLS on 127.0.0.1 (``pop3_host``/``pop3_port``), as outlook.office365.com:995;
- submission on 127.0.0.2 (``submission_host``/``submission_port``) with STARTTLS; the
  listener is not on the client's own address, so Dovecot does not consider the connection
  secure and offers AUTH only after STARTTLS, like smtp.office365.com. Mail is relayed to the
  sink on 127.0.0.1:``sink_port`` without TLS;
- SASL XOAUTH2 and OAUTHBEARER only, checked by the oauth2 passdb against the identity
  provider's ``/introspect`` (the token owner must equal the login user name). A second, Lua
  passdb (package dovecot-auth-lua) plays Exchange's mailbox permissions for shared mailboxes
  and app-only tokens: when the owner differs from the login user (the mailbox), it introspects
  the token and asks the identity provider's ``/delegation?owner=&mailbox=`` (set by
  ``idp.allow_delegation``) whether that owner may open the mailbox; a failed login
  is answered within 0.5 s (``auth_failure_delay = 0``; Dovecot 2.3.19 still flushes failures
  on a 500 ms timer) instead of 2 s, and the growing per-IP penalty is off;
- a third passdb (Lua, first in the chain) plays Exchange's per-protocol permission for POP3: a
  token whose scope has neither POP.AccessAsUser.All nor ``.default`` (app-only) is refused there,
  while IMAP and submission accept it;
- a maildir per user under ``workdir/mail``, owned by the ``dovecot`` user when run as root
  (``workdir`` and its parents must then be traversable by that user), by the current user
  otherwise (all *_user settings become the current user and chroots are turned off).

Dovecot missing is an error (:class:`DovecotMissing`): integration tests never skip silently.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

from tests.idp import IdentityProvider
from tests.pki import TestPKI

DOVECOT_PACKAGES = "dovecot-imapd dovecot-pop3d dovecot-submissiond dovecot-auth-lua"


# URL-encoding for the Lua passdbs' requests to the identity provider.
_LUA_ESCAPE = """local function escape(text)
  return (string.gsub(text, "[^%w%-%._~@]", function(c) return string.format("%%%02X", string.byte(c)) end))
end
"""


class DovecotMissing(RuntimeError):
    """Dovecot is not installed."""


class DovecotError(RuntimeError):
    """Dovecot did not start or a doveadm command failed; the message includes its log."""


def _find(program: str) -> str:
    path = shutil.which(program) or next((f"{d}/{program}" for d in ("/usr/sbin", "/usr/bin")
                                          if os.access(f"{d}/{program}", os.X_OK)), None)
    if path is None:
        raise DovecotMissing(f"{program} not found: install {DOVECOT_PACKAGES} (bash tests/run.sh does)")
    return path


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _wait_for_port(host: str, port: int, process: subprocess.Popen[bytes], deadline: float) -> bool:
    """True once ``host:port`` accepts connections; False if the process exited or time ran out."""
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Dovecot:
    """A Dovecot instance in ``workdir`` that trusts ``idp``'s tokens and relays to the sink."""

    imap_host = "127.0.0.1"
    pop3_host = "127.0.0.1"
    submission_host = "127.0.0.2"

    def __init__(self, workdir: str | os.PathLike[str], pki: TestPKI, idp: IdentityProvider, sink_port: int,
                 sink_host: str = "127.0.0.1"):
        self.workdir = Path(workdir).resolve()
        self.pki, self.idp, self.sink_host, self.sink_port = pki, idp, sink_host, sink_port
        self.config_file = self.workdir / "dovecot.conf"
        self.log_file = self.workdir / "dovecot.log"
        self.mail_root = self.workdir / "mail"
        self.imap_port = self.pop3_port = self.submission_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        if os.geteuid() == 0:
            self._internal_user, self._login_user = "dovecot", "dovenull"
            try:  # the Debian package's unprivileged users; mail files belong to "dovecot"
                entry = pwd.getpwnam("dovecot")
                pwd.getpwnam("dovenull")
            except KeyError:
                raise DovecotMissing(f"no dovecot/dovenull users: install {DOVECOT_PACKAGES}") from None
            self._mail_uid, self._mail_gid = entry.pw_uid, entry.pw_gid
        else:
            self._mail_uid, self._mail_gid = os.getuid(), os.getgid()
            self._internal_user = self._login_user = pwd.getpwuid(self._mail_uid).pw_name

    # ----------------------------------------------------------------- configuration
    def config_text(self) -> str:
        """The generated dovecot.conf (ports must have been chosen)."""
        rootless = os.geteuid() != 0
        no_chroot = "\n  chroot =" if rootless else ""
        group = grp.getgrgid(self._mail_gid).gr_name
        return f"""\
# Generated by tests/dovecot.py: a throw-away upstream server for the tests.
base_dir = {self.workdir}/run
state_dir = {self.workdir}/state
instance_name = test-dovecot-{self.imap_port}
log_path = {self.log_file}
protocols = imap pop3 submission
listen = 127.0.0.1
hostname = upstream.test
login_greeting = Test upstream ready.

default_internal_user = {self._internal_user}
default_internal_group = {group if rootless else "dovecot"}
default_login_user = {self._login_user}
first_valid_uid = {self._mail_uid}
first_valid_gid = {self._mail_gid}

ssl = yes
ssl_cert = <{self.pki.cert_file}
ssl_key = <{self.pki.key_file}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes

auth_mechanisms = xoauth2 oauthbearer
auth_failure_delay = 0  # default 2 s; Dovecot 2.3.19 still answers failures on a 500 ms tick
auth_verbose = yes
# POP3 only: a token without the POP permission is refused (as Exchange does); others go on.
passdb {{
  driver = lua
  mechanisms = xoauth2 oauthbearer
  args = file={self.workdir}/pop-scope.lua blocking=yes
  result_success = continue-fail
  result_failure = return-fail
  result_internalfail = return-fail
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {self.workdir}/oauth2.conf.ext
}}
# Tried when the oauth2 passdb fails: a delegate's (or an app's) token for someone else's mailbox.
passdb {{
  driver = lua
  mechanisms = xoauth2 oauthbearer
  args = file={self.workdir}/delegation.lua blocking=yes
}}
ssl_client_ca_file = {self.workdir}/ca.pem
userdb {{
  driver = static
  args = uid={self._mail_uid} gid={self._mail_gid} home={self.mail_root}/%Lu allow_all_users=yes
}}
mail_location = maildir:~/Maildir
mail_max_userip_connections = 1000

service imap-login {{{no_chroot}
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    address = {self.imap_host}
    port = {self.imap_port}
    ssl = yes
  }}
}}
service pop3-login {{{no_chroot}
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    address = {self.pop3_host}
    port = {self.pop3_port}
    ssl = yes
  }}
}}
# Not on 127.0.0.1: Dovecot treats a client on its own address as secure and would offer AUTH
# before STARTTLS.
service submission-login {{{no_chroot}
  inet_listener submission {{
    address = {self.submission_host}
    port = {self.submission_port}
  }}
}}
service anvil {{{no_chroot}
  unix_listener anvil-auth-penalty {{  # no growing per-IP delay after failed logins
    mode = 0
  }}
}}
submission_relay_host = {self.sink_host}
submission_relay_port = {self.sink_port}
submission_relay_ssl = no
"""

    def oauth2_text(self) -> str:
        """The oauth2 passdb's settings: RFC 7662 introspection at the identity provider."""
        return f"""\
introspection_url = {self.idp.introspection_url}
introspection_mode = post
force_introspection = yes
username_attribute = username
active_attribute = active
active_value = true
tls_ca_cert_file = {self.workdir}/ca.pem
timeout_msecs = 10000
"""

    def delegation_lua_text(self) -> str:
        """The Lua passdb: accept a token whose owner may open the login user's mailbox.

        Dovecot 2.3's XOAUTH2 mechanism verifies the token as the "password" through the passdb
        chain; this one introspects it and asks the identity provider's /delegation endpoint.
        """
        return f"""\
-- Generated by tests/dovecot.py: shared-mailbox delegation for the test upstream.
local base = "{self.idp.url}"

{_LUA_ESCAPE}
local function get(path)
  local client = dovecot.http.client{{request_timeout_msecs = 5000, max_attempts = 1}}
  local response = client:request{{url = base .. path, method = "GET"}}:submit()
  if response:status() ~= 200 then
    return nil
  end
  return response:payload()
end

function auth_passdb_lookup(req)
  return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "lookup not supported"
end

function auth_password_verify(req, token)
  local info = get("/introspect?token=" .. escape(token))
  if info == nil or not string.find(info, '"active":%s*true') then
    return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, ""
  end
  local owner = string.match(info, '"username":%s*"([^"]*)"')
  if owner == nil then
    return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, ""
  end
  if string.lower(owner) == string.lower(req.user) then
    return dovecot.auth.PASSDB_RESULT_OK, ""
  end
  local answer = get("/delegation?owner=" .. escape(owner) .. "&mailbox=" .. escape(req.user))
  if answer ~= nil and string.find(answer, '"allowed":%s*true') then
    req:log_info("delegation: " .. owner .. " may open " .. req.user)
    return dovecot.auth.PASSDB_RESULT_OK, ""
  end
  req:log_info("delegation: " .. owner .. " may not open " .. req.user)
  return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, ""
end
"""

    def pop_scope_lua_text(self) -> str:
        """The Lua passdb in front of the others: POP3 logins need a token with the POP permission."""
        return f"""\
-- Generated by tests/dovecot.py: Exchange's POP permission check for the test upstream.
local base = "{self.idp.url}"

{_LUA_ESCAPE}
function auth_passdb_lookup(req)
  return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "lookup not supported"
end

function auth_password_verify(req, token)
  if req.service ~= "pop3" then
    return dovecot.auth.PASSDB_RESULT_OK, ""
  end
  local client = dovecot.http.client{{request_timeout_msecs = 5000, max_attempts = 1}}
  local response = client:request{{url = base .. "/introspect?token=" .. escape(token), method = "GET"}}:submit()
  if response:status() ~= 200 then
    return dovecot.auth.PASSDB_RESULT_OK, ""  -- the next passdbs refuse what is not a valid token
  end
  local info = response:payload()
  if not string.find(info, '"active":%s*true') then
    return dovecot.auth.PASSDB_RESULT_OK, ""
  end
  local scope = string.match(info, '"scope":%s*"([^"]*)"') or ""
  if string.find(scope, "POP.AccessAsUser.All", 1, true) or string.find(scope, "/.default", 1, true) then
    return dovecot.auth.PASSDB_RESULT_OK, ""
  end
  req:log_info("pop-scope: the token has no POP permission")
  return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, ""
end
"""

    # ----------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 20.0) -> None:
        """Write the configuration and run Dovecot until its listeners accept connections."""
        dovecot = _find("dovecot")
        _find("doveadm")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)  # the mail, auth and login processes run as other users
        shutil.copyfile(self.pki.ca_file, self.workdir / "ca.pem")  # read by the auth process
        (self.workdir / "ca.pem").chmod(0o644)
        self.mail_root.mkdir(exist_ok=True)
        os.chown(self.mail_root, self._mail_uid, self._mail_gid)
        self.mail_root.chmod(stat.S_IRWXU)
        for attempt in range(3):  # a chosen free port can be taken before Dovecot binds it
            self.imap_port = _free_port(self.imap_host)
            self.pop3_port = _free_port(self.pop3_host)
            self.submission_port = _free_port(self.submission_host)
            self.config_file.write_text(self.config_text())
            (self.workdir / "oauth2.conf.ext").write_text(self.oauth2_text())
            (self.workdir / "delegation.lua").write_text(self.delegation_lua_text())
            (self.workdir / "pop-scope.lua").write_text(self.pop_scope_lua_text())
            with open(self.workdir / "dovecot.stderr", "ab") as stderr:
                self._process = subprocess.Popen([dovecot, "-F", "-c", str(self.config_file)],
                                                 stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
            deadline = time.monotonic() + timeout
            if (_wait_for_port(self.imap_host, self.imap_port, self._process, deadline)
                    and _wait_for_port(self.pop3_host, self.pop3_port, self._process, deadline)
                    and _wait_for_port(self.submission_host, self.submission_port, self._process, deadline)):
                return
            self.stop()
            if "Address already in use" not in self.log_text() or attempt == 2:
                break
        raise DovecotError(f"Dovecot did not start; its log:\n{self.log_text()}")

    def stop(self) -> None:
        """Stop Dovecot (SIGTERM to the master, which stops its children)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        """Dovecot's log file and anything it printed before logging started."""
        parts = [p.read_text(errors="replace") for p in (self.workdir / "dovecot.stderr", self.log_file)
                 if p.exists()]
        return "".join(parts)

    # ----------------------------------------------------------------- mail
    def deliver(self, user: str, message: bytes, mailbox: str = "INBOX", create: bool = False) -> None:
        """Store ``message`` in ``user``'s mailbox (``doveadm save``, as the mail user); ``create``:
        create the mailbox first if it does not exist."""
        if create:  # (fails harmlessly if it exists)
            subprocess.run([_find("doveadm"), "-c", str(self.config_file), "mailbox", "create", "-u", user, mailbox],
                           capture_output=True, timeout=30)
        result = subprocess.run([_find("doveadm"), "-c", str(self.config_file), "save", "-u", user, "-m", mailbox],
                                input=message, capture_output=True, timeout=30)
        if result.returncode != 0:
            raise DovecotError(f"doveadm save failed ({result.returncode}): "
                               f"{result.stderr.decode(errors='replace')}\n{self.log_text()[-4000:]}")
