"""The TLS-ALPN-01 front: a TLS listener that reads the ClientHello first.

RFC 8737 validation opens a TLS connection offering only the ALPN protocol
``acme-tls/1`` and must be shown a special certificate for the name in its
SNI. OpenSSL picks the certificate before Python could see the client's
ALPN list (``sni_callback`` gets the name only), so for the listeners that
answer TLS-ALPN-01 the gate accepts connections itself, peeks at the first
bytes (``MSG_PEEK``: they stay in the socket for TLS to read), and starts
TLS with the right context through ``loop.connect_accepted_socket``:

- ``acme-tls/1`` for a name with an open challenge: the challenge
  certificate; the connection is closed once the handshake is done, as the
  RFC asks of both sides;
- anything else: the listener's own context, exactly as
  ``loop.create_server(ssl=...)`` would have served it.

The peek costs one ``recv`` per connection, on those listeners only
(``acme.challenge = "tls-alpn-01"``); other listeners keep asyncio's own
accept loop. :class:`FrontServer` stands in for the ``asyncio.Server`` of
such a listener (``close``, ``wait_closed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable

from ..config import Acme, Listener
from . import clienthello

log = logging.getLogger("palpo_gate.acme")

#: Connections accepted per wake-up before other work gets a turn.
_ACCEPT_BATCH = 64
#: Pause before peeking again at a ClientHello that is not complete yet.
_PEEK_AGAIN = 0.005


def fronted(listener: Listener, acme: Acme | None) -> bool:
    """Does *listener* answer TLS-ALPN-01 (and so need the front)?"""
    return (listener.tls is not None and listener.tls.acme and acme is not None
            and acme.challenge == "tls-alpn-01")


class _Done(asyncio.Protocol):
    """The connection of a TLS-ALPN-01 validation: nothing after the handshake."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class FrontServer:
    """Accepts on *sock*; each connection is served by *factory* over TLS with
    *context*, or answers a TLS-ALPN-01 validation with the context
    *challenge(name)* returns."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.BaseProtocol],
                 context: ssl.SSLContext,
                 challenge: Callable[[str], ssl.SSLContext | None],
                 handshake_timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._factory = factory
        self._context = context
        self._challenge = challenge
        self._timeout = handshake_timeout
        self._pending: dict[socket.socket, asyncio.TimerHandle | asyncio.Task[None]] = {}
        self._closed = asyncio.Event()
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed.is_set() else (self._sock,)

    def is_serving(self) -> bool:
        return not self._closed.is_set()

    def close(self) -> None:
        """Stop accepting and close the listening socket (as asyncio's
        Server.close); connections still in their first bytes are dropped."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for conn in list(self._pending):
            self._drop(conn)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- accept, peek, hand over

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the next wake-up tries again
                log.debug("front: accept failed: %s", exc)
                return
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pending[conn] = self._loop.call_later(self._timeout, self._drop, conn)
            self._loop.add_reader(conn.fileno(), self._peek, conn)

    def _peek(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(clienthello.MAX_HELLO, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)
            return
        hello = clienthello.parse(data)
        if hello is clienthello.NEED_MORE:
            # Level-triggered: the bytes are still there, so wait a moment
            # rather than wake again at once.
            self._loop.remove_reader(conn.fileno())
            self._loop.call_later(_PEEK_AGAIN, self._peek_again, conn)
            return
        self._loop.remove_reader(conn.fileno())
        context, factory = self._context, self._factory
        if isinstance(hello, clienthello.Hello) and hello.acme_tls_1:
            assert hello.server_name is not None
            answer = self._challenge(hello.server_name)
            if answer is not None:
                log.debug("acme: answering a tls-alpn-01 validation for %s", hello.server_name)
                context, factory = answer, _Done
        timer = self._pending.get(conn)
        if isinstance(timer, asyncio.TimerHandle):
            timer.cancel()
        self._pending[conn] = self._loop.create_task(self._start_tls(conn, context, factory))

    def _peek_again(self, conn: socket.socket) -> None:
        if conn in self._pending and conn.fileno() >= 0:
            self._loop.add_reader(conn.fileno(), self._peek, conn)

    async def _start_tls(self, conn: socket.socket, context: ssl.SSLContext,
                         factory: Callable[[], asyncio.BaseProtocol]) -> None:
        try:
            await self._loop.connect_accepted_socket(
                factory, conn, ssl=context, ssl_handshake_timeout=self._timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.debug("front: TLS handshake failed: %s", exc)
            with contextlib.suppress(OSError):
                conn.close()
        finally:
            self._pending.pop(conn, None)

    def _drop(self, conn: socket.socket) -> None:
        """Close a connection that has not begun TLS (timed out, gone, closing)."""
        pending = self._pending.pop(conn, None)
        if isinstance(pending, asyncio.Task):
            pending.cancel()
            return
        if pending is not None:
            pending.cancel()
        if conn.fileno() >= 0:
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                self._loop.remove_reader(conn.fileno())
            conn.close()
