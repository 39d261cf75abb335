"""Per-client limits: ``[rate_limits]``.

This module owns which requests are limited, how they are counted, where
the counts live and what a refusal looks like. The client address comes from
:mod:`clients`; the handler asks :meth:`Policy.check` only on limited routes.

- The rule (pure, :func:`limited_route`): ``login`` is POST ``.../login``,
  ``register`` POST ``.../register``, ``password`` POST
  ``.../account/password`` and every ``.../requestToken`` endpoint (password
  reset, 3PID validation), under ``/_matrix/client/`` ``r0``, ``v3`` and
  ``unstable``. It is one precompiled regex over the normalised path (case
  folded, ``;params`` dropped), so no spelling of a path the homeserver might
  route there escapes it. ``requests`` counts every forwarded request;
  ``connections`` caps concurrent connections (:mod:`prelude` counts them).
- The cost: an ordinary GET pays one comparison (``method == "POST"``) unless
  ``requests`` is set.
- Counting: the ``limits`` library's sliding window counter (two counters per
  client and limit, in memory or in Redis), keyed by :func:`clients.limit_key`.
  The library (with what it pulls in, ~3 MiB of RSS) is imported when the
  first request is counted, not at start: a gate that is never asked to
  count does not carry it (the supervisor's shared store loads it at start).
- Storage: ``memory://`` keeps the counts in the process. With
  ``server.workers`` > 1 they live in the supervisor, once for all workers
  (:class:`SharedStore`; each worker asks it over a socket pair), so the
  kernel spreading connections over workers does not multiply the budget.
  ``redis://`` keeps them in Redis, shared by every gate that uses it.
  ``connections`` is always counted per gate (its workers together): it
  guards this machine's sockets.
- Failing open: a storage that does not answer within
  :data:`STORAGE_TIMEOUT` (Redis down, the supervisor gone) lets the request
  through, counted in ``palpo_gate_rate_limit_fail_open_total`` and logged
  (once per outage, then again when it answers); it is not asked again for
  :data:`RETRY_DOWN` seconds. A broken limiter must not take the homeserver
  down, and nothing here blocks the event loop (redis-py's asyncio client).
- A refusal: 429 ``{"errcode": "M_LIMIT_EXCEEDED", "error": ...,
  "retry_after_ms": N}`` with ``Retry-After`` and the CORS headers (Matrix
  client-server API, "Rate limiting"), never forwarded, counted in
  ``palpo_gate_rate_limited_total{limit}`` and logged with the address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import clients
from .config import Config, Rate
from .wellknown import CORS_HEADERS

log = logging.getLogger("palpo_gate")

NAMES = ("login", "register", "password", "requests", "connections")
#: How long one storage call may take before the request passes unchecked.
STORAGE_TIMEOUT = 0.5
#: After a storage failure, requests pass unchecked this long before it is tried again.
RETRY_DOWN = 5.0
#: A worker finds its end of the socket pair to the supervisor's store here.
ENV_STORE_FD = "PALPO_GATE_LIMITS_FD"

METRIC_REFUSED = "palpo_gate_rate_limited_total"
METRIC_FAIL_OPEN = "palpo_gate_rate_limit_fail_open_total"

# -- the rule (pure) ----------------------------------------------------------------

_LIMITED_RE = re.compile(
    r"/_matrix/client/(?:r0|v3|unstable)/(?:"
    r"(?P<login>login)"
    r"|(?P<register>register)"
    r"|(?P<password>account/password|(?:[^/]+/)+requesttoken)"
    r")/?", re.IGNORECASE)


def limited_route(path: str) -> str | None:
    """The limit a POST to the normalised *path* counts against, or None."""
    if ";" in path:
        # /login;x is /login to a server that strips path parameters.
        path = "/".join(seg.split(";", 1)[0] for seg in path.split("/"))
    m = _LIMITED_RE.fullmatch(path)
    return m.lastgroup if m is not None else None


def refusal(limit: str, retry_after_ms: int) -> web.Response:
    """The 429 of a request over *limit* (Matrix client-server API, "Rate limiting")."""
    seconds = max(1, math.ceil(retry_after_ms / 1000))
    body = json.dumps({
        "errcode": "M_LIMIT_EXCEEDED",
        "error": f"Too many requests ({limit}) from this address; retry in {seconds} s",
        "retry_after_ms": retry_after_ms,
    }).encode()
    return web.Response(status=429, body=body, headers=(
        ("Content-Type", "application/json"), ("Retry-After", str(seconds)), *CORS_HEADERS))


class StorageDown(Exception):
    """The counts could not be read or written."""


# -- storages --------------------------------------------------------------------------


def _memory_storage() -> Any:
    """``limits``' in-process storage, sweeping expired counters at most once
    a second: the library starts a sweep of every key after each hit, which
    under many clients costs more than the hits themselves."""
    from limits.aio.storage import MemoryStorage

    class _Memory(MemoryStorage):
        _next_sweep = 0.0

        async def _MemoryStorage__schedule_expiry(self) -> None:
            now = time.monotonic()
            if now >= self._next_sweep:
                self._next_sweep = now + 1.0
                await MemoryStorage._MemoryStorage__schedule_expiry(self)  # type: ignore[attr-defined]

    return _Memory()


_items: dict[tuple[int, str], Any] = {}  # limits.RateLimitItem by (amount, unit)


def _item(amount: int, unit: str) -> Any:
    key = (amount, unit)
    item = _items.get(key)
    if item is None:
        from limits import parse as parse_limit

        item = _items[key] = parse_limit(f"{amount}/{unit}")
    return item


class _LimitsBackend:
    """Counts in a ``limits`` storage: memory, or Redis. The storage is made
    by *make_storage* at the first hit (see the module's docstring)."""

    def __init__(self, make_storage: Callable[[], Any],
                 errors: tuple[type[BaseException], ...] = ()) -> None:
        self._make_storage = make_storage
        self.storage: Any = None
        self.limiter: Any = None
        self._errors = errors

    def start(self) -> None:
        from limits.aio.strategies import SlidingWindowCounterRateLimiter

        self.storage = self._make_storage()
        self.limiter = SlidingWindowCounterRateLimiter(self.storage)

    async def hit(self, name: str, amount: int, unit: str, key: str) -> int:
        """0 if the hit is within the budget; else milliseconds until it may be."""
        if self.limiter is None:
            self.start()
        item = _item(amount, unit)
        try:
            if await self.limiter.hit(item, name, key):
                return 0
            stats = await self.limiter.get_window_stats(item, name, key)
        except self._errors as exc:
            raise StorageDown(str(exc) or type(exc).__name__) from exc
        return max(1, math.ceil((stats.reset_time - time.time()) * 1000))

    async def close(self) -> None:
        return None


def memory_backend() -> _LimitsBackend:
    return _LimitsBackend(_memory_storage)


def redis_backend(url: str) -> _LimitsBackend:
    """Counts in Redis through redis-py's asyncio client (never blocking the loop)."""
    from limits.aio.storage import RedisStorage
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError

    scheme = "async+redis+unix" if url.startswith("redis+unix:") else "async+" + url.split(":")[0]
    uri = scheme + url[url.index(":"):]
    storage = RedisStorage(
        uri, implementation="redispy", key_prefix="palpo_gate",
        socket_timeout=STORAGE_TIMEOUT, socket_connect_timeout=STORAGE_TIMEOUT,
        # No retries: a request is not held up; the next one tries again.
        retry=Retry(NoBackoff(), 0))
    backend = _LimitsBackend(lambda: storage, (RedisError, OSError))

    async def close() -> None:
        with contextlib.suppress(Exception):
            await storage.bridge.storage.aclose()

    backend.close = close  # type: ignore[method-assign]
    return backend


class _Connections:
    """Concurrent connections per key, counted here."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def acquire(self, key: str, cap: int) -> bool:
        n = self.counts.get(key, 0)
        if n >= cap:
            return False
        self.counts[key] = n + 1
        return True

    def release(self, key: str) -> None:
        n = self.counts.get(key, 0) - 1
        if n > 0:
            self.counts[key] = n
        else:
            self.counts.pop(key, None)


# -- the workers' shared store ------------------------------------------------------------
#
# One line per message on a UNIX socket pair, words separated by spaces (keys
# are addresses or networks, names and units are words):
#   worker -> store: "<id> H <name> <amount> <unit> <key>"   a hit
#                    "<id> C <cap> <key>"                    take a connection slot
#                    "0 R <key>"                             give one back (no answer)
#   store -> worker: "<id> <n>"   H: 0 allowed, else ms to wait; C: 1 taken, 0 refused


class _Lines(asyncio.Protocol):
    """One end of a channel: its transport, and each complete line it reads
    handed to :meth:`line`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            self.line(line)

    def line(self, line: bytes) -> None:
        raise NotImplementedError


class _StoreSide(_Lines):
    """The supervisor's end of one worker's channel."""

    def __init__(self, store: SharedStore) -> None:
        super().__init__()
        self.store = store
        self.held: dict[str, int] = {}

    def line(self, line: bytes) -> None:
        try:
            self._message(line.decode("ascii").split(" "))
        except (ValueError, IndexError, UnicodeDecodeError):
            log.error("rate limit store: a malformed message from a worker: %r", line[:200])

    def _message(self, words: list[str]) -> None:
        op = words[1]
        conns = self.store.connections
        if op == "H":
            _, _, name, amount, unit, key = words
            task = asyncio.get_running_loop().create_task(
                self._hit(words[0], name, int(amount), unit, key))
            self.store.tasks.add(task)
            task.add_done_callback(self.store.tasks.discard)
        elif op == "C":
            _, _, cap, key = words
            ok = conns.acquire(key, int(cap))
            if ok:
                self.held[key] = self.held.get(key, 0) + 1
            self._answer(words[0], 1 if ok else 0)
        elif op == "R":
            key = words[2]
            if self.held.get(key, 0) > 0:
                self.held[key] -= 1
                conns.release(key)
        else:
            raise ValueError(op)

    async def _hit(self, msg_id: str, name: str, amount: int, unit: str, key: str) -> None:
        try:
            wait = await self.store.backend.hit(name, amount, unit, key)
        except StorageDown:
            wait = 0
        self._answer(msg_id, wait)

    def _answer(self, msg_id: str, value: int) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(f"{msg_id} {value}\n".encode())

    def connection_lost(self, exc: BaseException | None) -> None:
        # A worker that died gives back the connection slots it held.
        for key, n in self.held.items():
            for _ in range(n):
                self.store.connections.release(key)
        self.held.clear()


class SharedStore:
    """In the supervisor: the ``memory://`` counts and the connection slots
    of every worker, served over one socket pair per worker."""

    def __init__(self) -> None:
        self.backend = memory_backend()
        # Loaded now, not at the first count: a worker waits for the answer
        # only STORAGE_TIMEOUT, and the import would take part of it.
        self.backend.start()
        self.connections = _Connections()
        self.tasks: set[asyncio.Task[None]] = set()
        self._transports: list[asyncio.BaseTransport] = []

    async def channel(self) -> socket.socket:
        """A new channel; the returned end is the worker's (inheritable)."""
        self._transports = [t for t in self._transports if not t.is_closing()]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: _StoreSide(self), ours)
        self._transports.append(transport)
        theirs.set_inheritable(True)
        return theirs

    def close(self) -> None:
        for transport in self._transports:
            transport.close()
        self._transports.clear()


class _WorkerSide(_Lines):
    """A worker's end of its channel to the supervisor's store."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: dict[int, asyncio.Future[int]] = {}
        self.closed = False
        self._next = 0

    def line(self, line: bytes) -> None:
        msg_id, _, value = line.partition(b" ")
        fut = self.waiting.pop(int(msg_id), None)
        if fut is not None and not fut.done():
            fut.set_result(int(value))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(StorageDown("the supervisor's store is gone"))
        self.waiting.clear()

    def call(self, words: str) -> asyncio.Future[int]:
        if self.closed or self.transport is None:
            raise StorageDown("the supervisor's store is gone")
        self._next += 1
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting[self._next] = fut
        self.transport.write(f"{self._next} {words}\n".encode())
        return fut

    def tell(self, words: str) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(f"0 {words}\n".encode())


class _SharedBackend:
    """A worker's counts, kept by the supervisor's :class:`SharedStore`."""

    limiter = True  # nothing to load (see _LimitsBackend.start)

    def __init__(self, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        self._side = _WorkerSide()
        self._ready = asyncio.get_running_loop().create_task(self._connect(sock))

    async def _connect(self, sock: socket.socket) -> None:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: self._side, sock)

    async def hit(self, name: str, amount: int, unit: str, key: str) -> int:
        if not self._ready.done():
            await self._ready
        return await self._side.call(f"H {name} {amount} {unit} {key}")

    def acquire(self, key: str, cap: int) -> Awaitable[int]:
        return self._side.call(f"C {cap} {key}")

    def release(self, key: str) -> None:
        self._side.tell(f"R {key}")

    async def close(self) -> None:
        if self._side.transport is not None:
            self._side.transport.close()


# -- the process's limits, and one config's policy -------------------------------------------


class RateLimits:
    """The limits of one gate process: the storage (kept across reloads while
    ``storage`` is unchanged), the connection slots, the counters."""

    def __init__(self, metrics: Any = None) -> None:
        fd = os.environ.get(ENV_STORE_FD)
        #: with several workers: the supervisor's store
        self.shared = _SharedBackend(int(fd)) if fd else None
        self.local_connections = _Connections()
        self.refused: dict[str, int] = dict.fromkeys(NAMES, 0)
        self.fail_open = 0
        self._storage_url = ""
        self._backend: Any = None
        self._down_until = 0.0
        self._down_since = 0.0
        self._logged: dict[tuple[str, str], float] = {}
        self._closing: set[asyncio.Task[None]] = set()
        if metrics is not None:
            metrics.register_counter(
                METRIC_REFUSED, "Requests refused with 429 by [rate_limits], by limit.",
                lambda: {(k,): float(v) for k, v in self.refused.items()}, ("limit",))
            metrics.register_counter(
                METRIC_FAIL_OPEN, "Requests let through unchecked: the rate limit storage "
                "did not answer.", lambda: float(self.fail_open))

    def policy(self, cfg: Config) -> Policy:
        """The policy of a new config generation (the storage follows it)."""
        rl = cfg.rate_limits
        if rl.storage != self._storage_url:
            old = self._backend
            if rl.storage == "memory://":
                self._backend = self.shared if self.shared is not None else memory_backend()
            else:
                self._backend = redis_backend(rl.storage)
            self._storage_url = rl.storage
            self._down_until = 0.0
            if old is not None and old is not self.shared:
                task = asyncio.get_running_loop().create_task(old.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        return Policy(self, cfg)

    async def close(self) -> None:
        if self._backend is not None and self._backend is not self.shared:
            await self._backend.close()
        if self.shared is not None:
            await self.shared.close()

    # -- checks

    async def hit(self, name: str, rate: Rate, addr: str) -> int:
        """0 if *addr* may go on, else milliseconds until it may (fails open)."""
        now = time.monotonic()
        if now < self._down_until:
            self.fail_open += 1
            return 0
        if self._backend.limiter is None:
            # The first count loads the library: outside the storage's timeout.
            self._backend.start()
        try:
            async with asyncio.timeout(STORAGE_TIMEOUT):
                wait = await self._backend.hit(name, rate.amount, rate.unit,
                                               clients.limit_key(addr))
        except (StorageDown, TimeoutError) as exc:
            self._storage_failed(exc)
            return 0
        if self._down_since:
            log.warning("rate limit storage %s answers again after %.0f s; limits apply again",
                        _safe_url(self._storage_url), now - self._down_since)
            self._down_since = 0.0
        if wait:
            self._refused(name, addr, wait)
        return wait

    def _storage_failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.fail_open += 1
        self._down_until = now + RETRY_DOWN
        if not self._down_since:
            self._down_since = now
            log.warning("rate limit storage %s does not answer (%s); requests pass unchecked "
                        "(trying again every %.0f s)", _safe_url(self._storage_url),
                        str(exc) or type(exc).__name__, RETRY_DOWN)

    def _refused(self, name: str, addr: str, wait_ms: int) -> None:
        """Count a refusal; log it, once a minute per (limit, address) at most:
        a client that keeps trying must not flood the log."""
        self.refused[name] = self.refused.get(name, 0) + 1
        now = time.monotonic()
        key = (name, addr)
        if self._logged.get(key, 0.0) > now:
            return
        if len(self._logged) > 10_000:
            self._logged = {k: t for k, t in self._logged.items() if t > now}
        self._logged[key] = now + 60.0
        if wait_ms:
            log.warning("rate limit %s: refused %s (over the limit; retry in %d ms)",
                        name, addr, wait_ms)
        else:
            log.warning("rate limit %s: refused %s (over the cap)", name, addr)

    # -- connections (prelude.py)

    def acquire_connection(self, addr: str, cap: int) -> bool | Awaitable[int]:
        """Take a connection slot for *addr*: True/False, or an awaitable of
        1/0 with several workers (the slots are the supervisor's)."""
        key = clients.limit_key(addr)
        if self.shared is None:
            return self.local_connections.acquire(key, cap)
        return self.shared.acquire(key, cap)

    def release_connection(self, addr: str) -> None:
        key = clients.limit_key(addr)
        if self.shared is None:
            self.local_connections.release(key)
        else:
            self.shared.release(key)

    def connection_refused(self, addr: str) -> None:
        self._refused("connections", addr, 0)


def _safe_url(url: str) -> str:
    """A storage URL without its password, for the log."""
    return re.sub(r"//[^@/]*@", "//***@", url)


class Policy:
    """``[rate_limits]`` of one config generation."""

    __slots__ = ("connections", "every", "owner", "posts", "rates", "requests")

    def __init__(self, owner: RateLimits, cfg: Config) -> None:
        rl = cfg.rate_limits
        self.owner = owner
        self.rates: dict[str, Rate | None] = {
            "login": rl.login, "register": rl.register, "password": rl.password}
        self.requests = rl.requests
        #: any POST limit on: a POST's path is matched
        self.posts = any(self.rates.values())
        #: ``requests`` on: every forwarded request is checked
        self.every = rl.requests is not None
        self.connections = rl.connections

    def rules(self, method: str, path: str) -> tuple[tuple[str, Rate], ...]:
        """The limits a forwarded request counts against."""
        out: tuple[tuple[str, Rate], ...] = ()
        if self.requests is not None:
            out = (("requests", self.requests),)
        if method == "POST" and self.posts:
            name = limited_route(path)
            rate = self.rates.get(name) if name is not None else None
            if rate is not None:
                out += ((name, rate),)  # type: ignore[operator]
        return out

    async def check(self, rules: tuple[tuple[str, Rate], ...], addr: str
                    ) -> web.Response | None:
        """None if *addr* may go on; else the 429 to answer."""
        hit: Callable[[str, Rate, str], Awaitable[int]] = self.owner.hit
        for name, rate in rules:
            wait = await hit(name, rate, addr)
            if wait:
                return refusal(name, wait)
        return None
