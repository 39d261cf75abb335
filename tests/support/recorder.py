"""A recording upstream: a raw asyncio HTTP/1.1 server that keeps the exact bytes
of every request it receives (head and body, framing included).

Its behaviour per request is a coroutine ``handler(req, reader, writer)``;
the default reads the body and answers 200 with a small JSON echo. Tests
swap the handler to stall, stream, close early or answer oddly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Req:
    head: bytes
    method: bytes = b""
    target: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    raw_body: bytes = b""  # as it came on the wire (chunk framing included)
    body: bytes = b""  # de-chunked
    body_done: asyncio.Event = field(default_factory=asyncio.Event)
    first_body_byte: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    def header(self, name: str) -> bytes | None:
        for n, v in self.headers:
            if n.lower() == name.lower().encode():
                return v
        return None

    def header_all(self, name: str) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower().encode()]

    async def read_body(self, reader: asyncio.StreamReader) -> bytes:
        length = self.header("content-length")
        if self.header("transfer-encoding"):
            while True:
                line = await reader.readuntil(b"\r\n")
                self.raw_body += line
                self.first_body_byte.set()
                size = int(line.split(b";")[0], 16)
                data = await reader.readexactly(size + 2)
                self.raw_body += data
                self.body += data[:-2]
                if size == 0:  # the gate sends no trailers: "0\r\n\r\n" ends it
                    break
        elif length:
            remaining = int(length)
            while remaining:
                chunk = await reader.read(min(remaining, 65536))
                if not chunk:
                    raise ConnectionResetError("client closed mid-body")
                self.first_body_byte.set()
                remaining -= len(chunk)
                self.raw_body += chunk
            self.body = self.raw_body
        self.body_done.set()
        return self.body


def response(status: int = 200, body: bytes = b"", headers: list[tuple[str, str]] | None = None,
             reason: str = "OK") -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    hdrs = list(headers or [])
    if not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in hdrs):
        hdrs.append(("Content-Length", str(len(body))))
    lines += [f"{n}: {v}" for n, v in hdrs]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def echo_handler(req: Req, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
    await req.read_body(reader)
    body = json.dumps({"target": req.target.decode("latin-1"), "len": len(req.body)}).encode()
    writer.write(response(200, body, [("Content-Type", "application/json")]))


async def count_handler(req: Req, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
    """Read the Content-Length body without keeping it (a big upload costs
    nothing here), answer 200 with the number of bytes that arrived."""
    length = int(req.header("content-length") or 0)
    got = 0
    while got < length:
        data = await reader.read(min(1 << 20, length - got))
        if not data:
            return
        got += len(data)
    writer.write(response(200, b"%d" % got))


Handler = Callable[[Req, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Recorder:
    def __init__(self) -> None:
        self.requests: list[Req] = []
        self.handler: Handler = echo_handler
        self.connections = 0
        self.closed_connections = 0
        self.arrived = asyncio.Condition()
        self.port = 0
        self.path = ""
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def wait_requests(self, n: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            async with self.arrived:
                await self.arrived.wait_for(lambda: len(self.requests) >= n)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head[:-4].split(b"\r\n")
                method, target, _ = lines[0].split(b" ", 2)
                hdrs = []
                for line in lines[1:]:
                    n, _, v = line.partition(b":")
                    hdrs.append((n, v.strip()))
                req = Req(head, method, target, hdrs)
                self.requests.append(req)
                async with self.arrived:
                    self.arrived.notify_all()
                await self.handler(req, reader, writer)
                await writer.drain()
                if (req.header("connection") or b"").lower() == b"close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self.closed_connections += 1
            self.writers.discard(writer)
            writer.close()


def up_url(up: Recorder) -> str:
    """The ``[upstream] url`` that names *up*."""
    return f"unix:{up.path}" if up.path else f"http://127.0.0.1:{up.port}"


@contextlib.asynccontextmanager
async def recorder(unix_path: str | None = None, host: str = "127.0.0.1"
                   ) -> AsyncIterator[Recorder]:
    rec = Recorder()
    if unix_path:
        server = await asyncio.start_unix_server(rec._serve, unix_path)
        rec.path = unix_path
    else:
        server = await asyncio.start_server(rec._serve, host, 0)
        rec.port = server.sockets[0].getsockname()[1]
    try:
        yield rec
    finally:
        server.close()
        for w in list(rec.writers):
            w.close()
        pending = [t for t in rec.tasks if not t.done()]
        if pending:
            # Closed writers end their handlers; a handler stuck in a test's
            # own await is cancelled after a grace period.
            _, stuck = await asyncio.wait(pending, timeout=2)
            for t in stuck:
                t.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=2)
