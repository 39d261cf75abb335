"""Budgets shared beyond one process: several gates on one
Redis, a Redis that goes away (fail open, counted), and ``server.workers = 2``
(one budget for all workers, not one each).

Real processes (``python -m palpo_gate``), Debian's ``redis-server`` started
here on a loopback port, a threaded upstream; clients connect from 127.0.0.2,
127.0.0.3 to be separate addresses.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest
from support.gate import GateProcess, gate_toml, run_gate
from support.net import free_port
from support.upstream_thread import ThreadedUpstream, threaded_upstream

LOGIN = "/_matrix/client/v3/login"


class Redis:
    def __init__(self, port: int, workdir: pathlib.Path) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed (Debian package redis-server; .ci/run)"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
            assert self.proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not answer"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def redis(tmp_path: pathlib.Path) -> Iterator[Redis]:
    r = Redis(free_port(), tmp_path)
    r.start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def upstream() -> Iterator[ThreadedUpstream]:
    with threaded_upstream() as up:
        yield up


def config(upstream: ThreadedUpstream, rate_limits: str, *, workers: int = 1,
           metrics: int = 0) -> str:
    return gate_toml(upstream.url, bind=f"127.0.0.1:{free_port()}", role=None,
                     server=f'workers = {workers}\ndrain_timeout = "1s"',
                     extra=f"[rate_limits]\n{rate_limits}\n"
                     + (f'[metrics]\nbind = "127.0.0.1:{metrics}"\n' if metrics else ""))


def status(port: int, target: str = LOGIN, source: str = "127.0.0.2", method: str = "POST"
           ) -> int:
    """One request on a new connection from *source*; the status."""
    body = b"{}" if method == "POST" else b""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as s:
        s.sendall(f"{method} {target} HTTP/1.1\r\nHost: gate.test\r\nConnection: close\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    assert m, data[:200]
    return int(m.group(1))


def scrape(port: int, name: str) -> dict[str, float]:
    """Samples of metric *name* on the metrics endpoint, by label text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key[len(name):]] = float(value)
    return out


def wait_for(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def port(gate: GateProcess) -> int:
    return gate.port("main")


@pytest.mark.timeout(90)
def test_two_gates_share_one_budget_in_redis(redis: Redis, upstream: ThreadedUpstream,
                                             tmp_path: pathlib.Path) -> None:
    limits = f'login = "3/minute"\nstorage = "{redis.url}"'
    with run_gate(config(upstream, limits), tmp_path / "a") as a, \
            run_gate(config(upstream, limits), tmp_path / "b") as b:
        assert [status(port(a)), status(port(b)), status(port(a))] == [200, 200, 200]
        # The budget is spent on both gates, not per gate.
        assert status(port(b)) == 429
        assert status(port(a)) == 429
        # Another address has its own, on either gate.
        assert status(port(b), source="127.0.0.3") == 200
    logins = [r for r in upstream.requests if r.target == LOGIN.encode()]
    assert [r.headers[b"x-forwarded-for"] for r in logins] == [b"127.0.0.2"] * 3 + [b"127.0.0.3"]


@pytest.mark.timeout(90)
def test_redis_gone_fails_open_with_a_metric(redis: Redis, upstream: ThreadedUpstream,
                                             tmp_path: pathlib.Path) -> None:
    metrics = free_port()
    limits = f'login = "2/minute"\nstorage = "{redis.url}"'
    with run_gate(config(upstream, limits, metrics=metrics), tmp_path / "g") as gate:
        assert [status(port(gate)) for _ in range(3)] == [200, 200, 429]
        assert scrape(metrics, "palpo_gate_rate_limited_total") == {'{limit="login"}': 1.0,
            '{limit="register"}': 0.0, '{limit="password"}': 0.0, '{limit="requests"}': 0.0,
            '{limit="connections"}': 0.0}
        assert scrape(metrics, "palpo_gate_rate_limit_fail_open_total") == {"": 0.0}
        redis.stop()
        # Requests pass (the limiter must not take the homeserver down), quickly.
        started = time.monotonic()
        assert [status(port(gate)) for _ in range(4)] == [200] * 4
        assert time.monotonic() - started < 5
        assert scrape(metrics, "palpo_gate_rate_limit_fail_open_total")[""] >= 4
        assert wait_for(lambda: any("does not answer" in line for line in gate.stderr_lines))
        # Redis back (empty): limits apply again once the gate tries it again.
        redis.start()
        time.sleep(5.5)
        assert [status(port(gate)) for _ in range(3)] == [200, 200, 429]
        assert wait_for(lambda: any("answers again" in line for line in gate.stderr_lines))
    warnings = [line for line in gate.stderr_lines if "does not answer" in line]
    assert len(warnings) == 1, warnings  # once per outage, not once per request


@pytest.mark.timeout(90)
def test_unreachable_redis_at_start_fails_open(upstream: ThreadedUpstream,
                                               tmp_path: pathlib.Path) -> None:
    limits = f'login = "1/minute"\nstorage = "redis://127.0.0.1:{free_port()}/0"'
    with run_gate(config(upstream, limits), tmp_path / "g") as gate:
        assert [status(port(gate)) for _ in range(3)] == [200, 200, 200]


@pytest.mark.timeout(120)
def test_workers_share_one_budget(upstream: ThreadedUpstream, tmp_path: pathlib.Path) -> None:
    metrics = free_port()
    with run_gate(config(upstream, 'login = "4/minute"\nconnections = 3', workers=2,
                         metrics=metrics), tmp_path / "g") as gate:
        # Both workers serve: run_gate waited for the supervisor's READY=1.
        # Each attempt on a new connection: the kernel spreads them over both
        # workers (SO_REUSEPORT), so per-worker budgets would let 8 through.
        results = [status(port(gate)) for _ in range(30)]
        assert results.count(200) == 4, results
        assert results.count(429) == 26
        assert status(port(gate), source="127.0.0.3") == 200
        # Concurrent connections: one cap for both workers.
        conns = [socket.create_connection(("127.0.0.1", port(gate)), timeout=10,
                                          source_address=("127.0.0.4", 0)) for _ in range(10)]
        try:
            answers = []
            for s in conns:
                s.sendall(b"GET /_matrix/client/v3/sync HTTP/1.1\r\nHost: gate.test\r\n\r\n")
            for s in conns:
                answers.append(s.recv(65536)[:12])
            assert answers.count(b"HTTP/1.1 200") == 3, answers
            assert answers.count(b"HTTP/1.1 429") == 7, answers
        finally:
            for s in conns:
                s.close()
        # The slots come back when the connections end.
        assert wait_for(lambda: status(port(gate), "/_matrix/client/v3/sync", "127.0.0.4",
                                       "GET") == 200)
        # Refusals from both workers, summed by the supervisor.
        assert wait_for(lambda: scrape(metrics, "palpo_gate_rate_limited_total").get(
            '{limit="login"}') == 26.0)
    assert len([r for r in upstream.requests if r.target == LOGIN.encode()]) == 5
