"""The floor under the proxy's figures: a do-nothing Python relay, measured beside it (``--only floor``).

Some of issue 15's targets are ratios to direct that every proxy pays for by being a proxy: one
more process on the path, two more loopback hops per round trip (each a wake-up of another
process, which costs tens of microseconds on this 2-core virtual machine), and an upstream TLS
connection opened at LOGIN. To tell that cost from the proxy's own, this scenario measures two
relays that do the least a proxy can do, in the same rounds as direct and the proxy:

- ``imap``: greets the client, and on its first command opens TLS to Dovecot, logs in with
  ``AUTHENTICATE XOAUTH2`` with a fixed token, answers the client's tag ``OK`` and from then on
  passes bytes both ways unread (asyncio protocols and asyncio's TLS, no parsing, no password
  check, no token store, no logging);
- ``smtp``: logs in upstream once (STARTTLS, ``AUTH XOAUTH2``) at the client's AUTH, answers it
  ``235`` and then passes bytes both ways unread: no line is parsed, so every reply the client
  gets is the upstream's.

Neither is a product: they check no password, keep no promise of the proxy's (a broken upstream
gives the client nothing, a message is not checked) and exist only to be measured.
``python -m bench.floor imap|smtp --upstream HOST:PORT --cafile CA --user U --port P`` runs one
(the token is the first line of standard input, never an argument; ``--uvloop``: on uvloop's
event loop, which the scenario asks for when the benchmark runs the proxy on it, ``--uvloop``);
the scenario starts both.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

from proxy.sasl import xoauth2_initial_response

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ the relays
class _Upstream(asyncio.Protocol):
    """The upstream side: logs in (IMAP: greeting, AUTHENTICATE; SMTP: already done), then passes bytes on."""

    def __init__(self, client: "_Client", login: bytes | None):
        self.client, self.login, self.buffer, self.transport = client, login, b"", None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.login is None:
            self.client.transport.write(data)
            return
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.startswith(b"* OK"):
                self.transport.write(b"a AUTHENTICATE XOAUTH2 " + self.login + b"\r\n")
            elif line.startswith(b"a "):
                ok = line.startswith(b"a OK")
                self.login = None
                self.client.transport.write(self.client.tag + (b" OK logged in\r\n" if ok else b" NO refused\r\n"))
                self.client.upstream = self.transport
                if self.buffer:
                    self.client.transport.write(self.buffer)
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class _Client(asyncio.Protocol):
    def __init__(self, relay: "Relay"):
        self.relay, self.upstream, self.buffer, self.tag, self.transport = relay, None, b"", b"", None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(b"* OK [CAPABILITY IMAP4rev1] floor\r\n" if self.relay.protocol == "imap"
                        else b"220 floor ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
            return
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if self.relay.protocol == "imap":
                self.tag = line.split(b" ", 1)[0]
                asyncio.ensure_future(self.relay.connect_imap(self))
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.transport.write(b"250-floor\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 209715200\r\n"
                                     b"250 AUTH PLAIN LOGIN\r\n")
            elif verb == b"AUTH":
                asyncio.ensure_future(self.relay.connect_smtp(self))
                return
            else:
                self.transport.write(b"503 5.5.1 log in first\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


class Relay:
    def __init__(self, protocol: str, host: str, port: int, user: str, token: str, cafile: str):
        self.protocol, self.host, self.port = protocol, host, port
        self.context = ssl.create_default_context(cafile=cafile)
        self.login = xoauth2_initial_response(user, token)

    async def connect_imap(self, client: _Client) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: _Upstream(client, self.login), self.host, self.port,
                                     ssl=self.context, server_hostname=self.host)

    async def connect_smtp(self, client: _Client) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)

        async def reply() -> bytes:
            while True:
                line = await reader.readline()
                if line[3:4] != b"-":
                    return line

        await reply()
        for command in (b"EHLO floor", b"STARTTLS"):
            writer.write(command + b"\r\n")
            await reply()
        await writer.start_tls(self.context, server_hostname=self.host)
        for command in (b"EHLO floor", b"AUTH XOAUTH2 " + self.login):
            writer.write(command + b"\r\n")
            last = await reply()
        if not last.startswith(b"235"):
            client.transport.write(b"535 5.7.8 upstream refused the token\r\n")
            writer.close()
            return
        writer.transport.set_protocol(_Upstream(client, None))
        client.upstream = writer.transport
        client.transport.write(b"235 2.7.0 logged in\r\n")

    async def serve(self, listen_port: int) -> None:
        server = await asyncio.get_running_loop().create_server(lambda: _Client(self), "127.0.0.1", listen_port,
                                                                backlog=1024)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol", choices=("imap", "smtp"))
    parser.add_argument("--upstream", required=True, metavar="HOST:PORT",
                        help="Dovecot's IMAPS (implicit TLS) or submission (STARTTLS) port")
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop (as the proxy with bench --uvloop)")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    host, port = args.upstream.rsplit(":", 1)
    token = sys.stdin.readline().strip()
    asyncio.run(Relay(args.protocol, host, int(port), args.user, token, args.cafile).serve(args.port))


# ------------------------------------------------------------------------------ the scenario
def _start(protocol: str, upstream: tuple[str, int], ctx) -> tuple[subprocess.Popen, int]:  # noqa: ANN001
    from tests.harness import free_port

    bed, port = ctx.bed, free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.floor", protocol, "--upstream", f"{upstream[0]}:{upstream[1]}",
                                "--cafile", str(bed.idp.pki.ca_file), "--user", bed.account.user, "--port", str(port)]
                               + (["--uvloop"] if bed.uvloop else []),
                               cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    process.stdin.write(bed.direct_token + "\n")
    process.stdin.close()
    if process.stdout.readline().strip() != "ready":
        process.kill()
        raise RuntimeError(f"the {protocol} floor relay did not start")
    return process, port


def floor(ctx) -> list:  # noqa: ANN001
    """LOGIN → OK p50, logins/s and SMTP messages/s: direct, the proxy, and a do-nothing relay (floor)."""
    import smtplib
    import socket

    from bench.imap import SyncImap, Target
    from bench.scenarios import Row, _login_loop, _login_and_close, _smtp, make_message

    s, bed = ctx.sizes, ctx.bed
    imap, imap_port = _start("imap", bed.imap_direct, ctx)
    smtp, smtp_port = _start("smtp", bed.smtp_direct, ctx)
    relay = Target("floor", "127.0.0.1", imap_port, bed.account.user, "unused")
    note = "in the floor rows the 'proxy' column is a do-nothing Python relay (bench/floor.py), same rounds"
    rows = {}
    for figure, unit, better in (("LOGIN → OK, p50", "ms", False),
                                 (f"logins/s, {s.login_clients} clients", "1/s", True),
                                 (f"SMTP messages/s ({s.smtp_messages} × {s.smtp_message_size / 1e3:g} kB)", "1/s", True)):
        rows[figure] = (Row(f"floor: {figure}, the proxy", unit, higher_is_better=better),
                        Row(f"floor: {figure}, do-nothing relay", unit, higher_is_better=better,
                            note="" if rows else note))

    def smtp_session(side: str) -> smtplib.SMTP:
        if side != "floor":
            return _smtp(ctx, side)
        conn = smtplib.SMTP("127.0.0.1", smtp_port, timeout=120)
        conn.login(bed.account.user, "unused")
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    small = make_message(s.smtp_message_size, 1)
    sender, rcpt = bed.account.user, ["someone@example.com"]
    sides = [ctx.direct, ctx.proxy, relay]
    try:
        for target in sides:  # warm-up
            _login_and_close(target)
            conn = smtp_session(target.name)
            conn.sendmail(sender, rcpt, small)
            conn.quit()
        for run in range(s.runs):
            for target in sides if run % 2 == 0 else sides[::-1]:
                times = []
                for _ in range(s.logins):
                    client = SyncImap(target, timeout=30)
                    times.append(client.login() * 1000)
                    client.close()
                done, _, elapsed = asyncio.run(_login_loop(target, s.login_clients, s.logins_concurrent,
                                                           s.peer_seconds / 2))
                conn = smtp_session(target.name)
                started = time.perf_counter()
                for _ in range(s.smtp_messages):
                    conn.sendmail(sender, rcpt, small)
                sent = s.smtp_messages / (time.perf_counter() - started)
                conn.quit()
                for (mine, floor_row), value in zip(rows.values(), (statistics.median(times), done / elapsed, sent)):
                    if target is ctx.direct:
                        mine.direct.append(value)
                        floor_row.direct.append(value)
                    else:
                        (floor_row if target is relay else mine).proxy.append(value)
    finally:
        for process in (imap, smtp):
            process.kill()
            process.wait()
    ctx.log("floor: " + "; ".join(f"{figure}: relay {pair[1].ratio:.2f}, proxy {pair[0].ratio:.2f} of direct"
                                  for figure, pair in rows.items()))
    return [row for pair in rows.values() for row in pair]


if __name__ == "__main__":
    main()
