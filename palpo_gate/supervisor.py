"""Worker processes: ``server.workers = N`` processes sharing the listeners.

This module owns the supervisor, the parent of the workers. It serves no
request itself. It:
- hands the workers the sockets they cannot bind themselves: UNIX sockets
  (bound once here) and sockets passed by systemd (inherited). TCP sockets
  are bound by every worker with SO_REUSEPORT, so the kernel spreads new
  connections across them;
- starts the workers (``python -m palpo_gate`` again, told by environment
  variables that it is a worker, so each is a fresh interpreter rather than
  a fork of a running event loop) and restarts one that dies;
- tells systemd READY=1 only once every worker reported ready, and
  RELOADING / READY / STOPPING / WATCHDOG for the whole service;
- forwards SIGHUP (after checking the new config itself, so that a bad one
  is reported once) and SIGTERM / SIGINT;
- serves the metrics endpoint, summing the snapshots the workers write;
- keeps the ``[rate_limits]`` counts of ``memory://`` and the connection
  slots for all workers (:class:`ratelimit.SharedStore`, one socket pair
  per worker), so that several workers do not multiply a client's budget.

Each worker runs :class:`process.Process` and reports on a pipe
(``process.REPORT_*``): ready, reloaded, reload failed. The signal wiring,
the reload loop and the watchdog are :mod:`process`'s, shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable

from . import config as configmod
from . import metrics as metricsmod
from . import ratelimit, systemd
from .generation import cert_sets
from .listeners import bind_socket, systemd_sockets
from .process import (
    ENV_FDS,
    ENV_METRICS_DIR,
    ENV_REPORT_FD,
    ENV_WORKER,
    REPORT_FAILED,
    REPORT_READY,
    REPORT_RELOADED,
    Signals,
    cancel,
    log_reload_failure,
    reload_loop,
    start_metrics_listener,
    start_task,
    start_watchdog,
)

log = logging.getLogger("palpo_gate")

#: How long a restarted worker waits after a crash, growing while it keeps crashing.
_BACKOFF = (0.5, 1, 2, 5, 10, 30)


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.reports: asyncio.Queue[str] = asyncio.Queue()
        self.crashes = 0


class _ReportProtocol(asyncio.Protocol):
    def __init__(self, worker: _Worker) -> None:
        self.worker = worker

    def data_received(self, data: bytes) -> None:
        for ch in data.decode("ascii", "replace"):
            if ch == REPORT_READY:
                self.worker.ready.set()
            elif ch in (REPORT_RELOADED, REPORT_FAILED):
                self.worker.reports.put_nowait(ch)


class Supervisor:
    def __init__(self, cfg: configmod.Config, path: str | None, *,
                 notify: Callable[[str], object] = systemd.notify) -> None:
        self.cfg = cfg
        self.path = path
        self._notify = notify
        self._workers: list[_Worker] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._handed: dict[str, socket.socket] = {}
        self._metrics_dir = ""
        self._metrics_server: asyncio.AbstractServer | None = None
        self._signals = Signals()
        self._store: ratelimit.SharedStore | None = None

    # -- sockets handed to every worker

    def _hand_down(self) -> None:
        passed = systemd_sockets()
        for name, sock in passed.items():
            self._handed[name] = sock
        for i, lst in enumerate(self.cfg.listeners):
            if lst.bind.kind == "unix":
                try:
                    self._handed[str(lst.bind)] = bind_socket(lst.bind, {})
                except OSError as exc:
                    raise configmod.ConfigError([f"listeners[{i}].bind: cannot listen on "
                                                 f"{lst.bind}: {exc.strerror or exc}"]) from None
        for sock in self._handed.values():
            sock.set_inheritable(True)

    # -- workers

    def _worker_env(self, worker: _Worker, report_fd: int) -> dict[str, str]:
        env = dict(os.environ)
        for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(var, None)  # systemd hears from the supervisor only
        env[ENV_WORKER] = str(worker.index)
        env[ENV_FDS] = ";".join(f"{k}={s.fileno()}" for k, s in self._handed.items())
        env[ENV_REPORT_FD] = str(report_fd)
        if self._metrics_dir:
            env[ENV_METRICS_DIR] = self._metrics_dir
        return env

    async def _spawn(self, worker: _Worker) -> None:
        read_fd, write_fd = os.pipe()
        env = self._worker_env(worker, write_fd)
        store = await self._store.channel() if self._store is not None else None
        if store is not None:
            env[ratelimit.ENV_STORE_FD] = str(store.fileno())
        args = [sys.executable, "-m", "palpo_gate"]
        if self.path is not None:
            args += ["--config", self.path]
        worker.ready.clear()
        loop = asyncio.get_running_loop()
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                *args, env=env, pass_fds=(write_fd, *(s.fileno() for s in self._handed.values()),
                                          *((store.fileno(),) if store is not None else ())),
                stdin=asyncio.subprocess.DEVNULL)
        finally:
            os.close(write_fd)
            if store is not None:
                store.close()
        await loop.connect_read_pipe(lambda: _ReportProtocol(worker),
                                     os.fdopen(read_fd, "rb", buffering=0))
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)

    async def _watch(self, worker: _Worker) -> None:
        """Restart *worker* whenever it exits while the service runs."""
        while True:
            assert worker.proc is not None
            code = await worker.proc.wait()
            if self._stopping:
                return
            worker.crashes += 1
            delay = _BACKOFF[min(worker.crashes - 1, len(_BACKOFF) - 1)]
            log.error("worker %d (pid %d) exited with status %s; restarting in %gs",
                      worker.index, worker.proc.pid, code, delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            await self._spawn(worker)
            try:
                async with asyncio.timeout(60):
                    await worker.ready.wait()
                worker.crashes = 0 if worker.crashes < 3 else worker.crashes
            except TimeoutError:
                log.error("restarted worker %d did not report ready", worker.index)

    def _signal_all(self, sig: int) -> None:
        for w in self._workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    # -- the service

    async def run(self) -> int:
        self._hand_down()
        if self.cfg.metrics is not None:
            self._metrics_dir = tempfile.mkdtemp(prefix="palpo-gate-metrics-")
        self._signals.install()
        try:
            if self.cfg.metrics is not None:
                await self._start_metrics()
            self._store = ratelimit.SharedStore()
            failed = await self._start_workers()
            if failed is not None:
                return failed
            self._tasks = [start_task(self._watch(w), f"worker {w.index}")
                           for w in self._workers]
            log.info("palpo-gate ready: %d workers, upstream %s", len(self._workers),
                     self.cfg.upstream.url)
            self._notify(systemd.READY)
            watchdog = start_watchdog(self._notify)
            reloads = start_task(reload_loop(self._signals.reload, self._reload_once),
                                 "supervisor reload")
            await self._signals.stop.wait()
            await cancel(reloads, watchdog)
            return await self._shutdown(0)
        finally:
            self._release()

    async def _start_workers(self) -> int | None:
        """Start every worker and wait until all are ready: None then, else
        (one exited first, or the service was stopped) the exit status."""
        self._workers = [_Worker(i) for i in range(self.cfg.server.workers)]
        for w in self._workers:
            await self._spawn(w)
        waits = [asyncio.ensure_future(self._all_ready()),
                 asyncio.ensure_future(self._signals.stop.wait()),
                 *(asyncio.ensure_future(w.proc.wait()) for w in self._workers if w.proc)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for f in waits:
            f.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        if all(w.ready.is_set() for w in self._workers):
            return None
        codes = {w.proc.returncode for w in self._workers if w.proc is not None}
        log.error("a worker failed to start; stopping")
        status = await self._shutdown(1)
        # A worker's config error (a listener that cannot bind, say) is
        # the service's: exit 2 as a single process would.
        return 2 if 2 in codes else status

    def _release(self) -> None:
        """What the supervisor holds: signals, sockets, metrics, the shared store."""
        self._signals.remove()
        for sock in self._handed.values():
            sock.close()
        for lst in self.cfg.listeners:
            if lst.bind.kind == "unix" and not lst.bind.path.startswith("@"):
                with contextlib.suppress(OSError):
                    os.unlink(lst.bind.path)
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self._store is not None:
            self._store.close()
        if self._metrics_dir:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    async def _all_ready(self) -> None:
        for w in self._workers:
            await w.ready.wait()

    async def _shutdown(self, status: int) -> int:
        self._stopping = True
        self._notify(systemd.STOPPING)
        for t in self._tasks:
            t.cancel()
        self._signal_all(signal.SIGTERM)
        grace = self.cfg.server.drain_timeout + 5
        procs = [w.proc for w in self._workers if w.proc is not None]
        try:
            async with asyncio.timeout(grace):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            log.error("workers still running %gs after SIGTERM; killing them", grace)
            self._signal_all(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs))
        log.info("stopped")
        return status

    async def _reload_once(self) -> None:
        self._notify(systemd.reloading_message())
        try:
            try:
                cfg = configmod.load(self.path)
                cert_sets(cfg)
            except configmod.ConfigError as exc:
                log_reload_failure("the running config", exc.errors)
                return
            if cfg.server.workers != self.cfg.server.workers:
                log.warning("server.workers changes take effect at the next restart")
            handed = {str(lst.bind) for lst in cfg.listeners if lst.bind.kind == "unix"}
            if handed - set(self._handed):
                log.warning("new UNIX listeners need a restart when server.workers > 1")
            results = await self._reload_workers()
            if all(r == REPORT_RELOADED for r in results):
                self.cfg = cfg
                log.info("reloaded: %d workers", len(results))
            else:
                log.error("reload: %d of %d workers kept their config",
                          sum(r != REPORT_RELOADED for r in results), len(results))
        finally:
            self._notify(systemd.READY)

    async def _reload_workers(self) -> list[str]:
        """SIGHUP to every worker; what each reported ("?": nothing in 30 s)."""
        for w in self._workers:
            while not w.reports.empty():
                w.reports.get_nowait()
        self._signal_all(signal.SIGHUP)
        results = []
        for w in self._workers:
            try:
                async with asyncio.timeout(30):
                    results.append(await w.reports.get())
            except TimeoutError:
                results.append("?")
        return results

    async def _start_metrics(self) -> None:
        assert self.cfg.metrics is not None
        directory = self._metrics_dir

        def render() -> bytes:
            return metricsmod.merge(metricsmod.read_snapshots(directory), stale_after=5.0)

        self._metrics_server = await start_metrics_listener(
            self.cfg.metrics.bind, render, self._handed, " (summed over the workers)")
