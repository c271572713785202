"""kpx/echo: TCP and UDP on port 8080 (--port N); every request line (TCP) or datagram (UDP)
gets one line back: `pod=<name> ip=<pod IP> client=<client ip:port as seen>`."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import line_prefix, parse_args, run_loop  # noqa: E402

PREFIX = b""


class EchoTCP(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        host, port = transport.get_extra_info("peername")[:2]
        self.answer = PREFIX + f"{host}:{port}\n".encode()
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        n = buf.count(b"\n")
        if n:
            self.t.write(self.answer * n)
            buf = buf[buf.rfind(b"\n") + 1 :]
        self.buf = buf[-65536:]

    def eof_received(self) -> bool:
        if self.buf:  # a last request without newline still gets its answer
            self.t.write(self.answer)
            self.buf = b""
        return False


class EchoUDP(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.t.sendto(PREFIX + f"{addr[0]}:{addr[1]}\n".encode(), addr)


async def serve(bind: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoTCP, bind, port, backlog=4096, reuse_address=True)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    udp.bind((bind, port))
    await loop.create_datagram_endpoint(EchoUDP, sock=udp)
    async with server:
        await server.serve_forever()


def main() -> None:
    global PREFIX
    args = parse_args("kpx/echo")
    PREFIX = line_prefix()
    run_loop(lambda: serve(args.bind, args.port))


if __name__ == "__main__":
    main()
