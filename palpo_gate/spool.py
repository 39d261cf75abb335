"""Buffering a chunked upload so that it can be sent on with a Content-Length.

Bodies stream through the gate; this module owns the one exception
(``forwarding.buffer_chunked_uploads``, docs/DESIGN.md section 3). Some homeservers
refuse a chunked media upload (Synapse: 400 "Request must specify a
Content-Length"); nginx in front of them hides it, since it buffers request
bodies by default and sends them on with their length. With the option on,
a chunked body on a media upload endpoint (:func:`routing.media_upload`) is
collected here first: in memory up to :data:`MEMORY_BOUND`, then in an
anonymous temporary file (``$TMPDIR``, else ``/tmp``), so memory stays flat
whatever the size. The body is bounded by ``limits.max_body_size`` (413) and
each pause by ``limits.body_timeout`` (408), as for a streamed body.

The file is written and read back in the event loop: the pieces are small
and go to the page cache, as nginx's own client body buffering does.

It must not touch the upstream: the proxy sends the head with
:func:`with_length` and the body through :func:`replay`, on the same path as
any other body.
"""

from __future__ import annotations

import asyncio
import tempfile
from typing import Any

from aiohttp import web

from .errors import BadRequestBody, BodyTimeout, BodyTooLarge, GateError

#: Bytes kept in memory before the body moves to a temporary file.
MEMORY_BOUND = 256 * 1024
#: Size of the pieces read back from the spool and written upstream.
READ_SIZE = 64 * 1024


class SpooledBody:
    """A collected request body, read back once from the start."""

    __slots__ = ("_file", "size")

    def __init__(self) -> None:
        self._file = tempfile.SpooledTemporaryFile(max_size=MEMORY_BOUND)
        self.size = 0

    def close(self) -> None:
        self._file.close()

    # -- read back as aiohttp's StreamReader reads a request body ----------------

    async def readany(self) -> bytes:
        return self._file.read(READ_SIZE)

    async def read(self, n: int = -1) -> bytes:
        return self._file.read(n)

    def at_eof(self) -> bool:
        return self._file.tell() >= self.size

    is_eof = at_eof


async def collect(request: web.BaseRequest, limit: int, body_timeout: float) -> SpooledBody:
    """Read the whole request body into a :class:`SpooledBody`.

    Raises 413 past *limit* bytes, 408 after a pause of *body_timeout*, 400
    when the body cannot be read (a bad chunk). A client that goes away
    raises ``ConnectionError``, as it does while streaming.
    """
    body = SpooledBody()
    try:
        content = request.content
        write = body._file.write
        while True:
            try:
                async with asyncio.timeout(body_timeout):
                    data = await content.readany()
            except TimeoutError:
                raise BodyTimeout("request body stalled") from None
            if not data:
                break
            body.size += len(data)
            if body.size > limit:
                raise BodyTooLarge(f"request body over the limit of {limit} bytes")
            write(data)
        body._file.seek(0)
    except (GateError, ConnectionError, asyncio.CancelledError):
        body.close()
        raise
    except Exception as exc:  # the client's body could not be read
        body.close()
        raise BadRequestBody(f"request body unreadable: {exc}") from None
    return body


def with_length(head: bytes, size: int) -> bytes:
    """*head* (built without framing) with ``Content-Length: size`` as its last field."""
    # Every HTTP head ends with an empty line (RFC 9112 section 2.1).
    return b"%bContent-Length: %d\r\n\r\n" % (head[:-2], size)


class _Replayed:
    """The client's request, its body read back from a spool.

    Everything but ``content`` is the client's request: the handler keeps
    using it as one (response, logging, closing the connection).
    """

    __slots__ = ("_request", "content")

    def __init__(self, request: web.BaseRequest, body: SpooledBody) -> None:
        self._request = request
        self.content = body

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def replay(request: web.BaseRequest, body: SpooledBody) -> web.BaseRequest:
    """*request* with its body served from *body*."""
    return _Replayed(request, body)  # type: ignore[return-value]
