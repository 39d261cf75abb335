"""Delegation documents and CORS (docs/DESIGN.md section 4).

This module owns the bytes of ``/.well-known/matrix/server`` and
``/.well-known/matrix/client`` and the CORS headers that go with them and with
every error the gate answers on a Matrix path. The documents are built once,
at load; a request only picks one. Pure: no sockets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .config import WellKnown

#: The CORS headers of the Matrix spec's recommended values, also on gate-made errors so
#: that a browser client sees a 502/504/413 and not a CORS failure.
CORS_HEADERS: tuple[tuple[str, str], ...] = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, OPTIONS"),
    ("Access-Control-Allow-Headers",
     "Origin, X-Requested-With, Content-Type, Accept, Authorization"),
)
CACHE_CONTROL = ("Cache-Control", "public, max-age=3600")


@dataclass(frozen=True, slots=True)
class Documents:
    server: bytes | None  # None: that document is not configured (404)
    client: bytes | None


def build(wk: WellKnown) -> Documents:
    server = None
    if wk.server:
        server = json.dumps({"m.server": wk.server}, separators=(",", ":")).encode()
    client = None
    if wk.client:
        doc: dict[str, object] = {"m.homeserver": {"base_url": wk.client}}
        if wk.identity_server:
            doc["m.identity_server"] = {"base_url": wk.identity_server}
        doc.update(wk.client_extra)
        client = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    return Documents(server, client)
