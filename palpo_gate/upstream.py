"""The upstream leg: a keep-alive pool of HTTP/1.1 connections to Palpo.

This module owns the connections to the upstream (TCP or UNIX socket): it
connects, writes the request head it is given as bytes, unchanged (the
target the client sent is the target Palpo gets), moves the response bytes
into :mod:`exchange`, which holds the rules of HTTP/1.1 responses, and hands
out what that made. It owns the waits: backpressure both ways and the
deadlines. It knows nothing of routing or of the client side.

Why not aiohttp's ClientSession: it re-quotes or drops parts of the target
(a trailing ``?``, ``#frag``), adds headers of its own, and costs about 2.7x
the CPU per request (see docs/DESIGN.md section 11).

Rules kept here:
- a connection goes back to the pool only when :mod:`exchange` says it is
  reusable and the caller read the response whole; anything else closes it;
- what one connection buffers is bounded: reads go into one buffer the pool
  shares, sized to what the connection may still hold: 64 KiB, up to 256 KiB
  while the client keeps up, and 64 KiB again once it falls behind;
- every failure becomes one of the :mod:`errors` classes.
"""

from __future__ import annotations

import asyncio
import math

from .config import Upstream
from .errors import UpstreamBroken, UpstreamConnectTimeout, UpstreamTimeout, UpstreamUnavailable
from .exchange import BROKEN, MAX_RESPONSE_HEAD, Exchange

__all__ = ["IDLE_EXPIRY", "MAX_RESPONSE_HEAD", "Connection", "Deadlines", "Pool"]

#: The most response body one connection buffers while the client is not
#: taking it. It is also the largest read: a read never asks for more than the
#: room left, and reading pauses when there is none. What a stalled download
#: costs (with response._HIGH_WATER on the client side) is bounded by it.
_HIGH_WATER = 64 * 1024
#: The largest read, reached by doubling from _HIGH_WATER while the client
#: takes every piece without falling behind; the first time it falls behind
#: (the forward loop calls pause()) reads are _HIGH_WATER again. Fewer,
#: larger pieces cost less CPU per byte (docs/DESIGN.md section 12).
_MAX_READ = 256 * 1024
_READ_SIZES = (_HIGH_WATER, 2 * _HIGH_WATER, _MAX_READ)
#: Idle pooled connections older than this are not reused: an upstream that
#: times idle connections out (60 s is common) may be closing them right now,
#: and a request written into that race cannot always be retried.
IDLE_EXPIRY = 50.0


class Connection(asyncio.BufferedProtocol):
    """One upstream connection; carries one exchange at a time."""

    # Slots: thousands of these are held during long-polls.
    __slots__ = (
        "_drain_waiter", "_exc", "_in_exchange", "_loop", "_pool", "_read_paused",
        "_read_size", "_timer_key", "_waiter", "_write_paused", "closed", "exchange", "idle_since",
        "reused", "transport",
    )

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        #: the rules of the responses on this connection
        self.exchange = Exchange()
        self.closed = False
        #: True when this connection served an earlier exchange (came from the pool)
        self.reused = False
        self.idle_since = 0.0
        self._in_exchange = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        #: the largest read now: _HIGH_WATER .. _MAX_READ
        self._read_size = _HIGH_WATER
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer_key = 0

    @property
    def got_bytes(self) -> bool:
        """A byte of the response came."""
        return self.exchange.got_bytes

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        # Never more than the room left below the read size: one read cannot
        # take a connection past it (reading is paused once there is no room).
        buffered = self.exchange.buffered
        if not buffered:
            return self._pool.read_views[self._read_size]  # no slice made per read
        return self._pool.read_view[:max(self._read_size - buffered, 1)]

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._pool.read_view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if not self._in_exchange:
            # Bytes nobody asked for: the connection is out of step; drop it.
            self._close()
            return
        exchange = self.exchange
        events = exchange.feed(data)
        if events:
            if events & BROKEN:
                self._fail(UpstreamBroken(exchange.error or "invalid response from upstream"))
                self._close(abort=True)
                return
            if exchange.buffered >= self._read_size and not self._read_paused and self.transport:
                self._read_paused = True
                self.transport.pause_reading()
            self._wake()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool._discard(self)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(UpstreamBroken("upstream closed the connection"))
        if not self._in_exchange:
            return
        exchange = self.exchange
        events = exchange.eof()
        if events & BROKEN:
            self._fail(UpstreamBroken(exchange.error or "upstream closed the connection"))
        elif events:
            self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- the exchange -----------------------------------------------------------

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(exc)

    def fail(self, exc: BaseException) -> None:
        """Abort the exchange with *exc* (raised to whoever waits on it)."""
        self._fail(exc)
        self._close(abort=True)

    def begin(self, head_only: bool) -> None:
        self._in_exchange = True
        self._read_size = _HIGH_WATER
        self.exchange.start(head_only)

    def write(self, data: bytes) -> None:
        if self.transport is None or self.closed:
            raise self._exc or UpstreamBroken("upstream closed the connection")
        self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait until the upstream takes what was written (backpressure)."""
        if self._exc is not None:
            raise self._exc
        if not self._write_paused:
            return
        fut = self._drain_waiter = self._loop.create_future()
        deadlines = self._pool.deadlines
        key = deadlines.add(fut, timeout, "upstream did not read the request body in time")
        try:
            await fut
        finally:
            deadlines.remove(key, fut)
            self._drain_waiter = None

    def _arm(self, timeout: float, why: str) -> asyncio.Future[None]:
        """A future woken by the next event on this connection, or failed with
        UpstreamTimeout after *timeout* seconds. Awaited directly by the proxy:
        no coroutine frame between the handler and the event."""
        fut = self._waiter = self._loop.create_future()
        self._timer_key = self._pool.deadlines.add(fut, timeout, why)
        return fut

    def _disarm(self) -> None:
        if self._timer_key:
            self._pool.deadlines.remove(self._timer_key, self._waiter)
            self._timer_key = 0
        self._waiter = None

    def wait_head(self, timeout: float | None) -> asyncio.Future[None] | None:
        """None once the response head is here; else a future to await first.

        *timeout* None: no deadline, while the request body is still being
        sent (its own timeouts police it; :meth:`wake` ends the wait when it
        is done, so that the caller can wait again with a deadline).
        """
        self._disarm()
        if self.exchange.head_ready:
            return None
        if self._exc is not None:
            raise self._exc
        if timeout is None:
            fut = self._waiter = self._loop.create_future()
            return fut
        return self._arm(timeout, "upstream did not answer in time")

    def wake(self) -> None:
        """Wake whoever waits on this exchange (to re-check its state)."""
        self._wake()

    def head(self) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        return self.exchange.head()

    def take(self) -> bytes:
        """The response body buffered so far (b"" if none); raises the
        exchange's error once nothing is left to hand out."""
        if self._timer_key:
            self._disarm()
        else:
            self._waiter = None
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        elif self._read_size < _MAX_READ:
            # Asked again with no pause() since the last piece: the client
            # took it without falling behind.
            self._read_size *= 2
        exchange = self.exchange
        if exchange.body:
            return exchange.take()
        if self._exc is not None and not exchange.complete:
            raise self._exc
        return b""

    def pause(self) -> None:
        """Read nothing more until the next :meth:`take`: the client is behind,
        and what it has not taken is already held on its side. Reads are
        back to _HIGH_WATER: a client that stalls holds no more than that."""
        self._read_size = _HIGH_WATER
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def wait_body(self, timeout: float) -> asyncio.Future[None] | None:
        """None if body bytes or the end are here; else a future to await."""
        exchange = self.exchange
        if exchange.body or exchange.complete:
            return None
        if self._exc is not None:
            raise self._exc
        return self._arm(timeout, "upstream stopped sending the response")

    async def read_head(self, timeout: float) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """Wait for the response head: (status, reason, raw headers)."""
        while (fut := self.wait_head(timeout)) is not None:
            await fut
        return self.head()

    async def read_body(self, timeout: float) -> bytes:
        """The next piece of the response body; b"" at its end."""
        while not (data := self.take()) and (fut := self.wait_body(timeout)) is not None:
            await fut
        return data

    def drained(self) -> bool:
        """The response is complete and every body byte has been handed out."""
        exchange = self.exchange
        return exchange.complete and not exchange.body

    def finish(self, reusable: bool) -> None:
        """End the exchange: back to the pool if the response was read whole and
        the exchange allows reuse, closed otherwise."""
        self._in_exchange = False
        self._disarm()
        if reusable and self.exchange.reusable and not self.closed and self._exc is None:
            if self._read_paused and self.transport is not None:
                # Paused for a slow client at the last piece: an idle pooled
                # connection must still see the upstream close it.
                self.transport.resume_reading()
            self.exchange.next_cycle()
            self._read_paused = False
            self._pool._release(self)
        else:
            self._close(abort=True)

    def _close(self, abort: bool = False) -> None:
        self._in_exchange = False
        self._disarm()
        if self.transport is not None and not self.closed:
            self.closed = True
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        self._pool._discard(self)


class Deadlines:
    """Timeouts for many waits at the cost of one timer per tick.

    Every wait for upstream bytes has a deadline; with thousands of held
    long-polls a TimerHandle each (about 670 bytes) adds up. Deadlines are
    rounded up to the next tick of :attr:`TICK` seconds and kept in one dict
    per tick; a wait that ends removes its entry.
    """

    TICK = 0.1

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ticks: dict[int, dict[asyncio.Future[None], str]] = {}

    def add(self, fut: asyncio.Future[None], timeout: float, why: str) -> int:
        key = math.ceil((self._loop.time() + timeout) / self.TICK)
        waits = self._ticks.get(key)
        if waits is None:
            waits = self._ticks[key] = {}
            self._loop.call_at(key * self.TICK, self._expire, key)
        waits[fut] = why
        return key

    def remove(self, key: int, fut: asyncio.Future[None] | None) -> None:
        waits = self._ticks.get(key)
        if waits is not None and fut is not None:
            waits.pop(fut, None)

    def _expire(self, key: int) -> None:
        for fut, why in self._ticks.pop(key, {}).items():
            if not fut.done():
                fut.set_exception(UpstreamTimeout(why))


class Pool:
    """Idle keep-alive connections to one upstream, newest first."""

    def __init__(self, cfg: Upstream, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.cfg = cfg
        self.loop = loop or asyncio.get_running_loop()
        self.deadlines = Deadlines(self.loop)
        self._idle: list[Connection] = []
        self._all: set[Connection] = set()
        #: every connection of this pool reads into this buffer: httptools
        #: copies what it keeps before the next read
        self.read_view = memoryview(bytearray(_MAX_READ))
        #: its first 64, 128 and 256 KiB (every read size a connection has)
        self.read_views = {size: self.read_view[:size] for size in _READ_SIZES}
        path = cfg.path
        self._unix_path = "\0" + path[1:] if path.startswith("@") else path

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def open_count(self) -> int:
        return len(self._all)

    async def acquire(self) -> Connection:
        """A pooled connection if one is idle, else a new one."""
        return self.idle() or await self.connect()

    def idle(self) -> Connection | None:
        """A pooled connection, if one is idle and young enough (no coroutine:
        this is every request's path)."""
        if self._idle:
            expired = self.loop.time() - IDLE_EXPIRY
            while self._idle:
                conn = self._idle.pop()
                if conn.idle_since < expired:
                    conn._close()  # older ones too: the list is oldest first
                    for old in self._idle:
                        old._close()
                    self._idle.clear()
                elif not conn.closed:
                    conn.reused = True
                    return conn
        return None

    async def connect(self) -> Connection:
        cfg = self.cfg
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                if cfg.kind == "unix":
                    _, conn = await self.loop.create_unix_connection(
                        lambda: Connection(self), self._unix_path)
                else:
                    _, conn = await self.loop.create_connection(
                        lambda: Connection(self), cfg.host, cfg.port)
        except TimeoutError:
            raise UpstreamConnectTimeout(
                f"upstream {cfg.url} did not accept a connection in time") from None
        except OSError as exc:
            raise UpstreamUnavailable(
                f"upstream {cfg.url} unreachable: {exc.strerror or exc}") from None
        self._all.add(conn)
        return conn

    def _release(self, conn: Connection) -> None:
        if len(self._idle) < self.cfg.pool_size:
            conn.idle_since = self.loop.time()
            self._idle.append(conn)
        else:
            conn._close()

    def _discard(self, conn: Connection) -> None:
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        for conn in list(self._all):
            conn._close()
        self._idle.clear()
