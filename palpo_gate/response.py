"""Writing the upstream's response to the client, as bytes.

This module owns the client-side framing of forwarded responses. aiohttp's
``StreamResponse.prepare()`` rebuilds the head through a CIMultiDict, adds
``Date`` / ``Server`` / ``Content-Type`` of its own and sends the head and
each body piece in separate writes. :class:`ProxiedResponse` instead keeps
the upstream's header bytes as they came (hop-by-hop ones removed by
:mod:`headers`), decides the framing once (RFC 9112 section 6), and sends the
head together with the first body bytes: a small response is one write.

It stays a ``StreamResponse`` so aiohttp's connection loop can finish it and
read its keep-alive decision as for any other response.
"""

from __future__ import annotations

from aiohttp import web

#: Flush to the client and wait for it once this much is buffered (backpressure).
_HIGH_WATER = 256 * 1024
_LAST_CHUNK = b"0\r\n\r\n"


def _gone() -> ConnectionResetError:
    return ConnectionResetError("client connection closed")


class ProxiedResponse(web.StreamResponse):
    """A response whose head bytes come from the upstream."""

    def __init__(self, status: int, reason: bytes, header_block: bytes,
                 length: int | None, no_body: bool) -> None:
        super().__init__(status=status)
        self._reason_bytes = reason
        #: "Name: value\r\n" lines to send as they are
        self._block = header_block
        self._length = length
        self._no_body = no_body
        self._chunked_out = False
        self._pending: bytes | None = None
        self._sent = 0

    @property
    def started(self) -> bool:
        """True once any byte of this response went to the client."""
        return self._sent > 0

    async def prepare(self, request: web.BaseRequest) -> None:  # type: ignore[override]
        if self._eof_sent or self._payload_writer is not None:
            return
        self._req = request
        self._payload_writer = request._payload_writer
        version = request.version
        keep_alive = request.keep_alive if self._keep_alive is None else self._keep_alive
        lines = [b"HTTP/%d.%d %d %s\r\n" % (version[0], version[1], self.status,
                                            self._reason_bytes or b"-"),
                 self._block]
        if self._length is not None:
            # Kept as the upstream sent it (for HEAD too: the length of the GET).
            if self.status != 204:
                lines.append(b"Content-Length: %d\r\n" % self._length)
        elif self._no_body:
            pass
        elif version >= (1, 1):
            self._chunked_out = True
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:
            keep_alive = False  # an HTTP/1.0 body without a length ends at close
        if not keep_alive:
            if version >= (1, 1):
                lines.append(b"Connection: close\r\n")
        elif version < (1, 1):
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        self._keep_alive = keep_alive
        self._pending = b"".join(lines)

    def _frame(self, data: bytes, last: bool) -> bytes:
        if self._chunked_out:
            if data:
                data = b"%x\r\n%b\r\n" % (len(data), data)
            if last:
                data += _LAST_CHUNK
        if self._pending is not None:
            data = self._pending + data
            self._pending = None
        return data

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await self._send(self._frame(bytes(data), False))

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof_sent:
            return
        payload = self._frame(data, True)
        self._eof_sent = True
        self._body_length = self._sent
        if payload:
            await self._send(payload)
        self._payload_writer = None
        self._req = None

    async def _send(self, payload: bytes) -> None:
        request = self._req
        transport = request.transport if request is not None else None
        if transport is None or transport.is_closing():
            raise _gone()
        transport.write(payload)
        self._sent += len(payload)
        writer = self._payload_writer
        if writer is not None:
            writer.output_size += len(payload)
            if transport.get_write_buffer_size() > _HIGH_WATER:
                await writer.drain()
