"""Writing the upstream's response to the client, as bytes.

This module owns the client-side framing of forwarded responses. aiohttp's
``StreamResponse.prepare()`` rebuilds the head through a CIMultiDict, adds
``Date`` / ``Server`` / ``Content-Type`` of its own and sends the head and
each body piece in separate writes. :class:`ProxiedResponse` instead keeps
the upstream's header bytes as they came (hop-by-hop ones removed by
:mod:`headers`), decides the framing once (RFC 9112 section 6), and sends the
head together with the first body bytes: a small response is one write.

It stays a ``StreamResponse`` (:class:`compat.StreamResponse`, set up
without aiohttp's ``__init__``) so aiohttp's connection loop can finish it
and read its keep-alive decision as for any other response: it answers
``keep_alive``, ``prepared`` and ``body_length`` from its own fields.
"""

from __future__ import annotations

import array
import fcntl
import termios
from typing import Any

from aiohttp import web

from .compat import StreamResponse

#: Wait for the client once this much is buffered toward it (backpressure),
#: and the high-water mark every client transport gets when it connects
#: (listeners.py; uvloop's default is 64 KiB, and
#: 512 KiB for TLS): a client that stops reading holds at most this plus one
#: piece of body (upstream._HIGH_WATER). The kernel's socket buffer, not this
#: one, keeps a fast client busy.
HIGH_WATER = 32 * 1024
#: A client is behind, too, once this much waits in its socket's kernel send
#: queue (TIOCOUTQ: not yet sent or not yet acknowledged), though the
#: transport's buffer is empty: loopback and LAN send buffers autotune to
#: megabytes. Telling the forward loop then drops the upstream's reads back
#: to their smallest size (upstream.Connection.pause) before the kernel is
#: full, so a client that stalls after a fast start is left holding one small
#: piece, not a large one. Checked for body pieces only, not last ones.
_QUEUE_HIGH = 256 * 1024
_LAST_CHUNK = b"0\r\n\r\n"


def _gone() -> ConnectionResetError:
    return ConnectionResetError("client connection closed")


_OUTQ = array.array("i", [0])


def _queued(fd: int) -> int:
    """Bytes in the socket's kernel send queue (0 if it cannot say)."""
    try:
        fcntl.ioctl(fd, termios.TIOCOUTQ, _OUTQ)
    except OSError:
        return 0
    return _OUTQ[0]


class ProxiedResponse(StreamResponse):
    """A response whose head bytes come from the upstream."""

    # Its own fields in slots: they stay out of the instance dict aiohttp's
    # StreamResponse fills, which keeps every attribute access cheap.
    __slots__ = ("_block", "_chunked_out", "_client", "_code", "_drain_writer", "_fd",
                 "_finished", "_forced", "_keep", "_length", "_no_body", "_pending",
                 "_reason_bytes", "_sent", "_writer")

    def __init__(self, status: int, reason: bytes, header_block: bytes,
                 length: int | None, no_body: bool) -> None:
        super().__init__(status)
        self._code = status
        self._keep = False  # keep-alive, as decided in start()
        self._reason_bytes = reason
        #: "Name: value\r\n" lines to send as they are
        self._block = header_block
        self._length = length
        self._no_body = no_body
        self._chunked_out = False
        self._pending: bytes | None = None
        self._sent = 0
        self._drain_writer: Any = None
        self._writer: Any = None  # the payload writer, until the end is sent
        self._client: web.BaseRequest | None = None  # likewise, the request
        self._finished = False
        self._forced = False  # force_close() was called
        self._fd = -1  # the client's socket, for its kernel send queue (-2: none)

    @property
    def keep_alive(self) -> bool:  # type: ignore[override]
        """What aiohttp's connection loop acts on after the response."""
        return self._keep

    @property
    def prepared(self) -> bool:
        return self._writer is not None or self._finished

    @property
    def body_length(self) -> int:
        return self._sent

    @property
    def started(self) -> bool:
        """True once any byte of this response went to the client."""
        return self._sent > 0

    def start(self, request: web.BaseRequest) -> None:
        """Decide the framing and build the head (sent with the first body bytes)."""
        if self._writer is not None or self._finished:
            return  # started already (aiohttp's loop calls prepare() after the handler)
        version = request.version
        keep_alive = not self._forced and request.keep_alive
        status = self._code
        length = self._length
        chunked = False
        # HTTP/1.1 to 1.0 clients too: the highest version the gate speaks
        # (RFC 9110 section 2.5); keep-alive for them is spelled out below.
        if length is not None:
            # Kept as the upstream sent it (for HEAD too: the length of the GET).
            framing = b"Content-Length: %d\r\n" % length if status != 204 else b""
        elif self._no_body:
            framing = b""
        elif version >= (1, 1):
            chunked = True
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            framing = b""
            keep_alive = False  # an HTTP/1.0 body without a length ends at close
        if not keep_alive:
            if version >= (1, 1):
                framing += b"Connection: close\r\n"
        elif version < (1, 1):
            framing += b"Connection: keep-alive\r\n"
        self._pending = b"HTTP/1.1 %d %s\r\n%s%s\r\n" % (
            status, self._reason_bytes or b"-", self._block, framing)
        self._keep = keep_alive
        self._writer = self._drain_writer = request.writer
        self._client = request
        self._chunked_out = chunked

    def force_close(self) -> None:
        super().force_close()
        self._forced = True
        self._keep = False

    def send(self, data: bytes, last: bool = False) -> bool:
        """Frame and write *data* (and the end of the body if *last*).

        Returns True when the client is behind and the caller should
        ``await drain()`` before sending more.
        """
        if self._finished:
            return False
        if self._chunked_out:
            if data:
                data = b"%x\r\n%b\r\n" % (len(data), data)
            if last:
                data += _LAST_CHUNK
        if self._pending is not None:
            data = self._pending + data
            self._pending = None
        request = self._client
        writer = self._writer
        if last:
            self._finished = True
            self._client = self._writer = None
        if not data:
            return False
        transport = request.transport if request is not None else None
        if transport is None or transport.is_closing():
            raise _gone()
        transport.write(data)
        self._sent += len(data)
        if writer is not None:
            writer.output_size += len(data)
        if transport.get_write_buffer_size() > HIGH_WATER:
            return True
        if last:
            return False
        fd = self._fd
        if fd == -1:  # looked up at the first body piece: small responses never do
            sock = transport.get_extra_info("socket")
            fd = self._fd = sock.fileno() if sock is not None else -2
        return fd >= 0 and _queued(fd) > _QUEUE_HIGH

    async def drain(self) -> None:  # type: ignore[override]
        """Wait until the client has taken what was written (backpressure)."""
        await self._drain_writer.drain()

    # -- the StreamResponse interface, for aiohttp's connection loop ------------

    async def prepare(self, request: web.BaseRequest) -> None:  # type: ignore[override]
        self.start(request)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        writer = self._writer
        if self.send(bytes(data)) and writer is not None:
            await writer.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        self.send(data, last=True)
