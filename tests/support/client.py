"""A raw HTTP/1.1 client for tests: sends exactly the bytes it is given and
parses the response with httptools, so a test sees what a user's client sees
(status, headers as sent, body, whether the connection was closed)."""

from __future__ import annotations

import asyncio
import ssl as sslmod
from dataclasses import dataclass, field

import httptools


@dataclass
class Resp:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False  # the message ended properly (not cut by a close)
    chunks: list[bytes] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower().encode():
                return v.decode("latin-1")
        return None

    def header_all(self, name: str) -> list[str]:
        return [v.decode("latin-1") for n, v in self.headers if n.lower() == name.lower().encode()]

    def json(self) -> object:
        import json
        return json.loads(self.body)


class _P:
    def __init__(self, head_only: bool) -> None:
        self.resp = Resp()
        self.done = False
        self.head_only = head_only
        self.headers_done = False

    def on_header(self, n: bytes, v: bytes) -> None:
        self.resp.headers.append((n, v))

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, b: bytes) -> None:
        self.resp.body += b
        self.resp.chunks.append(b)

    def on_message_complete(self) -> None:
        self.done = True
        self.resp.complete = True


class Conn:
    """One client connection; ``request()`` may be called several times (keep-alive)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pending = b""

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1", *, ssl: sslmod.SSLContext | None = None,
                   server_hostname: str | None = None, unix: str | None = None,
                   source: str | None = None) -> Conn:
        """*source*: the local address to connect from (127.0.0.2 is another client)."""
        if unix:
            r, w = await asyncio.open_unix_connection(unix)
        else:
            r, w = await asyncio.open_connection(host, port, ssl=ssl,
                                                 server_hostname=server_hostname if ssl else None,
                                                 local_addr=(source, 0) if source else None)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_response(self, head_only: bool = False, timeout: float = 10.0,
                            on_chunk: object = None) -> Resp:
        p = _P(head_only)
        parser = httptools.HttpResponseParser(p)
        async with asyncio.timeout(timeout):
            data = self.pending
            self.pending = b""
            while True:
                if data:
                    if head_only:
                        idx = data.find(b"\r\n\r\n")
                        if idx >= 0:
                            parser.feed_data(data[: idx + 4])
                            self.pending = data[idx + 4 :]
                            p.resp.status = parser.get_status_code()
                            p.resp.complete = True
                            return p.resp
                    try:
                        parser.feed_data(data)
                    except httptools.HttpParserUpgrade:
                        pass
                    if p.done:
                        break
                    if p.headers_done and callable(on_chunk):
                        on_chunk(p.resp)
                data = await self.reader.read(65536)
                if not data:
                    break
        p.resp.status = parser.get_status_code() if p.headers_done else 0
        return p.resp

    async def request(self, data: bytes, head_only: bool = False, timeout: float = 10.0) -> Resp:
        await self.send(data)
        return await self.read_response(head_only, timeout)

    async def closed_by_peer(self, timeout: float = 5.0) -> bool:
        try:
            async with asyncio.timeout(timeout):
                data = await self.reader.read(65536)
                while data:
                    data = await self.reader.read(65536)
                return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, sslmod.SSLError):
            pass


async def fetch(port: int, data: bytes, **kw: object) -> Resp:
    """One request on a fresh connection."""
    conn = await Conn.open(port, **kw)  # type: ignore[arg-type]
    try:
        return await conn.request(data, head_only=data.startswith(b"HEAD "))
    finally:
        await conn.close()


def get(target: str | bytes, host: str = "gate.test", extra: str = "",
        method: str = "GET") -> bytes:
    t = target.encode("latin-1") if isinstance(target, str) else target
    return (method.encode() + b" " + t + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
            + extra.encode("latin-1") + b"\r\n")


def raw(method: str, target: str | bytes, headers: list[tuple[str, str]] | None = None,
        body: bytes = b"", host: str | None = "gate.test") -> bytes:
    """A request exactly as given (no header is added but Host)."""
    t = target.encode("latin-1") if isinstance(target, str) else target
    lines = [method.encode() + b" " + t + b" HTTP/1.1"]
    if host is not None:
        lines.append(b"Host: " + host.encode())
    lines += [f"{n}: {v}".encode("latin-1") for n, v in headers or []]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunk(data: bytes) -> bytes:
    """*data* as one chunk of a chunked body."""
    return b"%x\r\n" % len(data) + data + b"\r\n"
