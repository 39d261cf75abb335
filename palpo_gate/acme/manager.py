"""The one process that talks to the CA: when to order, and what a failure does.

Runs in whichever gate process holds the state directory's lock (see
:mod:`.service`). Its loop, for the configured names:

1. no stored certificate covers every name: order now;
2. else it is due (:func:`.schedule.due`, with the CA's renewal information
   where the directory offers ``renewalInfo``, RFC 9773): order then;
3. an order runs in a thread of its own (the ``acme`` library blocks); the
   new certificate is written to the store, which every process serves;
4. a failure is logged once, with its cause, and counted; the certificate
   that serves keeps serving; the next attempt waits
   :func:`.schedule.retry_delay` (``Retry-After`` respected).

A reload wakes the loop (new names are ordered at once). Nothing here ever
retries without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..config import Acme
from . import certs, schedule
from .client import AcmeFailure, Conversation, describe
from .serving import Served, utc
from .store import Store

log = logging.getLogger("palpo_gate.acme")

T = TypeVar("T")

#: The longest sleep between two looks at the schedule (a clock that jumps,
#: a certificate replaced by hand).
RECHECK = 3600.0
#: How often renewal information (RFC 9773) is asked for, unless the CA says.
ARI_DEFAULT_RECHECK = 6 * 3600.0


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """*fn(*args)* in a daemon thread of its own. Not the loop's default
    executor: an HTTP request to a CA that hangs must not hold up the
    process's exit, which waits for that executor."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            result: Any = (True, fn(*args))
        except BaseException as exc:  # handed to the awaiting task
            result = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(deliver, *result)

    threading.Thread(target=run, name="palpo-gate acme", daemon=True).start()
    return await future


class Manager:
    """The schedule and the attempts of one state directory's certificates."""

    def __init__(self, cfg: Acme, store: Store, served: Served) -> None:
        self.cfg = cfg
        self.store = store
        self.served = served
        #: failed attempts in a row, and in all (the metric)
        self.failures = 0
        self.failures_total = 0
        self._next_attempt = 0.0
        self._ari: tuple[int, float | None, float] | None = None  # serial, when, next check
        self._wake = asyncio.Event()

    def reconfigure(self, cfg: Acme) -> None:
        if cfg.domains != self.cfg.domains:
            self._next_attempt = 0.0  # new names: no back-off from the old set
            self.failures = 0
        self.cfg = cfg
        self._wake.set()

    async def run(self) -> None:
        self.store.clear_challenges()  # left by a process that died mid-order
        while True:
            wait = await self._plan()
            if wait > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(wait, RECHECK)):
                        await self._wake.wait()
                continue
            await self._attempt()

    # -- planning

    async def _plan(self) -> float:
        """Seconds until the next attempt (0: now)."""
        now = time.time()
        stored = self.served.stored()
        domains = set(self.cfg.domains)
        if stored is None or not domains <= stored[1].names or stored[1].not_after <= now:
            return max(self._next_attempt - now, 0.0)
        pem, info = stored
        ari_time = await self._renewal_info(pem, info.serial, now)
        due = schedule.due(info.not_before, info.not_after, self.cfg.renew_before, ari_time,
                           self.store.mtime(self.store.certificate))
        return max(due - now, self._next_attempt - now, 0.0)

    async def _renewal_info(self, pem: bytes, serial: int, now: float) -> float | None:
        """The CA's suggested renewal time for the stored certificate (RFC 9773),
        asked again at the time it gives; None when it offers none."""
        if self._ari is not None and self._ari[0] == serial and now < self._ari[2]:
            return self._ari[1]
        conversation = Conversation(self.cfg.directory, self.cfg.email, self.cfg.ca_bundle,
                                    self.store)
        try:
            when, next_check = await in_thread(conversation.renewal_time, pem)
        except Exception as exc:
            retry = getattr(exc, "retry_after", None)  # acme.errors.ARIError
            next_check = retry.timestamp() if retry is not None else now + ARI_DEFAULT_RECHECK
            log.warning("acme: cannot read the CA's renewal information: %s; asking again at "
                        "%s", describe(exc.__cause__ or exc), utc(next_check))
            when = self._ari[1] if self._ari is not None and self._ari[0] == serial else None
        finally:
            conversation.close()
        if when is not None and (self._ari is None or self._ari[1] != when):
            log.info("acme: the CA suggests renewing the certificate (serial %x) at %s",
                     serial, utc(when))
        self._ari = (serial, when, max(next_check, now + schedule.MIN_RETRY))
        return when

    # -- one attempt

    async def _attempt(self) -> None:
        cfg = self.cfg
        names = ", ".join(cfg.domains)
        log.info("acme: ordering a certificate for %s from %s (%s)", names, cfg.directory,
                 cfg.challenge)
        started = time.monotonic()
        conversation = Conversation(cfg.directory, cfg.email, cfg.ca_bundle, self.store)
        try:
            await in_thread(self._order, conversation, cfg)
        except Exception as exc:
            self._failed(exc, conversation.net.retry_after)
            return
        finally:
            conversation.close()
        self.failures = 0
        self._next_attempt = 0.0
        self.served.refresh(quiet=True)
        info = self.served.info
        assert info is not None
        due = schedule.due(info.not_before, info.not_after, cfg.renew_before,
                           obtained=time.time())
        log.info("acme: obtained a certificate for %s in %.1fs (serial %x, valid until %s); "
                 "renewal due %s", names, time.monotonic() - started, info.serial,
                 utc(info.not_after), utc(due))

    def _order(self, conversation: Conversation, cfg: Acme) -> None:
        """In the thread: order, then store (so that a certificate obtained as
        the process stops is not lost)."""
        pem = conversation.order(cfg.domains, cfg.challenge)
        info = certs.info(pem)
        # Stored, such a certificate would be ordered again at once.
        if not set(cfg.domains) <= info.names:
            raise AcmeFailure(f"the CA issued a certificate for {', '.join(sorted(info.names))}"
                              f", not for {', '.join(cfg.domains)}")
        if info.not_after <= time.time():
            raise AcmeFailure(f"the CA issued a certificate that expired at "
                              f"{utc(info.not_after)}")
        self.store.write(self.store.certificate, pem)

    def _failed(self, exc: BaseException, retry_after: float | None) -> None:
        self.failures += 1
        self.failures_total += 1
        info = self.served.info
        now = time.time()
        remaining = info.not_after - now if self.served.issued and info is not None else None
        delay = schedule.retry_delay(self.failures, retry_after=retry_after,
                                     remaining=remaining)
        self._next_attempt = now + delay
        serving = (f"still serving the certificate valid until {utc(info.not_after)}"
                   if remaining is not None and info is not None
                   else "still serving the temporary self-signed certificate")
        log.error("acme: could not obtain a certificate for %s: %s; %s; next attempt in %s",
                  ", ".join(self.cfg.domains), describe(exc), serving, _duration(delay))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
