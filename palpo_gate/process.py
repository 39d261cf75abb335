"""The life of one gate process (docs/DESIGN.md section 6): start, reload, stop.

This module owns signals and what systemd is told:
- start: bind every listener, then ``READY=1``;
- SIGHUP: read the config file and the certificates again; a config that
  cannot be used is logged with its key paths and the running generation
  keeps serving (``RELOADING=1`` + ``MONOTONIC_USEC`` before, ``READY=1``
  after, either way);
- SIGTERM / SIGINT: ``STOPPING=1``, stop accepting, let in-flight requests
  finish for ``server.drain_timeout``, exit 0;
- ``WATCHDOG=1`` at half of ``WATCHDOG_USEC`` while running.

It also says when the process runs out of file descriptors (see
:func:`start_fd_watch`).

The pieces a supervisor of worker processes shares (signal wiring, the
reload loop, background tasks, the metrics listener) are here too, and so
is the worker's side of its contract with that supervisor (:class:`Worker`,
read from the environment once). The supervisor itself is
:mod:`supervisor`, which imports this module and never the other way.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import config as configmod
from . import logpipe, systemd
from . import metrics as metricsmod
from .config import Bind
from .generation import Gate
from .listeners import serve_metrics

log = logging.getLogger("palpo_gate")

# -- background tasks ----------------------------------------------------------------

#: Tasks started by :func:`start_task`: the event loop keeps only weak
#: references to tasks, so one nobody holds may vanish mid-flight.
_tasks: set[asyncio.Task[Any]] = set()


def keep_large_pieces_on_the_heap() -> None:
    """Let body pieces of up to 256 KiB come from the heap, and keep it.

    glibc's malloc maps allocations of 128 KiB and more with an mmap of their
    own and gives the top of the heap back to the kernel once 128 KiB of it
    are free: every piece of a large upstream read (httptools copies it into
    a new bytes object) would then fault in fresh zeroed pages, which costs
    more CPU than the larger reads save (docs/DESIGN.md section 12). Raised
    thresholds let freed pieces be reused. Called once, before the event
    loop starts; elsewhere than glibc, nothing is done.
    """
    import ctypes  # here: only the serving process needs it

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 1024 * 1024)
    mallopt(m_trim_threshold, 4 * 1024 * 1024)


def start_task(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
    """Run *coro* as a named task that is kept referenced until it ends and
    whose unexpected exception is logged, not lost with the task."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _tasks.add(task)
    task.add_done_callback(_task_done)
    return task


def _task_done(task: asyncio.Task[Any]) -> None:
    _tasks.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s ended with an unexpected error", task.get_name(), exc_info=exc)


async def cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel *tasks* (None ones skipped) and wait until they have ended."""
    running = [t for t in tasks if t is not None]
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- signals and reload --------------------------------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Signals:
    """SIGTERM / SIGINT set :attr:`stop`, SIGHUP sets :attr:`reload`, while
    installed on the running loop."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.reload = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload.set)

    def remove(self) -> None:
        if self._loop is not None:
            for sig in (*STOP_SIGNALS, signal.SIGHUP):
                self._loop.remove_signal_handler(sig)
            self._loop = None


async def reload_loop(requested: asyncio.Event, reload: Callable[[], Awaitable[object]]) -> None:
    """Call *reload* once per SIGHUP, for as long as the process runs.

    SIGHUPs that arrive during a reload coalesce into one more. A reload that
    fails in a way nobody foresaw is logged and the next SIGHUP is handled
    again: the running config keeps serving either way.
    """
    while True:
        await requested.wait()
        requested.clear()
        try:
            await reload()
        except Exception:
            log.exception("reload failed unexpectedly; still serving the running config")


def log_reload_failure(serving: str, errors: Iterable[str]) -> None:
    """A config that cannot be used, by key path; *serving* is what still serves."""
    log.error("reload failed; still serving %s. The new config:", serving)
    for line in errors:
        log.error("  %s", line)


async def start_metrics_listener(bind: Bind, render: Callable[[], bytes],
                                 passed: dict[str, socket.socket],
                                 note: str = "") -> asyncio.AbstractServer:
    """The Prometheus endpoint on ``[metrics] bind`` (its own listener)."""
    server = await serve_metrics(bind, render, passed)
    log.info("metrics on %s%s", bind, note)
    return server


# -- a worker's side of the supervisor's contract -------------------------------------

ENV_WORKER = "PALPO_GATE_WORKER"  # the worker's index
ENV_FDS = "PALPO_GATE_FDS"  # "key=fd;key=fd": sockets handed down
ENV_REPORT_FD = "PALPO_GATE_REPORT_FD"  # the pipe a worker reports on
ENV_METRICS_DIR = "PALPO_GATE_METRICS_DIR"  # where a worker writes its metrics snapshot

#: What a worker reports on its pipe.
REPORT_READY, REPORT_RELOADED, REPORT_FAILED = "R", "H", "F"


@dataclass(frozen=True)
class Worker:
    """This process as one of ``server.workers`` processes, as its
    supervisor started it (``ENV_*`` variables)."""

    index: str
    report_fd: int
    metrics_dir: str
    fds: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Worker | None:
        """This process's role: None when it is not a worker."""
        if ENV_WORKER not in env:
            return None
        return cls(env[ENV_WORKER], int(env[ENV_REPORT_FD]), env.get(ENV_METRICS_DIR, ""),
                   env.get(ENV_FDS, ""))

    def sockets(self) -> dict[str, socket.socket]:
        """The sockets the supervisor handed down, by key."""
        out: dict[str, socket.socket] = {}
        for item in filter(None, self.fds.split(";")):
            key, _, fd = item.rpartition("=")
            out[key] = socket.socket(fileno=int(fd))
        return out

    def report(self, code: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self.report_fd, code.encode())


# -- one serving process -------------------------------------------------------------


class Process:
    """One serving process: a :class:`Gate` plus its signals."""

    def __init__(self, cfg: configmod.Config, path: str | None, *,
                 passed: dict[str, socket.socket] | None = None, reuse_port: bool = False,
                 notify: Callable[[str], object] = systemd.notify,
                 report: Callable[[str], object] | None = None,
                 metrics_dir: str = "") -> None:
        self.cfg = cfg
        self.path = path
        self._passed = passed
        self._reuse_port = reuse_port
        self._notify = notify
        #: a worker's channel to its supervisor (REPORT_*)
        self._report = report or (lambda _: None)
        #: a worker writes its metrics here for the supervisor to serve
        self._metrics_dir = metrics_dir
        self.gate: Gate | None = None
        self.metrics: metricsmod.Registry | None = None
        self._metrics_server: asyncio.AbstractServer | None = None
        self._signals = Signals()

    @classmethod
    def for_worker(cls, cfg: configmod.Config, path: str | None, worker: Worker) -> Process:
        """A worker: listeners shared through SO_REUSEPORT or handed down, and
        systemd told by the supervisor, not by this process."""
        return cls(cfg, path, passed=worker.sockets(), reuse_port=True,
                   notify=lambda _: None, report=worker.report, metrics_dir=worker.metrics_dir)

    async def run(self, on_ready: Callable[[], object] | None = None) -> int:
        gate = await self._start()
        snapshots = (start_task(self._write_snapshots(), "metrics snapshots")
                     if self.metrics is not None and self._metrics_dir else None)
        self._signals.install()
        log.info("palpo-gate ready: %d listener(s), upstream %s", len(gate.servers),
                 self.cfg.upstream.url)
        if on_ready is not None:
            on_ready()
        self._report(REPORT_READY)
        self._notify(systemd.READY)
        watchdog = start_watchdog(self._notify)
        fd_watch = start_fd_watch()
        reloader = start_task(reload_loop(self._signals.reload, self.reload), "palpo-gate reload")
        try:
            await self._signals.stop.wait()
            self._notify(systemd.STOPPING)
            log.info("stopping: draining in-flight requests for up to %gs",
                     gate.cfg.server.drain_timeout)
        finally:
            await cancel(reloader, fd_watch, watchdog, snapshots)
            if self._metrics_server is not None:
                self._metrics_server.close()
            await gate.close(gate.cfg.server.drain_timeout)
            self._signals.remove()
        log.info("stopped")
        return 0

    async def _start(self) -> Gate:
        """The gate listening, and its metrics endpoint when configured."""
        if self.cfg.metrics is not None:
            self.metrics = metricsmod.Registry((lst.name for lst in self.cfg.listeners),
                                               log_drops=logpipe.dropped)
        self.gate = gate = Gate(self.cfg, passed=self._passed, reuse_port=self._reuse_port,
                                metrics=self.metrics)
        await gate.start()
        if self.metrics is not None:
            try:
                await self._start_metrics(gate)
            except BaseException:
                await gate.close(0)
                raise
        return gate

    async def reload(self) -> bool:
        """Read the config file again and serve it; False if it could not be used."""
        assert self.gate is not None
        self._notify(systemd.reloading_message())
        try:
            cfg = configmod.load(self.path)
            await self.gate.reload(cfg)
        except configmod.ConfigError as exc:
            log_reload_failure(f"generation {self.gate.generation}", exc.errors)
            if self.metrics is not None:
                self.metrics.reload_failed()
            self._report(REPORT_FAILED)
            return False
        finally:
            self._notify(systemd.READY)
        log.info("reloaded %s: generation %d", cfg.source, self.gate.generation)
        self._report(REPORT_RELOADED)
        if self.metrics is not None:
            self.metrics.reload_succeeded(self.gate.generation)
        if cfg.metrics != self.cfg.metrics:
            log.warning("[metrics] changes take effect at the next restart")
        return True

    async def _start_metrics(self, gate: Gate) -> None:
        """The Prometheus endpoint on ``[metrics] bind`` (its own listener)."""
        registry = self.metrics
        assert registry is not None and self.cfg.metrics is not None
        registry.register_gauge(
            metricsmod.UPSTREAM_CONNECTIONS, "Open connections to the upstream.",
            lambda: float(gate.upstream_connections()[0]))
        registry.register_gauge(
            metricsmod.UPSTREAM_IDLE_CONNECTIONS, "Idle keep-alive connections to the upstream.",
            lambda: float(gate.upstream_connections()[1]))
        if gate.acme is not None:
            gate.acme.register_metrics(registry)  # certificate expiry, ACME failures
        if self._metrics_dir:
            return  # a worker: the supervisor serves the sum of all workers
        self._metrics_server = await start_metrics_listener(
            self.cfg.metrics.bind, registry.render, self._passed or {})

    async def _write_snapshots(self) -> None:
        assert self.metrics is not None
        path = os.path.join(self._metrics_dir, f"worker-{os.getpid()}.json")
        while True:
            try:
                self.metrics.write_snapshot(path)
            except OSError as exc:
                log.warning("cannot write metrics snapshot %s: %s", path, exc)
            await asyncio.sleep(1.0)


def start_watchdog(notify: Callable[[str], object]) -> asyncio.Task[None] | None:
    interval = systemd.watchdog_interval()
    if interval is None:
        return None

    async def beat() -> None:
        while True:
            notify(systemd.WATCHDOG)
            await asyncio.sleep(interval)

    return start_task(beat(), "palpo-gate watchdog")


#: How often the process checks that it can open a file descriptor (seconds),
#: and how often at most it says that it cannot.
FD_CHECK_INTERVAL = 1.0
FD_WARN_INTERVAL = 60.0


def start_fd_watch(interval: float = FD_CHECK_INTERVAL,
                   warn_every: float = FD_WARN_INTERVAL) -> asyncio.Task[None]:
    """Log running out of file descriptors, which costs new connections.

    At RLIMIT_NOFILE, ``accept(2)`` fails with EMFILE. uvloop's libuv sheds
    that load itself, out of the gate's sight: it closes a spare descriptor
    it keeps for the purpose, accepts every pending connection and closes it
    at once (the client sees a reset), and tells no one. So the gate checks
    every *interval* seconds whether it can open a descriptor; while it
    cannot, it says so at most every *warn_every* seconds, and once more
    when it can again. Cost: an ``open`` and a ``close`` a second.
    """

    async def watch() -> None:
        warned = -warn_every
        failed = 0  # checks that failed since the last message
        reported = False  # an episode has been said; its end will be too
        while True:
            await asyncio.sleep(interval)
            try:
                fd = os.open("/", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    continue
                failed += 1
                now = time.monotonic()
                if now - warned >= warn_every:
                    which = ("the process's limit, RLIMIT_NOFILE "
                             f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]}"
                             if exc.errno == errno.EMFILE else "the system's limit")
                    seen = ("" if failed == 1 else
                            f" (in {failed} checks since the last such message)")
                    log.error("out of file descriptors, %s%s: new connections are closed as "
                              "soon as they are accepted. Raise the limit (LimitNOFILE= in "
                              "the systemd unit, ulimit -n) or shed load", which, seen)
                    warned, failed, reported = now, 0, True
                continue
            os.close(fd)
            if reported:
                log.warning("file descriptors available again")
                reported = False

    return start_task(watch(), "palpo-gate fd watch")
