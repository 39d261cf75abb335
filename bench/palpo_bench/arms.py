"""The temp dir and the arms: certificate, media file, nginx configs rendered
from bench/*.tmpl, the upstreams, the gate, the bare server and nginx as proxies."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from palpo_bench.common import (
    BENCH_DIR,
    HOST,
    MEDIA_SIZE,
    UPLOAD_SIZE,
    VERSIONS_JSON,
    MiB,
    Mode,
)
from palpo_bench.procs import (
    Service,
    free_port,
    launch,
    log_says,
    pin,
    port_open,
    stop_service,
    wait_ready,
)

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

# On, as in production: every rule of the gate is kept while measured.
[metrics]
bind = "{HOST}:{ports['metrics']}"
"""


def start_gate(ctx: Ctx, upstream_port: int, prefix: list[str] | None = None,
               ready_s: float = 30.0) -> Service:
    """The gate (its command after *prefix*, e.g. valgrind's, if given)."""
    workdir = ctx.tmp / f"gate-{ctx.starts}"
    ctx.starts += 1
    workdir.mkdir()
    ports = {"plain": free_port(), "tls": free_port(), "metrics": free_port()}
    conf = workdir / "gate.toml"
    conf.write_text(gate_toml(ctx, upstream_port, ports))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ctx.args.gate_src), os.environ.get("PYTHONPATH", "")) if p)}
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
