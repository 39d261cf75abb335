"""One arm in one round: start its proxy, run its measurements, and describe
the result in one line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from palpo_bench.arms import Ctx, running_proxy
from palpo_bench.common import VERSIONS_PATH, log
from palpo_bench.measure import (
    measure_download,
    measure_idle_rss,
    measure_longpolls,
    measure_small_get,
    measure_upload,
)
from palpo_bench.procs import Service
from palpo_bench.wrk import run_wrk, url

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
    groups = ctx.args.figure_groups
    if ctx.mode.warmup_s:
        guarded(ctx, f"{tag} warm-up", lambda: run_wrk(ctx, url(ports["plain"], VERSIONS_PATH),
                                                     ctx.mode.warmup_s, 64))
    res: dict[str, Any] = {}
    if "get" in groups:
        res |= guarded(ctx, f"{tag} small GET",
                       lambda: measure_small_get(ctx, proxy, ports["plain"], False, f"{tag} GET"))
    if "tls" in groups:
        res |= guarded(ctx, f"{tag} TLS small GET", lambda: measure_small_get(
            ctx, proxy, ports["tls"], True, f"{tag} TLS GET"))
    if download and "download" in groups:
        res |= guarded(ctx, f"{tag} download",
                       lambda: measure_download(ctx, proxy, ports["plain"], f"{tag} download"))
    return res


def slow_phase(ctx: Ctx, arm: str, proxy: Service | None, port: int, rnd: int) -> dict[str, Any]:
    tag = f"round {rnd} {arm}"
    groups = ctx.args.figure_groups
    res: dict[str, Any] = {}
    if "longpolls" in groups:
        if proxy is not None:
            res |= guarded(ctx, f"{tag} idle RSS", lambda: measure_idle_rss(proxy, port))
        idle = res.get("_idle_rss_kib")
        res |= guarded(ctx, f"{tag} long-polls",
                       lambda: measure_longpolls(ctx, proxy, port, idle, f"{tag} long-polls"))
    if "upload" in groups:
        res |= guarded(ctx, f"{tag} upload",
                       lambda: measure_upload(ctx, proxy, port, f"{tag} upload"))
    return res


def run_arm(ctx: Ctx, arm: str, rnd: int) -> dict[str, Any]:
    assert ctx.upstream is not None and ctx.slow is not None
    groups = ctx.args.figure_groups
    slow = "longpolls" in groups or "upload" in groups
    if arm == "direct":
        res = fast_phase(ctx, arm, None, ctx.upstream.ports, rnd)
        res |= slow_phase(ctx, arm, None, ctx.slow.ports["plain"], rnd)
        return res
    if arm == "bare":
        # The floor of the gate's stack answers from memory: small GETs and
        # idle RSS; there is nothing to download, upload or hold.
        res = {}
        if "get" in groups or "tls" in groups:
            with running_proxy(ctx, arm, ctx.upstream) as proxy:
                res = fast_phase(ctx, arm, proxy, proxy.ports, rnd, download=False)
        if "longpolls" in groups:
            with running_proxy(ctx, arm, ctx.upstream) as proxy:
                res |= guarded(ctx, f"round {rnd} bare idle RSS",
                               lambda: measure_idle_rss(proxy, proxy.ports["plain"]))
        return res
    res = {}
    if {"get", "tls", "download"} & set(groups):
        with running_proxy(ctx, arm, ctx.upstream) as proxy:
            res = fast_phase(ctx, arm, proxy, proxy.ports, rnd)
    if slow:
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
