"""The gate as operators run it (docs/DESIGN.md sections 1 and 6): a real
``python -m palpo_gate --config FILE`` process, driven by signals and
watched the way an operator (or systemd) sees it — from outside.

- SIGHUP under load drops no request and refuses no connection; a held
  long-poll survives it; renewed certificates reach new handshakes; a broken
  config leaves the running one serving.
- SIGTERM drains in-flight requests for ``drain_timeout`` and no longer.
- systemd: the notify protocol (order, MONOTONIC_USEC, watchdog, abstract
  sockets, one READY=1 with workers), socket activation.
- ``server.workers``: the workers exist, share the connections, are
  restarted when killed, reload and stop together, sum their metrics.
- Metrics in one process follow the traffic and the reloads.

The upstream is threaded (tests/support/upstream_thread.py): the gate runs in
another process, the test's own event loop (if any) is the clients'.
The in-process reload mechanics are tests/test_reload.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import os
import pathlib
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import trustme
from support.client import Conn, fetch, get
from support.gate import GateProcess, answers_health, gate_toml, run_gate, watch
from support.net import free_port
from support.notify import Datagram, notify_socket
from support.upstream_thread import ThreadedUpstream, threaded_upstream

from palpo_gate import config as configmod

# -- helpers ---------------------------------------------------------------------------


def _config(upstream: str, port: int | str, *, name: str = "main", server: str = "",
            extra: str = "", listener: str = "", access: str = "off") -> str:
    bind = port if isinstance(port, str) else f"127.0.0.1:{port}"
    return gate_toml(upstream, bind=bind, name=name, server=server, access=access,
                     before=extra, listener=listener)


def _write(path: pathlib.Path, text: str) -> None:
    """Replace *path* atomically: the gate never reads half a file."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def _count(gp: GateProcess, needle: str) -> int:
    return sum(needle in line for line in list(gp.stderr_lines))


def _stderr(gp: GateProcess) -> str:
    return "".join(gp.stderr_lines)


def _wait_count(gp: GateProcess, needle: str, n: int, timeout: float = 10.0) -> None:
    """Wait until *needle* appears in at least *n* stderr lines."""
    deadline = time.monotonic() + timeout
    while _count(gp, needle) < n:
        if time.monotonic() > deadline:
            pytest.fail(f"{needle!r} did not appear {n} time(s) within {timeout}s; "
                        f"stderr:\n{_stderr(gp)[-4000:]}")
        if gp.proc.poll() is not None:
            pytest.fail(f"the gate exited ({gp.proc.returncode}) while waiting for "
                        f"{needle!r}; stderr:\n{_stderr(gp)[-4000:]}")
        time.sleep(0.02)


async def _await_count(gp: GateProcess, needle: str, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _count(gp, needle) < n:
        assert time.monotonic() < deadline, (
            f"{needle!r} did not appear {n} time(s) within {timeout}s; stderr:\n"
            f"{_stderr(gp)[-4000:]}")
        assert gp.proc.poll() is None, f"the gate exited; stderr:\n{_stderr(gp)[-4000:]}"
        await asyncio.sleep(0.02)


def _sighup_and_wait(gp: GateProcess, outcome: str = "reloaded", timeout: float = 10.0) -> None:
    """SIGHUP, then wait for the log line of its outcome ("reloaded" / "reload failed")."""
    before = _count(gp, outcome)
    gp.proc.send_signal(signal.SIGHUP)
    _wait_count(gp, outcome, before + 1, timeout)


def _http(port: int, target: str, *, method: str = "GET", body: bytes | None = None,
          timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, target, body=body, headers={"Host": "matrix.test"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _unix_http(path: str, target: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """One request on a fresh UNIX-socket connection (Connection: close)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: matrix.test\r\nConnection: close\r\n\r\n"
                  .encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


def _wait_exit(proc: subprocess.Popen[str], timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pid {proc.pid} did not exit within {timeout} s")


def _started(proc: subprocess.Popen[str], cfg: configmod.Config,
             port: int) -> contextlib.AbstractContextManager[GateProcess]:
    """run_gate() for a process started some other way (the socket-activation
    wrapper): ready once the passed socket, on *port*, answers /health."""
    probe = dataclasses.replace(cfg.listeners[0], bind=configmod.Bind("tcp", "127.0.0.1", port))
    return watch(proc, cfg, lambda: answers_health(probe))


def _children(pid: int) -> set[int]:
    """The child processes of *pid* (every thread's children)."""
    out: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(x) for x in f.read().split())
    return out


def _alive(pid: int) -> bool:
    """*pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _is_gate_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return b"PALPO_GATE_WORKER=" in f.read()
    except OSError:
        return False


def _wait_workers(pid: int, n: int, timeout: float, exclude: frozenset[int] | set[int] = frozenset()
                  ) -> set[int]:
    """Wait until *pid* has exactly *n* live children, none in *exclude*."""
    deadline = time.monotonic() + timeout
    while True:
        kids = {k for k in _children(pid) if _alive(k)}
        if len(kids) == n and not kids & exclude:
            return kids
        if time.monotonic() > deadline:
            pytest.fail(f"expected {n} workers (not {sorted(exclude)}) under {pid} within "
                        f"{timeout}s; have {sorted(kids)}")
        time.sleep(0.05)


def _tcp_inodes(local_port: int) -> dict[int, int]:
    """Established server-side sockets on 127.0.0.1:*local_port*: {peer port: inode}."""
    out: dict[int, int] = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            if state == "01" and int(local.split(":")[1], 16) == local_port:
                out[int(remote.split(":")[1], 16)] = inode
    return out


def _socket_owner(pids: set[int]) -> dict[int, int]:
    """{socket inode: pid} over the open fds of *pids*."""
    out: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    out[int(link[8:-1])] = pid
    return out


def _who_accepts(port: int, workers: set[int], n: int = 60) -> dict[int, int]:
    """Open *n* fresh connections (one request each, all kept open), then find
    which worker holds the server side of each: {worker pid: connections}."""
    conns: list[http.client.HTTPConnection] = []
    try:
        for i in range(n):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conns.append(c)
            c.request("GET", f"/_matrix/spread/{i}", headers={"Host": "matrix.test"})
            resp = c.getresponse()
            assert resp.status == 200, resp.status
            resp.read()  # the connection stays open (keep-alive)
        client_ports = {c.sock.getsockname()[1] for c in conns}
        server_side = _tcp_inodes(port)
        owners = _socket_owner(workers)
        spread: dict[int, int] = dict.fromkeys(workers, 0)
        unowned = 0
        for cport in client_ports:
            owner = owners.get(server_side.get(cport, -1))
            if owner is None:
                unowned += 1
            else:
                spread[owner] += 1
        assert unowned == 0, f"{unowned} of {n} connections held by no worker; {spread}"
        return spread
    finally:
        for c in conns:
            c.close()


def _scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    status, body = _http(port, "/metrics")
    assert status == 200, status
    out = []
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        assert m, line
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m[2] or ""))
        out.append((m[1], labels, float(m[3])))
    return out


def _metric(samples: list[tuple[str, dict[str, str], float]], name: str,
            **labels: str) -> float:
    """The sum of *name*'s samples whose labels include *labels*."""
    return sum(v for n, ls, v in samples
               if n == name and all(ls.get(k) == want for k, want in labels.items()))


def _trusting(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = False
    return ctx


def _write_cert(ca: trustme.CA, host: str, cert_path: pathlib.Path,
                key_path: pathlib.Path) -> None:
    """A certificate for *host*, put in place as certbot does: new files renamed over."""
    cert = ca.issue_cert(host)
    staged_key = key_path.with_name(key_path.name + ".new")
    staged_cert = cert_path.with_name(cert_path.name + ".new")
    cert.private_key_pem.write_to_path(str(staged_key))
    with open(staged_cert, "wb") as f:
        for pem in cert.cert_chain_pems:
            f.write(pem.bytes())
    os.replace(staged_key, key_path)
    os.replace(staged_cert, cert_path)


def _dns_names(peercert: dict[str, object]) -> set[str]:
    return {v for k, v in peercert.get("subjectAltName", ()) if k == "DNS"}  # type: ignore[union-attr]


# -- 1. SIGHUP under a steady request loop ----------------------------------------------


@dataclass
class _Stats:
    requests: int = 0
    reconnects: int = 0
    refused: int = 0
    failures: list[str] = field(default_factory=list)
    upstreams: set[str] = field(default_factory=set)


async def _keepalive_loop(port: int, deadline: float, max_requests: int, stats: _Stats,
                          ident: int) -> None:
    conn: Conn | None = None
    n = 0
    try:
        while n < max_requests and time.monotonic() < deadline:
            n += 1
            stats.requests += 1
            try:
                if conn is None:
                    conn = await Conn.open(port)
                resp = await conn.request(get(f"/_matrix/client/ka/{ident}/{n}"), timeout=5)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                stats.failures.append(f"keep-alive {ident} request {n}: {exc!r}")
                if conn is not None:
                    await conn.close()
                conn = None
                continue
            if resp.status != 200 or not resp.complete:
                stats.failures.append(f"keep-alive {ident} request {n}: status {resp.status}, "
                                      f"complete={resp.complete}")
                await conn.close()
                conn = None
                continue
            stats.upstreams.add(resp.json()["upstream"])  # type: ignore[index]
            if (resp.header("Connection") or "").lower() == "close":
                stats.reconnects += 1  # announced: reconnecting is what a client does
                await conn.close()
                conn = None
    finally:
        if conn is not None:
            await conn.close()


async def _fresh_loop(port: int, deadline: float, max_requests: int, stats: _Stats) -> None:
    n = 0
    while n < max_requests and time.monotonic() < deadline:
        n += 1
        stats.requests += 1
        try:
            async with asyncio.timeout(5):
                resp = await fetch(port, get(f"/_matrix/client/fresh/{n}"))
        except ConnectionRefusedError as exc:
            stats.refused += 1
            stats.failures.append(f"fresh connection {n} refused: {exc!r}")
            continue
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            stats.failures.append(f"fresh connection {n}: {exc!r}")
            continue
        if resp.status != 200 or not resp.complete:
            stats.failures.append(f"fresh connection {n}: status {resp.status}, "
                                  f"complete={resp.complete}")


@pytest.mark.timeout(60)
async def test_sighup_under_load_drops_nothing(tmp_path: pathlib.Path) -> None:
    with threaded_upstream("one") as one, threaded_upstream("two") as two:
        port = free_port()
        config_a = _config(one.url, port)
        config_b = _config(two.url, port, extra='[admin]\nallow_from = ["127.0.0.1/32"]')
        config_c = _config(one.url, port, extra='[admin]\nallow_from = ["10.0.0.0/8"]')
        with run_gate(config_a, tmp_path) as gp:
            path = tmp_path / "gate.toml"
            keepalive, fresh = _Stats(), _Stats()
            start = time.monotonic()
            deadline = start + 3.0
            load = [asyncio.create_task(_keepalive_loop(port, deadline, 5000, keepalive, i))
                    for i in range(4)]
            load.append(asyncio.create_task(_fresh_loop(port, deadline, 3000, fresh)))
            admin_after_b = None
            try:
                for i, text in enumerate((config_b, config_c, config_a)):
                    await asyncio.sleep(0.5)
                    _write(path, text)
                    gp.proc.send_signal(signal.SIGHUP)
                    await _await_count(gp, "reloaded", i + 1, timeout=5)
                    if i == 0:
                        async with asyncio.timeout(5):
                            admin_after_b = await fetch(port, get("/_palpo/admin/x"))
                reloads_done = time.monotonic()
            finally:
                await asyncio.gather(*load)
            took = time.monotonic() - start

            total = keepalive.requests + fresh.requests
            failures = keepalive.failures + fresh.failures
            summary = (f"{len(failures)} failed of {total} requests ({keepalive.requests} on 4 "
                       f"keep-alive connections, {keepalive.reconnects} announced reconnects; "
                       f"{fresh.requests} on fresh connections, {fresh.refused} refused) "
                       f"over {took:.2f}s with 3 SIGHUPs")
            print(summary)
            assert reloads_done < deadline, "the reloads did not all happen during the load"
            assert not failures, summary + ":\n" + "\n".join(failures[:20])
            assert keepalive.requests >= 200 and fresh.requests >= 50, summary
            assert keepalive.upstreams == {"one", "two"}, keepalive.upstreams
            # The new configs were in effect: the admin CIDR of config B opened the
            # admin path (forwarded to "two"); config A, last, closes it again.
            assert admin_after_b is not None and admin_after_b.status == 200
            assert admin_after_b.json()["upstream"] == "two"  # type: ignore[index]
            assert (await fetch(port, get("/_palpo/admin/x"))).status == 403
            assert gp.proc.poll() is None
        assert gp.proc.returncode == 0, _stderr(gp)
        _no_traceback(_stderr(gp))


# -- 2. SIGHUP during a held long-poll ---------------------------------------------------


@pytest.mark.timeout(30)
async def test_sighup_during_a_long_poll(tmp_path: pathlib.Path) -> None:
    with threaded_upstream("old", sync_hold=3.0) as old, threaded_upstream("new") as new:
        port = free_port()
        with run_gate(_config(old.url, port), tmp_path) as gp:
            poll = await Conn.open(port)
            try:
                sent = time.monotonic()
                await poll.send(get("/_matrix/client/v3/sync?timeout=30000"))
                assert await asyncio.to_thread(old.wait_for, lambda: old.requests, 5)
                _write(tmp_path / "gate.toml", _config(new.url, port))
                gp.proc.send_signal(signal.SIGHUP)
                await _await_count(gp, "reloaded", 1, timeout=5)
                assert time.monotonic() - sent < 2.5, "the reload took too long to test this"
                # New requests go to the new upstream meanwhile.
                r = await fetch(port, get("/_matrix/client/versions"))
                assert r.status == 200 and r.json()["upstream"] == "new"  # type: ignore[index]
                resp = await poll.read_response(timeout=10)
                took = time.monotonic() - sent
            finally:
                await poll.close()
            assert resp.status == 200 and resp.complete, (resp.status, resp.body)
            assert resp.json() == {"next_batch": "old-s1"}
            assert 2.5 <= took < 6, took
            assert old.requests[0].peer_closed_at is None
            assert gp.proc.poll() is None


# -- 3. certificates renewed on disk -----------------------------------------------------


@pytest.mark.timeout(30)
async def test_certificate_swapped_on_disk_is_served_after_sighup(
        tmp_path: pathlib.Path) -> None:
    ca = trustme.CA()
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    _write_cert(ca, "before.test", cert, key)
    ctx = _trusting(ca)

    async def names(sni: str) -> set[str]:
        conn = await Conn.open(port, ssl=ctx, server_hostname=sni)
        try:
            return _dns_names(conn.writer.get_extra_info("peercert"))
        finally:
            await conn.close()

    with threaded_upstream() as up:
        port = free_port()
        toml = _config(up.url, port, listener=f'[listeners.tls]\ncert = "{cert}"\nkey = "{key}"')
        with run_gate(toml, tmp_path) as gp:
            assert await names("before.test") == {"before.test"}
            held = await Conn.open(port, ssl=ctx, server_hostname="before.test")
            try:
                assert (await held.request(get("/_matrix/a"))).status == 200
                _write_cert(ca, "after.test", cert, key)
                gp.proc.send_signal(signal.SIGHUP)
                await _await_count(gp, "reloaded", 1, timeout=5)
                assert await names("after.test") == {"after.test"}
                assert await names("before.test") == {"after.test"}
                # The connection opened before the swap still works.
                r = await held.request(get("/_matrix/b"))
                assert r.status == 200 and r.complete, (r.status, r.body)
                assert _dns_names(held.writer.get_extra_info("peercert")) == {"before.test"}
            finally:
                await held.close()
            assert gp.proc.poll() is None


# -- 4. a broken config on SIGHUP -------------------------------------------------------


@pytest.mark.timeout(40)
def test_broken_config_on_sighup_keeps_the_old_one(tmp_path: pathlib.Path) -> None:
    with threaded_upstream("old") as old, threaded_upstream("new") as new:
        port = free_port()
        good = _config(old.url, port)
        path = tmp_path / "gate.toml"
        missing = tmp_path / "missing"
        broken = [
            # (config text, what the log must name)
            (good + "\n[upstream\nurl = ", [str(path), "TOML"]),
            (_config(new.url, port, server="bogus_key = 1"), ["server.bogus_key", "unknown key"]),
            (_config(new.url, port, listener=(f'[listeners.tls]\ncert = "{missing}/c.pem"\n'
                                              f'key = "{missing}/k.pem"')),
             ["listeners[0].tls.cert"]),
        ]
        with run_gate(good, tmp_path) as gp:
            assert _http(port, "/_matrix/x")[0] == 200
            for i, (text, named) in enumerate(broken, 1):
                _write(path, text)
                start = len(gp.stderr_lines)
                _sighup_and_wait(gp, "reload failed")
                # The error lines follow the "reload failed" line.
                deadline = time.monotonic() + 5
                while not all(any(n in line for line in gp.stderr_lines[start:]) for n in named):
                    assert time.monotonic() < deadline, (named, gp.stderr_lines[start:])
                    time.sleep(0.02)
                assert gp.proc.poll() is None, _stderr(gp)
                assert _count(gp, "reloaded") == 0, _stderr(gp)
                status, body = _http(port, f"/_matrix/after-bad-{i}")
                assert status == 200 and b'"upstream": "old"' in body, (status, body)
            assert new.requests == []
            _write(path, _config(new.url, port))
            _sighup_and_wait(gp, "reloaded")
            status, body = _http(port, "/_matrix/after-good")
            assert status == 200 and b'"upstream": "new"' in body, (status, body)
        assert gp.proc.returncode == 0
        _no_traceback(_stderr(gp))


# -- 5. SIGTERM drains ------------------------------------------------------------------


def _background_get(port: int, target: str, result: dict[str, object]) -> threading.Thread:
    def run() -> None:
        try:
            result["resp"] = _http(port, target, timeout=20)
        except Exception as exc:
            result["error"] = exc
        result["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _refused_soon(port: int, tries: int = 40) -> bool:
    for _ in range(tries):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.025)
    return False


def _sigterm_with_a_held_long_poll(
        up: ThreadedUpstream, tmp_path: pathlib.Path, drain: str, exit_within: float,
        while_draining: Callable[[GateProcess, int], None] = lambda gp, port: None,
) -> tuple[GateProcess, dict[str, object], int, float]:
    """Hold a long-poll through the gate, SIGTERM it, run *while_draining*, wait
    for the exit: the gate, the long-poll's result, the exit status and the
    seconds from SIGTERM to the exit."""
    port = free_port()
    with run_gate(_config(up.url, port, server=f'drain_timeout = "{drain}"'), tmp_path) as gp:
        result: dict[str, object] = {}
        t = _background_get(port, "/_matrix/client/v3/sync?timeout=30000", result)
        assert up.wait_for(lambda: up.requests, 5), "the long-poll never reached upstream"
        sent = time.monotonic()
        gp.proc.send_signal(signal.SIGTERM)
        while_draining(gp, port)
        rc = _wait_exit(gp.proc, exit_within)
        took = time.monotonic() - sent
        t.join(5)
    return gp, result, rc, took


def _still_draining(gp: GateProcess, port: int) -> None:
    assert _refused_soon(port), "new connections are still accepted after SIGTERM"
    assert gp.proc.poll() is None, "the gate exited with a long-poll in flight"


@pytest.mark.timeout(30)
def test_sigterm_drains_a_held_long_poll(tmp_path: pathlib.Path) -> None:
    with threaded_upstream("up", sync_hold=2.0) as up:
        gp, result, rc, took = _sigterm_with_a_held_long_poll(up, tmp_path, "10s", 15,
                                                              _still_draining)
        print(f"drain: held long-poll answered, exit {rc} {took:.2f}s after SIGTERM")
        assert result.get("resp") == (200, b'{"next_batch": "up-s1"}'), result
        assert rc == 0, _stderr(gp)
        assert took < 5, f"exit {took:.2f}s after SIGTERM; the long-poll needed < 2 s"
        _no_traceback(_stderr(gp))


@pytest.mark.timeout(30)
def test_sigterm_cuts_what_outlasts_the_drain_timeout(tmp_path: pathlib.Path) -> None:
    with threaded_upstream("up", sync_hold=5.0) as up:
        gp, result, rc, took = _sigterm_with_a_held_long_poll(up, tmp_path, "1s", 10)
        print(f"drain_timeout 1s: exit {rc} {took:.2f}s after SIGTERM")
        assert rc == 0, _stderr(gp)
        # drain_timeout is the whole drain (docs/DESIGN.md section 6: "drain for [10 s], then
        # close"), not a time per phase of it.
        assert 0.8 <= took < 1.7, f"exit {took:.2f}s after SIGTERM with drain_timeout = 1s"
        # The held request was cut, not answered with the upstream's body.
        assert result.get("resp") != (200, b'{"next_batch": "up-s1"}'), result
        assert "resp" in result or "error" in result, result
        # ... and its upstream request aborted.
        assert up.wait_for(lambda: up.requests[0].peer_closed_at is not None, 3)
        _no_traceback(_stderr(gp))


# -- 6. systemd notify ------------------------------------------------------------------


def _check_order(got: list[Datagram], pid: int) -> None:
    kinds = [d.text.split("\n")[0] for d in got if d.text != "WATCHDOG=1"]
    assert kinds == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], [d.text for d in got]
    assert all(d.pid == pid for d in got), [(d.text, d.pid) for d in got]


def _notify_cycle(gp: GateProcess, ns: object, *, after_ready: Callable[[], None] | None = None
                  ) -> None:
    """READY → SIGHUP: RELOADING + MONOTONIC_USEC, READY → SIGTERM: STOPPING."""
    ns.wait_for("READY=1", timeout=10)  # type: ignore[attr-defined]
    if after_ready is not None:
        after_ready()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    gp.proc.send_signal(signal.SIGHUP)
    reloading = ns.wait_for("RELOADING=1", timeout=10)  # type: ignore[attr-defined]
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=[0-9]+", reloading.text), reloading.text
    assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= after
    ns.wait_for("READY=1", timeout=10)  # type: ignore[attr-defined]
    gp.proc.send_signal(signal.SIGTERM)
    ns.wait_for("STOPPING=1", timeout=10)  # type: ignore[attr-defined]
    assert _wait_exit(gp.proc, 15) == 0, _stderr(gp)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_ready_reloading_stopping(tmp_path: pathlib.Path, abstract: bool) -> None:
    with threaded_upstream() as up, notify_socket(tmp_path, abstract=abstract) as ns:
        port = free_port()
        with run_gate(_config(up.url, port), tmp_path, env={"NOTIFY_SOCKET": ns.path}) as gp:
            _notify_cycle(gp, ns)
        _check_order(ns.datagrams(), gp.proc.pid)


@pytest.mark.timeout(30)
def test_notify_watchdog(tmp_path: pathlib.Path) -> None:
    with threaded_upstream() as up, notify_socket(tmp_path) as ns:
        port = free_port()
        env = {"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "400000"}
        with run_gate(_config(up.url, port), tmp_path, env=env) as gp:
            ns.wait_for("READY=1", timeout=10)
            start = time.monotonic()
            ns.wait_for("WATCHDOG=1", timeout=1.0)
            ns.wait_for("WATCHDOG=1", timeout=1.0)
            took = time.monotonic() - start
            assert took <= 1.0, took
        beats = [d for d in ns.datagrams() if d.text == "WATCHDOG=1"]
        assert all(d.pid == gp.proc.pid for d in beats)


@pytest.mark.timeout(40)
def test_notify_with_workers_comes_from_the_supervisor_once(tmp_path: pathlib.Path) -> None:
    with threaded_upstream() as up, notify_socket(tmp_path) as ns:
        port = free_port()
        env = {"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "400000"}
        with run_gate(_config(up.url, port, server="workers = 2"), tmp_path, env=env) as gp:

            def after_ready() -> None:
                # READY=1 only once both workers are ready: the supervisor logs its
                # "ready" just before READY=1; in the stderr pipe all share, both
                # workers' "ready" lines come first.
                _wait_count(gp, "palpo-gate ready: 2 workers", 1, timeout=5)
                lines = list(gp.stderr_lines)
                supervisor = next(i for i, line in enumerate(lines)
                                  if "palpo-gate ready: 2 workers" in line)
                worker_ready = [i for i, line in enumerate(lines)
                                if "[worker" in line and "palpo-gate ready" in line]
                assert len(worker_ready) == 2 and max(worker_ready) < supervisor, _stderr(gp)
                assert len(_wait_workers(gp.proc.pid, 2, 1)) == 2
                ns.wait_for("WATCHDOG=1", timeout=1.0)  # the supervisor has a watchdog
                time.sleep(0.3)
                # ... and once: workers send nothing of their own.
                ready = [d for d in ns.datagrams() if d.text == "READY=1"]
                assert len(ready) == 1, [(d.text, d.pid) for d in ns.datagrams()]

            _notify_cycle(gp, ns, after_ready=after_ready)
        _check_order(ns.datagrams(), gp.proc.pid)
        assert _count(gp, "reloaded: 2 workers") == 1, _stderr(gp)


# -- 7. socket activation ---------------------------------------------------------------

#: What systemd does before exec: the sockets at fd 3, LISTEN_PID = the pid that
#: execs (exec keeps it), LISTEN_FDS, LISTEN_FDNAMES.
_ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="client")
os.execv(sys.executable, [sys.executable, "-m", "palpo_gate", "--config", sys.argv[2]])
"""


def _activate(sock: socket.socket, path: pathlib.Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _ACTIVATE, str(sock.fileno()), str(path)],
                            pass_fds=(sock.fileno(),), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(30)
def test_socket_activation_serves_the_passed_socket(tmp_path: pathlib.Path) -> None:
    with threaded_upstream() as up:
        toml = _config(up.url, "systemd:client")
        path = tmp_path / "gate.toml"
        path.write_text(toml)
        with socket.create_server(("127.0.0.1", 0)) as sock:
            port = sock.getsockname()[1]
            proc = _activate(sock, path)
        # Only the gate holds the socket now.
        with _started(proc, configmod.loads(toml, str(path)), port) as gp:
            for i in range(5):
                status, body = _http(port, f"/_matrix/activated/{i}")
                assert status == 200 and f"/_matrix/activated/{i}".encode() in body
            # A reload keeps the passed socket.
            _sighup_and_wait(gp)
            assert _http(port, "/_matrix/after-reload")[0] == 200
            gp.proc.send_signal(signal.SIGTERM)
            assert _wait_exit(gp.proc, 15) == 0, _stderr(gp)
        assert len(up.requests) == 6
        _no_traceback(_stderr(gp))


@pytest.mark.timeout(30)
def test_socket_activation_without_the_named_socket_exits_2(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "gate.toml"
    path.write_text(_config("http://127.0.0.1:9", "systemd:federation"))
    with socket.create_server(("127.0.0.1", 0)) as sock:
        proc = _activate(sock, path)
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert proc.returncode == 2, err
    assert "listeners[0].bind" in err, err
    assert "federation" in err, err
    assert "palpo-gate ready" not in err
    _no_traceback(err)


# -- 8. workers -------------------------------------------------------------------------


@contextlib.contextmanager
def _unix_path(tmp_path: pathlib.Path) -> Iterator[str]:
    """A socket path that fits sun_path (a long tmp_path may not)."""
    path = str(tmp_path / "gate.sock")
    if len(path) <= 100:
        yield path
        return
    short = tempfile.mkdtemp(prefix="pg-")
    try:
        yield os.path.join(short, "gate.sock")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(short, "gate.sock"))
        os.rmdir(short)


def _reap_strays(pids: set[int]) -> None:
    """Workers left behind by a failed test: ours (started by our gate), by pid."""
    for pid in pids:
        if _alive(pid) and _is_gate_worker(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(60)
def test_workers_share_heal_reload_and_stop(tmp_path: pathlib.Path) -> None:
    seen: set[int] = set()
    with threaded_upstream() as up, _unix_path(tmp_path) as sock_path:
        port = free_port()
        toml = _config(up.url, port, server="workers = 2") + (
            f'[[listeners]]\nname = "local"\nbind = "unix:{sock_path}"\nrole = "client"\n')
        try:
            with run_gate(toml, tmp_path) as gp:  # ready: READY=1, every worker serves
                pid = gp.proc.pid
                # (a) two worker processes, children of the gate
                workers = _wait_workers(pid, 2, 5)
                seen |= workers
                assert all(_is_gate_worker(w) for w in workers)
                # (b) the kernel spreads new connections over both
                spread = _who_accepts(port, workers)
                print(f"connections per worker: {spread}")
                assert all(n > 0 for n in spread.values()), spread
                for i in range(10):
                    assert _unix_http(sock_path, f"/_matrix/unix/{i}")[0] == 200

                # (c) a killed worker is replaced
                victim = min(workers)
                ready_lines = _count(gp, "palpo-gate ready")
                os.kill(victim, signal.SIGKILL)
                killed = time.monotonic()
                workers = _wait_workers(pid, 2, 5, exclude={victim})
                seen |= workers
                _wait_count(gp, "palpo-gate ready", ready_lines + 1, timeout=5)
                healed = time.monotonic() - killed
                print(f"worker {victim} killed; replaced and ready after {healed:.2f}s")
                assert healed < 5, healed
                failed = [i for i in range(40) if _http(port, f"/_matrix/healed/{i}")[0] != 200]
                failed += [i for i in range(10)
                           if _unix_http(sock_path, f"/_matrix/healed-unix/{i}")[0] != 200]
                assert not failed, f"{len(failed)} of 50 requests failed after the restart"
                spread = _who_accepts(port, workers)
                print(f"connections per worker after the restart: {spread}")
                assert all(n > 0 for n in spread.values()), spread

                # (d) SIGHUP reloads both
                _sighup_and_wait(gp, "reloaded: 2 workers")
                assert _count(gp, "reload failed") == 0, _stderr(gp)
                assert _http(port, "/_matrix/after-reload")[0] == 200
                assert _unix_http(sock_path, "/_matrix/after-reload-unix")[0] == 200
                assert _children(pid) == workers, "a reload must not restart workers"

                # (e) SIGTERM stops them all
                gp.proc.send_signal(signal.SIGTERM)
                rc = _wait_exit(gp.proc, 20)
            assert rc == 0, _stderr(gp)
            deadline = time.monotonic() + 3
            while any(_alive(w) for w in seen) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not [w for w in seen if _alive(w)], "workers outlived the gate"
            assert not os.path.exists(sock_path), "the UNIX socket file was left behind"
            _no_traceback(_stderr(gp))
        finally:
            _reap_strays(seen)


@pytest.mark.timeout(40)
def test_workers_metrics_are_summed(tmp_path: pathlib.Path) -> None:
    seen: set[int] = set()
    with threaded_upstream() as up:
        port, mport = free_port(), free_port()
        toml = _config(up.url, port, server="workers = 2",
                       extra=f'[metrics]\nbind = "127.0.0.1:{mport}"')
        try:
            with run_gate(toml, tmp_path) as gp:  # ready: READY=1, every worker serves
                workers = _wait_workers(gp.proc.pid, 2, 5)
                seen |= workers
                made = 60
                spread = _who_accepts(port, workers, n=made)
                assert all(n > 0 for n in spread.values()), spread
                # Workers write their snapshots every second.
                deadline = time.monotonic() + 4
                while True:
                    samples = _scrape(mport)
                    total = _metric(samples, "palpo_gate_requests_total")
                    if total >= made or time.monotonic() > deadline:
                        break
                    time.sleep(0.25)
                assert total == made, (total, made, spread)
                assert _metric(samples, "palpo_gate_requests_total", listener="main",
                               route="forward", status="200") == made
                assert _metric(samples, "palpo_gate_request_duration_seconds_count") == made
                assert _metric(samples, "palpo_gate_workers") == 2
                assert _metric(samples, "palpo_gate_config_generation") == 1
        finally:
            _reap_strays(seen)


# -- 9. metrics in one process ----------------------------------------------------------


@pytest.mark.timeout(30)
def test_metrics_follow_traffic_and_reloads(tmp_path: pathlib.Path) -> None:
    with threaded_upstream() as up:
        port, mport, dead = free_port(), free_port(), free_port()
        metrics = f'[metrics]\nbind = "127.0.0.1:{mport}"'
        toml = _config(up.url, port, extra=metrics)
        with run_gate(toml, tmp_path) as gp:
            s = _scrape(mport)
            assert _metric(s, "palpo_gate_requests_total") == 0
            assert _metric(s, "palpo_gate_config_generation") == 1
            assert _metric(s, "palpo_gate_reload_failures_total") == 0
            assert _metric(s, "palpo_gate_workers") == 1

            out = 0
            for i in range(7):
                status, body = _http(port, f"/_matrix/m/{i}")
                assert status == 200
                out += len(body)
            status, body = _http(port, "/_matrix/upload", method="POST", body=b"x" * 1234)
            assert status == 200
            out += len(body)
            assert _http(port, "/health")[0] == 200
            assert _http(port, "/_palpo/admin/users")[0] == 403
            assert _http(port, "/nowhere")[0] == 404

            s = _scrape(mport)
            assert _metric(s, "palpo_gate_requests_total", listener="main", route="forward",
                           status="200") == 8
            assert _metric(s, "palpo_gate_requests_total", route="health", status="200") == 1
            assert _metric(s, "palpo_gate_requests_total", route="admin", status="403") == 1
            assert _metric(s, "palpo_gate_requests_total", route="not_found", status="404") == 1
            assert _metric(s, "palpo_gate_request_duration_seconds_count", listener="main",
                           route="forward") == 8
            assert _metric(s, "palpo_gate_request_duration_seconds_bucket", route="forward",
                           le="+Inf") == 8
            assert _metric(s, "palpo_gate_request_bytes_total", listener="main") == 1234
            assert _metric(s, "palpo_gate_response_bytes_total", listener="main") == out

            # A good reload: generation 2; a bad one: a failure counted, still 2.
            _sighup_and_wait(gp)
            s = _scrape(mport)
            assert _metric(s, "palpo_gate_config_generation") == 2
            assert _metric(s, "palpo_gate_reload_failures_total") == 0
            _write(tmp_path / "gate.toml", toml + "\n[bogus]\n")
            _sighup_and_wait(gp, "reload failed")
            s = _scrape(mport)
            assert _metric(s, "palpo_gate_config_generation") == 2
            assert _metric(s, "palpo_gate_reload_failures_total") == 1

            # The upstream down: connect errors counted, 502 answered.
            _write(tmp_path / "gate.toml", _config(f"http://127.0.0.1:{dead}", port,
                                                   extra=metrics))
            _sighup_and_wait(gp)
            assert _http(port, "/_matrix/down")[0] == 502
            s = _scrape(mport)
            assert _metric(s, "palpo_gate_config_generation") == 3
            assert _metric(s, "palpo_gate_upstream_errors_total", kind="connect_error") == 1
            assert _metric(s, "palpo_gate_requests_total", route="forward", status="502") == 1
        assert gp.proc.returncode == 0, _stderr(gp)
