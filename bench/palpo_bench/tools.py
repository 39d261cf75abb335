"""The tools the benchmark needs (installed when missing and allowed), the
file-descriptor limit, and what the machine is."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from palpo_bench.common import BENCH_DIR, log

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


