"""A fast SMTP sink for the benchmarks: accepts every message on loopback and discards it.

tests/sink.py keeps every message (and parses line by line with aiosmtpd); a benchmark needs a
sink that is never the bottleneck, so this one only scans for the end of DATA.
``python -m bench.sink --port N`` runs it until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

_END = b"\r\n.\r\n"


class SinkProtocol(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buffer = bytearray()
        self.in_data = False
        transport.write(b"220 sink.bench ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.buffer:
            if self.in_data:
                end = self.buffer.find(_END)
                if end < 0:
                    # keep the last bytes: the end marker may straddle two reads
                    del self.buffer[:max(0, len(self.buffer) - 4)]
                    return
                del self.buffer[:end + len(_END)]
                self.in_data = False
                self.transport.write(b"250 2.0.0 Ok: discarded\r\n")
                continue
            end = self.buffer.find(b"\n")
            if end < 0:
                return
            line = bytes(self.buffer[:end + 1]).strip().upper()
            del self.buffer[:end + 1]
            self.reply(line)

    def reply(self, line: bytes) -> None:
        verb = line.split(b" ", 1)[0]
        if verb in (b"EHLO", b"LHLO"):
            self.transport.write(b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                                 b"250 SIZE 209715200\r\n")
        elif verb == b"HELO":
            self.transport.write(b"250 sink.bench\r\n")
        elif verb == b"DATA":
            self.in_data = True
            self.buffer[:0] = b"\r\n"  # an empty message still ends with CRLF . CRLF
            self.transport.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"QUIT":
            self.transport.write(b"221 2.0.0 Bye\r\n")
            self.transport.close()
        else:  # MAIL, RCPT, RSET, NOOP, ...
            self.transport.write(b"250 2.0.0 Ok\r\n")


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SinkProtocol, host, port, backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="SMTP sink that discards messages (benchmarks only)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
