"""--scaling N: what a second gate worker adds, in N interleaved rounds.

The gate runs with ``server.workers = 1``, then 2, then 1, ... on every CPU (the
kernel places its processes), while wrk (-t1) and the fast upstream nginx stay
pinned to CPU 0 as in every other figure. Each run: a warm-up, then the small
GET (wrk -c64). Besides req/s and the gate's CPU per request, each run records
what could limit it: the busy share of every CPU (/proc/stat), the cores the
gate used (its CPU seconds / wall seconds), and the cores wrk and the upstream
used. With two cores, workers = 2 can only gain what CPU 0 has left after wrk
and the upstream: the figures say how much that was.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from palpo_bench.arms import Ctx, start_gate
from palpo_bench.common import VERSIONS_PATH, log
from palpo_bench.procs import stop_service
from palpo_bench.wrk import check_wrk, run_wrk, url

WORKERS = (1, 2)
#: a CPU this busy over a run had no time left to give
SATURATED = 0.95


def parse_proc_stat(text: str) -> dict[int, tuple[int, int]]:
    """/proc/stat → {cpu: (busy ticks, total ticks)}; idle and iowait are not busy."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(x) for x in rest.split()]
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
            # guest time is already inside user / nice: counted once
            total = sum(ticks[:8])
            out[int(name[3:])] = (total - idle, total)
    return out


def busy_shares(before: dict[int, tuple[int, int]],
                after: dict[int, tuple[int, int]]) -> dict[int, float]:
    """The busy share of each CPU between two readings of :func:`parse_proc_stat`."""
    out = {}
    for cpu, (busy, total) in after.items():
        b0, t0 = before.get(cpu, (0, 0))
        out[cpu] = (busy - b0) / (total - t0) if total > t0 else 0.0
    return out


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per worker count, and workers 2 / workers 1 per round and their
    median, for req/s and CPU per request."""
    keys = ("rps", "cpu_us_per_req", "gate_cores", "wrk_cores", "upstream_cores",
            "p99_ms")
    med = {str(w): {k: _median([r[str(w)].get(k) for r in rounds if str(w) in r])
                    for k in keys} for w in WORKERS}
    for w in WORKERS:
        med[str(w)]["cpu_busy"] = {
            cpu: _median([r[str(w)]["cpu_busy"].get(cpu) for r in rounds if str(w) in r])
            for cpu in sorted({c for r in rounds if str(w) in r for c in r[str(w)]["cpu_busy"]})}
    ratio = {}
    for k in ("rps", "cpu_us_per_req"):
        per = [r["2"][k] / r["1"][k] for r in rounds
               if "1" in r and "2" in r and r["1"].get(k) and r["2"].get(k) is not None]
        ratio[k] = {"per_round": per, "median": statistics.median(per) if per else None}
    return {"medians": med, "ratio_2_to_1": ratio, "limit": limit_note(med)}


def limit_note(med: dict[str, dict[str, Any]]) -> str:
    """What held workers = 2 back, read from its medians."""
    two = med.get("2", {})
    busy = two.get("cpu_busy") or {}
    if not busy or two.get("gate_cores") is None:
        return "not measured"
    full = [cpu for cpu, share in busy.items() if share is not None and share >= SATURATED]
    parts = [f"gate used {two['gate_cores']:.2f} cores"]
    if two.get("wrk_cores") is not None and two.get("upstream_cores") is not None:
        parts.append(f"wrk {two['wrk_cores']:.2f} and the upstream "
                     f"{two['upstream_cores']:.2f} cores, both on CPU 0")
    busy_text = ", ".join(f"CPU {cpu} {share:.0%}" for cpu, share in busy.items()
                          if share is not None)
    if len(full) == len(busy):
        verdict = (f"every CPU busy ({busy_text}): the machine is the limit; the gate "
                   "gets what wrk, the upstream and other work leave")
    elif full:
        verdict = f"CPU {', '.join(map(str, full))} saturated ({busy_text})"
    else:
        verdict = (f"no CPU saturated ({busy_text}): the load generator's connections "
                   "or latency limit it, not cores")
    return "; ".join([verdict, *parts])


def _one_run(ctx: Ctx, workers: int, rnd: int) -> dict[str, Any]:
    """A fresh gate with *workers* on every CPU; warm-up; the small GET."""
    assert ctx.upstream is not None
    # Every CPU, explicitly: the runner pinned itself to CPU 0, and a child
    # started without taskset would inherit that.
    every_cpu = ",".join(str(cpu) for cpu in range(os.cpu_count() or 1))
    sub = dataclasses.replace(ctx, cpu_proxy=every_cpu,  # type: ignore[arg-type]
                              args=argparse.Namespace(**{**vars(ctx.args),
                                                         "gate_workers": workers}))
    gate = start_gate(sub, ctx.upstream.ports["plain"])
    ctx.starts = sub.starts
    try:
        target = url(gate.ports["plain"], VERSIONS_PATH)
        run_wrk(ctx, target, max(ctx.mode.warmup_s, 1), 64)
        stat0, gate0 = parse_proc_stat(Path("/proc/stat").read_text()), gate.cpu_seconds()
        up0 = ctx.upstream.cpu_seconds()
        kids0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
        res = run_wrk(ctx, target, ctx.mode.get_s, 64, latency=True)
        wall = time.monotonic() - t0
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy = busy_shares(stat0, parse_proc_stat(Path("/proc/stat").read_text()))
        gate_cpu, up_cpu = gate.cpu_seconds() - gate0, ctx.upstream.cpu_seconds() - up0
    finally:
        stop_service(gate, ctx.flags)
    check_wrk(ctx, f"scaling round {rnd} workers {workers}", res)
    wrk_cpu = (kids.ru_utime - kids0.ru_utime) + (kids.ru_stime - kids0.ru_stime)
    return {
        "rps": res["rps"],
        "p99_ms": res.get("p99_ms"),
        "cpu_us_per_req": gate_cpu / res["requests"] * 1e6 if res["requests"] else None,
        "gate_cores": gate_cpu / wall,
        "wrk_cores": wrk_cpu / wall,
        "upstream_cores": up_cpu / wall,
        "cpu_busy": busy,
        "_requests": res["requests"],
        "_errors": res["non_2xx"] + res["socket_errors"],
    }


def measure(ctx: Ctx, n: int) -> dict[str, Any]:
    """N rounds of workers 1 then 2 (interleaved), and their summary."""
    rounds = []
    for rnd in range(1, n + 1):
        entry: dict[str, Any] = {"round": rnd}
        for w in WORKERS:
            try:
                entry[str(w)] = run = _one_run(ctx, w, rnd)
            except Exception as e:  # a flag, not the end of the run
                ctx.flags.append(f"scaling round {rnd} workers {w}: failed: "
                                 f"{type(e).__name__}: {e}")
                continue
            log(f"scaling round {rnd}/{n} workers {w}: {run['rps']:,.0f} req/s, "
                f"{run['cpu_us_per_req']:.1f} µs/req, gate {run['gate_cores']:.2f} cores, "
                f"CPU busy " + ", ".join(f"{c}: {s:.0%}" for c, s in run["cpu_busy"].items()))
        rounds.append(entry)
    return {"rounds": rounds, **summarise(rounds)}


def _f(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(sc: dict[str, Any], get_s: int) -> list[str]:
    med, ratio = sc["medians"], sc["ratio_2_to_1"]
    cpus = sorted({c for w in med.values() for c in w["cpu_busy"]})
    lines = ["## Workers scaling (`--scaling`)", "",
             f"The gate with `server.workers` = 1 and 2 on every CPU; wrk -t1 -c64 ({get_s} s, "
             "small GET) and the upstream nginx pinned to CPU 0; rounds interleaved "
             f"({len(sc['rounds'])}). Medians; cores = CPU seconds / wall seconds.", "",
             "| workers | req/s | gate CPU per request (µs) | p99 (ms) | gate cores | "
             "wrk cores | upstream cores | " + " | ".join(f"CPU {c} busy" for c in cpus) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(cpus)]
    for w in WORKERS:
        m = med[str(w)]
        lines.append(f"| {w} | {_f(m['rps'], ',.0f')} | {_f(m['cpu_us_per_req'], '.1f')} | "
                     f"{_f(m['p99_ms'], '.2f')} | {_f(m['gate_cores'], '.2f')} | "
                     f"{_f(m['wrk_cores'], '.2f')} | {_f(m['upstream_cores'], '.2f')} | "
                     + " | ".join(_f(m["cpu_busy"].get(c), '.0%') for c in cpus) + " |")
    for key, label in (("rps", "req/s"), ("cpu_us_per_req", "CPU per request")):
        r = ratio[key]
        per = ", ".join(f"{x:.2f}" for x in r["per_round"])
        lines.append("")
        lines.append(f"workers 2 / workers 1, {label}: **{_f(r['median'], '.2f')}x** "
                     f"(rounds: {per or 'n/a'})")
    lines += ["", f"What limits it: {sc['limit']}."]
    return lines
