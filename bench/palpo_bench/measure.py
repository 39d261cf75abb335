"""The measurements, one function per figure group: small GETs, download,
upload (wrk), idle RSS and held long-polls (asyncio clients)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any

from palpo_bench.arms import Ctx
from palpo_bench.common import (
    HOST,
    MEDIA_PATH,
    SYNC_PATH,
    UPLOAD_PATH,
    UPLOAD_SIZE,
    VERSIONS_PATH,
    GiB,
    MiB,
)
from palpo_bench.procs import Service
from palpo_bench.wrk import _per, check_wrk, url, wrk_with_cpu

# ---------------------------------------------------------------------------
# The measurements: one function per figure group


def measure_small_get(ctx: Ctx, proxy: Service | None, port: int, tls: bool,
                      label: str) -> dict[str, Any]:
    """wrk -t1 -c64 --latency on the ~240-byte /versions answer: req/s, p50, p99,
    and the proxy's CPU per request."""
    before = proxy.cpu_times() if proxy else None
    res, cpu = wrk_with_cpu(ctx, proxy, url(port, VERSIONS_PATH, tls), ctx.mode.get_s, 64,
                            latency=True)
    check_wrk(ctx, label, res)
    prefix = "tls" if tls else "get"
    cpu_per_req = _per(cpu, res["requests"])
    split: dict[str, Any] = {}
    if proxy is not None and before is not None and not tls:
        # User space against kernel: the gate's upstream leg is two more
        # socket calls per request, kernel work an instruction count misses.
        after = proxy.cpu_times()
        for key, t0, t1 in (("user", before[0], after[0]), ("sys", before[1], after[1])):
            per = _per(t1 - t0, res["requests"])
            split[f"get_{key}_us_per_req"] = per * 1e6 if per is not None else None
    return {
        **split,
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
