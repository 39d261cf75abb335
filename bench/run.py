"""palpo_gate against nginx, its own floor (bare aiohttp) and no proxy at all, in one command.

    python bench/run.py            # full run (~12-15 min): 5 rounds, 8,000 long-polls
    python bench/run.py --quick    # < 3 min: 3 rounds of 3 s, 1,000 long-polls
    python bench/run.py --smoke    # < 30 s: 1 round of 1 s, 50 long-polls (CI)
    python bench/run.py --rounds 0 --instructions 2000   # instructions per request only

What it does, in order:

1. makes sure nginx, wrk, openssl and taskset exist (apt-get installs them if
   not, unless --no-install) and that matplotlib imports (pip installs
   bench/requirements.txt if not);
2. in a temp dir: a self-signed certificate (openssl req), a 16 MiB media
   file, and two upstreams pinned to CPU 0: nginx serving a ~240-byte JSON
   /versions answer and the media file (bench/nginx_upstream.conf.tmpl), and
   bench/slow_upstream.py for held /sync long-polls and uploads;
3. rounds of the arms in a fixed interleaved order (direct, nginx, bare, gate,
   direct, ...); ``bare`` is bench/bare_server.py, aiohttp's web.Server answering
   from memory (small GETs and idle RSS only). A proxy arm runs its proxy
   pinned to CPU 1 (taskset), everything else stays on CPU 0, so the figures
   are per proxy core. The
   proxy is started once against the fast upstream (small GET, TLS small GET,
   download) and once against the slow one (idle RSS, long-polls, upload);
4. with --instructions N: the bare server and the gate under callgrind, N small
   GETs each (bench/instructions.py);
5. medians over rounds, per-round ratios to nginx and gate / bare, the targets
   table, and bench/results/<name>.json, .md and .png.

CPU per request is the robust figure on a shared machine: utime+stime of the
proxy's processes (from /proc/PID/stat, master and workers) over a wrk run,
divided by the requests wrk completed; req/s moves with whatever else the
machine runs, CPU seconds per request hardly do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
ARMS = ("direct", "nginx", "bare", "gate")
HOST = "127.0.0.1"
MiB = 1024 * 1024
GiB = 1024 * MiB
CLK_TCK = os.sysconf("SC_CLK_TCK")

VERSIONS_PATH = "/_matrix/client/versions"
MEDIA_PATH = "/_matrix/media/v3/download/bench/file16m"
UPLOAD_PATH = "/_matrix/media/v3/upload"
SYNC_PATH = "/_matrix/client/v3/sync"
MEDIA_SIZE = 16 * MiB
UPLOAD_SIZE = 20 * MiB
# Palpo-like /versions answer, ~240 bytes.
VERSIONS_JSON = json.dumps({
    "versions": ["r0.5.0", "r0.6.0", "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6",
                 "v1.7", "v1.8", "v1.9", "v1.10", "v1.11"],
    "unstable_features": {"org.matrix.msc2716": False, "org.matrix.msc3916.stable": True,
                          "org.matrix.simplified_msc3575": True},
}, separators=(",", ":"))

# ---------------------------------------------------------------------------
# Modes and figures (data, not branches)


@dataclasses.dataclass(frozen=True)
class Mode:
    rounds: int
    warmup_s: int      # wrk warm-up on the small GET before a proxy's measurements
    get_s: int         # small GET and TLS small GET, each
    transfer_s: int    # 16 MiB download and 20 MiB upload, each
    longpolls: int     # long-polls held at once
    hold_s: float      # how long the slow upstream holds each one


MODES = {
    "smoke": Mode(rounds=1, warmup_s=0, get_s=1, transfer_s=1, longpolls=50, hold_s=1.0),
    "quick": Mode(rounds=3, warmup_s=1, get_s=3, transfer_s=2, longpolls=1000, hold_s=3.0),
    "full": Mode(rounds=5, warmup_s=2, get_s=10, transfer_s=5, longpolls=8000, hold_s=10.0),
}


@dataclasses.dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    better: str            # "higher" | "lower"
    proxy_only: bool = False  # measured on a proxy's processes: none for `direct`


FIGURES = (
    Figure("get_rps", "small GET throughput (64 conns)", "req/s", "higher"),
    Figure("get_p50_ms", "small GET p50 latency", "ms", "lower"),
    Figure("get_p99_ms", "small GET p99 latency", "ms", "lower"),
    Figure("get_cpu_us_per_req", "small GET proxy CPU per request", "µs", "lower", True),
    Figure("get_req_per_cpu_s", "small GET requests per proxy CPU-second", "req/CPU-s",
           "higher", True),
    Figure("tls_rps", "TLS small GET throughput (64 conns)", "req/s", "higher"),
    Figure("tls_p50_ms", "TLS small GET p50 latency", "ms", "lower"),
    Figure("tls_p99_ms", "TLS small GET p99 latency", "ms", "lower"),
    Figure("tls_cpu_us_per_req", "TLS small GET proxy CPU per request", "µs", "lower", True),
    Figure("tls_req_per_cpu_s", "TLS small GET requests per proxy CPU-second", "req/CPU-s",
           "higher", True),
    Figure("download_mibps", "16 MiB download (4 conns)", "MiB/s", "higher"),
    Figure("download_cpu_s_per_gib", "download proxy CPU per GiB", "CPU-s/GiB", "lower", True),
    Figure("upload_mibps", "20 MiB upload (4 conns)", "MiB/s", "higher"),
    Figure("upload_cpu_s_per_gib", "upload proxy CPU per GiB", "CPU-s/GiB", "lower", True),
    Figure("longpoll_completed", "held long-polls answered 200", "count", "higher"),
    Figure("longpoll_peak_held", "long-polls held at once (peak)", "count", "higher"),
    Figure("idle_rss_mib", "idle RSS", "MiB", "lower", True),
    Figure("idle_pss_mib", "idle PSS (shared pages split)", "MiB", "lower", True),
    Figure("held_rss_mib", "RSS with the long-polls held", "MiB", "lower", True),
    Figure("rss_kib_per_held", "RSS growth per held long-poll", "KiB", "lower", True),
)
FIGURE_BY_KEY = {f.key: f for f in FIGURES}


@dataclasses.dataclass(frozen=True)
class Target:
    key: str
    kind: str          # "ratio" (gate/nginx, median of per-round ratios) | "bare" (gate/bare,
                       # the same way) | "abs" | "all"
    op: str            # ">=" | "<="
    bound: float
    text: str


TARGETS = (
    Target("get_req_per_cpu_s", "ratio", ">=", 0.25,
           "small GET: req per CPU-second ≥ 0.25x nginx"),
    Target("get_p99_ms", "ratio", "<=", 5.0, "small GET: p99 latency ≤ 5x nginx"),
    Target("get_cpu_us_per_req", "bare", "<=", 1.5,
           "small GET: CPU per request ≤ 1.5x bare aiohttp"),
    Target("get_p99_ms", "bare", "<=", 2.0, "small GET: p99 latency ≤ 2x bare aiohttp"),
    Target("tls_req_per_cpu_s", "ratio", ">=", 0.25,
           "TLS small GET: req per CPU-second ≥ 0.25x nginx"),
    Target("download_mibps", "ratio", ">=", 1.0, "16 MiB download MiB/s ≥ 1.0x nginx"),
    Target("upload_mibps", "ratio", ">=", 1.0, "20 MiB upload MiB/s ≥ 1.0x nginx"),
    Target("longpoll_completed", "all", ">=", 1.0, "every held long-poll completes with 200"),
    Target("rss_kib_per_held", "abs", "<=", 12.0, "RSS growth ≤ 12 KiB per held long-poll"),
    Target("idle_rss_mib", "abs", "<=", 45.0, "idle RSS ≤ 45 MiB"),
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Tools, limits, machine


def find_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


APT_PACKAGES = {"nginx": "nginx", "wrk": "wrk", "openssl": "openssl", "taskset": "util-linux",
                "valgrind": "valgrind", "perf": "linux-perf"}
#: Needed by every run; valgrind only with --instructions; perf is optional.
ALWAYS = ("nginx", "wrk", "openssl", "taskset")


def ensure_tools(install: bool, instructions: bool = False) -> dict[str, str]:
    """The system tools by name → path; apt-get / pip install what is missing."""
    wanted = [*ALWAYS, "valgrind"] if instructions else list(ALWAYS)
    missing = [t for t in wanted if find_tool(t) is None]
    if instructions and find_tool("perf") is None and install and os.geteuid() == 0:
        # perf counts instructions where the machine has counters; without it
        # the callgrind figure stands alone, so a failed install is no error.
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            log("apt-get installing linux-perf")
            subprocess.run(["apt-get", "install", "-y", "-q", "linux-perf"], check=True,
                           capture_output=True, env={**os.environ,
                                                     "DEBIAN_FRONTEND": "noninteractive"})
    if missing:
        if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
            sys.exit(f"bench: missing {', '.join(missing)}; install the Debian packages "
                     f"{' '.join(sorted({APT_PACKAGES[t] for t in missing}))} "
                     "(bench/setup.sh does it)")
        log(f"apt-get installing {missing}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q",
                        *sorted({APT_PACKAGES[t] for t in missing})], check=True, env=env)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if not install:
            sys.exit("bench: matplotlib missing: pip install -r bench/requirements.txt")
        log("pip installing bench/requirements.txt")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r",
                        str(BENCH_DIR / "requirements.txt")], check=True)
    tools = {t: find_tool(t) for t in APT_PACKAGES}
    still = [t for t in wanted if tools[t] is None]
    if still:
        sys.exit(f"bench: still missing after install: {still}")
    return tools  # type: ignore[return-value]


def raise_fd_limit(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE for this process and so every child it starts."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for target in ((want, max(want, hard)), (min(want, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, target)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine_info(tools: dict[str, str]) -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for mod in ("aiohttp", "uvloop", "httptools"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "os": first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "nginx": first_line([tools["nginx"], "-v"]),
        "wrk": first_line([tools["wrk"], "-v"]),
        "openssl": first_line([tools["openssl"], "version"]),
        "python_packages": versions,
        "loadavg_start": os.getloadavg(),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


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
        ticks = 0
        for pid in self.pids():
            f = _stat_fields(pid)
            if f is not None:
                ticks += int(f[11]) + int(f[12])
        return ticks / CLK_TCK

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


def pin(cpu: int | None) -> list[str]:
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


# ---------------------------------------------------------------------------
# The temp dir: certificate, media file, configs, and the services


@dataclasses.dataclass
class Ctx:
    args: argparse.Namespace
    mode: Mode
    tools: dict[str, str]
    tmp: Path
    cert: Path
    key: Path
    upload_lua: Path
    cpu_load: int | None     # wrk, upstreams, this runner
    cpu_proxy: int | None    # the proxy under test
    fd_limit: int
    upstream: Service | None = None
    slow: Service | None = None
    flags: list[str] = dataclasses.field(default_factory=list)
    starts: int = 0


def make_cert(tmp: Path, openssl: str) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def make_media(tmp: Path) -> Path:
    media = tmp / "media"
    media.mkdir()
    block = os.urandom(MiB)
    with open(media / "file16m", "wb") as f:
        for _ in range(MEDIA_SIZE // MiB):
            f.write(block)
    return media


def make_upload_lua(tmp: Path) -> Path:
    path = tmp / "upload.lua"
    path.write_text(f'wrk.method = "POST"\n'
                    f'wrk.body = string.rep("x", {UPLOAD_SIZE})\n'
                    f'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    return path


def render(template: str, **values: Any) -> str:
    text = (BENCH_DIR / template).read_text()
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", str(value))
    left = re.findall(r"\{\{\w+\}\}", text)
    if left:
        raise ValueError(f"{template}: unfilled placeholders {left}")
    return text


def start_nginx(ctx: Ctx, name: str, template: str, cpu: int | None, **values: Any) -> Service:
    prefix = ctx.tmp / f"{name}-{ctx.starts}"
    ctx.starts += 1
    prefix.mkdir()
    ports = {"plain": free_port(), "tls": free_port()}
    conf = prefix / "nginx.conf"
    conf.write_text(render(template, PREFIX=prefix, PORT=ports["plain"], TLS_PORT=ports["tls"],
                           CERT=ctx.cert, KEY=ctx.key, WORKER_RLIMIT=ctx.fd_limit,
                           USER="user root;" if os.geteuid() == 0 else "", **values))
    svc = launch(name, [*pin(cpu), ctx.tools["nginx"], "-p", str(prefix), "-e",
                        str(prefix / "error.log"), "-c", str(conf)], prefix, ports)
    wait_ready(svc, lambda: all(port_open(p) for p in ports.values()) and len(svc.pids()) > 1)
    return svc


def start_upstreams(ctx: Ctx) -> None:
    media = make_media(ctx.tmp)
    ctx.upstream = start_nginx(ctx, "upstream-nginx", "nginx_upstream.conf.tmpl", ctx.cpu_load,
                               MEDIA_DIR=media, VERSIONS_JSON=VERSIONS_JSON,
                               WORKER_CONNECTIONS=min(4096, ctx.fd_limit - 64))
    port = free_port()
    workdir = ctx.tmp / "slow-upstream"
    ctx.slow = launch("slow-upstream",
                      [*pin(ctx.cpu_load), sys.executable, str(BENCH_DIR / "slow_upstream.py"),
                       "--port", str(port), "--hold", str(ctx.mode.hold_s)],
                      workdir, {"plain": port})
    wait_ready(ctx.slow, log_says(workdir / "stderr.log", "slow-upstream ready"))


def gate_toml(ctx: Ctx, upstream_port: int, ports: dict[str, int]) -> str:
    return f"""# palpo_gate under benchmark (rendered by bench/run.py)
[server]
workers = {ctx.args.gate_workers}
drain_timeout = "1s"

[upstream]
url = "http://{HOST}:{upstream_port}"
pool_size = 64

[[listeners]]
name = "plain"
bind = "{HOST}:{ports['plain']}"
role = "client"

[[listeners]]
name = "tls"
bind = "{HOST}:{ports['tls']}"
role = "client"
[listeners.tls]
cert = "{ctx.cert}"
key = "{ctx.key}"

[limits]
max_body_size = "50M"

[log]
level = "info"
access = "off"
"""


def start_gate(ctx: Ctx, upstream_port: int, prefix: list[str] | None = None,
               ready_s: float = 30.0) -> Service:
    """The gate (its command after *prefix*, e.g. valgrind's, if given)."""
    workdir = ctx.tmp / f"gate-{ctx.starts}"
    ctx.starts += 1
    workdir.mkdir()
    ports = {"plain": free_port(), "tls": free_port()}
    conf = workdir / "gate.toml"
    conf.write_text(gate_toml(ctx, upstream_port, ports))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_DIR), os.environ.get("PYTHONPATH", "")) if p)}
    if prefix:
        env["PYTHONHASHSEED"] = "0"  # the same dict layouts, run after run
    svc = launch("gate", [*pin(ctx.cpu_proxy), *(prefix or []), sys.executable, "-m",
                          "palpo_gate", "--config", str(conf)], workdir, ports, env=env)
    wait_ready(svc, log_says(workdir / "stderr.log", "palpo-gate ready"), ready_s)
    return svc


def start_bare(ctx: Ctx, prefix: list[str] | None = None, ready_s: float = 30.0) -> Service:
    """aiohttp's web.Server alone (bench/bare_server.py), pinned as the gate."""
    workdir = ctx.tmp / f"bare-{ctx.starts}"
    ctx.starts += 1
    workdir.mkdir()
    ports = {"plain": free_port(), "tls": free_port()}
    env = {**os.environ, "PYTHONHASHSEED": "0"} if prefix else None
    svc = launch("bare", [*pin(ctx.cpu_proxy), *(prefix or []), sys.executable,
                          str(BENCH_DIR / "bare_server.py"),
                          "--port", str(ports["plain"]), "--tls-port", str(ports["tls"]),
                          "--cert", str(ctx.cert), "--key", str(ctx.key),
                          "--body-file", str(versions_body(ctx.tmp))], workdir, ports, env=env)
    wait_ready(svc, log_says(workdir / "stderr.log", "bare-server ready"), ready_s)
    return svc


def versions_body(tmp: Path) -> Path:
    """The fast upstream's /versions body as a file, for the bare server."""
    path = tmp / "versions.json"
    if not path.exists():
        path.write_text(VERSIONS_JSON)
    return path


def nginx_connections(ctx: Ctx) -> int:
    """worker_connections for the proxy nginx: two sockets per held long-poll plus
    room for the rest, as an operator would size it (each slot costs ~0.4 KiB of
    RSS up front, so it is not simply set to the maximum)."""
    # 2 per held long-poll (client + upstream), plus what earlier phases
    # left open (wrk keep-alives, the upstream keepalive cache): with only
    # +512, nginx logged "worker_connections are not enough, reusing
    # connections" and dropped ~250 of 8,000 long-polls.
    return min(max(1024, 2 * ctx.mode.longpolls + 2048), ctx.fd_limit - 64)


@contextlib.contextmanager
def running_proxy(ctx: Ctx, arm: str, upstream: Service) -> Iterator[Service]:
    port = upstream.ports["plain"]
    if arm == "nginx":
        svc = start_nginx(ctx, "proxy-nginx", "nginx_proxy.conf.tmpl", ctx.cpu_proxy,
                          UPSTREAM_PORT=port, WORKER_CONNECTIONS=nginx_connections(ctx))
    elif arm == "bare":
        svc = start_bare(ctx)
    else:
        svc = start_gate(ctx, port)
    try:
        yield svc
    finally:
        stop_service(svc, ctx.flags)


# ---------------------------------------------------------------------------
# wrk


_TIME_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_SIZE = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}


def _ms(value: str, unit: str) -> float:
    return float(value) * _TIME_MS[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    """wrk's text report → numbers (latencies in ms, sizes in bytes).

    wrk prints sizes with binary prefixes ("16.00MB" = 16 MiB) and times with
    us / ms / s / m units; the latency distribution only with --latency.
    """
    out: dict[str, Any] = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h), ([\d.]+)([KMGTP]?)B read", text)
    if not m:
        raise ValueError(f"no 'N requests in' line in wrk output:\n{text}")
    out["requests"] = int(m[1])
    out["duration_s"] = _ms(m[2], m[3]) / 1e3
    out["bytes_read"] = float(m[4]) * _SIZE[m[5]]
    if m2 := re.search(r"Requests/sec:\s+([\d.]+)", text):
        out["rps"] = float(m2[1])
    if m2 := re.search(r"Transfer/sec:\s+([\d.]+)([KMGTP]?)B", text):
        out["transfer_bps"] = float(m2[1]) * _SIZE[m2[2]]
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$",
                                       text, re.M):
        out[f"p{pct}_ms"] = _ms(value, unit)
    m2 = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(x) for x in m2.groups()) if m2 else 0
    m2 = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = int(m2[1]) if m2 else 0
    return out


def run_wrk(ctx: Ctx, url: str, seconds: int, conns: int, *, latency: bool = False,
            timeout_s: int = 10, script: Path | None = None) -> dict[str, Any]:
    cmd = [*pin(ctx.cpu_load), ctx.tools["wrk"], "-t1", f"-c{conns}", f"-d{seconds}s",
           f"--timeout={timeout_s}s"]
    if latency:
        cmd.append("--latency")
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(url)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exit {proc.returncode}: {proc.stderr.strip()}")
    return parse_wrk(proc.stdout)


def wrk_with_cpu(ctx: Ctx, proxy: Service | None, url: str, seconds: int, conns: int,
                 **kw: Any) -> tuple[dict[str, Any], float | None]:
    """One wrk run and the proxy's CPU seconds over it (None without a proxy)."""
    before = proxy.cpu_seconds() if proxy else None
    res = run_wrk(ctx, url, seconds, conns, **kw)
    cpu = proxy.cpu_seconds() - before if proxy and before is not None else None
    return res, cpu


def check_wrk(ctx: Ctx, label: str, res: dict[str, Any]) -> None:
    if res["requests"] == 0:
        ctx.flags.append(f"{label}: wrk completed no request")
    if res["non_2xx"] or res["socket_errors"]:
        ctx.flags.append(f"{label}: {res['non_2xx']} non-2xx responses, "
                         f"{res['socket_errors']} socket errors")


def _per(a: float | None, b: float) -> float | None:
    return a / b if a is not None and b else None


# ---------------------------------------------------------------------------
# The measurements: one function per figure group


def url(port: int, path: str, tls: bool = False) -> str:
    return f"{'https' if tls else 'http'}://{HOST}:{port}{path}"


def measure_small_get(ctx: Ctx, proxy: Service | None, port: int, tls: bool,
                      label: str) -> dict[str, Any]:
    """wrk -t1 -c64 --latency on the ~240-byte /versions answer: req/s, p50, p99,
    and the proxy's CPU per request."""
    res, cpu = wrk_with_cpu(ctx, proxy, url(port, VERSIONS_PATH, tls), ctx.mode.get_s, 64,
                            latency=True)
    check_wrk(ctx, label, res)
    prefix = "tls" if tls else "get"
    cpu_per_req = _per(cpu, res["requests"])
    return {
        f"{prefix}_rps": res["rps"],
        f"{prefix}_p50_ms": res.get("p50_ms"),
        f"{prefix}_p99_ms": res.get("p99_ms"),
        f"{prefix}_cpu_us_per_req": cpu_per_req * 1e6 if cpu_per_req is not None else None,
        f"{prefix}_req_per_cpu_s": _per(res["requests"], cpu) if cpu else None,
        f"_{prefix}_requests": res["requests"],
        f"_{prefix}_cpu_s": cpu,
        f"_{prefix}_errors": res["non_2xx"] + res["socket_errors"],
    }


def measure_download(ctx: Ctx, proxy: Service | None, port: int, label: str) -> dict[str, Any]:
    """wrk -c4 on the 16 MiB media file: MiB/s from wrk's Transfer/sec (bytes read,
    partial responses included) and proxy CPU per GiB moved."""
    res, cpu = wrk_with_cpu(ctx, proxy, url(port, MEDIA_PATH), ctx.mode.transfer_s, 4,
                            timeout_s=30)
    check_wrk(ctx, label, res)
    return {
        "download_mibps": res["transfer_bps"] / MiB,
        "download_cpu_s_per_gib": _per(cpu, res["bytes_read"] / GiB),
        "_download_responses": res["requests"],
        "_download_errors": res["non_2xx"] + res["socket_errors"],
    }


def measure_upload(ctx: Ctx, proxy: Service | None, port: int, label: str) -> dict[str, Any]:
    """wrk -c4 POSTing a 20 MiB body to the slow upstream (answered after the whole
    body): MiB/s = completed uploads x 20 MiB / wrk's duration."""
    assert ctx.slow is not None
    before = slow_stats(ctx)["uploads_completed"]
    res, cpu = wrk_with_cpu(ctx, proxy, url(port, UPLOAD_PATH), ctx.mode.transfer_s, 4,
                            timeout_s=60, script=ctx.upload_lua)
    check_wrk(ctx, label, res)
    arrived = slow_stats(ctx)["uploads_completed"] - before
    if arrived < res["requests"]:
        ctx.flags.append(f"{label}: wrk counted {res['requests']} uploads, "
                         f"upstream saw {arrived} complete")
    moved = res["requests"] * UPLOAD_SIZE
    return {
        "upload_mibps": moved / MiB / res["duration_s"],
        "upload_cpu_s_per_gib": _per(cpu, moved / GiB),
        "_upload_requests": res["requests"],
        "_upload_errors": res["non_2xx"] + res["socket_errors"],
    }


# -- asyncio clients: long-polls, idle warm-up, the upstream's stats ---------

def _request(path: str, port: int) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Authorization: Bearer bench\r\n\r\n").encode()


async def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """One GET on a fresh connection: (status, body)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(_request(path, port))
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            m = re.search(rb"(?im)^content-length:[ \t]*(\d+)", head)
            body = await reader.readexactly(int(m[1])) if m else b""
            return status, body
        finally:
            writer.close()


def slow_stats(ctx: Ctx) -> dict[str, int]:
    assert ctx.slow is not None
    return run_async(_slow_stats(ctx.slow.ports["plain"]))


async def _slow_stats(port: int) -> dict[str, int]:
    status, body = await http_get(port, "/_bench/stats")
    if status != 200:
        raise RuntimeError(f"slow upstream stats: HTTP {status}")
    return json.loads(body)


def run_async(coro: Any) -> Any:
    import uvloop

    return uvloop.run(coro)


async def _warm_up(port: int, count: int) -> None:
    for i in range(count):
        status, _ = await http_get(port, f"{SYNC_PATH}?timeout=0&since=w{i}")
        if status != 200:
            raise RuntimeError(f"warm-up /sync?timeout=0 through the proxy: HTTP {status}")


def measure_idle_rss(proxy: Service, port: int) -> dict[str, Any]:
    """RSS of a proxy that has started and answered a few requests, then idled."""
    run_async(_warm_up(port, 20))
    time.sleep(0.3)
    rss = proxy.rss_kib()
    return {"idle_rss_mib": rss / 1024, "idle_pss_mib": proxy.pss_kib() / 1024,
            "_idle_rss_kib": rss}


async def _one_longpoll(port: int, i: int, ramp: asyncio.Semaphore) -> str:
    try:
        async with ramp:  # bounds connects in flight, not polls held
            reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(_request(f"{SYNC_PATH}?timeout=30000&since=s{i}", port))
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1].decode()
            m = re.search(rb"(?im)^content-length:[ \t]*(\d+)", head)
            await reader.readexactly(int(m[1]) if m else 0)
            return status
        finally:
            writer.close()
    except Exception as e:  # counted, not raised: every outcome is a figure
        return type(e).__name__


async def _watch_held(ctx: Ctx, proxy: Service | None, baseline: int, done: asyncio.Event,
                      result: dict[str, Any]) -> None:
    """Poll the upstream's held count; sample the proxy's RSS at the peak."""
    assert ctx.slow is not None
    peak, rss, peak_at, t0 = 0, None, None, time.monotonic()
    while not done.is_set():
        with contextlib.suppress(Exception):
            held = (await _slow_stats(ctx.slow.ports["plain"]))["held"] - baseline
            if held >= peak and held > 0:
                if proxy is not None:
                    now = proxy.rss_kib()
                    rss = now if held > peak or rss is None else max(rss, now)
                if held > peak:
                    peak_at = round(time.monotonic() - t0, 2)
                peak = held
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), 0.1)
    result["peak"], result["rss_kib"], result["peak_at_s"] = peak, rss, peak_at


async def _longpolls(ctx: Ctx, proxy: Service | None, port: int, n: int,
                     baseline: int) -> dict[str, Any]:
    ramp = asyncio.Semaphore(64)
    done, watch = asyncio.Event(), {}
    watcher = asyncio.create_task(_watch_held(ctx, proxy, baseline, done, watch))
    t0 = time.monotonic()
    tasks = [asyncio.create_task(_one_longpoll(port, i, ramp)) for i in range(n)]
    deadline = ctx.mode.hold_s + 60 + n / 100
    finished, pending = await asyncio.wait(tasks, timeout=deadline)
    for t in pending:
        t.cancel()
    elapsed = time.monotonic() - t0
    done.set()
    await watcher
    outcomes: dict[str, int] = {}
    for t in finished:
        outcomes[t.result()] = outcomes.get(t.result(), 0) + 1
    if pending:
        outcomes["unfinished"] = len(pending)
    return {"outcomes": outcomes, "elapsed_s": elapsed, **watch}


def listen_overflows() -> int:
    """TcpExt ListenOverflows (machine-wide): connections dropped because a
    listener's accept queue was full; the client retries the SYN after 1 s, 3 s..."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        lines = Path("/proc/net/netstat").read_text().splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            if names.startswith("TcpExt:"):
                return int(values.split()[names.split().index("ListenOverflows")])
    return 0


def measure_longpolls(ctx: Ctx, proxy: Service | None, port: int, idle_kib: int | None,
                      label: str) -> dict[str, Any]:
    """N concurrent GET /sync held by the upstream: how many come back 200, how many
    were held at once, and the proxy's RSS at that moment."""
    n = ctx.mode.longpolls
    baseline = slow_stats(ctx)["held"]
    overflows = listen_overflows()
    res = run_async(_longpolls(ctx, proxy, port, n, baseline))
    overflows = listen_overflows() - overflows
    ok = res["outcomes"].get("200", 0)
    if ok != n:
        ctx.flags.append(f"{label}: {ok}/{n} long-polls answered 200 ({res['outcomes']})")
    if res["peak"] < n:
        ctx.flags.append(f"{label}: only {res['peak']}/{n} long-polls were held at once")
    if overflows:
        ctx.flags.append(f"{label}: {overflows} connections overflowed a listen backlog "
                         "(TcpExt ListenOverflows; SYN retried after 1 s+)")
    out: dict[str, Any] = {
        "longpoll_completed": ok,
        "longpoll_peak_held": res["peak"],
        "_longpoll_outcomes": res["outcomes"],
        "_longpoll_elapsed_s": round(res["elapsed_s"], 2),
        "_longpoll_peak_at_s": res["peak_at_s"],
        "_listen_overflows": overflows,
        "held_rss_mib": None,
        "rss_kib_per_held": None,
    }
    if proxy is not None and res["rss_kib"] is not None and idle_kib is not None:
        out["held_rss_mib"] = res["rss_kib"] / 1024
        out["rss_kib_per_held"] = (res["rss_kib"] - idle_kib) / max(res["peak"], 1)
    return out


# ---------------------------------------------------------------------------
# One arm in one round


def guarded(ctx: Ctx, label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measurement; a failure becomes a flag, not the end of a long run."""
    try:
        return fn()
    except Exception as e:
        ctx.flags.append(f"{label}: failed: {type(e).__name__}: {e}")
        log(f"{label}: FAILED: {e}")
        return {}


def fast_phase(ctx: Ctx, arm: str, proxy: Service | None, ports: dict[str, int],
               rnd: int, download: bool = True) -> dict[str, Any]:
    tag = f"round {rnd} {arm}"
    if ctx.mode.warmup_s:
        guarded(ctx, f"{tag} warm-up", lambda: run_wrk(ctx, url(ports["plain"], VERSIONS_PATH),
                                                     ctx.mode.warmup_s, 64))
    res: dict[str, Any] = {}
    res |= guarded(ctx, f"{tag} small GET",
                   lambda: measure_small_get(ctx, proxy, ports["plain"], False, f"{tag} GET"))
    res |= guarded(ctx, f"{tag} TLS small GET",
                   lambda: measure_small_get(ctx, proxy, ports["tls"], True, f"{tag} TLS GET"))
    if download:
        res |= guarded(ctx, f"{tag} download",
                       lambda: measure_download(ctx, proxy, ports["plain"], f"{tag} download"))
    return res


def slow_phase(ctx: Ctx, arm: str, proxy: Service | None, port: int, rnd: int) -> dict[str, Any]:
    tag = f"round {rnd} {arm}"
    res: dict[str, Any] = {}
    if proxy is not None:
        res |= guarded(ctx, f"{tag} idle RSS", lambda: measure_idle_rss(proxy, port))
    idle = res.get("_idle_rss_kib")
    res |= guarded(ctx, f"{tag} long-polls",
                   lambda: measure_longpolls(ctx, proxy, port, idle, f"{tag} long-polls"))
    res |= guarded(ctx, f"{tag} upload",
                   lambda: measure_upload(ctx, proxy, port, f"{tag} upload"))
    return res


def run_arm(ctx: Ctx, arm: str, rnd: int) -> dict[str, Any]:
    assert ctx.upstream is not None and ctx.slow is not None
    if arm == "direct":
        res = fast_phase(ctx, arm, None, ctx.upstream.ports, rnd)
        res |= slow_phase(ctx, arm, None, ctx.slow.ports["plain"], rnd)
        return res
    if arm == "bare":
        # The floor of the gate's stack answers from memory: small GETs and
        # idle RSS; there is nothing to download, upload or hold.
        with running_proxy(ctx, arm, ctx.upstream) as proxy:
            res = fast_phase(ctx, arm, proxy, proxy.ports, rnd, download=False)
        with running_proxy(ctx, arm, ctx.upstream) as proxy:
            res |= guarded(ctx, f"round {rnd} bare idle RSS",
                           lambda: measure_idle_rss(proxy, proxy.ports["plain"]))
        return res
    with running_proxy(ctx, arm, ctx.upstream) as proxy:
        res = fast_phase(ctx, arm, proxy, proxy.ports, rnd)
    with running_proxy(ctx, arm, ctx.slow) as proxy:
        res |= slow_phase(ctx, arm, proxy, proxy.ports["plain"], rnd)
    return res


def describe(res: dict[str, Any]) -> str:
    parts = []
    for key, fmt in (("get_rps", "GET {:,.0f} req/s"), ("get_p99_ms", "p99 {:.2f} ms"),
                     ("get_cpu_us_per_req", "{:.1f} µs/req"), ("tls_rps", "TLS {:,.0f} req/s"),
                     ("download_mibps", "down {:,.0f} MiB/s"), ("upload_mibps", "up {:,.0f} MiB/s"),
                     ("longpoll_completed", "polls {}"), ("idle_rss_mib", "idle {:.1f} MiB"),
                     ("rss_kib_per_held", "{:.1f} KiB/held")):
        if res.get(key) is not None:
            parts.append(fmt.format(res[key]))
    return ", ".join(parts)


# ---------------------------------------------------------------------------
# Summary: medians, ratios to nginx, targets


def medians(rounds: list[dict[str, Any]], arms: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        out[arm] = {}
        for fig in FIGURES:
            vals = [r["arms"][arm].get(fig.key) for r in rounds if arm in r["arms"]]
            vals = [v for v in vals if v is not None]
            out[arm][fig.key] = statistics.median(vals) if vals else None
    return out


def ratios(rounds: list[dict[str, Any]], arms: list[str], meds: dict[str, dict[str, Any]],
           base: str = "nginx", of: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """arm / *base* per round, the median of those, and the ratio of the medians,
    for every arm (or those in *of*)."""
    out: dict[str, dict[str, Any]] = {}
    if base not in arms:
        return out
    for arm in arms:
        if arm == base or (of is not None and arm not in of):
            continue
        out[arm] = {}
        for fig in FIGURES:
            per_round = []
            for r in rounds:
                a, b = r["arms"].get(arm, {}).get(fig.key), r["arms"][base].get(fig.key)
                per_round.append(a / b if a is not None and b else None)
            valid = [x for x in per_round if x is not None]
            a, b = meds[arm][fig.key], meds[base][fig.key]
            out[arm][fig.key] = {
                "per_round": per_round,
                "median_of_rounds": statistics.median(valid) if valid else None,
                "of_medians": a / b if a is not None and b else None,
            }
    return out


def evaluate_targets(rounds: list[dict[str, Any]], meds: dict[str, dict[str, Any]],
                     rats: dict[str, dict[str, Any]], n: int,
                     rats_bare: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        measured: float | None = None
        shown = "n/a"
        if t.kind in ("ratio", "bare"):
            base = "nginx" if t.kind == "ratio" else "bare"
            table = rats if t.kind == "ratio" else (rats_bare or {})
            measured = table.get("gate", {}).get(t.key, {}).get("median_of_rounds")
            if measured is not None:
                shown = f"{measured:.2f}x {base}"
        elif t.kind == "abs":
            measured = meds.get("gate", {}).get(t.key)
            if measured is not None:
                shown = f"{measured:.1f} {FIGURE_BY_KEY[t.key].unit}"
        else:  # all: every round's count equals the number sent
            counts = [r["arms"]["gate"].get(t.key) for r in rounds if "gate" in r["arms"]]
            if counts and None not in counts:
                measured = min(counts) / n
                shown = " / ".join(f"{c}/{n}" for c in counts)
        met = None if measured is None else (
            measured >= t.bound if t.op == ">=" else measured <= t.bound)
        out.append({"target": t.text, "figure": t.key, "kind": t.kind, "op": t.op,
                    "bound": t.bound, "measured": measured, "shown": shown, "met": met})
    return out


# ---------------------------------------------------------------------------
# Output: JSON, Markdown, PNG


def fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if a >= 0.1 else f"{v:.3f}"


def markdown(result: dict[str, Any]) -> str:
    arms, m, s = result["arms"], result["machine"], result["settings"]
    warmup = f" after a {s['warmup_s']} s warm-up" if s["warmup_s"] else ""
    if result["rounds"]:
        what = (f"mode **{result['mode']}** · {s['rounds']} round(s), arms interleaved "
                f"({', '.join(arms)}) · wrk {s['get_s']} s per small-GET figure{warmup}, "
                f"{s['transfer_s']} s per transfer figure · {s['longpolls']:,} long-polls "
                f"held {s['hold_s']:g} s")
    else:
        what = f"instructions per request only ({', '.join(arms)}; no wall-clock rounds)"
    lines = [
        f"# palpo_gate benchmark `{result['name']}`",
        "",
        f"{result['date']} · {what} · pinning: {s['pinning']} · "
        f"gate workers: {s['gate_workers']}",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, kernel {m['kernel']}, {m['os']}; "
        f"Python {m['python']}; {m['nginx']}; {m['wrk']}; {m['openssl']}. "
        f"Load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end "
        "(the machine may be shared: compare CPU per request, not req/s, across runs).",
        "",
    ]
    if result["rounds"]:
        lines += _figures_markdown(result)
    if "instructions" in result:
        import instructions

        lines += ["", *instructions.markdown(result["instructions"])]
    lines += ["", "## How these were measured", ""]
    lines += [f"- {note}" for note in result["notes"]]
    if result["flags"]:
        lines += ["", "## Flags raised during the run", ""]
        lines += [f"- {f}" for f in result["flags"]]
    return "\n".join(lines) + "\n"


def _figures_markdown(result: dict[str, Any]) -> list[str]:
    arms, s = result["arms"], result["settings"]
    lines = [
        "## Targets (gate)",
        "",
        "| target | measured | met? |",
        "|---|---|---|",
    ]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['shown']} | {met} |")
    lines += ["", f"## Figures (median over {s['rounds']} round(s))", ""]
    head = "| figure | unit | " + " | ".join(arms) + " |"
    sep = "|---|---|" + "---|" * len(arms)
    show_ratio = "gate" in result["ratios"]
    to_bare = result.get("ratios_to_bare", {}).get("gate")
    if show_ratio:
        head += " gate / nginx | per round |"
        sep += "---|---|"
    if to_bare:
        head += " gate / bare |"
        sep += "---|"
    lines += [head, sep]
    for fig in FIGURES:
        row = f"| {fig.label} ({fig.better} is better) | {fig.unit} | "
        row += " | ".join(fmt(result["medians"][a][fig.key]) for a in arms) + " |"
        if show_ratio:
            r = result["ratios"]["gate"][fig.key]
            per = ", ".join(fmt(x) for x in r["per_round"])
            row += f" {fmt(r['median_of_rounds'])} | {per} |"
        if to_bare:
            row += f" {fmt(to_bare[fig.key]['median_of_rounds'])} |"
        lines.append(row)
    if to_bare and show_ratio:
        lines += ["", "## The gate against nginx and against its own floor", "",
                  "gate / nginx moves with how busy the machine is (Python slows more than "
                  "nginx under contention); gate / bare compares the gate with aiohttp's "
                  "web.Server alone, on the same loop and parser, pinned the same way, and "
                  "holds across machines. Median of per-round ratios (single rounds in "
                  "brackets).", "",
                  "| figure | gate | bare | nginx | gate / bare | gate / nginx |",
                  "|---|---|---|---|---|---|"]
        med = result["medians"]
        for key in ("get_cpu_us_per_req", "get_p99_ms", "tls_cpu_us_per_req", "tls_p99_ms"):
            fig = FIGURE_BY_KEY[key]
            cells = []
            for r in (to_bare[key], result["ratios"]["gate"][key]):
                per = ", ".join(fmt(x) for x in r["per_round"])
                cells.append(f"{fmt(r['median_of_rounds'])}x ({per})")
            lines.append(f"| {fig.label} ({fig.unit}) | {fmt(med['gate'][key])} | "
                         f"{fmt(med['bare'][key])} | {fmt(med['nginx'][key])} | "
                         f"{cells[0]} | {cells[1]} |")
    return lines


def _bar_color(f: Figure, med: float, target: dict[str, Any] | None) -> str:
    if target is not None and target["met"] is not None:
        return "tab:green" if target["met"] else "tab:red"
    good = med >= 1 if f.better == "higher" else med <= 1
    return "tab:blue" if good else "tab:orange"


def _chart_label(f: Figure, target: dict[str, Any] | None) -> str:
    label = f"{f.label} [{f.better} is better]"
    if target is not None and target["kind"] == "abs":
        label += f"\ntarget {target['op']} {target['bound']:g} {f.unit}: gate {target['shown']}"
    return label


def chart(result: dict[str, Any], path: Path) -> None:
    """Horizontal bars of gate / nginx per figure, drawn from 1.0 on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, NullLocator

    rats = result["ratios"].get("gate")
    # The chart is gate / nginx: the gate / bare targets are in the Markdown.
    targets = {t["figure"]: t for t in result["targets"] if t["kind"] != "bare"}
    figs = [f for f in FIGURES if f.key not in ("longpoll_completed", "longpoll_peak_held")]
    fig_, ax = plt.subplots(figsize=(11, 0.45 * len(figs) + 2.2))
    if not rats:
        ax.text(0.5, 0.5, "no gate and nginx arms: no ratios", ha="center", va="center")
        ax.set_axis_off()
    else:
        ys = list(range(len(figs)))[::-1]
        values = []
        for y, f in zip(ys, figs, strict=True):
            r, t = rats[f.key], targets.get(f.key)
            med = r["median_of_rounds"]
            if med is None or med <= 0:
                ax.text(1.0, y, "  n/a", va="center", fontsize=8)
                continue
            values += [med, *(x for x in r["per_round"] if x)]
            ax.barh(y, med - 1, left=1, color=_bar_color(f, med, t), alpha=0.75, height=0.6)
            pts = [x for x in r["per_round"] if x is not None and x > 0]
            ax.scatter(pts, [y] * len(pts), color="black", s=10, zorder=3)
            rounds = ", ".join(f"{x:.2f}" for x in pts) if len(pts) > 1 else ""
            ax.text(1.01, y, f"{med:.2f}x" + (f"  ({rounds})" if rounds else ""),
                    transform=ax.get_yaxis_transform(), va="center", ha="left", fontsize=8)
            if t is not None and t["kind"] == "ratio":
                values.append(t["bound"])
                ax.plot([t["bound"]] * 2, [y - 0.4, y + 0.4], color="black", lw=2.5, zorder=4)
        ax.set_yticks(ys)
        ax.set_yticklabels([_chart_label(f, targets.get(f.key)) for f in figs], fontsize=8)
        ax.axvline(1.0, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        lo, hi = min([*values, 0.5]) / 1.6, max([*values, 2.0]) * 1.6
        ax.set_xlim(lo, hi)
        ticks = [x for x in (0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50) if lo <= x <= hi]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{x:g}x" for x in ticks])
        ax.set_xlabel("gate / nginx, median of per-round ratios (dots and brackets: single "
                      "rounds; thick tick: target)", fontsize=9)
        ax.legend(handles=[Patch(color="tab:green", alpha=0.75, label="target met"),
                           Patch(color="tab:red", alpha=0.75, label="target missed"),
                           Patch(color="tab:blue", alpha=0.75, label="gate better (no target)"),
                           Patch(color="tab:orange", alpha=0.75, label="gate worse (no target)")],
                  loc="lower right", fontsize=7, framealpha=0.9)
    ax.set_title(f"palpo_gate vs nginx, one core each: {result['name']} "
                 f"({result['mode']}, {result['date'][:10]}, {result['settings']['rounds']} "
                 "round(s))", fontsize=10)
    fig_.tight_layout()
    fig_.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig_)


NOTES = [
    "Arms: `direct` = wrk / the asyncio client straight to the upstreams (no proxy); "
    "`nginx` = nginx 1 worker configured like Palpo's reverse-proxy page "
    "(bench/nginx_proxy.conf.tmpl: upstream {} keepalive 64, HTTP/1.1, Connection \"\", "
    "X-Forwarded-For/Proto, Host $host:$server_port, client_max_body_size 50M, default "
    "proxy buffering); `gate` = `python -m palpo_gate` with `server.workers` as shown, "
    "access log off (nginx: access_log off); `bare` = bench/bare_server.py, aiohttp's "
    "web.Server on uvloop answering the upstream's /versions body from memory (small GETs "
    "and idle RSS only).",
    "gate / bare compares the gate with the floor of its own stack (same interpreter, loop, "
    "parser and pinning, same rounds) and holds across hosts; gate / nginx moves with how "
    "contended the host is, as Python slows more than nginx.",
    "Pinning: the proxy under test (and the bare server) on CPU 1 (taskset -c 1); wrk, both "
    "upstreams and this runner (incl. its asyncio long-poll client) on CPU 0, so every proxy "
    "figure is per core.",
    "Small GET: `wrk -t1 -c64 --latency` on GET /_matrix/client/versions (a fixed ~240-byte "
    "JSON from the upstream nginx); req/s, and p50 / p99 from wrk's latency distribution.",
    "CPU per request: utime+stime of the proxy's processes (/proc/PID/stat; nginx master + "
    "worker, the gate process and any children) before and after the wrk run, divided by the "
    "requests wrk completed; req per CPU-second is its inverse. 10 ms tick resolution.",
    "TLS small GET: the same over HTTPS, both proxies on the same self-signed RSA-2048 "
    "certificate (openssl req); `direct` TLS is wrk over TLS straight to the upstream nginx, "
    "which then terminates TLS itself.",
    "Download: `wrk -t1 -c4` on a 16 MiB file the upstream nginx serves with sendfile; MiB/s "
    "is wrk's Transfer/sec (bytes read, partial responses included).",
    "Upload: `wrk -t1 -c4` with a Lua script POSTing a 20 MiB body to the slow upstream, "
    "which answers after the whole body; MiB/s = completed uploads x 20 MiB / duration "
    "(uploads still in flight at the end are not counted, the same for every arm).",
    "Long-polls: an asyncio client opens N connections (at most 64 connects in flight) and "
    "sends GET /_matrix/client/v3/sync on each; the slow upstream answers each after the "
    "hold. Completed = answered 200. Peak held = the most the upstream held at once.",
    "RSS: VmRSS from /proc/PID/status summed over the proxy's processes. Idle = a fresh "
    "proxy after 20 requests, then 0.3 s idle. Held = sampled while the upstream held the "
    "most long-polls; per held long-poll = (held - idle) / peak held, in KiB.",
    "Ratios: arm / nginx within each round (rounds interleave the arms so that each ratio "
    "compares runs seconds apart), then the median over rounds.",
]


def write_results(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    exts = ("json", "md", "png") if result["rounds"] else ("json", "md")  # no ratios to chart
    paths = {ext: out_dir / f"{result['name']}.{ext}" for ext in exts}
    paths["json"].write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    paths["md"].write_text(markdown(result))
    if "png" in paths:
        chart(result, paths["png"])
    return paths


# ---------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="palpo_gate vs nginx vs direct benchmark")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_const", const="smoke", dest="mode",
                      help="1 round of 1 s runs, 50 long-polls: < 30 s (CI)")
    size.add_argument("--quick", action="store_const", const="quick", dest="mode",
                      help="3 rounds of 3 s runs, 1,000 long-polls: < 3 min")
    ap.set_defaults(mode="full")
    ap.add_argument("--only", default=",".join(ARMS),
                    help="comma-separated arms to run, from direct,nginx,gate (default all)")
    ap.add_argument("--gate-workers", type=int, default=1, metavar="N",
                    help="the gate's server.workers (default 1)")
    ap.add_argument("--no-pin", action="store_true",
                    help="no taskset: let the proxy use every core (e.g. gate workers=2)")
    ap.add_argument("--rounds", type=int, help="override the mode's number of rounds")
    ap.add_argument("--seconds", type=int, help="override the small-GET wrk duration")
    ap.add_argument("--longpolls", type=int, help="override the number of held long-polls")
    ap.add_argument("--hold", type=float, help="override the long-poll hold in seconds")
    ap.add_argument("--name", help="results file name (default MODE-YYYYmmdd-HHMMSS)")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                    help="results directory (default bench/results)")
    ap.add_argument("--no-install", action="store_true",
                    help="fail instead of apt-get / pip installing missing tools")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--instructions", type=int, default=0, metavar="N",
                    help="also count instructions per request of the gate and the bare "
                         "server under callgrind (and perf stat where the host has "
                         "counters), over N small GETs each (bench/instructions.py)")
    ap.add_argument("--instructions-conns", type=int, default=64, metavar="C",
                    help="keep-alive connections for --instructions (default 64, as wrk)")
    args = ap.parse_args(argv)
    arms = [a.strip() for a in args.only.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        ap.error(f"--only: unknown arm(s) {bad}; choose from {','.join(ARMS)}")
    args.arms = [a for a in ARMS if a in arms]
    if args.gate_workers < 1:
        ap.error("--gate-workers must be >= 1")
    if (args.rounds is not None and args.rounds < 0) or args.instructions < 0:
        ap.error("--rounds and --instructions must be >= 0")
    if args.rounds == 0 and not args.instructions:
        ap.error("--rounds 0 measures nothing without --instructions N")
    return args


def choose_mode(args: argparse.Namespace) -> Mode:
    mode = MODES[args.mode]
    overrides = {"rounds": args.rounds, "get_s": args.seconds, "longpolls": args.longpolls,
                 "hold_s": args.hold}
    return dataclasses.replace(mode, **{k: v for k, v in overrides.items() if v is not None})


def choose_cpus(args: argparse.Namespace) -> tuple[int | None, int | None, str]:
    if args.no_pin:
        return None, None, "off (--no-pin)"
    cpus = os.sched_getaffinity(0)
    if not {0, 1} <= cpus:
        log(f"cannot pin: CPUs {sorted(cpus)} available, need 0 and 1; running unpinned")
        return None, None, f"off (CPUs {sorted(cpus)})"
    os.sched_setaffinity(0, {0})  # this runner, and so its asyncio clients, on CPU 0
    return 0, 1, "proxy on CPU 1, load generator and upstreams on CPU 0"


def measure_instructions(ctx: Ctx) -> dict[str, Any]:
    """Instructions per request of the bare server and the gate (against the
    fast upstream), each under callgrind: bench/instructions.py."""
    import instructions

    assert ctx.upstream is not None
    upstream_port = ctx.upstream.ports["plain"]
    subjects = [instructions.Subject("bare", lambda p: start_bare(ctx, p, ready_s=600),
                                     VERSIONS_PATH),
                instructions.Subject("gate", lambda p: start_gate(ctx, upstream_port, p,
                                                                  ready_s=600),
                                     VERSIONS_PATH)]
    subjects = [s for s in subjects if s.name in ctx.args.arms]
    log(f"instructions: {ctx.args.instructions} requests per measurement, "
        f"{[s.name for s in subjects]} under callgrind (each start takes a minute)")
    return instructions.measure(subjects, ctx.tmp / "callgrind", n=ctx.args.instructions,
                                conns=ctx.args.instructions_conns,
                                perf=ctx.tools.get("perf"), log=log)


def on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    tools = ensure_tools(not args.no_install, instructions=args.instructions > 0)
    fd_limit = raise_fd_limit()
    mode = choose_mode(args)
    if fd_limit < 2 * mode.longpolls + 1024:
        sys.exit(f"bench: RLIMIT_NOFILE is {fd_limit}; {mode.longpolls} long-polls need "
                 f"{2 * mode.longpolls + 1024}")
    cpu_load, cpu_proxy, pinning = choose_cpus(args)
    now = dt.datetime.now(dt.UTC).astimezone()
    name = args.name or f"{args.mode}-{now:%Y%m%d-%H%M%S}"
    machine = machine_info(tools)
    tmp = Path(tempfile.mkdtemp(prefix="palpo-bench-"))
    flags: list[str] = []
    inst: dict[str, Any] | None = None
    t0 = time.monotonic()
    log(f"{name}: mode {args.mode} {mode}, arms {args.arms}, temp dir {tmp}")
    try:
        cert, key = make_cert(tmp, tools["openssl"])
        ctx = Ctx(args, mode, tools, tmp, cert, key, make_upload_lua(tmp), cpu_load, cpu_proxy,
                  fd_limit, flags=flags)
        start_upstreams(ctx)
        rounds = []
        for rnd in range(1, mode.rounds + 1):
            entry: dict[str, Any] = {"round": rnd, "arms": {}}
            for arm in args.arms:
                res = run_arm(ctx, arm, rnd)
                entry["arms"][arm] = res
                log(f"round {rnd}/{mode.rounds} {arm}: {describe(res)}")
            rounds.append(entry)
        if args.instructions:
            inst = measure_instructions(ctx)
    finally:
        for svc in list(reversed(STARTED)):
            stop_service(svc, flags)
        if args.keep_tmp:
            log(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    machine["loadavg_end"] = os.getloadavg()
    meds = medians(rounds, args.arms)
    rats = ratios(rounds, args.arms, meds)
    rats_bare = ratios(rounds, args.arms, meds, base="bare", of=("gate",))
    result = {
        "name": name,
        "date": now.isoformat(timespec="seconds"),
        "mode": args.mode,
        "duration_s": round(time.monotonic() - t0, 1),
        "machine": machine,
        "settings": {**dataclasses.asdict(mode), "pinning": pinning,
                     "gate_workers": args.gate_workers, "fd_limit": fd_limit,
                     "versions_json_bytes": len(VERSIONS_JSON), "media_bytes": MEDIA_SIZE,
                     "upload_bytes": UPLOAD_SIZE},
        "arms": args.arms,
        "figures": {f.key: {"label": f.label, "unit": f.unit, "better": f.better,
                            "proxy_only": f.proxy_only} for f in FIGURES},
        "rounds": rounds,
        "medians": meds,
        "ratios": rats,
        "ratios_to_bare": rats_bare,
        "targets": evaluate_targets(rounds, meds, rats, mode.longpolls, rats_bare)
        if "gate" in args.arms and rounds else [],
        "notes": NOTES,
        "flags": flags,
    }
    if inst is not None:
        result["instructions"] = inst
    paths = write_results(result, args.out)
    print(paths["md"].read_text())
    log(f"done in {result['duration_s']} s: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
