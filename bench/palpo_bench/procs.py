"""The processes the benchmark starts: launching (pinned), readiness, stopping,
and their CPU seconds and RSS read from /proc over the whole process tree."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from palpo_bench.common import CLK_TCK, HOST

# ---------------------------------------------------------------------------
# Processes we start: their process tree, CPU seconds and RSS from /proc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from #3 (state) on


def children_of(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            kids += [int(x) for x in task.read_text().split()]
    return kids


@dataclasses.dataclass
class Service:
    """A process this runner started (and its descendants)."""

    name: str
    popen: subprocess.Popen[bytes]
    workdir: Path
    ports: dict[str, int]
    seen: set[int] = dataclasses.field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            if _stat_fields(pid) is None:
                continue
            out.append(pid)
            todo += children_of(pid)
        self.seen.update(out)
        return out

    def cpu_seconds(self) -> float:
        """utime + stime of the whole tree (fields 14 and 15 of /proc/PID/stat)."""
        return sum(self.cpu_times())

    def cpu_times(self) -> tuple[float, float]:
        """(utime, stime) of the whole tree: user space and kernel, in seconds."""
        user = system = 0
        for pid in self.pids():
            f = _stat_fields(pid)
            if f is not None:
                user += int(f[11])
                system += int(f[12])
        return user / CLK_TCK, system / CLK_TCK

    def rss_kib(self) -> int:
        """VmRSS summed over the tree (nginx: master + workers)."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total

    def pss_kib(self) -> int:
        """Pss summed over the tree: shared pages split between their sharers, so a
        forked master and worker are not counted twice (0 where unreadable)."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        return total

    def problems(self) -> list[str]:
        """Problem lines in its logs: nginx [alert]/[crit]/[emerg]/[error], Python
        WARNING / ERROR / CRITICAL / Traceback."""
        pattern = re.compile(r"\[(alert|crit|emerg|error)\]|\b(WARNING|ERROR|CRITICAL)\b"
                             r"|^Traceback")
        hits = []
        for name in ("stderr.log", "error.log"):
            with contextlib.suppress(OSError):
                text = (self.workdir / name).read_text(errors="replace")
                hits += [ln for ln in text.splitlines() if pattern.search(ln)]
        return hits

    def stop(self, timeout: float = 15.0) -> None:
        tree = set(self.pids()) | self.seen
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        # Children (nginx workers) left behind by a killed parent: ours, by PID.
        for pid in tree - {self.pid}:
            if _stat_fields(pid) is not None:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


STARTED: list[Service] = []


def pin(cpu: int | str | None) -> list[str]:
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


def launch(name: str, cmd: list[str], workdir: Path, ports: dict[str, int],
           env: dict[str, str] | None = None) -> Service:
    workdir.mkdir(parents=True, exist_ok=True)
    out = open(workdir / "stdout.log", "wb")
    err = open(workdir / "stderr.log", "wb")
    try:
        popen = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                 env=env, cwd=workdir)
    finally:
        out.close()
        err.close()
    svc = Service(name, popen, workdir, ports)
    STARTED.append(svc)
    return svc


def wait_ready(svc: Service, ready: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if svc.popen.poll() is not None or time.monotonic() > deadline:
            logs = "".join((svc.workdir / n).read_text(errors="replace")[-3000:]
                           for n in ("stderr.log", "error.log") if (svc.workdir / n).exists())
            svc.stop()
            raise RuntimeError(f"{svc.name} did not start (exit {svc.popen.poll()}):\n{logs}")
        time.sleep(0.02)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def log_says(path: Path, text: str) -> Callable[[], bool]:
    return lambda: path.exists() and text in path.read_text(errors="replace")


def stop_service(svc: Service, flags: list[str] | None = None) -> None:
    svc.stop()
    with contextlib.suppress(ValueError):
        STARTED.remove(svc)
    problems = svc.problems()
    if problems and flags is not None:
        flags.append(f"{svc.name} ({svc.workdir.name}) logged {len(problems)} problem line(s), "
                     f"first: {problems[0].strip()[:200]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])
