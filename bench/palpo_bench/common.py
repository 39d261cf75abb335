"""What the benchmark measures, as data: paths, sizes, modes, figures and
their targets; and the one log line format."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = BENCH_DIR.parent
ARMS = ("direct", "nginx", "bare", "gate")
#: what --only-figures may choose; idle RSS goes with the long-polls
FIGURE_GROUPS = ("get", "tls", "download", "longpolls", "upload")
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
    Figure("get_user_us_per_req", "small GET proxy CPU per request, user space", "µs", "lower",
           True),
    Figure("get_sys_us_per_req", "small GET proxy CPU per request, kernel", "µs", "lower", True),
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
    Target("rss_kib_per_held", "abs", "<=", 9.0, "RSS growth ≤ 9 KiB per held long-poll"),
    Target("idle_rss_mib", "abs", "<=", 35.0, "idle RSS ≤ 35 MiB"),
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
