"""The command line and the real process (docs/DESIGN.md sections 1, 5 and 6): what an
operator types and sees. Every test runs ``python -m palpo_gate`` or the
installed ``palpo-gate`` script as a subprocess: exit statuses, messages,
signals, and the production handler settings (which the in-loop test gate
cannot show: aiohttp's test servers force handler cancellation).

The upstream here is a small threaded HTTP/1.1 server (the gate lives in
another process, so the test's event loop is not needed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from support.gate import GateProcess, gate_toml, run_gate, spawn
from support.net import free_port
from support.upstream_thread import ThreadedUpstream, UpReq

from palpo_gate import __version__
from palpo_gate import config as configmod

SCRIPT = os.path.join(os.path.dirname(sys.executable), "palpo-gate")
COMMANDS = {
    "python-m": [sys.executable, "-m", "palpo_gate"],
    "console-script": [SCRIPT],
}


def run_cli(cmd: list[str], *args: str, cwd: pathlib.Path,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30,
                          cwd=cwd, env={**os.environ, **(env or {})}, check=False)


@pytest.fixture(params=list(COMMANDS))
def command(request: pytest.FixtureRequest) -> list[str]:
    cmd = COMMANDS[request.param]
    if request.param == "console-script":
        assert os.access(SCRIPT, os.X_OK), f"the palpo-gate script is not installed: {SCRIPT}"
    return cmd


# -- a threaded upstream ---------------------------------------------------------------


class ThreadUpstream(ThreadedUpstream):
    """The shared threaded upstream (``support/upstream_thread.py``): targets
    starting with ``/_matrix/hold/N`` are answered after N seconds,
    ``/_matrix/client/v3/sync`` is held up to 10 s; the body is
    ``{"target": ...}``, which these tests compare byte for byte."""

    def __init__(self) -> None:
        super().__init__(sync_hold=10.0)

    def body(self, req: UpReq) -> bytes:
        return b'{"target": "%s"}' % req.target


@pytest.fixture
def upstream() -> Iterator[ThreadUpstream]:
    up = ThreadUpstream().start()
    try:
        yield up
    finally:
        up.stop()


def gate_config(upstream_port: int, port: int, extra: str = "") -> str:
    return gate_toml(f"http://127.0.0.1:{upstream_port}", bind=f"127.0.0.1:{port}",
                     server='drain_timeout = "10s"', extra=extra)


def http_get(port: int, target: str, timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", target, headers={"Host": "matrix.test"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# -- --version and check -------------------------------------------------------------


def test_version(command: list[str], tmp_path: pathlib.Path) -> None:
    proc = run_cli(command, "--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"palpo-gate {__version__}"


def test_check_without_config_prints_the_builtin_default(command: list[str],
                                                         tmp_path: pathlib.Path) -> None:
    proc = run_cli(command, "check", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert 'bind = "127.0.0.1:8080"' in proc.stdout
    assert 'url = "http://127.0.0.1:8008"' in proc.stdout
    # what it prints is a config file that means the same thing
    printed = configmod.loads(proc.stdout, "<printed>")
    assert dataclasses.replace(printed, source="x") == dataclasses.replace(
        configmod.load(None), source="x")


def test_check_with_a_good_config(command: list[str], tmp_path: pathlib.Path) -> None:
    path = tmp_path / "gate.toml"
    path.write_text(gate_config(8008, 8448, extra='hosts = ["matrix.test"]\n'
                                '[limits]\nmax_body_size = "10M"\nheader_timeout = "5s"'))
    proc = run_cli(command, "check", "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert 'bind = "127.0.0.1:8448"' in proc.stdout
    assert "max_body_size = 10485760" in proc.stdout
    assert 'header_timeout = "5s"' in proc.stdout
    assert 'hosts = ["matrix.test"]' in proc.stdout


BAD_CONFIG = """
[upstream]
url = "http://127.0.0.1:8008"
read_timout = "30s"

[limits]
header_timeout = "5 parsecs"

[[listeners]]
name = "main"
bind = "nohost"
"""


@pytest.mark.parametrize("mode", ["check", "run"])
def test_bad_config_reports_every_error_with_its_key_path(command: list[str], mode: str,
                                                          tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_CONFIG)
    args = ("check", "--config", str(path)) if mode == "check" else ("--config", str(path))
    proc = run_cli(command, *args, cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    for key in ("upstream.read_timout", "limits.header_timeout", "listeners[0].bind"):
        assert key in proc.stderr, (key, proc.stderr)
    assert "5 parsecs" in proc.stderr
    no_traceback(proc.stderr)
    assert proc.stdout == ""


@pytest.mark.parametrize("mode", ["check", "run"])
def test_missing_config_file(mode: str, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "nowhere" / "gate.toml"
    args = ("check", "--config", str(path)) if mode == "check" else ("--config", str(path))
    proc = run_cli(COMMANDS["python-m"], *args, cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert str(path) in proc.stderr
    assert re.search(r"no such file|not found", proc.stderr, re.IGNORECASE), proc.stderr
    no_traceback(proc.stderr)


@pytest.mark.parametrize("mode", ["check", "run"])
def test_invalid_toml(mode: str, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "gate.toml"
    path.write_text('[upstream\nurl = "http://127.0.0.1:8008"\n')
    args = ("check", "--config", str(path)) if mode == "check" else ("--config", str(path))
    proc = run_cli(COMMANDS["python-m"], *args, cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert str(path) in proc.stderr
    assert "TOML" in proc.stderr
    no_traceback(proc.stderr)


# -- running -------------------------------------------------------------------------


def _wait_exit(gp: GateProcess, timeout: float) -> tuple[int, float]:
    start = time.monotonic()
    try:
        rc = gp.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the gate did not exit within {timeout} s of SIGTERM")
    return rc, time.monotonic() - start


def test_runs_serves_forwards_and_stops_on_sigterm(upstream: ThreadUpstream,
                                                   tmp_path: pathlib.Path) -> None:
    port = free_port()
    with run_gate(gate_config(upstream.port, port), tmp_path) as gp:
        assert http_get(port, "/health") == (200, b"OK\n")
        status, body = http_get(port, "/_matrix/client/versions?a=%2F")
        assert (status, body) == (200, b'{"target": "/_matrix/client/versions?a=%2F"}')
        assert len(upstream.requests) == 1  # /health is never forwarded
        req = upstream.requests[0]
        assert req.headers[b"x-forwarded-for"] == b"127.0.0.1"
        assert req.headers[b"host"] == b"matrix.test:%d" % port
        gp.proc.send_signal(signal.SIGTERM)
        rc, took = _wait_exit(gp, 10)
    assert rc == 0, "".join(gp.stderr_lines)
    assert took < 5, took  # nothing in flight: no reason to wait for drain_timeout
    no_traceback("".join(gp.stderr_lines))


def test_idle_keep_alive_client_does_not_delay_stop(upstream: ThreadUpstream,
                                                    tmp_path: pathlib.Path) -> None:
    """drain_timeout is the time given to in-flight requests (docs/DESIGN.md section 7); an
    idle keep-alive connection (every Matrix client keeps one) has none, so the
    stop must not wait for it."""
    port = free_port()
    with run_gate(gate_config(upstream.port, port), tmp_path) as gp:
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            idle.request("GET", "/_matrix/client/versions", headers={"Host": "matrix.test"})
            assert idle.getresponse().read() == b'{"target": "/_matrix/client/versions"}'
            gp.proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            try:
                rc = gp.proc.wait(5)
            except subprocess.TimeoutExpired:
                pytest.fail("the gate did not exit within 5 s of SIGTERM with only an idle "
                            "keep-alive connection open (drain_timeout = 10 s)")
            took = time.monotonic() - start
        finally:
            idle.close()
    assert rc == 0, "".join(gp.stderr_lines)
    assert took < 5, took


def test_sigterm_drains_a_held_request(upstream: ThreadUpstream, tmp_path: pathlib.Path) -> None:
    port = free_port()
    result: dict[str, object] = {}

    def client() -> None:
        try:
            result["resp"] = http_get(port, "/_matrix/hold/2", timeout=15)
        except Exception as exc:
            result["error"] = exc

    with run_gate(gate_config(upstream.port, port), tmp_path) as gp:
        t = threading.Thread(target=client, daemon=True)
        t.start()
        assert upstream.wait_for(lambda: upstream.requests, 5), "request never reached upstream"
        sent = time.monotonic()
        gp.proc.send_signal(signal.SIGTERM)
        # stop accepting: new connections are refused soon after the signal
        refused = False
        for _ in range(20):
            time.sleep(0.05)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                refused = True
                break
        assert refused, "the gate still accepts connections while draining"
        assert gp.proc.poll() is None, "the gate exited with a request in flight"
        t.join(10)
        rc, _ = _wait_exit(gp, 10)
        took = time.monotonic() - sent
    assert result.get("resp") == (200, b'{"target": "/_matrix/hold/2"}'), result
    assert rc == 0, "".join(gp.stderr_lines)
    assert 1.5 <= took < 10, took


def test_refuses_to_run_without_the_c_parser(upstream: ThreadUpstream,
                                             tmp_path: pathlib.Path) -> None:
    path = tmp_path / "gate.toml"
    port = free_port()
    path.write_text(gate_config(upstream.port, port))
    proc = spawn(path, env={"AIOHTTP_NO_EXTENSIONS": "1"})
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert proc.returncode != 0, err
    assert re.search(r"\bC (HTTP )?parser", err), err
    assert "palpo-gate ready" not in err
    no_traceback(err)


def test_port_in_use_exits_2_naming_the_listener(upstream: ThreadUpstream,
                                                 tmp_path: pathlib.Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        path = tmp_path / "gate.toml"
        path.write_text(gate_config(upstream.port, port))
        proc = spawn(path)
        try:
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=5)
    assert proc.returncode == 2, err
    assert "listeners[0].bind" in err
    assert str(port) in err
    no_traceback(err)


def test_no_config_listens_on_8080(tmp_path: pathlib.Path) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the gate does
        try:
            probe.bind(("127.0.0.1", 8080))
        except OSError as exc:
            pytest.fail(f"127.0.0.1:8080 is in use ({exc}); this test needs it free to "
                        "check the built-in default listener")
    proc = subprocess.Popen([sys.executable, "-m", "palpo_gate"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        status = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                status, body = http_get(8080, "/health", timeout=2)
                break
            time.sleep(0.1)
        assert status == 200, f"no /health on 127.0.0.1:8080 (exit status {proc.poll()})"
        assert body == b"OK\n"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    assert "127.0.0.1:8080" in err  # the log says where it listens


def test_client_gone_aborts_the_upstream_request(upstream: ThreadUpstream,
                                                 tmp_path: pathlib.Path) -> None:
    """Production settings (handler_cancellation): a client that hangs up during a
    long-poll makes the gate close its upstream connection, and it is not retried."""
    port = free_port()
    with run_gate(gate_config(upstream.port, port), tmp_path):
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            client.sendall(b"GET /_matrix/client/v3/sync?timeout=30000 HTTP/1.1\r\n"
                           b"Host: matrix.test\r\nAuthorization: Bearer x\r\n\r\n")
            assert upstream.wait_for(lambda: upstream.requests, 5), "sync never reached upstream"
        finally:
            client.close()
        gone = time.monotonic()
        req = upstream.requests[0]
        assert upstream.wait_for(lambda: req.peer_closed_at is not None, 5), \
            "the upstream connection stayed open after the client left"
        assert req.peer_closed_at is not None
        assert req.peer_closed_at - gone <= 2.0, req.peer_closed_at - gone
        time.sleep(0.5)
        assert [r.target for r in upstream.requests] == [b"/_matrix/client/v3/sync?timeout=30000"]
