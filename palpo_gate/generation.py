"""One config's runtime and the reload diff.

This module owns :class:`Gate`: the listening sockets of a running gate (one
:class:`_Slot` each), the :class:`proxy.Generation` they serve (upstream
pool, handlers, documents built from one config), its certificates, and the
reload: a new config becomes a new generation; each listening socket whose
bind is unchanged is kept and only the factory for its new connections is
swapped (no refused connections); sockets no listener wants any more stop
accepting. Open connections finish on the generation they began with, whose
pool closes when the last of them is gone. It also drains on close.

Binding and the per-connection protocol are :mod:`listeners`'; the life of
the process (signals, systemd) is :mod:`process`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from typing import TYPE_CHECKING, Any

from aiohttp import web_protocol

from . import compat, ratelimit
from . import prelude as preludemod
from . import tls as tlsmod
from .acme.front import FrontServer, fronted  # light: no ACME client library
from .config import Config, ConfigError, Listener, join_host_port
from .listeners import LISTEN_BACKLOG, GateServer, bind_socket, systemd_sockets
from .metrics import Registry
from .proxy import Generation, ListenerHandler

if TYPE_CHECKING:
    from .acme.service import AcmeService

log = logging.getLogger("palpo_gate")


def cert_sets(cfg: Config, acme: AcmeService | None = None) -> dict[str, tlsmod.CertSet]:
    """Every TLS listener's certificates, loaded; errors name the key path.
    Without *acme* (``check``), a listener with only ``tls.acme`` is left out."""
    out: dict[str, tlsmod.CertSet] = {}
    errors: list[str] = []
    for i, lst in enumerate(cfg.listeners):
        if lst.tls is not None:
            certs = tlsmod.build(lst.tls, f"listeners[{i}].tls",
                                 acme.served if acme is not None else None, errors)
            if certs is not None:
                out[lst.name] = certs
    if errors:
        raise ConfigError(errors)
    return out


def ssl_contexts(cfg: Config) -> dict[str, ssl.SSLContext]:
    """The default SSL context of every TLS listener (validates certificates)."""
    return {name: certs.default for name, certs in cert_sets(cfg).items()}


def _slot_key(lst: Listener, cfg: Config) -> tuple[str, bool, bool, bool]:
    """Listeners with equal keys share a listening socket and its server across
    a reload; a key that differs only in TLS, in the PROXY protocol (TLS then
    starts after the header, in prelude.py, so the asyncio server of such a
    TLS listener is a plain one) or in answering ACME TLS-ALPN-01 (which needs
    an accept loop of its own) keeps the socket, not the server."""
    return (str(lst.bind), lst.tls is not None, lst.tls is not None and lst.proxy_protocol,
            fronted(lst, cfg.acme))


class _Slot:
    """One listening socket and its asyncio server. It outlives config
    generations while its key is unchanged: a reload swaps what new
    connections get, not the socket (no refused connections)."""

    def __init__(self, key: tuple[str, bool, bool, bool], sock: socket.socket, owned: bool) -> None:
        self.key = key
        self.sock = sock
        #: bound here (not passed by systemd or the supervisor): ours to unlink
        self.owned = owned
        self.listener: Listener | None = None
        self.gate_server: GateServer | None = None
        self.certs: tlsmod.CertSet | None = None
        self.context: ssl.SSLContext | None = None
        self.server: asyncio.AbstractServer | FrontServer | None = None

    def new_connection(self) -> web_protocol.RequestHandler:
        assert self.gate_server is not None
        return self.gate_server()

    def current_certs(self) -> tlsmod.CertSet:
        assert self.certs is not None
        return self.certs


class Gate:
    """A running gate: its listening sockets and the generation they serve.

    A reload builds a new :class:`Generation` and swaps one reference per
    listener; connections already open stay on the generation they started
    with until they end.
    """

    def __init__(self, cfg: Config, *, passed: dict[str, socket.socket] | None = None,
                 reuse_port: bool = False, metrics: Registry | None = None) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        #: automatic certificates (docs/DESIGN.md section 8), when [acme] is set
        self.acme = _acme_service(cfg)
        self._certs = cert_sets(cfg, self.acme)
        self.generation = 1
        self.metrics = metrics
        self.gen = Generation(cfg, self.loop, metrics)
        #: [rate_limits]: storage and counters outlive generations (ratelimit.py)
        self.rate_limits = ratelimit.RateLimits(metrics)
        self.gen.rate = self.rate_limits.policy(cfg)
        self._passed = passed if passed is not None else systemd_sockets()
        self._reuse_port = reuse_port
        self._slots: dict[str, _Slot] = {}  # by listener name
        self._retired: set[GateServer] = set()
        self._draining_gens: dict[Generation, set[GateServer]] = {}
        self._lock = asyncio.Lock()

    # -- views used by tests and the run loop

    @property
    def servers(self) -> list[tuple[Listener, GateServer, asyncio.AbstractServer]]:
        return [(s.listener, s.gate_server, s.server) for s in self._slots.values()
                if s.listener and s.gate_server and s.server]

    @property
    def contexts(self) -> dict[str, ssl.SSLContext]:
        return {name: s.context for name, s in self._slots.items() if s.context is not None}

    def upstream_connections(self) -> tuple[int, int]:
        """(open, idle) upstream connections of every live generation."""
        pools = [self.gen.pool, *(g.pool for g in self._draining_gens)]
        return sum(p.open_count for p in pools), sum(p.idle_count for p in pools)

    def addresses(self) -> dict[str, Any]:
        return {name: s.sock.getsockname() for name, s in self._slots.items()}

    # -- start, reload, close

    async def start(self) -> None:
        try:
            slots = self._open_slots(self.cfg, {})
            await self._commit(self.cfg, self.gen, self._certs, slots)
        except BaseException:
            await self.close(0)
            raise
        if self.acme is not None:
            self.acme.start()  # after the listeners: the CA's validation needs them
        for name, slot in self._slots.items():
            assert slot.listener is not None
            log.info("listener %s on %s (%s%s)", name, _where(slot.sock, slot.listener),
                     slot.listener.role, ", TLS" if slot.listener.tls else "")

    def _open_slots(self, cfg: Config, reusable: dict[tuple[str, bool, bool, bool], _Slot]
                    ) -> dict[str, _Slot]:
        """A slot per listener of *cfg*: reused when its key is unchanged, else
        newly bound. Raises ConfigError (closing what it bound) if a bind fails."""
        slots: dict[str, _Slot] = {}
        fresh: list[_Slot] = []
        try:
            for i, lst in enumerate(cfg.listeners):
                key = _slot_key(lst, cfg)
                # TLS added or removed on the same bind: the socket is ours
                # already (binding it again would fail); _commit gives it a
                # new server.
                slot = reusable.pop(key, None)
                if slot is None:
                    same_bind = next((k for k in reusable if k[0] == key[0]), None)
                    if same_bind is not None:
                        slot = reusable.pop(same_bind)
                if slot is None:
                    try:
                        sock = bind_socket(lst.bind, self._passed, reuse_port=self._reuse_port)
                    except OSError as exc:
                        raise ConfigError([f"listeners[{i}].bind: cannot listen on {lst.bind}: "
                                           f"{exc.strerror or exc}"]) from None
                    handed = lst.bind.kind == "systemd" or str(lst.bind) in self._passed
                    slot = _Slot(key, sock, owned=not handed)
                    fresh.append(slot)
                slots[lst.name] = slot
        except BaseException:
            for slot in fresh:
                slot.sock.close()
            raise
        return slots

    async def _commit(self, cfg: Config, gen: Generation, certs: dict[str, tlsmod.CertSet],
                      slots: dict[str, _Slot]) -> None:
        """Point every slot at *gen*; start servers for new sockets."""
        for lst in cfg.listeners:
            slot = slots[lst.name]
            key = _slot_key(lst, cfg)
            if slot.server is not None and slot.key != key:
                # TLS on or off: asyncio fixes it per server. The new server
                # takes a duplicate of the socket, so it never stops listening
                # (connections queued meanwhile are accepted by the new
                # server); the old one stops accepting, its open connections
                # finish as they are.
                sock = slot.sock.dup()
                sock.setblocking(False)
                for name, passed in self._passed.items():
                    if passed is slot.sock:  # systemd's or the supervisor's
                        self._passed[name] = sock
                slot.server.close()
                slot.sock, slot.server, slot.context = sock, None, None
                log.info("listener %s: now %s TLS, on the same socket", lst.name,
                         "with" if lst.tls else "without")
            slot.key = key
            handler = ListenerHandler(gen, lst)
            handler.bound(slot.sock.getsockname())
            if cfg.acme is not None and self.acme is not None and lst.tls is None:
                handler.acme = self.acme  # answers HTTP-01, never forwarded
            slot.listener = lst
            slot.gate_server = GateServer(handler, cfg)
            slot.certs = certs.get(lst.name)
            if slot.server is None:
                if slot.certs is not None:
                    slot.context = tlsmod.listening_context(slot.current_certs)
                if key[3] and slot.context is not None and self.acme is not None:
                    # ACME TLS-ALPN-01: the ClientHello is read before TLS starts.
                    slot.server = FrontServer(slot.sock, slot.new_connection, slot.context,
                                              self.acme.alpn_context, cfg.limits.header_timeout)
                else:
                    context = None if key[2] else slot.context  # prelude.py: TLS after PROXY
                    slot.server = await self.loop.create_server(
                        slot.new_connection, sock=slot.sock, ssl=context,
                        backlog=LISTEN_BACKLOG,
                        ssl_handshake_timeout=cfg.limits.header_timeout if context else None)
            slot.gate_server.prelude = preludemod.for_listener(
                lst, cfg, gen, slot.context, self.rate_limits)
        self._slots = slots

    async def reload(self, cfg: Config) -> None:
        """Serve *cfg* from now on. Raises ConfigError (and changes nothing) if
        its certificates or new listening sockets cannot be had."""
        async with self._lock:
            if cfg.acme is not None and self.acme is None:
                raise ConfigError(["acme: [acme] was added: automatic certificates start "
                                   "with the next restart"])
            certs = cert_sets(cfg, self.acme)
            old_slots = dict(self._slots)
            reusable = {s.key: s for s in old_slots.values()}
            slots = self._open_slots(cfg, reusable)
            # Sockets no new listener wants stop accepting now.
            wanted = {str(lst.bind) for lst in cfg.listeners}
            for slot in reusable.values():
                if slot.server is not None:
                    slot.server.close()
                if slot.listener is not None and str(slot.listener.bind) not in wanted:
                    self._unlink(slot)
            old_gen = self.gen
            old_servers = {s.gate_server for s in old_slots.values() if s.gate_server}
            new_gen = Generation(cfg, self.loop, self.metrics)
            new_gen.rate = self.rate_limits.policy(cfg)
            await self._commit(cfg, new_gen, certs, slots)
            self.cfg, self.gen, self._certs = cfg, new_gen, certs
            self.generation += 1
            if self.acme is not None:
                self.acme.reload(cfg.acme)
            self._draining_gens[old_gen] = set(old_servers)
            for gs in old_servers:
                self._retired.add(gs)
                gs.retire(lambda g, gen=old_gen: self._server_empty(gen, g))

    def _server_empty(self, gen: Generation, gs: GateServer) -> None:
        self._retired.discard(gs)
        servers = self._draining_gens.get(gen)
        if servers is None:
            return
        servers.discard(gs)
        if not servers:
            del self._draining_gens[gen]
            gen.pool.close()  # the last connection of that generation is gone

    async def close(self, drain_timeout: float) -> None:
        """Stop accepting, let in-flight requests finish for *drain_timeout*, close."""
        servers = [s.server for s in self._slots.values() if s.server is not None]
        gate_servers = [s.gate_server for s in self._slots.values() if s.gate_server]
        gate_servers += list(self._retired)
        for srv in servers:
            srv.close()
        for gs in gate_servers:
            if gs.prelude is not None:
                gs.prelude.close()
        busy: list[asyncio.Task[None]] = []
        for gs in gate_servers:
            for conn in gs.connections:
                task = compat.handler_task(conn)
                if compat.is_busy(conn):
                    # Finish the request in hand, then close (no next request).
                    conn.close()
                    if task is not None and not task.done():
                        busy.append(task)
                else:
                    # Idle keep-alive: close now rather than wait the drain out
                    # for a request that won't come.
                    conn.force_close()
        # One deadline for the whole drain (aiohttp's own shutdown(timeout)
        # waits up to twice its timeout).
        if busy and drain_timeout > 0:
            await asyncio.wait(busy, timeout=drain_timeout)
        cut = False
        for gs in gate_servers:
            for conn in gs.connections:
                cut = True
                conn.force_close()  # handler cancellation aborts its upstream request
        if cut and busy:
            await asyncio.wait(busy, timeout=1.0)
        for srv in servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        for slot in self._slots.values():
            if slot.server is None:
                slot.sock.close()
            self._unlink(slot)
        self.gen.pool.close()
        for gen in self._draining_gens:
            gen.pool.close()
        self._draining_gens.clear()
        if self.acme is not None:
            await self.acme.close()
        self._retired.clear()
        self._slots.clear()
        await self.rate_limits.close()

    @staticmethod
    def _unlink(slot: _Slot) -> None:
        lst = slot.listener
        if (slot.owned and lst is not None and lst.bind.kind == "unix"
                and not lst.bind.path.startswith("@")):
            with contextlib.suppress(OSError):
                os.unlink(lst.bind.path)


def _acme_service(cfg: Config) -> AcmeService | None:
    """The process's ACME service when [acme] is set (imported only then: the
    ACME client library is not small)."""
    if cfg.acme is None:
        return None
    from .acme.service import AcmeService

    return AcmeService(cfg.acme)


def _where(sock: socket.socket, lst: Listener) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        return join_host_port(name[0], name[1])
    return str(lst.bind)
