"""What the doctor fetched: plain records, filled by :mod:`.fetch`, judged by
:mod:`.checks`.

Nothing here opens a socket. Every record keeps the failure it met as text
(``error``) instead of an exception, so that a check can name the cause.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..config import Config


@dataclass(frozen=True, slots=True)
class Http:
    """One HTTP exchange: the answer, or why there was none."""

    what: str  # "GET https://127.0.0.1:8448/_matrix/key/v2/server", for messages
    status: int = 0  # 0: no response
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    error: str = ""  # "connection refused", "certificate verify failed: ..."

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not JSON."""
        return json.loads(self.body.decode("utf-8"))

    def same_answer(self, other: Http) -> bool:
        return self.status == other.status and self.body == other.body


@dataclass(frozen=True, slots=True)
class TlsProbe:
    """A TLS handshake with one listener for one server name (SNI)."""

    address: str  # "127.0.0.1:8448" or "unix:/run/x.sock"
    name: str  # the name sent in SNI and checked against the certificate
    error: str = ""  # the handshake failed: why
    leaf: bytes = b""  # DER of the certificate the listener presented
    verify_error: str = ""  # chain verification (time not checked here): why it failed
    version: str = ""  # "TLSv1.3"


@dataclass(frozen=True, slots=True)
class Lookup:
    """One DNS question and its answer. ``records``: SRV → (priority, weight,
    port, target); A / AAAA → address strings. NXDOMAIN and "no answer" are
    an empty answer, not an error."""

    qname: str
    qtype: str
    records: tuple[Any, ...] = ()
    error: str = ""  # the lookup itself failed (timeout, no server)


@dataclass(frozen=True, slots=True)
class Attempt:
    """A request sent the way a remote server or client would send it: to an
    address found by discovery, with the name discovery gave for TLS and Host."""

    address: str  # "127.0.0.1"
    port: int
    http: Http


@dataclass(frozen=True, slots=True)
class AdminProbe:
    listener: str
    source: str  # the address the request came from
    path: str
    http: Http


@dataclass
class Facts:
    """Everything one doctor run fetched."""

    cfg: Config
    now: datetime
    cafile: str | None = None
    #: direct to upstream.url, by probe name (see fetch.PROBES)
    upstream: dict[str, Http] = field(default_factory=dict)
    #: each listener's answer to GET /health, by listener name
    health: dict[str, Http] = field(default_factory=dict)
    #: the names each TLS listener must cover, and the handshakes made for them
    tls_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    tls: dict[str, list[TlsProbe]] = field(default_factory=dict)
    #: listeners whose address the doctor cannot know (systemd sockets)
    unreachable: dict[str, str] = field(default_factory=dict)
    #: the delegation documents, as the gate answers them (through listener
    #: wk_listener), or as https://<server name>/ answers them (wk_listener "")
    wk_listener: str = ""
    wk_host: str = ""  # the Host they were asked for: the server name
    wk_server: Http | None = None
    wk_client: Http | None = None
    #: the key document's server_name: the name remote servers resolve
    server_name: str | None = None
    dns: dict[tuple[str, str], Lookup] = field(default_factory=dict)
    dns_resolver: str = "the system resolver"
    route_attempts: list[Attempt] = field(default_factory=list)
    client_attempts: list[Attempt] = field(default_factory=list)
    admin: list[AdminProbe] = field(default_factory=list)
    #: why the admin API was not probed from outside (every source is allowed)
    admin_untested: str = ""
    #: through each listener that forwards /_matrix: probe name → answer
    through: dict[str, dict[str, Http]] = field(default_factory=dict)
