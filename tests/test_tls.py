"""TLS listeners over real sockets (docs/DESIGN.md section 1): certificates by SNI, strict
SNI, TLS 1.2 minimum, ALPN ``http/1.1`` only, X-Forwarded-Proto, and the
config errors an operator sees for a certificate that cannot be used.

The certificates come from trustme (``tls_files`` in conftest): "default"
for localhost / 127.0.0.1 / matrix.test, "other" for other.test. A client
checks what it got from the handshake itself: the peer certificate's
subjectAltName, the negotiated version and ALPN protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import ssl
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator

import pytest
import trustme
from support.client import Conn, get
from support.gate import gate_toml, port_of, running_gate
from support.recorder import Recorder, recorder

from palpo_gate.generation import Gate

DEFAULT_NAMES = {"localhost", "127.0.0.1", "matrix.test"}
OTHER_NAMES = {"other.test"}
HANDSHAKE_ERRORS = (ssl.SSLError, ConnectionError)


def _tls_listener(files: dict[str, str], *, strict: bool = False) -> str:
    return f"""
[listeners.tls]
cert = "{files['default_cert']}"
key = "{files['default_key']}"
strict_sni = {"true" if strict else "false"}
[[listeners.tls.sni]]
names = ["other.test"]
cert = "{files['other_cert']}"
key = "{files['other_key']}"
"""


@contextlib.asynccontextmanager
async def tls_gate(files: dict[str, str], *, strict: bool = False
                   ) -> AsyncIterator[tuple[Recorder, Gate, int]]:
    async with recorder() as up:
        toml = gate_toml(f"http://127.0.0.1:{up.port}",
                         listener=_tls_listener(files, strict=strict))
        async with running_gate(toml) as gate:
            yield up, gate, port_of(gate)


def client_ctx(files: dict[str, str], *, check_hostname: bool = False) -> ssl.SSLContext:
    """A verifying client context (the CA is trusted); hostname checks optional so
    that the certificate served for an unknown name can still be inspected."""
    ctx = ssl.create_default_context(cafile=files["ca"])
    ctx.check_hostname = check_hostname
    return ctx


async def handshake(port: int, ctx: ssl.SSLContext, sni: str | None) -> Conn:
    """A TLS connection; *sni* None sends no server_name extension."""
    async with asyncio.timeout(5):
        return await Conn.open(port, ssl=ctx, server_hostname=sni or "")


def ssl_object(conn: Conn) -> ssl.SSLObject:
    obj = conn.writer.get_extra_info("ssl_object")
    assert obj is not None
    return obj  # type: ignore[no-any-return]


def san(conn: Conn) -> set[str]:
    cert = ssl_object(conn).getpeercert()
    assert cert, "no verified peer certificate"
    return {value for _, value in cert["subjectAltName"]}


# -- certificate selection ------------------------------------------------------------


@pytest.mark.parametrize(("sni", "names"), [
    ("matrix.test", DEFAULT_NAMES),
    ("other.test", OTHER_NAMES),
    ("OTHER.test", OTHER_NAMES),  # SNI names are case-insensitive
    ("unknown.test", DEFAULT_NAMES),
    (None, DEFAULT_NAMES),
])
async def test_certificate_by_sni(tls_files: dict[str, str], sni: str | None,
                                  names: set[str]) -> None:
    async with tls_gate(tls_files) as (_, _, port):
        conn = await handshake(port, client_ctx(tls_files), sni)
        try:
            assert san(conn) == names
            # the connection is usable
            resp = await conn.request(get("/health", host="matrix.test"))
            assert resp.status == 200
        finally:
            await conn.close()


async def test_hostname_verifying_clients_accept_both_names(tls_files: dict[str, str]) -> None:
    """What a real Matrix client or server does: verify the name it asked for."""
    async with tls_gate(tls_files) as (_, _, port):
        for name in ("matrix.test", "other.test"):
            conn = await handshake(port, client_ctx(tls_files, check_hostname=True), name)
            await conn.close()


@pytest.mark.parametrize("sni", ["unknown.test", None])
async def test_strict_sni_refuses_unknown_or_missing_name(tls_files: dict[str, str],
                                                          sni: str | None) -> None:
    async with tls_gate(tls_files, strict=True) as (up, _, port):
        with pytest.raises(HANDSHAKE_ERRORS):
            conn = await handshake(port, client_ctx(tls_files), sni)
            await conn.close()
        assert up.requests == []


async def test_strict_sni_serves_known_names(tls_files: dict[str, str]) -> None:
    async with tls_gate(tls_files, strict=True) as (_, _, port):
        for name, names in (("matrix.test", DEFAULT_NAMES), ("other.test", OTHER_NAMES),
                            ("localhost", DEFAULT_NAMES)):
            conn = await handshake(port, client_ctx(tls_files, check_hostname=True), name)
            try:
                assert san(conn) == names
                resp = await conn.request(get("/health", host=name))
                assert resp.status == 200
            finally:
                await conn.close()


# -- protocol versions and ALPN ------------------------------------------------------


def _tls11_client(files: dict[str, str]) -> ssl.SSLContext:
    ctx = client_ctx(files)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 is deprecated
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    # OpenSSL 3 refuses TLS 1.1's SHA-1 signatures at the default security level.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


async def _client_can_speak_tls11(ca: trustme.CA, files: dict[str, str]) -> bool:
    """Control: does this OpenSSL let a client negotiate TLS 1.1 at all?"""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sctx.minimum_version = ssl.TLSVersion.TLSv1_1
    sctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ca.issue_cert("127.0.0.1").configure_cert(sctx)

    async def close_at_once(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    server = await asyncio.start_server(close_at_once, "127.0.0.1", 0, ssl=sctx)
    try:
        try:
            conn = await handshake(server.sockets[0].getsockname()[1], _tls11_client(files),
                                   None)
        except HANDSHAKE_ERRORS:
            return False
        version = ssl_object(conn).version()
        await conn.close()
        return version == "TLSv1.1"
    finally:
        server.close()
        await server.wait_closed()


async def test_tls11_client_is_refused(ca: trustme.CA, tls_files: dict[str, str]) -> None:
    async with tls_gate(tls_files) as (_, gate, port):
        if await _client_can_speak_tls11(ca, tls_files):
            # The control server above negotiated TLS 1.1 with this very client
            # context, so a failure below is the gate's refusal.
            with pytest.raises(HANDSHAKE_ERRORS):
                conn = await handshake(port, _tls11_client(tls_files), "matrix.test")
                await conn.close()
        else:  # pragma: no cover - this OpenSSL cannot offer TLS 1.1 at all
            # Fall back to the gate's listening context: it sets the version floor.
            assert gate.contexts["main"].minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls12_and_tls13_are_accepted(tls_files: dict[str, str],
                                            version: ssl.TLSVersion) -> None:
    ctx = client_ctx(tls_files, check_hostname=True)
    ctx.minimum_version = ctx.maximum_version = version
    expected = {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    async with tls_gate(tls_files) as (_, _, port):
        for name in ("matrix.test", "other.test"):
            conn = await handshake(port, ctx, name)
            try:
                assert ssl_object(conn).version() == expected
                resp = await conn.request(get("/health", host=name))
                assert resp.status == 200
            finally:
                await conn.close()


@pytest.mark.parametrize("sni", ["matrix.test", "other.test"])
async def test_alpn_is_http11_never_h2(tls_files: dict[str, str], sni: str) -> None:
    """ALPN also comes from the context the SNI callback switched to."""
    async with tls_gate(tls_files) as (_, _, port):
        both = client_ctx(tls_files)
        both.set_alpn_protocols(["h2", "http/1.1"])
        conn = await handshake(port, both, sni)
        try:
            assert ssl_object(conn).selected_alpn_protocol() == "http/1.1"
            resp = await conn.request(get("/health", host=sni))
            assert resp.status == 200
        finally:
            await conn.close()

        h2_only = client_ctx(tls_files)
        h2_only.set_alpn_protocols(["h2"])
        conn = await handshake(port, h2_only, sni)
        try:
            assert ssl_object(conn).selected_alpn_protocol() is None
        finally:
            await conn.close()


# -- HTTP over TLS ---------------------------------------------------------------------


async def test_request_over_tls_is_forwarded_with_proto_https(tls_files: dict[str, str]) -> None:
    async with tls_gate(tls_files) as (up, _, port):
        conn = await handshake(port, client_ctx(tls_files, check_hostname=True), "matrix.test")
        try:
            resp = await conn.request(get("/_matrix/client/versions?x=%2F", host="matrix.test",
                                          extra="X-Forwarded-Proto: http\r\n"))
            assert resp.status == 200 and resp.complete
            assert resp.json() == {"target": "/_matrix/client/versions?x=%2F", "len": 0}
            # keep-alive over TLS
            again = await conn.request(get("/_matrix/client/versions", host="matrix.test"))
            assert again.status == 200
        finally:
            await conn.close()
        assert len(up.requests) == 2
        req = up.requests[0]
        assert req.header_all("x-forwarded-proto") == [b"https"]
        assert req.header("host") == b"matrix.test:%d" % port
        assert req.target == b"/_matrix/client/versions?x=%2F"


async def test_plain_http_on_the_tls_port_is_not_served(tls_files: dict[str, str]) -> None:
    async with tls_gate(tls_files) as (up, _, port):
        conn = await Conn.open(port)
        try:
            await conn.send(get("/_matrix/client/versions", host="matrix.test"))
            async with asyncio.timeout(5):
                data = await conn.reader.read(65536)
            assert not data.startswith(b"HTTP/1.1 2")
            assert await conn.closed_by_peer(timeout=5)
        finally:
            await conn.close()
        assert up.requests == []
        # the listener still works for TLS clients
        conn = await handshake(port, client_ctx(tls_files), "matrix.test")
        try:
            assert (await conn.request(get("/health", host="matrix.test"))).status == 200
        finally:
            await conn.close()


async def test_header_timeout_covers_the_handshake_and_the_head(
        tls_files: dict[str, str]) -> None:
    """Slowloris over TLS: a client that never sends its ClientHello, and one that
    completes the handshake but drips its head, are both cut after header_timeout."""
    async with recorder() as up:
        toml = gate_toml(f"http://127.0.0.1:{up.port}", listener=_tls_listener(tls_files),
                         extra='[limits]\nheader_timeout = "1s"')
        async with running_gate(toml) as gate:
            port = port_of(gate)
            silent = await Conn.open(port)
            try:
                assert await silent.closed_by_peer(timeout=4), "silent TCP client never cut"
            finally:
                await silent.close()

            conn = await handshake(port, client_ctx(tls_files), "matrix.test")
            loop = asyncio.get_running_loop()
            start = loop.time()
            watcher = asyncio.ensure_future(conn.closed_by_peer(timeout=6))
            try:
                head = get("/_matrix/client/versions", host="matrix.test")
                for i in range(len(head) - 1):  # never the final byte
                    if watcher.done():
                        break
                    with contextlib.suppress(ConnectionError):
                        await conn.send(head[i:i + 1])
                    await asyncio.sleep(0.2)
                closed = await watcher
            finally:
                watcher.cancel()
                await conn.close()
            assert closed and loop.time() - start <= 3.5, loop.time() - start
            assert up.requests == []


# -- config errors ---------------------------------------------------------------------


def _check(tmp_path: pathlib.Path, toml: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gate.toml"
    path.write_text(toml)
    return subprocess.run([sys.executable, "-m", "palpo_gate", "check", "--config", str(path)],
                          capture_output=True, text=True, timeout=30, check=False)


def test_check_reports_key_not_matching_certificate(tls_files: dict[str, str],
                                                    tmp_path: pathlib.Path) -> None:
    files = dict(tls_files, default_key=tls_files["other_key"])
    proc = _check(tmp_path, gate_toml("http://127.0.0.1:8008", listener=_tls_listener(files)))
    assert proc.returncode == 2, proc.stderr
    assert "listeners[0].tls.cert" in proc.stderr
    assert tls_files["other_key"] in proc.stderr
    assert "Traceback" not in proc.stderr


def _sni_key_mismatch(files: dict[str, str]) -> str:
    """The SNI certificate of other.test paired with the default key."""
    return _tls_listener(files).replace(f'key = "{files["other_key"]}"',
                                        f'key = "{files["default_key"]}"')


def test_check_reports_sni_key_not_matching(tls_files: dict[str, str],
                                            tmp_path: pathlib.Path) -> None:
    proc = _check(tmp_path, gate_toml("http://127.0.0.1:8008",
                                      listener=_sni_key_mismatch(tls_files)))
    assert proc.returncode == 2, proc.stderr
    assert "listeners[0].tls.sni[0].cert" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_reports_every_bad_certificate_at_once(tls_files: dict[str, str],
                                                     tmp_path: pathlib.Path) -> None:
    """docs/DESIGN.md section 5: all errors at once. A mismatched SNI pair on one listener and
    a missing certificate file on another are both reported by one `check`."""
    toml = gate_toml("http://127.0.0.1:8008", listener=_sni_key_mismatch(tls_files)) + f"""
[[listeners]]
name = "federation"
bind = "127.0.0.1:0"
role = "federation"
[listeners.tls]
cert = "{tls_files['default_cert']}.missing"
key = "{tls_files['default_key']}"
"""
    proc = _check(tmp_path, toml)
    assert proc.returncode == 2, proc.stderr
    assert "listeners[1].tls.cert" in proc.stderr
    assert "listeners[0].tls.sni[0].cert" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_accepts_good_certificates(tls_files: dict[str, str], tmp_path: pathlib.Path) -> None:
    proc = _check(tmp_path, gate_toml("http://127.0.0.1:8008",
                                      listener=_tls_listener(tls_files, strict=True)))
    assert proc.returncode == 0, proc.stderr
    assert "strict_sni = true" in proc.stdout
    assert 'names = ["other.test"]' in proc.stdout
