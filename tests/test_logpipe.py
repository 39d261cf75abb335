"""Log output that never blocks (palpo_gate/logpipe.py): a reader that stops
reading stdout or stderr must never stop the gate.

First :class:`LogPipe` over real pipes and sockets in an event loop, then the
real ``palpo-gate`` process with a stdout (and a stderr) that the test stops
reading, and with fewer file descriptors than connections.
"""

from __future__ import annotations

import asyncio
import fcntl
import http.client
import logging
import os
import pathlib
import re
import resource
import socket
import threading
import time
import urllib.request

import pytest
from support.gate import gate_toml, run_gate
from support.net import free_port
from support.pipes import os_pipe
from support.upstream_thread import threaded_upstream
from test_metrics import parse, values

from palpo_gate import logpipe, metrics
from palpo_gate.logpipe import LogPipe

F_GETPIPE_SZ = 1032


def line(i: int, size: int = 100, tag: bytes = b"") -> bytes:
    head = tag + b"%07d " % i
    return head + b"x" * (size - len(head) - 1) + b"\n"


async def read_lines(fd: int, count: int, *, timeout: float = 20.0, chunk: int = 65536,
                     pause: float = 0.0) -> list[bytes]:
    """Read *fd* until *count* lines came (reading *chunk* bytes, then
    sleeping *pause* seconds: a slow reader), letting the loop run meanwhile."""
    os.set_blocking(fd, False)
    buf = b""
    deadline = time.monotonic() + timeout
    while buf.count(b"\n") < count:
        assert time.monotonic() < deadline, (buf.count(b"\n"), count)
        try:
            data = os.read(fd, chunk)
        except BlockingIOError:
            await asyncio.sleep(0.002)
            continue
        assert data, "the writer closed"
        buf += data
        await asyncio.sleep(pause)
    return buf.splitlines(keepends=True)


# -- LogPipe ----------------------------------------------------------------------------


async def test_a_slow_reader_loses_nothing_while_the_buffer_has_room() -> None:
    with os_pipe() as (r, w):
        capacity = fcntl.fcntl(w, F_GETPIPE_SZ)
        pipe = LogPipe(w, "stdout", limit=4 * capacity)
        lines = [line(i) for i in range(3 * capacity // 100)]  # three pipes' worth
        started = time.monotonic()
        for data in lines:
            assert pipe.write(data)
        assert time.monotonic() - started < 1.0  # nothing waited for the reader
        assert pipe.dropped == 0 and pipe._queued > 0
        got = await read_lines(r, len(lines), chunk=1000, pause=0.001)
    assert got == lines


async def test_a_full_buffer_drops_counts_and_warns_then_lines_flow_again(
        caplog: pytest.LogCaptureFixture) -> None:
    with os_pipe() as (r, w), caplog.at_level(logging.WARNING, logger="palpo_gate"):
        pipe = LogPipe(w, "stdout", limit=16 * 1024, warn_every=0.5)
        sent = [line(i) for i in range(2000)]  # 200 KB: the pipe and the buffer hold 80 KiB
        for data in sent[:1000]:
            pipe.write(data)
        await asyncio.sleep(0.05)
        first = pipe.dropped
        assert first > 0
        warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].startswith(f"{first} log line(s) to stdout")
        for data in sent[1000:]:
            pipe.write(data)
        await asyncio.sleep(0.05)
        # At most one warning per interval: the next one, later, says how many more.
        assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1
        await asyncio.sleep(0.6)
        warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert len(warnings) == 2
        assert warnings[1].startswith(f"{pipe.dropped - first} log line(s) to stdout")

        kept = 2000 - pipe.dropped
        got = await read_lines(r, kept)
        # What was kept is whole and in order: the first lines, then the rest dropped.
        assert got == sent[:kept]
        later = [line(i, tag=b"later ") for i in range(50)]
        for data in later:
            pipe.write(data)
        assert await read_lines(r, 50) == later
        assert pipe.dropped == 2000 - kept


async def test_lines_stay_whole_between_writers_sharing_a_pipe() -> None:
    """Two writers (two workers) on one pipe whose reader is slow: every
    write is whole lines of at most PIPE_BUF bytes, so no line is cut by
    the other writer's."""
    with os_pipe() as (r, w):
        pipes = [LogPipe(w, "stdout", limit=64 * 1024), LogPipe(w, "stdout", limit=64 * 1024)]
        sent: set[bytes] = set()
        for i in range(400):
            for k, pipe in enumerate(pipes):
                data = line(i, size=700 + 300 * k, tag=b"w%d " % k)
                sent.add(data)
                pipe.write(data)
        kept = len(sent) - sum(p.dropped for p in pipes)
        got = await read_lines(r, kept, chunk=3000, pause=0.001)
    assert len(got) == kept and set(got) <= sent
    for k in range(2):  # each writer's own lines in order
        mine = [int(x.split()[1]) for x in got if x.startswith(b"w%d " % k)]
        assert mine == sorted(mine)


async def test_the_descriptor_others_share_stays_blocking() -> None:
    """O_NONBLOCK belongs to the open file description, which the gate
    shares with its supervisor, workers and whatever started it: it is left
    alone (a pipe is opened again; a socket is written with MSG_DONTWAIT)."""
    with os_pipe() as (r, w):
        pipe = LogPipe(w, "stdout")
        assert os.get_blocking(w)
        pipe.write(b"one\n")
        assert os.read(r, 100) == b"one\n"
        pipe.close()
        assert os.get_blocking(w)
    a, b = socket.socketpair()
    with a, b:
        pipe = LogPipe(a.fileno(), "stderr", limit=1 << 20)
        assert a.getblocking() and os.get_blocking(a.fileno())
        sent = [line(i) for i in range(10_000)]  # 1 MB: more than the socket buffers
        for data in sent:
            pipe.write(data)
        assert pipe._queued > 0 and pipe.dropped == 0
        assert await read_lines(b.fileno(), len(sent)) == sent
        pipe.close()
        assert a.getblocking()


def test_what_is_left_at_exit_gets_a_bounded_time() -> None:
    """No event loop (before it runs, or after): close() writes what it can
    while the reader reads, and gives up after its timeout."""
    with os_pipe() as (r, w):
        capacity = fcntl.fcntl(w, F_GETPIPE_SZ)
        pipe = LogPipe(w, "stdout", limit=4 * capacity)
        sent = [line(i) for i in range(2 * capacity // 100)]
        for data in sent:
            pipe.write(data)
        assert pipe._queued > 0
        got: list[bytes] = []

        def reader() -> None:
            time.sleep(0.2)
            buf = b""
            while buf.count(b"\n") < len(sent):
                buf += os.read(r, 65536)
            got.extend(buf.splitlines(keepends=True))

        thread = threading.Thread(target=reader)
        thread.start()
        pipe.close(timeout=10)
        thread.join(10)
        assert got == sent and pipe.dropped == 0

    with os_pipe() as (r, w):
        pipe = LogPipe(w, "stdout", limit=4 * capacity)
        for data in sent:
            pipe.write(data)
        queued = len(pipe._queue)
        started = time.monotonic()
        pipe.close(timeout=0.3)  # nobody reads
        assert 0.3 <= time.monotonic() - started < 2.0
        assert pipe.dropped == queued > 0


async def test_the_logging_handler_writes_through_a_pipe() -> None:
    with os_pipe() as (r, w):
        pipe = LogPipe(w, "stderr", limit=4096)
        logger = logging.getLogger("palpo_gate.test_logpipe")
        handler = logpipe.Handler(pipe)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        try:
            for i in range(2000):  # 80 KB: the pipe (64 KiB) and 4 KiB of buffer
                logger.warning("message %04d %s", i, "m" * 25)
            assert 0 < pipe.dropped < 2000
            got = await read_lines(r, 2000 - pipe.dropped)
        finally:
            logger.removeHandler(handler)
            logger.propagate = True
    assert got[0] == b"WARNING message 0000 " + b"m" * 25 + b"\n"
    assert all(re.fullmatch(rb"WARNING message \d{4} m{25}\n", x) for x in got)


def test_dropped_lines_are_a_counter_summed_across_workers() -> None:
    regs = [metrics.Registry(["main"], log_drops=lambda n=n: {"stdout": 3 * n, "stderr": n})
            for n in (1, 2)]
    families = parse(metrics.merge([r.snapshot() for r in regs]))
    assert families["palpo_gate_log_lines_dropped_total"]["type"] == "counter"
    assert values(families, "palpo_gate_log_lines_dropped_total") == {
        ("stdout",): 9, ("stderr",): 3}
    # Both streams show (as 0) before anything was dropped.
    assert values(parse(metrics.Registry().render()), "palpo_gate_log_lines_dropped_total") == {
        ("stdout",): 0, ("stderr",): 0}


# -- the real process ---------------------------------------------------------------------


def config(upstream: str, port: int, metrics_port: int, *, level: str = "info") -> str:
    return gate_toml(upstream, bind=f"127.0.0.1:{port}", access="json",
                     log=f'level = "{level}"',
                     extra=f'[metrics]\nbind = "127.0.0.1:{metrics_port}"')


def health_seconds(port: int) -> float:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
    return time.monotonic() - started


def dropped(metrics_port: int) -> dict[tuple[str, ...], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        return values(parse(r.read()), "palpo_gate_log_lines_dropped_total")


def wait_for(pred: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


PAD = "p" * 1000  # access lines of ~1.3 KB: 2,000 of them overflow pipe and buffer


def test_a_stdout_nobody_reads_never_stops_the_gate(tmp_path: pathlib.Path) -> None:
    port, metrics_port = free_port(), free_port()
    with threaded_upstream() as up, \
            run_gate(config(up.url, port, metrics_port), tmp_path, read_stdout=False) as gp:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        slowest = 0.0
        for i in range(2000):
            conn.request("GET", f"/_matrix/client/v3/rooms/r/messages?n={i}&pad={PAD}")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, (i, resp.status)
            if i % 100 == 0:
                slowest = max(slowest, health_seconds(port))
        slowest = max(slowest, health_seconds(port))
        assert slowest < 1.0  # the loop never waited for the log reader
        assert len(up.requests) == 2000
        lost = dropped(metrics_port)
        assert lost[("stdout",)] > 0 and lost[("stderr",)] == 0
        assert gp.stdout_lines == []

        gp.stdout_reading.set()  # the reader comes back
        for i in range(5):
            conn.request("GET", f"/_matrix/client/v3/rooms/r/messages?after={i}")
            conn.getresponse().read()
        wait_for(lambda: sum("after=" in x for x in gp.stdout_lines) == 5)
        conn.close()
        logged = sum("pad=" in x for x in gp.stdout_lines)
        assert logged + lost[("stdout",)] == 2000  # each line written, or counted
        assert dropped(metrics_port)[("stdout",)] == lost[("stdout",)]
        wait_for(lambda: any("log line(s) to stdout dropped" in x for x in gp.stderr_lines))
    warning = next(x for x in gp.stderr_lines if "log line(s) to stdout dropped" in x)
    assert "WARNING" in warning


BAD = ("GET /_matrix/client/v3/sync?n={n}&pad=" + PAD + "&access_token=SECRET HTTP/1.1\r\n"
       "Host: a\r\nBad Header: y\r\n\r\n")


def malformed(port: int, n: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(BAD.format(n=n).encode())
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    return answer


def test_a_stderr_nobody_reads_never_stops_the_gate(tmp_path: pathlib.Path) -> None:
    """At level debug every refused request writes a line to stderr."""
    port, metrics_port = free_port(), free_port()
    with run_gate(config("http://127.0.0.1:9", port, metrics_port, level="debug"), tmp_path,
                  ) as gp:
        gp.stderr_reading.clear()
        time.sleep(0.3)
        slowest = 0.0
        for n in range(1200):
            assert malformed(port, n).startswith(b"HTTP/1.0 400 ")
            if n % 100 == 0:
                slowest = max(slowest, health_seconds(port))
        assert max(slowest, health_seconds(port)) < 1.0
        lost = dropped(metrics_port)
        assert lost[("stderr",)] > 0

        gp.stderr_reading.set()
        for n in range(5):
            malformed(port, 100_000 + n)
        wait_for(lambda: sum("n=10000" in x for x in gp.stderr_lines) == 5)
    assert "SECRET" not in "".join(gp.stderr_lines)


def _few_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def test_running_out_of_file_descriptors_is_logged_once(tmp_path: pathlib.Path) -> None:
    """uvloop's libuv accepts and closes connections itself at EMFILE; the
    gate says so once (not per connection), and again when it is over."""
    port = free_port()
    toml = f"""
[upstream]
url = "http://127.0.0.1:9"
[[listeners]]
name = "main"
bind = "127.0.0.1:{port}"
role = "client"
"""
    with run_gate(toml, tmp_path, preexec_fn=_few_fds) as gp:
        clients = []
        try:
            for _ in range(150):  # more connections than the gate has descriptors
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            time.sleep(3.5)

            def out_lines() -> list[str]:
                return [x for x in gp.stderr_lines if "out of file descriptors" in x]

            wait_for(lambda: out_lines())
            assert len(out_lines()) == 1, out_lines()
            assert "RLIMIT_NOFILE 64" in out_lines()[0] and "ERROR" in out_lines()[0]
        finally:
            for c in clients:
                c.close()
        wait_for(lambda: any("file descriptors available again" in x for x in gp.stderr_lines))
        assert health_seconds(port) < 5.0

