"""The command line: ``palpo-gate [--config PATH]``, ``palpo-gate check``,
``palpo-gate doctor``, ``palpo-gate --version`` (docs/DESIGN.md section 6).

This module owns exit statuses: 0 for a clean stop or a valid config, 2 for
a config that cannot be used (every error printed with its key path, no
traceback), 1 for anything else that stops the gate from starting.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import TYPE_CHECKING

from . import __version__, logpipe
from . import config as configmod

if TYPE_CHECKING:
    from .process import Worker

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="palpo-gate",
        description="A Matrix-correct reverse proxy for the Palpo homeserver. "
                    "With no --config it runs the built-in local dev config: "
                    "http://127.0.0.1:8080 → http://127.0.0.1:8008.")
    p.add_argument("--version", action="version", version=f"palpo-gate {__version__}")
    p.add_argument("--config", "-c", metavar="PATH", help="the TOML config file")
    sub = p.add_subparsers(dest="command")
    check = sub.add_parser("check", help="validate the config and print the effective config")
    check.add_argument("--config", "-c", metavar="PATH", dest="check_config",
                       help="the TOML config file")
    doctor = sub.add_parser("doctor", help="check the running deployment the way remote "
                            "servers and clients see it; exit 1 when a check fails")
    doctor.add_argument("--config", "-c", metavar="PATH", dest="doctor_config",
                        help="the TOML config file")
    doctor.add_argument("--cafile", metavar="PEM",
                        help="also trust this CA (PEM) besides the system store")
    doctor.add_argument("--json", action="store_true", help="print the results as JSON")
    doctor.add_argument("--resolver", metavar="HOST:PORT",
                        help="ask this DNS server (default: the system's resolvers)")
    return p


def _fail_config(exc: configmod.ConfigError) -> int:
    print("palpo-gate: invalid configuration:", file=sys.stderr)
    for line in exc.errors:
        print(f"  {line}", file=sys.stderr)
    return EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "doctor":
        from . import doctor

        return doctor.main(args.doctor_config or args.config, args.cafile, args.json,
                           args.resolver)
    path = getattr(args, "check_config", None) or args.config
    try:
        cfg = configmod.load(path)  # certificates included (tls.pair_problem)
    except configmod.ConfigError as exc:
        return _fail_config(exc)
    if args.command == "check":
        sys.stdout.write(configmod.dump(cfg))
        print(f"palpo-gate: configuration {cfg.source} is valid", file=sys.stderr)
        return 0
    from .listeners import C_PARSER

    return run(cfg, C_PARSER, path)


def run(cfg: configmod.Config, c_parser: bool, path: str | None = None) -> int:
    from .process import Worker, keep_large_pieces_on_the_heap

    worker = Worker.from_env()  # the one reading of this process's role
    who = f"palpo_gate[worker {worker.index}]" if worker is not None else "%(name)s"
    # stderr through a bounded buffer that never blocks the event loop, as
    # the access lines on stdout (logpipe).
    logging.basicConfig(level=cfg.log.level.upper(), handlers=[logpipe.Handler()],
                        format=f"%(asctime)s %(levelname)s {who}: %(message)s")
    log = logging.getLogger("palpo_gate")
    if not c_parser:
        log.error("aiohttp's C HTTP parser is not loaded (AIOHTTP_NO_EXTENSIONS set, or no "
                  "binary wheel for this platform); refusing to run with the pure-Python "
                  "parser, which has let request-smuggling vectors through")
        return 1
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        runner = asyncio.run
    else:
        runner = uvloop.run
    keep_large_pieces_on_the_heap()
    try:
        return runner(serve(cfg, path, worker))
    except configmod.ConfigError as exc:
        logpipe.close_all()  # what was logged comes before the errors
        return _fail_config(exc)
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled in serve()
        return 0
    finally:
        # Lines still buffered get logpipe.FLUSH_TIMEOUT seconds each.
        logpipe.close_all()


async def serve(cfg: configmod.Config, path: str | None, worker: Worker | None) -> int:
    """Run the gate until SIGTERM / SIGINT; the exit status. One process when
    ``server.workers`` is 1; else the supervisor, which starts this same
    program once per worker (*worker* then says which one this is)."""
    from .process import Process

    if worker is not None:
        return await Process.for_worker(cfg, path, worker).run()
    if cfg.server.workers > 1:
        from .supervisor import Supervisor

        return await Supervisor(cfg, path).run()
    return await Process(cfg, path).run()
