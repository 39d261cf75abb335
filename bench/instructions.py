"""Instructions per request: a cost figure that does not move with the machine's load.

CPU seconds per request depend on the CPU, its clock, its caches and on what
else runs on the machine. The number of instructions a server executes to
answer one request depends on none of that: it is what the code does. This
module counts them in two ways:

* **callgrind** (``valgrind --tool=callgrind``): the server runs under
  valgrind; after a warm-up its counters are zeroed (``callgrind_control
  -z``), N small GETs are sent on keep-alive connections, the counters are
  dumped (``callgrind_control -d``) and the dump's ``summary`` (instructions
  executed in user space, Ir) is divided by N. Start-up, imports and the
  warm-up are not in it. Repeated a few times in the same process to show
  that the figure is stable. Kernel work (system calls) is not counted.
* **perf stat** (``perf stat -e instructions:u,instructions -p PID``) over
  the same N requests, on the server running natively, where the machine
  exposes hardware counters (most VMs do not: ``perf stat -e instructions
  true`` then says ``<not supported>``, and the figure is left out).
  ``instructions`` there includes the kernel's share.

The load is a small blocking client in the runner (:class:`KeepAliveClient`):
C connections opened once, each sending its next request as soon as the
previous answer is complete, so up to C requests are in the server at once
(under callgrind the server is the bottleneck by far, so it sees C ready
connections at each turn of its loop, as under wrk's -c64).

Used by ``bench/run.py --instructions N``; the server processes are started
by run.py (gate, bare), this module only wraps their command and measures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import selectors
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
_CL_RE = re.compile(rb"(?im)^content-length:[ \t]*(\d+)[ \t]*\r?$")


class KeepAliveClient:
    """C keep-alive connections to one server, each with one request in flight."""

    def __init__(self, port: int, path: str, conns: int, timeout: float = 30.0) -> None:
        self.request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
        self.sel = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        try:
            for _ in range(conns):
                s = socket.create_connection((HOST, port), timeout=timeout)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.setblocking(False)
                self.socks.append(s)
                self.sel.register(s, selectors.EVENT_READ, bytearray())
        except BaseException:
            self.close()
            raise

    def run(self, count: int, timeout: float) -> None:
        """Send *count* requests (spread over the connections) and read every
        answer; raises on a status other than 200, a closed connection or
        *timeout* seconds without progress."""
        sent = done = 0
        for s in self.socks:
            if sent < count:
                s.sendall(self.request)
                sent += 1
        while done < count:
            events = self.sel.select(timeout)
            if not events:
                raise TimeoutError(f"no answer for {timeout} s ({done}/{count} done)")
            for key, _ in events:
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                buf: bytearray = key.data
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError(f"server closed a connection ({done}/{count} done)")
                buf += data
                while (end := buf.find(b"\r\n\r\n")) >= 0:
                    head = bytes(buf[:end + 2])
                    m = _CL_RE.search(head)
                    if m is None:
                        raise ValueError(f"answer without Content-Length: {head[:200]!r}")
                    total = end + 4 + int(m[1])
                    if len(buf) < total:
                        break
                    if not head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 ")):
                        raise ValueError(f"answer not 200: {head[:100]!r}")
                    del buf[:total]
                    done += 1
                    if sent < count:
                        sock.sendall(self.request)
                        sent += 1

    def close(self) -> None:
        for s in self.socks:
            with contextlib.suppress(Exception):
                self.sel.unregister(s)
            s.close()
        self.socks = []
        self.sel.close()


# ---------------------------------------------------------------------------
# callgrind


def callgrind_prefix(out_file: Path) -> list[str]:
    """The command prefix running a program under callgrind (dumps next to *out_file*)."""
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}",
            "--vgdb=yes", "--quiet"]


def _control(pid: int, what: str, timeout: float = 120.0) -> None:
    """callgrind_control on *pid*; vgdb reaches the process even while it
    sleeps in epoll_wait, so no request is needed to deliver the command."""
    proc = subprocess.run(["callgrind_control", what, str(pid)], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0 or "OK." not in proc.stdout:
        raise RuntimeError(f"callgrind_control {what} {pid} failed: "
                           f"{(proc.stdout + proc.stderr).strip()[-500:]}")


def dump_parts(out_file: Path) -> list[Path]:
    """The dump files callgrind wrote for *out_file* (``<file>.1``, ``.2``, ...), in order."""
    parts = [p for p in out_file.parent.glob(out_file.name + ".*")
             if p.suffix[1:].isdigit()]
    return sorted(parts, key=lambda p: int(p.suffix[1:]))


def dump_summary(path: Path) -> int:
    """The ``summary:`` line of a callgrind dump: instructions (Ir) in that part.
    (``totals:`` is not it: it adds inclusive call costs.)"""
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise ValueError(f"{path}: no summary line")


@dataclasses.dataclass
class Subject:
    """One server to measure: *start(prefix)* launches it with *prefix* before
    its command (the valgrind command, or nothing) and returns its process
    (with .pid, .ports["plain"], .stop())."""

    name: str
    start: Callable[[list[str]], Any]
    path: str


def measure_callgrind(subject: Subject, workdir: Path, n: int, conns: int, warmup: int,
                      repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    out_file = workdir / f"callgrind.{subject.name}"
    t0 = time.monotonic()
    svc = subject.start(callgrind_prefix(out_file))
    started_s = time.monotonic() - t0
    per_req: list[float] = []
    dumps: list[str] = []
    try:
        # Under callgrind the server is 30-100x slower: generous waits.
        client = KeepAliveClient(svc.ports["plain"], subject.path, conns, timeout=120)
        try:
            client.run(warmup, timeout=120)
            for _ in range(repeats):
                _control(svc.pid, "-z")
                client.run(n, timeout=120)
                _control(svc.pid, "-d")
                part = dump_parts(out_file)[-1]
                per_req.append(dump_summary(part) / n)
                dumps.append(part.name)
        finally:
            client.close()
    finally:
        svc.stop()
    med = statistics.median(per_req)
    log(f"instructions {subject.name}: {med:,.0f} Ir/request under callgrind "
        f"({', '.join(f'{x:,.0f}' for x in per_req)}; start-up {started_s:.0f} s)")
    return {"ir_per_request": med, "ir_per_request_runs": per_req,
            "spread_pct": (max(per_req) - min(per_req)) / med * 100 if med else None,
            "dumps": dumps, "startup_s": round(started_s, 1)}


# ---------------------------------------------------------------------------
# perf stat


PERF_EVENTS = ("instructions:u", "instructions")


def perf_supported(perf: str | None) -> tuple[bool, str]:
    """Whether ``perf stat`` can count instructions here, and why not."""
    if perf is None:
        return False, "perf not installed"
    try:
        proc = subprocess.run([perf, "stat", "-x", ",", "-e", PERF_EVENTS[0], "true"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"perf stat failed: {e}"
    counts = parse_perf_csv(proc.stderr)
    if proc.returncode != 0 or counts.get(PERF_EVENTS[0]) is None:
        why = "<not supported> (no hardware counters here)" \
            if "<not supported>" in proc.stderr else proc.stderr.strip()[-200:] or "no count"
        return False, f"`perf stat -e {PERF_EVENTS[0]} true`: {why}"
    return True, ""


def parse_perf_csv(text: str) -> dict[str, int | None]:
    """``perf stat -x ,`` output → {event: count, or None if not counted}."""
    out: dict[str, int | None] = {}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) < 3 or line.startswith("#"):
            continue
        value, event = fields[0].strip(), fields[2].strip()
        if not event:
            continue
        out[event] = int(value) if value.isdigit() else None
    return out


def measure_perf(subject: Subject, perf: str, n: int, conns: int, warmup: int,
                 repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    svc = subject.start([])
    runs: dict[str, list[float]] = {e: [] for e in PERF_EVENTS}
    try:
        client = KeepAliveClient(svc.ports["plain"], subject.path, conns)
        try:
            client.run(warmup, timeout=30)
            for _ in range(repeats):
                proc = subprocess.Popen([perf, "stat", "-x", ",", "-e", ",".join(PERF_EVENTS),
                                         "-p", str(svc.pid)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True)
                time.sleep(0.5)  # attached
                client.run(n, timeout=30)
                proc.send_signal(signal.SIGINT)
                _, err = proc.communicate(timeout=30)
                counts = parse_perf_csv(err)
                for e in PERF_EVENTS:
                    if counts.get(e) is not None:
                        runs[e].append(counts[e] / n)  # type: ignore[operator]
        finally:
            client.close()
    finally:
        svc.stop()
    out: dict[str, Any] = {}
    for e, vals in runs.items():
        key = "user" if e.endswith(":u") else "all"
        out[f"instructions_{key}_per_request"] = statistics.median(vals) if vals else None
        out[f"instructions_{key}_runs"] = vals
    log(f"perf stat {subject.name}: "
        + ", ".join(f"{k} {v:,.0f}" for k, v in out.items() if isinstance(v, float)))
    return out


# ---------------------------------------------------------------------------


def measure(subjects: list[Subject], workdir: Path, *, n: int, conns: int, perf: str | None,
            log: Callable[[str], None], repeats: int = 3) -> dict[str, Any]:
    """Instructions per request for every subject; the result's "servers" maps
    a subject's name to its figures, "ratio" holds gate / bare when both ran."""
    warmup = max(200, n // 5)
    perf_ok, perf_why = perf_supported(perf)
    servers: dict[str, Any] = {}
    for subject in subjects:
        entry: dict[str, Any] = {"path": subject.path}
        try:
            entry["callgrind"] = measure_callgrind(subject, workdir, n, conns, warmup,
                                                   repeats, log)
        except Exception as e:
            entry["callgrind_error"] = f"{type(e).__name__}: {e}"
            log(f"instructions {subject.name}: callgrind FAILED: {e}")
        if perf_ok:
            assert perf is not None
            try:
                entry["perf"] = measure_perf(subject, perf, n, conns, warmup, repeats, log)
            except Exception as e:
                entry["perf_error"] = f"{type(e).__name__}: {e}"
        servers[subject.name] = entry
    ratio: dict[str, float] = {}
    if "gate" in servers and "bare" in servers:
        g, b = servers["gate"], servers["bare"]
        with contextlib.suppress(KeyError, TypeError, ZeroDivisionError):
            ratio["callgrind"] = (g["callgrind"]["ir_per_request"]
                                  / b["callgrind"]["ir_per_request"])
        for key in ("instructions_user_per_request", "instructions_all_per_request"):
            with contextlib.suppress(KeyError, TypeError, ZeroDivisionError):
                ratio[f"perf_{key}"] = g["perf"][key] / b["perf"][key]
    return {"requests": n, "warmup": warmup, "connections": conns, "repeats": repeats,
            "perf": "used" if perf_ok else f"not used: {perf_why}",
            "servers": servers, "gate_over_bare": ratio}


def markdown(inst: dict[str, Any]) -> list[str]:
    """The Markdown section of a result's "instructions"."""
    lines = ["## Instructions per request", "",
             f"{inst['requests']:,} small GETs per measurement on {inst['connections']} "
             f"keep-alive connections after {inst['warmup']:,} warm-up requests, "
             f"{inst['repeats']} measurements per server; user-space instructions "
             "(callgrind Ir) from zeroed counters to a dump, divided by the requests. "
             "The same on any machine of the same software versions, whatever its load. "
             f"perf stat: {inst['perf']}.", "",
             "| server | instructions / request (callgrind) | runs | spread |",
             "|---|---|---|---|"]
    for name, entry in inst["servers"].items():
        cg = entry.get("callgrind")
        if cg is None:
            lines.append(f"| {name} | failed: {entry.get('callgrind_error', '?')} | | |")
            continue
        runs = ", ".join(f"{x:,.0f}" for x in cg["ir_per_request_runs"])
        lines.append(f"| {name} | {cg['ir_per_request']:,.0f} | {runs} | "
                     f"{cg['spread_pct']:.2f}% |")
    perf_rows = [(n, e["perf"]) for n, e in inst["servers"].items() if "perf" in e]
    if perf_rows:
        lines += ["", "| server | perf: user instructions / request | "
                  "user + kernel / request |", "|---|---|---|"]
        for name, p in perf_rows:
            u, a = p.get("instructions_user_per_request"), p.get("instructions_all_per_request")
            lines.append(f"| {name} | {u:,.0f} | {a:,.0f} |" if u and a else
                         f"| {name} | {u} | {a} |")
    if inst["gate_over_bare"]:
        lines += ["", "gate / bare: " + ", ".join(
            f"{k} {v:.2f}x" for k, v in inst["gate_over_bare"].items())]
    return lines
