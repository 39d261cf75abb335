"""A fake *remote* Matrix homeserver, just enough to sign federation requests.

It owns an ed25519 signing key and serves ``GET /_matrix/key/v2/server`` (a
correctly self-signed server-keys document) over HTTPS on 127.0.0.1 with a
trustme certificate, so that the homeserver under test can fetch and check its
key. Its server name is ``127.0.0.1:<port>``: an IP literal with a port needs
no .well-known or SRV lookup, the homeserver connects to it directly.

The HTTP server runs in a thread with its own event loop, so it works from
sync tests and from async tests (whatever loop they run on)::

    with run_remote_hs() as remote:
        auth = remote.sign_request("GET", "/_matrix/federation/v1/query/profile?...",
                                   destination="hs.test")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import trustme
from aiohttp import web
from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json

KEY_VALIDITY_MS = 24 * 3600 * 1000


class RemoteHomeserver:
    """The fake remote. Create it with :func:`run_remote_hs`."""

    def __init__(self, ca: trustme.CA | None = None, key_version: str = "a_remote") -> None:
        self.ca = ca or trustme.CA()
        self.signing_key = generate_signing_key(key_version)
        self.key_id = f"ed25519:{key_version}"
        self.verify_key_base64 = encode_verify_key_base64(get_verify_key(self.signing_key))
        # Requests this server received: (method, raw path) tuples.
        self.requests: list[tuple[str, str]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self.server_name = f"127.0.0.1:{self.port}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop_requested: asyncio.Event | None = None
        self._error: BaseException | None = None

    # -- keys and signatures ---------------------------------------------

    def server_keys(self) -> dict[str, Any]:
        """The signed ``/_matrix/key/v2/server`` document."""
        doc = {
            "server_name": self.server_name,
            "valid_until_ts": int(time.time() * 1000) + KEY_VALIDITY_MS,
            "verify_keys": {self.key_id: {"key": self.verify_key_base64}},
            "old_verify_keys": {},
        }
        return sign_json(doc, self.server_name, self.signing_key)

    def sign_request(
        self,
        method: str,
        uri: bytes | str,
        destination: str,
        content: Any = None,
    ) -> str:
        """The ``Authorization`` header value for a federation request.

        ``uri`` is the request target exactly as it will be sent on the wire
        (raw path and query, percent escapes kept as they are).
        """
        if isinstance(uri, bytes):
            uri = uri.decode("ascii")
        request_json: dict[str, Any] = {
            "method": method,
            "uri": uri,
            "origin": self.server_name,
            "destination": destination,
        }
        if content is not None:
            request_json["content"] = content
        signed = sign_json(request_json, self.server_name, self.signing_key)
        sig = signed["signatures"][self.server_name][self.key_id]
        return (
            f'X-Matrix origin="{self.server_name}",destination="{destination}",'
            f'key="{self.key_id}",sig="{sig}"'
        )

    def client_ssl_context(self) -> ssl.SSLContext:
        """An SSL context that trusts this server's certificate."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    # -- HTTP server ------------------------------------------------------

    def _make_app(self) -> web.Application:
        async def record(request: web.Request, handler):  # type: ignore[no-untyped-def]
            self.requests.append((request.method, request.raw_path))
            return await handler(request)

        async def keys(request: web.Request) -> web.Response:
            return web.Response(
                body=json.dumps(self.server_keys()).encode(),
                content_type="application/json",
            )

        async def version(request: web.Request) -> web.Response:
            return web.json_response({"server": {"name": "fake-remote", "version": "0"}})

        async def not_found(request: web.Request) -> web.Response:
            return web.json_response(
                {"errcode": "M_UNRECOGNIZED", "error": "fake remote"}, status=404
            )

        app = web.Application(middlewares=[web.middleware(record)])
        app.router.add_get("/_matrix/key/v2/server", keys)
        app.router.add_get("/_matrix/key/v2/server/{key_id}", keys)
        app.router.add_get("/_matrix/federation/v1/version", version)
        app.router.add_route("*", "/{tail:.*}", not_found)
        return app

    def _server_ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        cert.configure_cert(ctx)
        return ctx

    async def _serve(self) -> None:
        self._stop_requested = asyncio.Event()
        runner = web.AppRunner(self._make_app(), access_log=None, handle_signals=False)
        await runner.setup()
        self._runner = runner
        try:
            site = web.SockSite(runner, self._sock, ssl_context=self._server_ssl_context())
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._started.set()
        try:
            await self._stop_requested.wait()
        finally:
            # Drop kept-alive connections (the homeserver's key fetcher keeps one)
            # hard: a graceful TLS shutdown could outlive this loop and leave an
            # unclosed transport behind (ResourceWarning).
            server = runner.server
            for handler in list(server.connections if server is not None else ()):
                transport = handler.transport
                if transport is not None:
                    transport.abort()
            await runner.cleanup()
            for _ in range(5):  # let the transports' close callbacks run
                await asyncio.sleep(0.01)

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._started.set()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._thread_main, name=f"fake-remote-hs-{self.port}", daemon=True
        )
        self._thread.start()
        if not self._started.wait(15):
            raise RuntimeError("fake remote homeserver did not start")
        if self._error is not None:
            raise RuntimeError(f"fake remote homeserver failed: {self._error!r}")

    def stop(self) -> None:
        if self._thread is None:
            self._sock.close()
            return
        loop, stop = self._loop, self._stop_requested
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(15)
        self._thread = None
        self._sock.close()


@contextlib.contextmanager
def run_remote_hs(ca: trustme.CA | None = None) -> Iterator[RemoteHomeserver]:
    """Start a :class:`RemoteHomeserver` on 127.0.0.1; stop it on exit."""
    remote = RemoteHomeserver(ca)
    remote.start()
    try:
        yield remote
    finally:
        remote.stop()
