"""The access log: one line per request, plain or JSON (SPEC section 6).

This module owns the line format. It is the one place where client addresses
live (Palpo sees the gate's address). ``/health`` is never logged: the
handler returns before a record is made.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

logger = logging.getLogger("palpo_gate.access")


def setup_access_logger() -> None:
    """Access lines go to stdout, one per line, with no prefix of logging's own."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)


class AccessLog:
    def __init__(self, fmt: str) -> None:
        self.format = fmt
        self.enabled = fmt != "off"

    def write(self, request: Any, listener: str, client: str, rec: Any, started: float,
              rid: bytes, resp: Any) -> None:
        status = resp.status if resp is not None else 499  # client gone before an answer
        duration = time.monotonic() - started
        if self.format == "json":
            line = json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "client": client,
                "listener": listener,
                "method": request.method,
                "target": request.raw_path,
                "status": status,
                "upstream_status": rec.upstream_status or None,
                "bytes_in": rec.bytes_in,
                "bytes_out": rec.bytes_out,
                "duration_ms": round(duration * 1000, 3),
                "request_id": rid.decode(),
                "error": rec.error or None,
            })
        else:
            line = (f'{client} - - [{time.strftime("%d/%b/%Y:%H:%M:%S %z")}] '
                    f'"{request.method} {request.raw_path} HTTP/{request.version[0]}.'
                    f'{request.version[1]}" {status} {rec.bytes_out} '
                    f'listener={listener} upstream_status={rec.upstream_status or "-"} '
                    f'bytes_in={rec.bytes_in} duration={duration:.3f} rid={rid.decode()}'
                    + (f" error={rec.error}" if rec.error else ""))
        logger.info(line)
