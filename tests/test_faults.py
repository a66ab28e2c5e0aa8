"""Faults, end to end, against the real Dovecot and the local identity provider, with `proxy serve` logging
at DEBUG. Complements tests/test_imap_e2e.py (provider down/hanging/500/429 at login time, revoked
authorization, untrusted upstream certificate, silent upstream) and tests/test_smtp_faults.py (drop
and stall mid-DATA): here the provider is slow and throttles the background refresher, the refresh
token expires (also across a restart), the upstream refuses, fails TLS or shows a certificate for
another name, drops mid-FETCH; token files are torn by SIGKILL, corrupt or unreadable; clients say
nothing, drip a byte at a time, flood the listeners, announce 2 GB literals or guess passwords.

After every test, every text it produced (proxy logs, `proxy authorize` output, what clients
received, token files) is searched for secrets: see the ``beds`` fixture."""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid

import pytest
import yaml

from proxy.tokens.folder import FolderStore
from proxy.tokens.store import derive_key, open_sealed
from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.faultbed import PASSWORD, Bed, Client, FakeTLSFailure, leaks
from tests.harness import ROOT, TcpForwarder, free_port, rss_kib


def user(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}@example.com"


def message(subject: str, body: bytes = b"Hello.\r\n") -> bytes:
    return (f"From: a@example.com\r\nTo: b@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@example.com>\r\n\r\n").encode() + body


@pytest.fixture
def beds(tmp_path, idp_reset, pki, dovecot):
    """``beds(*users, **config sections)`` makes a :class:`Bed`; afterwards no secret may appear in
    anything the test's proxies, `proxy authorize` runs and clients produced, and the token
    folder and files must be 0700 and 0600."""
    made: list[Bed] = []

    def make(*users: str, **sections) -> Bed:
        bed = Bed(tmp_path / f"bed{len(made)}", idp_reset, pki, dovecot, list(users), **sections)
        made.append(bed)
        return bed

    yield make
    for bed in made:
        bed.stop()
    for bed in made:
        found = leaks(bed.texts(), bed.secrets())
        assert not found, f"secrets in the output: {found}"
        tokens = bed.directory / "tokens"
        if os.name != "nt" and tokens.is_dir():       # as `proxy authorize` and `proxy serve` left them
            assert stat.S_IMODE(tokens.stat().st_mode) == 0o700
            for path in tokens.iterdir():
                if path.is_file() and not path.is_symlink():
                    assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


# ---------------------------------------------------------------------------------- identity provider
def test_slow_provider_answer_is_used_and_throttling_backs_off(beds, idp_reset):
    """Slow: a login that cannot wait gets NO within its deadline, but the refresh goes on and the
    next login uses its result (one token request). Throttled (429): neither logins nor the
    background refresher retry in a loop, and the proxy recovers by itself."""
    amy, ben = user("amy"), user("ben")
    idp_reset.set_access_token_lifetime(3)
    bed = beds(amy, ben, limits={"login_timeout": 3})
    bed.authorize(amy)
    bed.authorize(ben)
    time.sleep(3.5)                                   # both stored access tokens have expired
    bed.start()
    idp_reset.set_access_token_lifetime(3600)
    idp_reset.reset_counters()
    idp_reset.set_fault("hang")                      # the provider answers only when the fault is cleared
    clear = threading.Timer(4.0, idp_reset.clear_faults)
    clear.start()
    started = time.monotonic()
    reply = bed.imap_login(amy)
    assert "UNAVAILABLE" in reply and time.monotonic() - started < 3.8
    clear.join()
    time.sleep(0.5)                                   # the slow answer has arrived (msal's timeout is 5 s)
    assert bed.imap_login(amy) == "OK"
    assert idp_reset.count("token:refresh_token") == 1

    idp_reset.set_access_token_lifetime(3)           # ben refreshes in the background every ~2 s
    assert bed.imap_login(ben) == "OK"
    idp_reset.reset_counters()
    idp_reset.set_fault("429", retry_after=1)
    time.sleep(7)
    throttled = idp_reset.count("token:refresh_token")
    assert 1 <= throttled <= 4, throttled             # backing off (2 s, 4 s, ...), not a loop
    for _ in range(3):
        assert "UNAVAILABLE" in bed.imap_login(ben)   # clients retrying do not add requests either
    assert idp_reset.count("token:refresh_token") <= throttled + 1
    idp_reset.clear_faults()
    deadline = time.monotonic() + 10
    while (reply := bed.imap_login(ben)) != "OK":
        assert time.monotonic() < deadline, reply
        time.sleep(1)


def test_expired_refresh_token_is_marked_not_deleted_and_names_proxy_authorize(beds, idp_reset):
    cal = user("cal")
    bed = beds(cal)
    bed.authorize(cal)
    bed.start()
    assert bed.imap_login(cal) == "OK"
    idp_reset.expire_refresh_tokens(cal)             # AADSTS700082, invalid_grant
    idp_reset.expire_access_tokens()                 # Dovecot refuses the held token: a refresh is needed
    idp_reset.reset_counters()
    for _ in range(3):
        reply = bed.imap_login(cal)
        assert "AUTHENTICATIONFAILED" in reply and f"proxy authorize {cal}" in reply, reply
    code, text = bed.smtp_login(cal)
    assert code == 535 and f"proxy authorize {cal}".encode() in text, text
    assert idp_reset.count("token:refresh_token") == 1   # one refresh, no retry storm
    data = json.loads(bed.token_file(cal).read_text())
    assert data["meta"]["state"] == "needs_authorization" and "invalid_grant" in data["meta"]["last_error"]
    assert data["meta"]["has_refresh_token"] is True       # marked unusable, not deleted
    bed.restart()                                          # the mark outlives the process
    reply = bed.imap_login(cal)
    assert "AUTHENTICATIONFAILED" in reply and f"proxy authorize {cal}" in reply, reply
    code, text = bed.smtp_login(cal)
    assert code == 535 and f"proxy authorize {cal}".encode() in text, text
    time.sleep(1)
    assert idp_reset.count("token:refresh_token") == 1   # nor after the restart
    bed.authorize(cal)
    assert bed.imap_login(cal) == "OK"


# ---------------------------------------------------------------------------------- upstream servers
def test_upstream_refused_tls_failure_and_certificate_for_another_name(beds, dovecot):
    dee = user("dee")
    bed = beds(dee)
    bed.authorize(dee)
    fake = FakeTLSFailure()
    # 127.0.0.3 reaches the real Dovecot, but its certificate names 127.0.0.1 and 127.0.0.2 only.
    imap_alias = TcpForwarder("127.0.0.1", dovecot.imap_port, host="127.0.0.3")
    smtp_alias = TcpForwarder(dovecot.submission_host, dovecot.submission_port, host="127.0.0.3")
    cases = {
        "refused": (f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", "cannot connect"),
        "not TLS": (f"127.0.0.1:{fake.imap_port}", f"127.0.0.1:{fake.smtp_port}", "TLS handshake with"),
        "name mismatch": (f"127.0.0.3:{imap_alias.port}", f"127.0.0.3:{smtp_alias.port}", "address mismatch"),
    }
    try:
        for case, (imap_upstream, smtp_upstream, expected) in cases.items():
            data = yaml.safe_load(bed.config.read_text())
            data["imap"]["upstream"], data["smtp"]["upstream"] = imap_upstream, smtp_upstream
            bed.config.write_text(yaml.safe_dump(data))
            bed.restart() if bed.proxy else bed.start()
            started = time.monotonic()
            reply = bed.imap_login(dee)
            assert "UNAVAILABLE" in reply and expected in reply, (case, reply)
            code, text = bed.smtp_login(dee)
            assert code == 454 and expected.encode() in text, (case, code, text)
            assert time.monotonic() - started < 10, case
    finally:
        fake.close()
        imap_alias.stop()
        smtp_alias.stop()


def test_upstream_dropped_mid_fetch_ends_that_session_only_and_loses_nothing(beds, dovecot):
    eli, fay = user("eli"), user("fay")
    big = message("big", (b"y" * 998 + b"\r\n") * 5000)   # 5 MB
    small = message("small")
    dovecot.deliver(eli, big)
    dovecot.deliver(fay, small)
    links = TcpForwarder("127.0.0.1", dovecot.imap_port)
    bed = beds(eli, fay, imap={"upstream": links.address})
    bed.authorize(eli)
    bed.authorize(fay)
    bed.start()
    try:
        first = bed.client("imap")
        first.line()
        first.send(f'a LOGIN {eli} "{PASSWORD}"\r\nb SELECT INBOX\r\n'.encode())
        first.until(b"b OK")
        second = bed.client("imap")
        second.line()
        second.send(f'a LOGIN {fay} "{PASSWORD}"\r\nb SELECT INBOX\r\n'.encode())
        second.until(b"b OK")
        assert len(links.pairs) == 2                   # one upstream connection per session
        first.send(b"c FETCH 1 (BODY.PEEK[])\r\n")
        head = first.line()
        assert head.startswith(b"* 1 FETCH") and head.rstrip().endswith(b"}")
        links.cut(0)                                   # the upstream connection breaks mid-literal
        started = time.monotonic()
        first.read_to_end()                            # the proxy closes the client's connection
        assert time.monotonic() - started < 5
        assert len(first.received) < len(big)          # a truncated literal, then the end: the client knows
        second.send(b"c FETCH 1 (BODY.PEEK[])\r\nd NOOP\r\n")
        lines = second.until(b"d OK")                  # the other session goes on
        assert any(line.startswith(b"c OK") for line in lines)
        assert small in b"".join(lines)
        imap = bed.imap()                              # nothing lost: the message is whole upstream
        imap.login(eli, PASSWORD)
        imap.select("INBOX")
        assert imap.fetch("1", "(BODY.PEEK[])")[1][0][1] == big
        imap.logout()
    finally:
        links.close()


def test_message_with_a_dot_after_a_bare_line_break_is_refused_not_smuggled(smtp_proxy, sink):
    """Dovecot (like other lenient servers) ends DATA at LF "." CRLF: relayed as it was, this message
    was delivered cut short with a 250, its MAIL line ran as a command, and the replies to the
    client's next commands came from the smuggled ones. The proxy now refuses such a message."""
    proxy = smtp_proxy()
    client = Client(proxy.port)
    client.line()
    client.send(b"EHLO c\r\nAUTH PLAIN " + base64.b64encode(f"\0{SMTP_USER}\0{SMTP_PASSWORD}".encode()) + b"\r\n")
    client.until(b"235 ")
    client.send(f"MAIL FROM:<{SMTP_USER}>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n".encode())
    client.until(b"354 ")
    client.send(b"Subject: one\r\n\r\nfirst part\n.\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<eve@example.org>"
                b"\r\nDATA\r\nSubject: smuggled\r\n\r\nspoofed\r\n.\r\n")
    assert client.line().startswith(b"550 5.6.0 Message not sent")
    client.send(f"NOOP\r\nMAIL FROM:<{SMTP_USER}>\r\nRCPT TO:<carol@example.org>\r\nDATA\r\n".encode())
    assert [client.line()[:4] for _ in range(4)] == [b"250 ", b"250 ", b"250 ", b"354 "]   # replies in step
    client.send(b"Subject: two\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
    assert client.line().startswith(b"250 ") and client.line().startswith(b"221 ")
    messages = sink.wait_for_messages(1)
    time.sleep(0.5)
    assert [m.data_after_received() for m in sink.messages] == [b"Subject: two\r\n\r\nsecond\r\n"]
    assert [m.rcpt_tos for m in messages] == [["carol@example.org"]]


# ---------------------------------------------------------------------------------- token files
WRITER = """
import sys
from proxy.tokens.folder import FolderStore
from proxy.tokens.store import derive_key
store = FolderStore(sys.argv[1])
key = derive_key("writer password", salt=b"0123456789abcdef", kdf={"name": "scrypt", "n": 1024, "r": 8, "p": 1})
counter = int(sys.argv[2])
print("ready", flush=True)
while True:
    counter += 1
    store.write_file("alice@firm.de", key, {"counter": counter, "pad": "x" * 200000}, {"counter": counter})
"""


def test_token_file_is_old_or_new_after_sigkill_during_writes(tmp_path):
    """A process replacing a token file in a loop is SIGKILLed at random moments, 40 times: the
    file always opens with the key and holds the newest completed write; left-over temporary
    files (0600, sealed like the file) never disturb reading."""
    store = FolderStore(tmp_path / "tokens")
    key = derive_key("writer password", salt=b"0123456789abcdef", kdf={"name": "scrypt", "n": 1024, "r": 8, "p": 1})
    store.write_file("alice@firm.de", key, {"counter": 0}, {"counter": 0})
    rng = random.Random(20240607)
    last, leftovers = 0, 0
    for _ in range(40):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(store.directory), str(last)], cwd=ROOT,
                                  stdout=subprocess.PIPE)
        assert writer.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.04))
        writer.kill()
        writer.wait()
        writer.stdout.close()
        sealed = store.read_file("alice@firm.de")
        payload = open_sealed(sealed, key)
        assert payload["counter"] >= last and sealed.meta["counter"] == payload["counter"]
        last = payload["counter"]
        temporary = [p for p in store.directory.iterdir() if p.name.startswith(".tmp-")]
        leftovers += bool(temporary)
        if os.name != "nt":
            assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in temporary)
    assert last >= 40          # writes completed between the kills
    assert leftovers >= 1      # and some kills did land in the middle of a write


def test_proxy_killed_while_refreshing_restarts_on_a_whole_token_file(beds, idp_reset):
    gus = user("gus")
    idp_reset.set_access_token_lifetime(2)           # refreshed (and the file rewritten) about every 1.5 s
    bed = beds(gus)
    bed.authorize(gus)
    bed.start()
    idp_reset.reset_counters()
    rng = random.Random(7)
    for _ in range(3):
        assert bed.imap_login(gus) == "OK"           # unlocks the account: background refreshes start
        time.sleep(rng.uniform(0.5, 2.0))
        bed.proxy.process.kill()
        bed.stop()
        json.loads(bed.token_file(gus).read_text())   # whole
        bed.start()
    assert bed.imap_login(gus) == "OK"
    assert idp_reset.count("token:refresh_token") >= 3


def test_corrupt_or_unreadable_token_file_fails_that_account_only(beds):
    ok, torn, folder, looped = user("ok"), user("torn"), user("folder"), user("looped")
    bed = beds(ok, torn, folder, looped)
    for name in (ok, torn, folder):
        bed.authorize(name)
    bed.start()
    assert bed.imap_login(torn) == "OK"               # unlocked in the running proxy first
    bed.token_file(torn).write_bytes(bed.token_file(torn).read_bytes()[:100])
    bed.token_file(folder).unlink()
    bed.token_file(folder).mkdir()                    # unreadable: a folder where the file should be
    os.symlink(bed.token_file(looped).name, bed.token_file(looped))  # unreadable: a symlink loop
    expected = {torn: ("AUTHENTICATIONFAILED", "token file is corrupt", f"proxy authorize {torn}"),
                folder: ("AUTHENTICATIONFAILED", "cannot read token file"),
                looped: ("Too many levels of symbolic links",)}
    for attempt in ("running", "restarted"):
        for name, words in expected.items():
            reply = bed.imap_login(name)
            assert all(word in reply for word in words), (attempt, name, reply)
            code, text = bed.smtp_login(name)
            assert code in (454, 535) and words[-1].encode() in text, (attempt, name, text)
        assert bed.imap_login(ok) == "OK" and bed.smtp_login(ok)[0] == 235   # the others are served
        if attempt == "running":
            bed.restart()                             # starts all the same, naming the account
            assert f"ERROR   proxy: account {looped}: " in bed.log()


# ---------------------------------------------------------------------------------- hostile clients
def test_silent_dripping_and_flooding_clients_cannot_starve_the_others(beds):
    """max_connections 20, preauth_timeout 2 s: idle and slow clients are dropped at the deadline;
    when every place is taken by clients that have not logged in, a new client is taken and the
    one idle the longest (over a second) dropped (issue 12); a flood of 1,500 connections is
    answered at once (refused, or taken and later dropped), and real clients are served after it;
    the proxy's memory stays flat."""
    hal = user("hal")
    bed = beds(hal, limits={"max_connections": 20, "preauth_timeout": 2, "login_timeout": 5})
    bed.authorize(hal)
    bed.start()
    import resource  # (POSIX; like the rest of this suite, which needs Dovecot)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    rss_before = rss_kib(bed.proxy.pid)
    time.sleep(0.5)                                  # the start-up probes' sessions are over
    for protocol, greeting, dropped, full, timeout in (
            ("imap", b"* OK", b"* BYE Too many connections waiting", b"* BYE Too many connections to the proxy",
             b"* BYE No login within the time allowed"),
            ("smtp", b"220 ", b"421 4.7.0 Too many connections waiting", b"421 4.7.0 Too many connections to the",
             b"421 4.4.2 No authentication within")):
        hogs = [bed.client(protocol) for _ in range(19)]
        for hog in hogs:
            assert hog.line().startswith(greeting)
        drip = bed.client(protocol)                  # one byte every 0.3 s: still dropped at the deadline
        assert drip.line().startswith(greeting)
        stop = threading.Event()

        def dripping() -> None:
            for byte in b"a LOGIN hal@example.com wrong-password\r\n":
                if stop.wait(0.3):
                    return
                try:
                    drip.send(bytes([byte]))
                except OSError:
                    return
        threading.Thread(target=dripping, daemon=True).start()
        started = time.monotonic()
        time.sleep(1.1)                              # (only connections idle for over a second are dropped)
        late = bed.client(protocol)                  # a real client while every place is taken: served
        assert late.line().startswith(greeting)
        assert hogs[0].read_to_end().startswith(dropped)   # the longest idle one made room
        for hog in [*hogs[1:], drip, late]:
            data = hog.read_to_end()
            assert timeout in data, (protocol, data)
        assert time.monotonic() - started < 2 + 1.5 + 1.1
        stop.set()
        flood = []
        for _ in range(1500):
            try:
                flood.append(socket.create_connection(("127.0.0.1", getattr(bed.proxy, f"{protocol}_port")), 10))
            except OSError:
                break
        assert len(flood) == 1500
        during, asked = bed.client(protocol), time.monotonic()
        assert during.line().startswith((greeting, full))   # answered, not left hanging
        assert time.monotonic() - asked < 5
        answers = [sock.makefile("rb").read() for sock in flood]   # each one refused, dropped or timed out
        odd = [a for a in answers if full not in a and dropped not in a and timeout not in a]
        assert not odd, (protocol, len(odd), odd[:3])
        for sock in flood:
            sock.close()
        time.sleep(0.5)
        if protocol == "imap":
            assert bed.imap_login(hal) == "OK"
        else:
            assert bed.smtp_login(hal)[0] == 235
    assert rss_kib(bed.proxy.pid) - rss_before < 30 * 1024


def test_oversized_lines_and_a_two_gigabyte_literal(beds):
    ivy = user("ivy")
    bed = beds(ivy)
    bed.authorize(ivy)
    bed.start()
    rss_before = rss_kib(bed.proxy.pid)
    client = bed.client("imap")
    client.line()
    client.send(b"a LOGIN {2147483648}\r\n")          # refused before a byte of it is read
    assert client.line() == b"a BAD Literal too large\r\n"
    client.send(b"b NOOP\r\nc LOGIN " + ivy.encode() + b" {2147483648+}\r\n")
    assert client.line() == b"b OK NOOP completed\r\n"
    assert client.line() == b"* BYE Literal too large\r\n" and client.read_to_end() == b""
    client = bed.client("imap")
    client.line()
    client.send(b"a LOGIN " + b"x" * 1_000_000, may_be_cut_off=True)  # no line end in sight: BYE, close
    assert client.line() == b"* BYE Line too long\r\n"
    client = bed.client("smtp")
    client.line()
    client.send(b"EHLO c\r\nAUTH PLAIN " + b"A" * 2_000_000 + b"\r\nAUTH PLAIN \x00\xff\r\nQUIT\r\n")
    lines = client.until(b"221 ")
    assert [line[:4] for line in lines if line[3:4] != b"-"] == [b"250 ", b"500 ", b"501 ", b"221 "], lines
    assert rss_kib(bed.proxy.pid) - rss_before < 16 * 1024
    assert bed.imap_login(ivy) == "OK"


def test_password_guessing_is_slowed_per_source_and_never_locks_out(beds, idp_reset):
    """Guesses at different accounts from one address slow each other down (per source); the real
    account's password still works at once, its token file is untouched, the provider unasked."""
    jay = user("jay")
    bed = beds(jay)
    bed.authorize(jay)
    bed.start()
    before = bed.token_file(jay).read_bytes()
    idp_reset.reset_counters()
    durations = []
    for guess in range(3):
        started = time.monotonic()
        assert "AUTHENTICATIONFAILED" in bed.imap_login(user(f"nobody{guess}"), f"guess number {guess}")
        durations.append(time.monotonic() - started)
    assert durations[0] >= 0.4 and durations[2] >= 1.8   # 0.5 s, 1 s, 2 s: one counter for the address
    code, _ = bed.smtp_login(jay, "another wrong one")     # the same counter over SMTP
    assert code == 535
    started = time.monotonic()
    assert bed.imap_login(jay) == "OK" and time.monotonic() - started < 3   # no lock-out, no delay (it would be 4 s)
    assert bed.token_file(jay).read_bytes() == before and idp_reset.count("token") == 0
