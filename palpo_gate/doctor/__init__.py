"""``palpo-gate doctor``: the deployment self-test.

It checks a running deployment from the gate's own config, the way a remote
homeserver and a client see it, and names each problem with its fix:

- ``fetch.py`` makes every request, handshake and DNS lookup (the only IO);
- ``checks.py`` judges what was fetched (pure, table-tested), using the
  server discovery of ``discovery.py`` (pure);
- this module runs both and prints one line per check, or JSON.

Exit status: 0 when no check fails (warnings do not fail), 1 when one does.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import datetime
from typing import Any

from .. import config as configmod
from . import checks
from .checks import FAIL, Result

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


async def diagnose(config_path: str | None, *, cafile: str | None = None,
                   resolver: tuple[str, int] | None = None,
                   now: datetime | None = None) -> list[Result]:
    """Every check's result, ``config`` first. The config is validated as
    ``palpo-gate check`` does it (certificates included)."""
    source = config_path or "<built-in default>"
    try:
        cfg = configmod.load(config_path)  # certificates included (tls.pair_problem)
    except configmod.ConfigError as exc:
        return [checks.config_result(source, exc.errors)]
    from . import fetch

    facts = await fetch.gather(cfg, cafile=cafile, resolver=resolver, now=now)
    return [checks.config_result(cfg.source, None), *checks.run(facts)]


def render_text(results: list[Result]) -> str:
    counts = checks.summary(results)
    lines = [r.line() for r in results]
    warnings = "warning" if counts["warn"] == 1 else "warnings"
    lines.append(f"{counts['pass']} passed, {counts['warn']} {warnings}, {counts['fail']} failed, "
                 f"{counts['skip']} skipped")
    return "\n".join(lines) + "\n"


def render_json(results: list[Result], source: str) -> str:
    doc: dict[str, Any] = {
        "config": source,
        "ok": not any(r.status == FAIL for r in results),
        "counts": checks.summary(results),
        "checks": [r.as_dict() for r in results],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main(config_path: str | None, cafile: str | None, as_json: bool,
         resolver: str | None) -> int:
    """The ``doctor`` subcommand (cli.py parses the arguments)."""
    if cafile and not os.access(cafile, os.R_OK):
        print(f"palpo-gate doctor: --cafile {cafile}: not a readable file", file=sys.stderr)
        return EXIT_USAGE
    where = None
    if resolver:
        from .fetch import parse_resolver

        try:
            where = parse_resolver(resolver)
        except ValueError as exc:
            print(f"palpo-gate doctor: --resolver: {exc}", file=sys.stderr)
            return EXIT_USAGE
    results = asyncio.run(diagnose(config_path, cafile=cafile, resolver=where))
    if as_json:
        sys.stdout.write(render_json(results, config_path or "<built-in default>"))
    else:
        sys.stdout.write(render_text(results))
    return EXIT_FAIL if any(r.status == FAIL for r in results) else EXIT_OK
