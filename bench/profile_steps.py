"""Where a proxied small GET's instructions go, step by step (callgrind, deterministic).

Instruction counts (bench/instructions.py) do not move with the machine's
load, so differences of a few thousand instructions between two servers are
real. This tool measures, each under callgrind on the same small GET:

* floors: ``raw`` (uvloop + httptools answering fixed bytes: no aiohttp at
  all), ``bare`` (aiohttp's web.Server answering from memory, as bench/run.py's
  bare arm), ``minproxy`` (web.Server + the gate's upstream pool and
  ProxiedResponse, with a fixed request head and response block: the
  upstream round trip without any rule);
* the gate as benchmarked, and the gate with one step *ablated*: replaced by
  a lookup of its result for the same request (``route``: the routing
  decision; ``reqhead``: the whole request-head step, checks and header rules;
  ``resphead``: the response header rules), or with metrics off (the bench
  gate runs with them on) or the access log
  turned on; the difference to the gate is what the step costs in place;
* micro-steps (``micro``): one call of a step, K times in a loop, inside one
  process under callgrind, minus the empty loop.

    python bench/profile_steps.py                 # everything, ~15 min
    python bench/profile_steps.py --only micro     # some: raw,bare,minproxy,gate,
                                                  # gate-route,... micro

Results: bench/results/profile-<date>.json (figures; ``--name`` replaces the
date in the file name) and a table on stdout.
The sub-commands ``serve``, ``raw``, ``minproxy`` and ``micro`` are the
processes it starts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from palpo_bench.steps import cmd_micro, cmd_minproxy, cmd_raw, cmd_serve

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
HOST = "127.0.0.1"

# -- the driver -----------------------------------------------------------------

VARIANTS = ("raw", "bare", "minproxy", "gate", "gate-route", "gate-reqhead", "gate-resphead",
            "gate-rid", "gate-protocol", "gate-route+reqhead+resphead+rid+protocol",
            "gate-gcoff", "gate-gcfreeze",
            "gate-metrics", "gate+access", "micro", "py-spy", "py-spy-bare", "syscalls-gate",
            "syscalls-bare")

#: Functions whose inclusive share of the gate's samples py-spy reports: the
#: steps of a proxied request, and aiohttp's machinery around the handler.
PYSPY_STEPS = {
    "route (Router.decide)": (("decide", "palpo_gate/routing.py"),),
    "request head (RequestHeads.build)": (("build", "palpo_gate/headers.py"),),
    "response head (response_block)": (("response_block", "palpo_gate/headers.py"),),
    "request id (header_value/new_request_id/sane)": (
        ("header_value", "palpo_gate/headers.py"), ("__call__", "palpo_gate/headers.py"),
        ("sane_request_id", "palpo_gate/headers.py")),
    "pool checkout (Pool.idle/acquire)": (("idle", "palpo_gate/upstream.py"),
                                          ("acquire", "palpo_gate/upstream.py")),
    "upstream write (Connection.write)": (("write", "palpo_gate/upstream.py"),),
    "response parse (Connection.data_received)": (("data_received", "palpo_gate/upstream.py"),),
    "client write (ProxiedResponse)": (("start", "palpo_gate/response.py"),
                                       ("send", "palpo_gate/response.py"),
                                       ("__init__", "palpo_gate/response.py")),
    "accounting (_Record, finish)": (("__init__", "palpo_gate/proxy.py"),
                                     ("finish", "palpo_gate/upstream.py")),
    "the gate's handler (ListenerHandler.__call__ + _forward)": (
        ("__call__", "palpo_gate/proxy.py"), ("_forward", "palpo_gate/proxy.py")),
    "aiohttp: request parse (RequestHandler.data_received)": (
        ("data_received", "aiohttp/web_protocol.py"), ("data_received", "palpo_gate/listeners.py")),
    "aiohttp: per-request loop (RequestHandler.start)": (("start", "aiohttp/web_protocol.py"),),
    "aiohttp: _handle_request + finish_response": (("_handle_request", "aiohttp/web_protocol.py"),
                                                   ("finish_response", "aiohttp/web_protocol.py")),
}


def syscalls(instructions: Any, start: Any, n: int, conns: int, tmp: Path) -> dict[str, Any]:
    """System calls per request (strace -c -f attached over N small GETs on a
    natively running server): the kernel work that instruction counts miss."""
    svc = start([])
    out = tmp / f"strace-{svc.pid}.txt"
    try:
        client = instructions.KeepAliveClient(svc.ports["plain"], "/_matrix/client/versions",
                                              conns)
        try:
            client.run(max(200, n // 5), timeout=30)
            proc = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(svc.pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached
            client.run(n, timeout=60)
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
        finally:
            client.close()
    finally:
        svc.stop()
    calls: dict[str, float] = {}
    for line in out.read_text().splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(fields) >= 5 and fields[3].isdigit() and not line.startswith("100.00"):
            calls[fields[-1]] = round(int(fields[3]) / n, 3)
    return {"per_request": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
            "total_per_request": round(sum(calls.values()), 3)}


def pyspy_profile(ctx: Any, start: Any, seconds: int, out: Path) -> dict[str, Any]:
    """py-spy (sampling, --nonblocking) on the gate under wrk -c64: the share of
    samples in each step (inclusive), and the top functions by own samples."""
    import shutil

    from palpo_bench import common, wrk

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    svc = start([])
    try:
        port = svc.ports["plain"]
        wrk.run_wrk(ctx, wrk.url(port, common.VERSIONS_PATH), 2, 64)
        spy_proc = subprocess.Popen([spy, "record", "--nonblocking", "-r", "400", "-d",
                                     str(seconds), "-f", "raw", "-o", str(out), "--pid",
                                     str(svc.pid)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
        wrk.run_wrk(ctx, wrk.url(port, common.VERSIONS_PATH), seconds + 2, 64)
        _, err = spy_proc.communicate(timeout=60)
        if not out.exists():
            raise RuntimeError(f"py-spy wrote nothing: {err[-1000:]}")
    finally:
        svc.stop()
    total = 0
    steps = dict.fromkeys(PYSPY_STEPS, 0)
    own: dict[str, int] = {}
    frame_re = re.compile(r"^(.*?) \((.*?)(?::\d+)?\)$")
    for line in out.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = []
        for frame in stack.split(";"):
            m = frame_re.match(frame)
            frames.append((m[1], m[2]) if m else (frame, ""))
        for step, needles in PYSPY_STEPS.items():
            # py-spy names methods Class.method
            if any((f == fn or f.endswith("." + fn)) and path.endswith(suffix)
                   for fn, suffix in needles for f, path in frames):
                steps[step] += count
        fn, path = frames[-1]
        leaf = f"{fn} ({'/'.join(path.split('/')[-2:])})"
        own[leaf] = own.get(leaf, 0) + count
    top = sorted(own.items(), key=lambda kv: -kv[1])[:25]
    return {"samples": total,
            "steps_pct": {k: round(100 * v / total, 1) for k, v in steps.items()},
            "top_own_pct": {k: round(100 * v / total, 1) for k, v in top}}


def drive(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(BENCH_DIR))
    import instructions
    from palpo_bench import arms, cli, common, procs
    from palpo_bench import tools as bench_tools

    only = args.only.split(",") if args.only else list(VARIANTS)
    bad = [v for v in only if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; choose from {','.join(VARIANTS)}")
    rargs = cli.parse_args(["--rounds", "0", "--instructions", str(args.requests),
                            "--no-install"])
    tools = bench_tools.ensure_tools(False, instructions=True)
    fd_limit = bench_tools.raise_fd_limit()
    cpu_load, cpu_proxy, _ = cli.choose_cpus(rargs)
    tmp = Path(tempfile.mkdtemp(prefix="palpo-profile-"))
    cert, key = arms.make_cert(tmp, tools["openssl"])
    ctx = arms.Ctx(rargs, cli.choose_mode(rargs), tools, tmp, cert, key,
                   arms.make_upload_lua(tmp), cpu_load, cpu_proxy, fd_limit)
    me = [sys.executable, str(Path(__file__).resolve())]
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(REPO_DIR)}
    results: dict[str, Any] = {}

    def gate_variant(ablations: str, metrics: bool = True, access: bool = False) -> Any:
        def start(prefix: list[str]) -> Any:
            assert ctx.upstream is not None
            workdir = tmp / f"gate-{ctx.starts}"
            ctx.starts += 1
            workdir.mkdir()
            ports = {"plain": procs.free_port(), "tls": procs.free_port(),
                     "metrics": procs.free_port()}
            toml = arms.gate_toml(ctx, ctx.upstream.ports["plain"], ports)
            if access:
                toml = toml.replace('access = "off"', 'access = "plain"')
            if not metrics:
                toml = toml[:toml.index("\n[metrics]")] + "\n"
            conf = workdir / "gate.toml"
            conf.write_text(toml)
            svc = procs.launch("gate", [*procs.pin(cpu_proxy), *prefix, *me, "serve", "--ablate",
                                        ablations, "--config", str(conf)], workdir, ports, env=env)
            procs.wait_ready(svc, procs.log_says(workdir / "stderr.log", "palpo-gate ready"), 600)
            return svc
        return start

    def floor(kind: str) -> Any:
        def start(prefix: list[str]) -> Any:
            assert ctx.upstream is not None
            workdir = tmp / f"{kind}-{ctx.starts}"
            ctx.starts += 1
            workdir.mkdir()
            ports = {"plain": procs.free_port()}
            cmd = [*procs.pin(cpu_proxy), *prefix, *me, kind, "--port", str(ports["plain"])]
            if kind == "raw":
                cmd += ["--body-file", str(arms.versions_body(tmp))]
            else:
                cmd += ["--upstream-port", str(ctx.upstream.ports["plain"])]
            svc = procs.launch(kind, cmd, workdir, ports, env=env)
            procs.wait_ready(svc, procs.log_says(workdir / "stderr.log", f"{kind} ready"), 600)
            return svc
        return start

    starters = {
        "raw": floor("raw"),
        "bare": lambda p: arms.start_bare(ctx, p, ready_s=600),
        "minproxy": floor("minproxy"),
        "gate": gate_variant(""),
        "gate-route": gate_variant("route"),
        "gate-reqhead": gate_variant("reqhead"),
        "gate-resphead": gate_variant("resphead"),
        "gate-route+reqhead+resphead": gate_variant("route,reqhead,resphead"),
        "gate-rid": gate_variant("rid"),
        "gate-protocol": gate_variant("protocol"),
        "gate-gcoff": gate_variant("gcoff"),
        "gate-gcfreeze": gate_variant("gcfreeze"),
        "gate-route+reqhead+resphead+rid+protocol": gate_variant(
            "route,reqhead,resphead,rid,protocol"),
        "gate-metrics": gate_variant("", metrics=False),
        "gate+access": gate_variant("", access=True),
    }
    try:
        arms.start_upstreams(ctx)
        for name in only:
            if name.startswith("syscalls-"):
                results[name] = syscalls(instructions, starters[name.split("-", 1)[1]],
                                         args.requests, args.conns, tmp)
                continue
            if name in ("py-spy", "py-spy-bare"):
                starter = starters["gate" if name == "py-spy" else "bare"]
                results[name] = pyspy_profile(ctx, starter, args.seconds,
                                              tmp / f"{name}.txt")
                continue
            if name == "micro":
                continue
            subject = instructions.Subject(name, starters[name], common.VERSIONS_PATH)
            results[name] = instructions.measure_callgrind(
                subject, tmp / "callgrind", args.requests, args.conns,
                max(200, args.requests // 5), 3, common.log)
        if "micro" in only:
            conf = tmp / "micro.toml"
            conf.write_text(arms.gate_toml(ctx, 9, {"plain": 8008, "tls": 8443,
                                                    "metrics": 9090}))
            out_file = tmp / "callgrind" / "callgrind.micro"
            out_file.parent.mkdir(exist_ok=True)
            proc = subprocess.run([*instructions.callgrind_prefix(out_file), *me, "micro",
                                   "--config", str(conf), "--k", str(args.k),
                                   "--steps", args.steps,
                                   "--out-file", str(out_file)],
                                  capture_output=True, text=True, env=env, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"micro failed: {proc.stderr[-3000:]}")
            results["micro"] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        for svc in list(reversed(procs.STARTED)):
            procs.stop_service(svc)
        if not args.keep_tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            common.log(f"temp dir kept: {tmp}")
    now = dt.datetime.now(dt.UTC).astimezone()
    out = {"date": now.isoformat(timespec="seconds"), "requests": args.requests,
           "connections": args.conns, "results": results}
    path = args.out / f"profile-{args.name or f'{now:%Y-%m-%d}'}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    if path.exists():  # keep what an earlier partial run measured
        old = json.loads(path.read_text())
        out["results"] = {**old.get("results", {}), **results}
    path.write_text(json.dumps(out, indent=2) + "\n")
    gate = out["results"].get("gate", {}).get("ir_per_request")
    for name, r in out["results"].items():
        if name == "micro":
            for step, ir in r.items():
                print(f"  micro {step:<62} {ir:>10,.0f} Ir")
            continue
        if name.startswith(("py-spy", "syscalls")):
            print(name, json.dumps(r, indent=1))
            continue
        ir = r["ir_per_request"]
        diff = f"{ir - gate:+10,.0f} vs gate" if gate else ""
        print(f"{name:<30} {ir:>10,.0f} Ir/request  {diff}")
    common.log(f"written: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    p = sub.add_parser("serve")
    p.add_argument("--ablate", default="")
    p.add_argument("--config", required=True)
    p = sub.add_parser("raw")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--body-file", required=True)
    p = sub.add_parser("minproxy")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream-port", type=int, required=True)
    p = sub.add_parser("micro")
    p.add_argument("--config", required=True)
    p.add_argument("--k", type=int, default=2000)
    p.add_argument("--out-file", required=True)
    p.add_argument("--steps", default="")
    ap.add_argument("--only", help=f"comma-separated, from {','.join(VARIANTS)}")
    ap.add_argument("--requests", type=int, default=2000, help="small GETs per measurement")
    ap.add_argument("--conns", type=int, default=64, help="keep-alive connections")
    ap.add_argument("--k", type=int, default=2000, help="calls per micro-step")
    ap.add_argument("--steps", default="",
                    help="micro: only the steps whose names contain one of these (comma-separated)")
    ap.add_argument("--seconds", type=int, default=15, help="py-spy recording under wrk")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    ap.add_argument("--name", default="",
                    help="the result is OUT/profile-NAME.json (default: the date)")
    ap.add_argument("--keep-tmp", action="store_true")
    args = ap.parse_args(argv)
    commands = {"serve": cmd_serve, "raw": cmd_raw, "minproxy": cmd_minproxy,
                "micro": cmd_micro}
    if args.cmd in commands:
        return commands[args.cmd](args)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
