"""The life of one gate process (SPEC section 6): start, reload, stop.

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

Worker processes (``server.workers`` > 1) run this same loop under the
supervisor in :mod:`workers`, which tells systemd for them.
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
from collections.abc import Callable

from . import config as configmod
from . import logpipe, systemd
from . import metrics as metricsmod
from .generation import Gate
from .listeners import serve_metrics

log = logging.getLogger("palpo_gate")


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
        #: a worker's channel to its supervisor ("R" ready, "H" reloaded, "F" failed)
        self._report = report or (lambda _: None)
        #: a worker writes its metrics here for the supervisor to serve
        self._metrics_dir = metrics_dir
        self.gate: Gate | None = None
        self.metrics: metricsmod.Registry | None = None
        self._metrics_server: asyncio.AbstractServer | None = None
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()

    async def run(self, on_ready: Callable[[], object] | None = None) -> int:
        loop = asyncio.get_running_loop()
        if self.cfg.metrics is not None:
            self.metrics = metricsmod.Registry((lst.name for lst in self.cfg.listeners),
                                               log_drops=logpipe.dropped)
        self.gate = gate = Gate(self.cfg, passed=self._passed, reuse_port=self._reuse_port,
                                metrics=self.metrics)
        await gate.start()
        snapshots: asyncio.Task[None] | None = None
        if self.metrics is not None:
            try:
                await self._start_metrics(gate)
            except BaseException:
                await gate.close(0)
                raise
            if self._metrics_dir:
                snapshots = loop.create_task(self._write_snapshots(), name="metrics snapshots")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        log.info("palpo-gate ready: %d listener(s), upstream %s", len(gate.servers),
                 self.cfg.upstream.url)
        if on_ready is not None:
            on_ready()
        self._report("R")
        self._notify("READY=1")
        watchdog = start_watchdog(self._notify)
        fd_watch = start_fd_watch()
        reloader = loop.create_task(self._reload_loop(), name="palpo-gate reload")
        try:
            await self._stop.wait()
            self._notify("STOPPING=1")
            log.info("stopping: draining in-flight requests for up to %gs",
                     gate.cfg.server.drain_timeout)
        finally:
            reloader.cancel()
            fd_watch.cancel()
            if watchdog is not None:
                watchdog.cancel()
            if snapshots is not None:
                snapshots.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reloader
            if self._metrics_server is not None:
                self._metrics_server.close()
            await gate.close(gate.cfg.server.drain_timeout)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("stopped")
        return 0

    async def _reload_loop(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()  # SIGHUPs during a reload coalesce into one more
            await self.reload()

    async def reload(self) -> bool:
        """Read the config file again and serve it; False if it could not be used."""
        assert self.gate is not None
        self._notify(systemd.reloading_message())
        try:
            cfg = configmod.load(self.path)
            await self.gate.reload(cfg)
        except configmod.ConfigError as exc:
            log.error("reload failed; still serving generation %d. The new config:",
                      self.gate.generation)
            for line in exc.errors:
                log.error("  %s", line)
            if self.metrics is not None:
                self.metrics.reload_failed()
            self._report("F")
            return False
        finally:
            self._notify("READY=1")
        log.info("reloaded %s: generation %d", cfg.source, self.gate.generation)
        self._report("H")
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
        bind = self.cfg.metrics.bind
        self._metrics_server = await serve_metrics(bind, registry.render, self._passed or {})
        log.info("metrics on %s", bind)


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
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    return asyncio.get_running_loop().create_task(beat(), name="palpo-gate watchdog")


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

    return asyncio.get_running_loop().create_task(watch(), name="palpo-gate fd watch")


async def serve(cfg: configmod.Config, path: str | None = None) -> int:
    """Run the gate until SIGTERM / SIGINT; the exit status.

    One process when ``server.workers`` is 1; else the supervisor of
    :mod:`workers`, which starts this same program once per worker.
    """
    from . import workers

    if workers.ENV_WORKER in os.environ:
        report_fd = int(os.environ[workers.ENV_REPORT_FD])

        def report(code: str) -> None:
            with contextlib.suppress(OSError):
                os.write(report_fd, code.encode())

        return await Process(cfg, path, passed=workers.inherited_sockets(), reuse_port=True,
                             notify=lambda _: None, report=report,
                             metrics_dir=os.environ.get(workers.ENV_METRICS_DIR, "")).run()
    if cfg.server.workers > 1:
        return await workers.Supervisor(cfg, path).run()
    return await Process(cfg, path).run()
