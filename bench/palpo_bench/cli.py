"""The command line: options, the mode and CPU choice, and the run from the
first tool check to the written results."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from palpo_bench import scaling
from palpo_bench.arms import (
    Ctx,
    make_cert,
    make_upload_lua,
    start_bare,
    start_gate,
    start_upstreams,
)
from palpo_bench.common import (
    ARMS,
    BENCH_DIR,
    FIGURE_GROUPS,
    FIGURES,
    MEDIA_SIZE,
    MODES,
    REPO_DIR,
    UPLOAD_SIZE,
    VERSIONS_JSON,
    VERSIONS_PATH,
    Mode,
    log,
)
from palpo_bench.procs import STARTED, stop_service
from palpo_bench.report import NOTES, write_results
from palpo_bench.rounds import describe, run_arm
from palpo_bench.stats import evaluate_targets, medians, ratios
from palpo_bench.tools import ensure_tools, machine_info, raise_fd_limit

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
    ap.add_argument("--only-figures", default=",".join(FIGURE_GROUPS), metavar="GROUPS",
                    help="comma-separated figure groups to measure, from "
                         f"{','.join(FIGURE_GROUPS)} (default all; idle RSS goes with "
                         "longpolls)")
    ap.add_argument("--gate-src", type=Path, default=REPO_DIR, metavar="DIR",
                    help="the source tree the gate runs from (default this checkout): "
                         "another checkout, to compare two versions on one host")
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
    ap.add_argument("--scaling", type=int, default=0, metavar="N",
                    help="also N interleaved rounds of the gate's small GET with workers 1 "
                         "and 2 on every CPU, wrk and the upstream on CPU 0 "
                         "(palpo_bench/scaling.py)")
    ap.add_argument("--instructions-conns", type=int, default=64, metavar="C",
                    help="keep-alive connections for --instructions (default 64, as wrk)")
    args = ap.parse_args(argv)
    arms = [a.strip() for a in args.only.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        ap.error(f"--only: unknown arm(s) {bad}; choose from {','.join(ARMS)}")
    args.arms = [a for a in ARMS if a in arms]
    groups = [g.strip() for g in args.only_figures.split(",") if g.strip()]
    bad = [g for g in groups if g not in FIGURE_GROUPS]
    if bad or not groups:
        ap.error(f"--only-figures: unknown group(s) {bad}; choose from {','.join(FIGURE_GROUPS)}")
    args.figure_groups = [g for g in FIGURE_GROUPS if g in groups]
    if not (args.gate_src / "palpo_gate" / "__init__.py").is_file():
        ap.error(f"--gate-src: no palpo_gate package in {args.gate_src}")
    args.gate_src = args.gate_src.resolve()
    if args.gate_workers < 1:
        ap.error("--gate-workers must be >= 1")
    if (args.rounds is not None and args.rounds < 0) or args.instructions < 0 or args.scaling < 0:
        ap.error("--rounds, --instructions and --scaling must be >= 0")
    if args.rounds == 0 and not args.instructions and not args.scaling:
        ap.error("--rounds 0 measures nothing without --instructions N or --scaling N")
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
    scale: dict[str, Any] | None = None
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
        if args.scaling:
            scale = scaling.measure(ctx, args.scaling)
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
                     "figure_groups": args.figure_groups, "gate_src": str(args.gate_src),
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
    if scale is not None:
        result["scaling"] = scale
    paths = write_results(result, args.out)
    print(paths["md"].read_text())
    log(f"done in {result['duration_s']} s: " + ", ".join(str(p) for p in paths.values()))
    return 0
