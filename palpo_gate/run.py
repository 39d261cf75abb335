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

Worker processes (``server.workers`` > 1) run this same loop under the
supervisor in :mod:`workers`, which tells systemd for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable

from . import config as configmod
from . import systemd
from .server import Gate

log = logging.getLogger("palpo_gate")


class Process:
    """One serving process: a :class:`Gate` plus its signals."""

    def __init__(self, cfg: configmod.Config, path: str | None, *,
                 passed: dict[str, socket.socket] | None = None, reuse_port: bool = False,
                 notify: Callable[[str], object] = systemd.notify) -> None:
        self.cfg = cfg
        self.path = path
        self._passed = passed
        self._reuse_port = reuse_port
        self._notify = notify
        self.gate: Gate | None = None
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()

    async def run(self, on_ready: Callable[[], object] | None = None) -> int:
        loop = asyncio.get_running_loop()
        self.gate = gate = Gate(self.cfg, passed=self._passed, reuse_port=self._reuse_port)
        await gate.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        log.info("palpo-gate ready: %d listener(s), upstream %s", len(gate.servers),
                 self.cfg.upstream.url)
        if on_ready is not None:
            on_ready()
        self._notify("READY=1")
        watchdog = _start_watchdog(self._notify)
        reloader = loop.create_task(self._reload_loop(), name="palpo-gate reload")
        try:
            await self._stop.wait()
            self._notify("STOPPING=1")
            log.info("stopping: draining in-flight requests for up to %gs",
                     gate.cfg.server.drain_timeout)
        finally:
            reloader.cancel()
            if watchdog is not None:
                watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reloader
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
            return False
        finally:
            self._notify("READY=1")
        log.info("reloaded %s: generation %d", cfg.source, self.gate.generation)
        return True


def _start_watchdog(notify: Callable[[str], object]) -> asyncio.Task[None] | None:
    interval = systemd.watchdog_interval()
    if interval is None:
        return None

    async def beat() -> None:
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    return asyncio.get_running_loop().create_task(beat(), name="palpo-gate watchdog")


async def serve(cfg: configmod.Config, path: str | None = None) -> int:
    """Run one gate process until SIGTERM / SIGINT; the exit status."""
    if cfg.server.workers > 1:
        log.warning("server.workers = %d: worker processes are not supported yet; "
                    "running one process", cfg.server.workers)
    return await Process(cfg, path).run()
