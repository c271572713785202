"""kpx/http: HTTP/1.1 on port 8080 (--port N); every request (any method, any path) gets 200
with the body `pod=<name> ip=<pod IP> client=<client ip:port as seen>\n`. Keep-alive and
pipelining work; no reverse DNS anywhere (http.server's getfqdn would hang in a netns)."""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import line_prefix, parse_args, run_loop  # noqa: E402

PREFIX = b""
MAX_HEAD = 65536


class HttpProto(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        host, port = transport.get_extra_info("peername")[:2]
        body = PREFIX + f"{host}:{port}\n".encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n".encode()
        self.keep = head + b"\r\n" + body
        self.close = head + b"Connection: close\r\n\r\n" + body
        self.buf = b""
        self.skip = 0  # request body bytes still to discard

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while True:
            if self.skip:
                n = min(self.skip, len(buf))
                buf, self.skip = buf[n:], self.skip - n
                if self.skip:
                    break
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self.t.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n\r\n")
                    self.t.close()
                    return
                break
            head, buf = buf[:end].decode("latin-1"), buf[end + 4 :]
            lines = head.split("\r\n")
            version = lines[0].rsplit(" ", 1)[-1]
            headers = {}
            for h in lines[1:]:
                k, _, v = h.partition(":")
                headers[k.strip().lower()] = v.strip().lower()
            try:
                self.skip = int(headers.get("content-length", "0"))
            except ValueError:
                self.skip = 0
            conn = headers.get("connection", "")
            closing = conn == "close" or (version == "HTTP/1.0" and conn != "keep-alive")
            if closing:
                self.t.write(self.close)
                self.t.close()
                return
            self.t.write(self.keep)
        self.buf = buf


async def serve(bind: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(HttpProto, bind, port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    global PREFIX
    args = parse_args("kpx/http")
    PREFIX = line_prefix()
    run_loop(lambda: serve(args.bind, args.port))


if __name__ == "__main__":
    main()
