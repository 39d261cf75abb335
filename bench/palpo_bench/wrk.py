"""wrk: running it, parsing its output, and its figures per request."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from palpo_bench.arms import Ctx
from palpo_bench.common import HOST
from palpo_bench.procs import Service, pin

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


def url(port: int, path: str, tls: bool = False) -> str:
    return f"{'https' if tls else 'http'}://{HOST}:{port}{path}"
