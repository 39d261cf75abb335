"""ACME in one gate process: what the rest of the gate calls.

One :class:`AcmeService` per process with an ``[acme]`` section. Every
process serves (:mod:`.serving`); exactly one per state directory talks to
the CA (:mod:`.manager`): the one that holds the directory's lock
(``flock``). With ``server.workers > 1`` the workers race for it, the loser
looks again every :data:`LEADER_RETRY` seconds (the kernel frees the lock of
a worker that dies, and another takes over); two gates started on the same
state directory share it the same way. Every process watches the stored
certificate and serves a new one within :data:`WATCH_INTERVAL` seconds.

The hooks into the rest of the gate:
- ``tls.py``: :attr:`AcmeService.served` is the ``tls.acme`` certificate;
- the listeners: :meth:`AcmeService.http01_response` on plain-HTTP listeners,
  :func:`.front.fronted` / :class:`.front.FrontServer` on TLS listeners
  answering TLS-ALPN-01;
- the process: :meth:`start`, :meth:`reload`, :meth:`close`, and the metrics
  in :meth:`register_metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from typing import Any

from aiohttp import web

from ..config import Acme, ConfigError
from .manager import Manager
from .serving import HTTP01_PREFIX, Challenges, Served
from .store import Store

log = logging.getLogger("palpo_gate.acme")

#: Seconds between two looks at the stored certificate (a new one from the
#: process that renews).
WATCH_INTERVAL = 1.0
#: Seconds between two tries at becoming the process that talks to the CA.
LEADER_RETRY = 5.0

EXPIRY_METRIC = "palpo_gate_certificate_expiry_timestamp_seconds"
FAILURES_METRIC = "palpo_gate_acme_failures_total"


class AcmeService:
    def __init__(self, cfg: Acme) -> None:
        """Prepare the state directory and the certificate to serve (stored,
        or temporary). Raises ConfigError when the state directory is unusable."""
        self.cfg = cfg
        self.store = Store(cfg.state_dir, cfg.directory)
        try:
            self.store.prepare()
            self.served = Served(self.store, cfg.domains)
            self.served.start()
        except OSError as exc:
            raise ConfigError([f"acme.state_dir: {cfg.state_dir}: "
                               f"{exc.strerror or exc}"]) from None
        self.challenges = Challenges(self.store)
        self.manager: Manager | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._leader: asyncio.Task[None] | None = None

    # -- hooks for the listeners

    def http01_response(self, method: str, target: str) -> web.Response:
        return self.challenges.http01_response(method, target)

    def alpn_context(self, name: str) -> ssl.SSLContext | None:
        return self.challenges.alpn_context(name)

    # -- the process

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch(), name="acme watch")]
        self._leader = loop.create_task(self._lead(), name="acme leader")

    def reload(self, cfg: Acme | None) -> None:
        """A new config: new names are ordered at once. The state directory
        and the directory URL stay until a restart (the account, the lock
        and the stored certificates live there)."""
        if cfg is None:
            if self._leader is not None:
                log.warning("acme: [acme] removed: no certificate is ordered or renewed")
                self._leader.cancel()
                self._leader = None
                self.manager = None
                self.store.unlock()
            return
        if self._leader is None:
            self._leader = asyncio.get_running_loop().create_task(self._lead(),
                                                                 name="acme leader")
        if (cfg.state_dir, cfg.directory) != (self.cfg.state_dir, self.cfg.directory):
            log.warning("acme: changes to acme.state_dir and acme.directory take effect at "
                        "the next restart")
            cfg = dataclasses.replace(cfg, state_dir=self.cfg.state_dir,
                                      directory=self.cfg.directory)
        if cfg.domains != self.cfg.domains:
            self.served.set_names(cfg.domains)
        self.cfg = cfg
        if self.manager is not None:
            self.manager.reconfigure(cfg)

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._leader] if self._leader is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks, self._leader = [], None
        self.store.unlock()

    def register_metrics(self, registry: Any) -> None:
        registry.register_gauge(
            EXPIRY_METRIC, "When the certificate served for each ACME name expires, in "
            "seconds since the epoch (0: none covers the name).",
            self.served.expiry, labels=("name",))
        registry.register_counter(
            FAILURES_METRIC, "Attempts to obtain or renew a certificate that failed.",
            lambda: float(self.manager.failures_total if self.manager is not None else 0))

    # -- tasks

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                self.served.refresh()
            except Exception:
                log.exception("acme: reading the stored certificate failed")

    async def _lead(self) -> None:
        while not self.store.try_lock():
            log.debug("acme: another process talks to the CA for %s", self.cfg.state_dir)
            await asyncio.sleep(LEADER_RETRY)
        log.debug("acme: this process talks to the CA for %s", self.cfg.state_dir)
        self.manager = Manager(self.cfg, self.store, self.served)
        while True:
            try:
                await self.manager.run()
            except Exception:
                # A bug, not a CA failure (those are handled inside): say so,
                # and do not spin.
                log.exception("acme: the certificate manager failed; restarting it in 60s")
                await asyncio.sleep(60)


__all__ = ["HTTP01_PREFIX", "AcmeService"]
