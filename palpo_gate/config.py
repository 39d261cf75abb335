"""The config file: TOML in, one immutable, fully parsed :class:`Config` out.

This module owns the schema of docs/DESIGN.md section 7 and every default in it. It
opens no socket; it reads the file and asks :func:`tls.pair_problem` whether
each certificate and key load as a pair, so that certificate errors are
reported with all the others (``tls.py`` builds the SSL contexts the
listeners use).

Rules:
- Everything is parsed here, once: durations to float seconds, sizes to int
  bytes, CIDRs to ``ip_network``, binds and upstream URLs to small records.
  Nothing downstream ever sees a raw TOML value.
- Unknown keys are errors. Every error names its TOML key path
  (``listeners[1].tls.cert: file not found``) and all errors are reported at
  once, as :class:`ConfigError`.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

try:
    import tomllib
except ImportError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

from .tls import pair_problem

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The embedded default: a local dev proxy (docs/DESIGN.md section 1, "No config at all").
DEFAULT_CONFIG_TOML = """\
[upstream]
url = "http://127.0.0.1:8008"

[[listeners]]
name = "dev"
bind = "127.0.0.1:8080"
role = "client"
"""

ROLE_PREFIXES: dict[str, tuple[str, ...]] = {
    "client": ("/_matrix", "/_palpo/client"),
    "federation": ("/_matrix",),
}
DEFAULT_BLOCKED_PREFIXES = ("/_palpo/admin", "/_synapse/admin")
LOG_LEVELS = ("debug", "info", "warning", "error")
ACCESS_FORMATS = ("plain", "json", "off")


class ConfigError(Exception):
    """A config that cannot be used; ``errors`` holds one "key.path: why" per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# --------------------------------------------------------------------------
# Parsed records


@dataclass(frozen=True, slots=True)
class Bind:
    """Where a listener (or the metrics endpoint) accepts connections."""

    kind: Literal["tcp", "unix", "systemd"]
    host: str = ""  # tcp: address or name, without brackets
    port: int = 0  # tcp
    path: str = ""  # unix: socket path; systemd: the LISTEN_FDNAMES name

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "systemd":
            return f"systemd:{self.path}"
        return join_host_port(self.host, self.port)


def join_host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets (RFC 3986 section 3.2.2)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class SniCert:
    names: tuple[str, ...]
    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class Tls:
    cert: str  # "" when acme is true and no file certificate is given
    key: str
    strict_sni: bool = False
    sni: tuple[SniCert, ...] = ()
    #: certificates for acme.domains, obtained by the gate (docs/DESIGN.md section 8)
    acme: bool = False


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    bind: Bind
    role: Literal["client", "federation"]
    prefixes: tuple[str, ...]
    hosts: frozenset[str] | None = None  # lower-case names without port; None = any
    tls: Tls | None = None
    #: every connection starts with a PROXY protocol header (prelude.py)
    proxy_protocol: bool = False


@dataclass(frozen=True, slots=True)
class Upstream:
    url: str
    kind: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""
    connect_timeout: float = 5.0
    read_timeout: float = 120.0
    pool_size: int = 64


@dataclass(frozen=True, slots=True)
class WellKnown:
    server: str
    client: str
    identity_server: str | None = None
    client_extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Admin:
    blocked_prefixes: tuple[str, ...] = DEFAULT_BLOCKED_PREFIXES
    allow_from: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_size: int = 50 * 1024 * 1024
    header_timeout: float = 30.0
    body_timeout: float = 60.0
    idle_timeout: float = 75.0
    #: the whole request head, request line and header fields (431 above it)
    max_header_size: int = 32 * 1024


#: The ``trusted_proxies`` entry for every peer of a UNIX-socket listener
#: (nginx's ``set_real_ip_from unix:``): such a peer has no address to match.
UNIX_PEER = "unix:"


@dataclass(frozen=True, slots=True)
class Forwarding:
    #: networks, and UNIX_PEER when it was listed
    trusted_proxies: tuple[IPNetwork | str, ...] = ()
    request_id_header: str = "X-Request-ID"
    #: collect chunked media uploads and send them on with a Content-Length
    #: (for homeservers that refuse chunked uploads; see spool.py)
    buffer_chunked_uploads: bool = False


@dataclass(frozen=True, slots=True)
class Log:
    level: str = "info"
    access: str = "plain"


@dataclass(frozen=True, slots=True)
class Metrics:
    bind: Bind


@dataclass(frozen=True, slots=True)
class Server:
    workers: int = 1
    drain_timeout: float = 10.0


# -- [rate_limits] and the client address ------------------------------------


@dataclass(frozen=True, slots=True)
class Rate:
    """``N/second|minute|hour|day``: *amount* requests per one *unit*."""

    amount: int
    unit: Literal["second", "minute", "hour", "day"]

    def __str__(self) -> str:
        return f"{self.amount}/{self.unit}"


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Per client address; None (``"0"``) turns one off."""

    login: Rate | None = Rate(10, "minute")
    register: Rate | None = Rate(5, "minute")
    password: Rate | None = Rate(5, "minute")
    requests: Rate | None = None
    connections: int = 0  # concurrent; 0: no cap
    storage: str = "memory://"


# --------------------------------------------------------------------------


#: Let's Encrypt's production directory, the default of acme.directory.
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
ACME_CHALLENGES = ("http-01", "tls-alpn-01")


@dataclass(frozen=True, slots=True)
class Acme:
    """``[acme]``: certificates obtained and renewed by the gate (docs/DESIGN.md section 8)."""

    domains: tuple[str, ...]
    directory: str = LETS_ENCRYPT
    email: str | None = None
    #: account key, certificates and open challenges live here
    state_dir: str = "/var/lib/palpo-gate/acme"
    #: more CAs trusted for the directory's HTTPS (a private or test CA)
    ca_bundle: str | None = None
    challenge: str = "http-01"
    #: seconds before expiry a certificate is renewed, unless the CA's
    #: renewal information (RFC 9773) says otherwise
    renew_before: float = 30 * 86400.0


@dataclass(frozen=True, slots=True)
class Config:
    server: Server
    upstream: Upstream
    listeners: tuple[Listener, ...]
    well_known: WellKnown | None
    admin: Admin
    limits: Limits
    forwarding: Forwarding
    log: Log
    metrics: Metrics | None
    acme: Acme | None = None
    source: str = "<built-in default>"
    rate_limits: RateLimits = RateLimits()


# --------------------------------------------------------------------------
# Value parsers: each takes the raw TOML value and returns the parsed value or
# raises _Bad with a message; the caller adds the key path.


class _Bad(ValueError):
    pass


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_duration(value: object) -> float:
    """Seconds as a number, or a string like "500ms", "30s", "2m", "1h"."""
    if isinstance(value, bool):
        raise _Bad("expected a duration (seconds, or a string like \"30s\")")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise _Bad(f"invalid duration {value!r} "
                       "(use seconds, or e.g. \"500ms\", \"30s\", \"2m\")")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise _Bad("expected a duration (seconds, or a string like \"30s\")")
    if not math.isfinite(seconds) or seconds <= 0:
        raise _Bad("a duration must be greater than zero")
    return seconds


def parse_size(value: object) -> int:
    """Bytes as an integer, or a string like "50M", "50MiB", "1G", "512KB".

    K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024, as in nginx's
    ``client_max_body_size 50M``; KB/MB/GB/TB are powers of 1000.
    """
    if isinstance(value, bool):
        raise _Bad("expected a size (bytes, or a string like \"50M\")")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m or m.group(3).lower() == "i" or (m.group(3).lower() == "ib" and not m.group(2)):
            raise _Bad(f"invalid size {value!r} (use bytes, or e.g. \"50M\", \"50MiB\", \"1G\")")
        unit, suffix = m.group(2).lower(), m.group(3).lower()
        base = 1000 if suffix == "b" and unit else 1024
        n = int(float(m.group(1)) * base ** _SIZE_POWERS[unit])
    else:
        raise _Bad("expected a size (bytes, or a string like \"50M\")")
    if n < 0:
        raise _Bad("a size cannot be negative")
    return n


def parse_bind(value: object, *, allow_systemd: bool = True) -> Bind:
    """``0.0.0.0:443``, ``[::]:8448``, ``unix:/path.sock`` or ``systemd:NAME``."""
    if not isinstance(value, str) or not value:
        raise _Bad("expected a string such as \"0.0.0.0:443\", \"[::]:8448\" "
                   "or \"unix:/path.sock\"")
    if value.startswith("unix:"):
        path = value[5:]
        if not path.startswith("/") and not path.startswith("@"):
            raise _Bad(f"{value!r}: a UNIX socket path must be absolute")
        return Bind("unix", path=path)
    if value.startswith("systemd:"):
        if not allow_systemd:
            raise _Bad(f"{value!r}: socket activation is not available here")
        name = value[8:]
        # FileDescriptorName= may not contain ':' (the LISTEN_FDNAMES separator).
        if not name or not re.fullmatch(r"[A-Za-z0-9_.@+-]{1,255}", name):
            raise _Bad(f"{value!r}: expected systemd:NAME, NAME as in FileDescriptorName=")
        return Bind("systemd", path=name)
    host, port = _split_host_port(value)
    if port is None:
        raise _Bad(f"{value!r}: a port is required (e.g. \"0.0.0.0:443\")")
    return Bind("tcp", host=host, port=port)


def _split_host_port(value: str) -> tuple[str, int | None]:
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise _Bad(f"{value!r}: unbalanced '[' in an IPv6 address")
        host, rest = value[1:end], value[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Bad(f"{value!r}: {host!r} is not an IPv6 address") from None
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise _Bad(f"{value!r}: expected ':port' after ']'")
        port_s = rest[1:]
    else:
        if value.count(":") > 1:
            raise _Bad(f"{value!r}: write IPv6 addresses in brackets, e.g. \"[::]:8448\"")
        host, sep, port_s = value.partition(":")
        if not sep:
            return host, None
        if not host:
            raise _Bad(f"{value!r}: missing host (use 0.0.0.0 or [::] for all addresses)")
        if not re.fullmatch(r"[A-Za-z0-9.-]+", host):
            raise _Bad(f"{value!r}: {host!r} is not a host name or IPv4 address")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise _Bad(f"{value!r}: port must be a number from 0 to 65535")
    return host, int(port_s)


def parse_upstream_url(value: object) -> tuple[str, str, int, str]:
    """``http://host:port`` or ``unix:/path`` → (kind, host, port, path)."""
    if not isinstance(value, str):
        raise _Bad("expected a string such as \"http://127.0.0.1:8008\" "
                   "or \"unix:/run/palpo.sock\"")
    if value.startswith("unix:"):
        path = value[5:]
        if not path.startswith("/") and not path.startswith("@"):
            raise _Bad(f"{value!r}: a UNIX socket path must be absolute")
        return "unix", "", 0, path
    if value.startswith("https://"):
        raise _Bad(f"{value!r}: the upstream speaks plain HTTP/1.1 (use http:// or unix:)")
    if not value.startswith("http://"):
        raise _Bad(f"{value!r}: expected http://host:port or unix:/path")
    rest = value[7:]
    if rest.endswith("/"):
        rest = rest[:-1]
    if "/" in rest or "?" in rest or "#" in rest:
        raise _Bad(
            f"{value!r}: no path after the port: the request target is passed on as it came"
        )
    host, port = _split_host_port(rest)
    if not host:
        raise _Bad(f"{value!r}: missing host")
    return "tcp", host, 80 if port is None else port, ""


def parse_cidr(value: object) -> IPNetwork:
    if not isinstance(value, str):
        raise _Bad("expected a CIDR string such as \"10.0.0.0/8\" or \"::1\"")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise _Bad(f"{value!r} is not an IP address or CIDR") from None


def parse_trusted_proxy(value: object) -> IPNetwork | str:
    """A CIDR, or ``"unix:"`` for the peers of UNIX-socket listeners."""
    if value == UNIX_PEER:
        return UNIX_PEER
    if isinstance(value, str) and value.startswith("unix:"):
        raise _Bad(f"{value!r}: write \"unix:\" alone (it trusts the peers of every "
                   "UNIX-socket listener; a socket path cannot name one)")
    try:
        return parse_cidr(value)
    except _Bad as exc:
        raise _Bad(f"{exc} (or \"unix:\" for peers on a UNIX-socket listener)") from None


def parse_prefix(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise _Bad("a prefix must be a string starting with '/'")
    if value != "/" and value.endswith("/"):
        value = value.rstrip("/")
    if "%" in value or "?" in value or "#" in value or "//" in value:
        raise _Bad(f"{value!r}: write a prefix decoded, without '%', '?', '#' or '//'")
    if any(seg in (".", "..") for seg in value.split("/")):
        raise _Bad(f"{value!r}: a prefix cannot contain '.' or '..' segments")
    return value


_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 section 5.6.2
_HOSTNAME_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)$")


def parse_host_name(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _Bad("expected a host name")
    name = value.lower().rstrip(".")
    if not _HOSTNAME_RE.match(name):
        raise _Bad(f"{value!r} is not a host name (write it without a port)")
    return name


def _sni_name(value: object) -> str:
    """A host name, or a one-label wildcard such as ``*.example.com``."""
    if isinstance(value, str) and value.startswith("*."):
        return "*." + parse_host_name(value[2:])
    return parse_host_name(value)


def _http_url(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^/\s]+(/\S*)?", value):
        raise _Bad("expected an http:// or https:// URL")
    return value


def _server_name(value: object) -> str:
    if not isinstance(value, str) or not value or "/" in value or " " in value:
        raise _Bad("expected \"host\" or \"host:port\", e.g. \"matrix.example.com:443\"")
    _split_host_port(value)
    return value


# --------------------------------------------------------------------------
# The reader: walks the TOML document, collects errors with their key paths.

T = TypeVar("T")
_MISSING = object()


class _Reader:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, path: str, msg: str) -> None:
        self.errors.append(f"{path}: {msg}")

    def table(self, raw: object, path: str, keys: Iterable[str]) -> dict[str, Any] | None:
        if not isinstance(raw, dict):
            self.error(path, "expected a table")
            return None
        allowed = set(keys)
        for key in raw:
            if key not in allowed:
                hint = _closest(key, allowed)
                self.error(f"{path}.{key}" if path else key,
                           "unknown key" + (f" (did you mean {hint!r}?)" if hint else ""))
        return raw

    def get(self, tbl: dict[str, Any], path: str, key: str,
            parse: Callable[[Any], T], default: T | object = _MISSING) -> T:
        full = f"{path}.{key}" if path else key
        if key not in tbl:
            if default is _MISSING:
                self.error(full, "required")
                return None  # type: ignore[return-value]
            return default  # type: ignore[return-value]
        try:
            return parse(tbl[key])
        except _Bad as exc:
            self.error(full, str(exc))
            return default if default is not _MISSING else None  # type: ignore[return-value]

    def list_of(self, tbl: dict[str, Any], path: str, key: str,
                parse: Callable[[Any], T], default: tuple[T, ...]) -> tuple[T, ...]:
        full = f"{path}.{key}" if path else key
        if key not in tbl:
            return default
        raw = tbl[key]
        if not isinstance(raw, list):
            self.error(full, "expected a list")
            return default
        out: list[T] = []
        for i, item in enumerate(raw):
            try:
                out.append(parse(item))
            except _Bad as exc:
                self.error(f"{full}[{i}]", str(exc))
        return tuple(out)


def _closest(key: str, allowed: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.75)
    return match[0] if match else None


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise _Bad("expected true or false")
    return v


def _str(v: object) -> str:
    if not isinstance(v, str) or not v:
        raise _Bad("expected a non-empty string")
    return v


def _int_range(lo: int, hi: int) -> Callable[[object], int]:
    def parse(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise _Bad(f"expected an integer from {lo} to {hi}")
        return v

    return parse


def _one_of(*choices: str) -> Callable[[object], str]:
    def parse(v: object) -> str:
        if v not in choices:
            raise _Bad(f"expected one of {', '.join(repr(c) for c in choices)}")
        return v  # type: ignore[return-value]

    return parse


def _file(v: object) -> str:
    path = _str(v)
    if not os.path.exists(path):
        raise _Bad(f"{path}: file not found")
    if not os.access(path, os.R_OK):
        raise _Bad(f"{path}: file not readable")
    return path


#: Headers the gate frames or sets itself; a request id under one of these
#: names would desync or spoof (Content-Length twice, say).
_RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "te",
    "trailer", "upgrade", "expect", "proxy-connection", "proxy-authorization",
    "proxy-authenticate", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
    "x-forwarded-port", "x-real-ip", "forwarded", "content-type", "content-encoding",
})


def _header_name(v: object) -> str:
    if not isinstance(v, str) or not _TOKEN_RE.match(v):
        raise _Bad("expected an HTTP header name")
    if v.lower() in _RESERVED_HEADERS:
        raise _Bad(f"{v!r} is a header the gate frames or sets itself")
    return v


# --------------------------------------------------------------------------
# Sections


def _read_server(r: _Reader, raw: object) -> Server:
    t = r.table(raw, "server", ("workers", "drain_timeout"))
    if t is None:
        return Server()
    return Server(
        workers=r.get(t, "server", "workers", _int_range(1, 256), 1),
        drain_timeout=r.get(t, "server", "drain_timeout", parse_duration, 10.0),
    )


def _read_upstream(r: _Reader, raw: object) -> Upstream:
    p = "upstream"
    t = r.table(raw, p, ("url", "connect_timeout", "read_timeout", "pool_size"))
    if t is None:
        return Upstream("http://127.0.0.1:8008", "tcp", "127.0.0.1", 8008)
    url = r.get(t, p, "url", _str, "http://127.0.0.1:8008")
    try:
        kind, host, port, path = parse_upstream_url(url)
    except _Bad as exc:
        r.error(f"{p}.url", str(exc))
        kind, host, port, path = "tcp", "127.0.0.1", 8008, ""
    return Upstream(
        url=url, kind=kind, host=host, port=port, path=path,  # type: ignore[arg-type]
        connect_timeout=r.get(t, p, "connect_timeout", parse_duration, 5.0),
        read_timeout=r.get(t, p, "read_timeout", parse_duration, 120.0),
        pool_size=r.get(t, p, "pool_size", _int_range(0, 100_000), 64),
    )


def _read_tls(r: _Reader, raw: object, p: str) -> Tls | None:
    t = r.table(raw, p, ("cert", "key", "strict_sni", "sni", "acme"))
    if t is None:
        return None
    acme = r.get(t, p, "acme", _bool, False)
    sni: list[SniCert] = []
    raw_sni = t.get("sni", [])
    if not isinstance(raw_sni, list):
        r.error(f"{p}.sni", "expected an array of tables ([[...tls.sni]])")
        raw_sni = []
    for i, item in enumerate(raw_sni):
        sp = f"{p}.sni[{i}]"
        st = r.table(item, sp, ("names", "cert", "key"))
        if st is None:
            continue
        names = r.list_of(st, sp, "names", _sni_name, ())
        if not st.get("names"):
            r.error(f"{sp}.names", "required: at least one server name")
        sni.append(SniCert(names, r.get(st, sp, "cert", _file), r.get(st, sp, "key", _file)))
    if acme is True:
        # The gate's own certificate is the default; a file pair is optional.
        for one, other in (("cert", "key"), ("key", "cert")):
            if one in t and other not in t:
                r.error(f"{p}.{other}", f"required with {p}.{one}")
        files = ("", "")
        if "cert" in t and "key" in t:
            files = (r.get(t, p, "cert", _file, ""), r.get(t, p, "key", _file, ""))
    else:
        files = (r.get(t, p, "cert", _file), r.get(t, p, "key", _file))
    tls = Tls(
        cert=files[0],
        key=files[1],
        strict_sni=r.get(t, p, "strict_sni", _bool, False),
        sni=tuple(sni),
        acme=acme is True,
    )
    pairs = [(f"{p}.cert", tls), *((f"{p}.sni[{i}].cert", s) for i, s in enumerate(sni))]
    for where, pair in pairs:
        if pair.cert and pair.key:
            # Checked here, with the other errors, so that all are reported at once.
            problem = pair_problem(pair.cert, pair.key)
            if problem:
                r.error(where, problem)
    return tls


def _read_listeners(r: _Reader, raw: object) -> tuple[Listener, ...]:
    if not isinstance(raw, list):
        r.error("listeners", "expected an array of tables ([[listeners]])")
        return ()
    if not raw:
        r.error("listeners", "at least one listener is required")
    out: list[Listener] = []
    names: set[str] = set()
    binds: set[Bind] = set()
    for i, item in enumerate(raw):
        p = f"listeners[{i}]"
        t = r.table(item, p, ("name", "bind", "role", "prefixes", "hosts", "tls",
                              "proxy_protocol"))
        if t is None:
            continue
        name = r.get(t, p, "name", _str, f"listener{i}")
        if name in names:
            r.error(f"{p}.name", f"{name!r} is used by another listener")
        names.add(name)
        bind = r.get(t, p, "bind", parse_bind)
        if bind is not None and bind in binds and not (bind.kind == "tcp" and bind.port == 0):
            r.error(f"{p}.bind", f"{bind} is used by another listener")
        binds.add(bind)
        role = r.get(t, p, "role", _one_of("client", "federation"), "client")
        prefixes = r.list_of(t, p, "prefixes", parse_prefix, ROLE_PREFIXES.get(role, ()))
        hosts_raw = r.list_of(t, p, "hosts", parse_host_name, ())
        if "hosts" in t and t["hosts"] == []:
            r.error(f"{p}.hosts", "empty: every request would get 421 (omit it to answer any Host)")
        tls = _read_tls(r, t["tls"], f"{p}.tls") if "tls" in t else None
        out.append(Listener(
            name=name, bind=bind, role=role, prefixes=prefixes,  # type: ignore[arg-type]
            hosts=frozenset(hosts_raw) if "hosts" in t else None, tls=tls,
            proxy_protocol=r.get(t, p, "proxy_protocol", _bool, False),
        ))
    return tuple(out)


def _read_well_known(r: _Reader, raw: object) -> WellKnown | None:
    p = "well_known"
    t = r.table(raw, p, ("server", "client", "identity_server", "client_extra"))
    if t is None:
        return None
    extra = t.get("client_extra", {})
    if not isinstance(extra, dict):
        r.error(f"{p}.client_extra", "expected a table")
        extra = {}
    for key, value in extra.items():
        if key in ("m.homeserver", "m.identity_server"):
            r.error(f"{p}.client_extra.{key}", "set by well_known.client / identity_server")
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            r.error(f"{p}.client_extra.{key}",
                    "not representable in JSON (TOML dates and times are not)")
    if "server" not in t and "client" not in t:
        r.error(p, "set server, client or both")
    return WellKnown(
        server=r.get(t, p, "server", _server_name, ""),
        client=r.get(t, p, "client", _http_url, ""),
        identity_server=r.get(t, p, "identity_server", _http_url, None),
        client_extra=dict(extra),
    )


def _read_admin(r: _Reader, raw: object) -> Admin:
    t = r.table(raw, "admin", ("blocked_prefixes", "allow_from"))
    if t is None:
        return Admin()
    return Admin(
        blocked_prefixes=tuple(
            s.lower() for s in r.list_of(t, "admin", "blocked_prefixes", parse_prefix,
                                         DEFAULT_BLOCKED_PREFIXES)
        ),
        allow_from=r.list_of(t, "admin", "allow_from", parse_cidr, ()),
    )


def _read_limits(r: _Reader, raw: object) -> Limits:
    p = "limits"
    t = r.table(raw, p, ("max_body_size", "header_timeout", "body_timeout", "idle_timeout",
                         "max_header_size"))
    if t is None:
        return Limits()
    d = Limits()
    return Limits(
        max_body_size=r.get(t, p, "max_body_size", parse_size, d.max_body_size),
        header_timeout=r.get(t, p, "header_timeout", parse_duration, d.header_timeout),
        body_timeout=r.get(t, p, "body_timeout", parse_duration, d.body_timeout),
        idle_timeout=r.get(t, p, "idle_timeout", parse_duration, d.idle_timeout),
        max_header_size=r.get(t, p, "max_header_size", _header_size, d.max_header_size),
    )


#: Bounds of limits.max_header_size: a head below 1 KiB refuses ordinary
#: requests; one request line and 128 header fields of 8 KiB each (aiohttp's
#: own limits) are about 1 MiB.
_HEAD_SIZE_RANGE = (1024, 1024 * 1024)


def _header_size(value: object) -> int:
    n = parse_size(value)
    lo, hi = _HEAD_SIZE_RANGE
    if not lo <= n <= hi:
        raise _Bad(f"expected a size from {lo} (1K) to {hi} (1M)")
    return n


def _read_forwarding(r: _Reader, raw: object) -> Forwarding:
    p = "forwarding"
    t = r.table(raw, p, ("trusted_proxies", "request_id_header", "buffer_chunked_uploads"))
    if t is None:
        return Forwarding()
    return Forwarding(
        trusted_proxies=r.list_of(t, p, "trusted_proxies", parse_trusted_proxy, ()),
        request_id_header=r.get(t, p, "request_id_header", _header_name, "X-Request-ID"),
        buffer_chunked_uploads=r.get(t, p, "buffer_chunked_uploads", _bool, False),
    )


def _read_log(r: _Reader, raw: object) -> Log:
    t = r.table(raw, "log", ("level", "access"))
    if t is None:
        return Log()
    return Log(
        level=r.get(t, "log", "level", _one_of(*LOG_LEVELS), "info"),
        access=r.get(t, "log", "access", _one_of(*ACCESS_FORMATS), "plain"),
    )


def _read_metrics(r: _Reader, raw: object) -> Metrics | None:
    t = r.table(raw, "metrics", ("bind",))
    if t is None:
        return None
    bind = r.get(t, "metrics", "bind", parse_bind, Bind("tcp", "127.0.0.1", 9108))
    return Metrics(bind=bind)


def _check_metrics_bind(r: _Reader, bind: Bind | None, raw_listeners: object) -> None:
    """The metrics endpoint cannot share a listener's socket: one of the two
    would fail to bind, or (systemd) both would serve one socket."""
    if bind is None or (bind.kind == "tcp" and bind.port == 0):
        return
    if raw_listeners is None:
        raw_listeners = tomllib.loads(DEFAULT_CONFIG_TOML)["listeners"]
    if not isinstance(raw_listeners, list):
        return
    for i, item in enumerate(raw_listeners):
        if not isinstance(item, dict):
            continue
        try:
            other = parse_bind(item.get("bind"))
        except _Bad:
            continue  # reported with the listener
        if other == bind:
            r.error("metrics.bind", f"{bind} is also listeners[{i}].bind")


# -- [rate_limits] and listeners' proxy_protocol -----------------------------

_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day)\s*$")


def parse_rate(value: object) -> Rate | None:
    """``"N/second|minute|hour|day"``; ``"0"`` (or 0) turns the limit off."""
    if value == "0" or (isinstance(value, int) and not isinstance(value, bool) and value == 0):
        return None
    m = _RATE_RE.match(value) if isinstance(value, str) else None
    if m is None or int(m.group(1)) == 0:
        raise _Bad(f"expected \"N/second\", \"N/minute\", \"N/hour\" or \"N/day\" "
                   f"(N from 1), or \"0\" for no limit; got {value!r}")
    return Rate(int(m.group(1)), m.group(2))  # type: ignore[arg-type]


def parse_rate_storage(value: object) -> str:
    """``memory://`` or a Redis URL: ``redis://[:password@]host[:port][/db]``,
    ``rediss://...`` (TLS) or ``redis+unix:///path/redis.sock[?db=N]``."""
    if value == "memory://":
        return value
    if not isinstance(value, str):
        raise _Bad("expected \"memory://\" or a Redis URL such as \"redis://127.0.0.1:6379/0\"")
    from urllib.parse import urlsplit

    try:
        url = urlsplit(value)
        url.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError as exc:
        raise _Bad(f"{value!r}: {exc}") from None
    if url.scheme in ("redis", "rediss"):
        if not url.hostname:
            raise _Bad(f"{value!r}: missing host")
        if url.path not in ("", "/") and not url.path[1:].isdigit():
            raise _Bad(f"{value!r}: the path is the database number, e.g. \"/0\"")
        return value
    if url.scheme == "redis+unix":
        if not url.path.startswith("/"):
            raise _Bad(f"{value!r}: expected redis+unix:///absolute/path.sock")
        return value
    raise _Bad(f"{value!r}: expected \"memory://\", redis://, rediss:// or redis+unix://")


def _read_rate_limits(r: _Reader, raw: object) -> RateLimits:
    p = "rate_limits"
    t = r.table(raw, p, ("login", "register", "password", "requests", "connections",
                         "storage"))
    if t is None:
        return RateLimits()
    d = RateLimits()
    return RateLimits(
        login=r.get(t, p, "login", parse_rate, d.login),
        register=r.get(t, p, "register", parse_rate, d.register),
        password=r.get(t, p, "password", parse_rate, d.password),
        requests=r.get(t, p, "requests", parse_rate, d.requests),
        connections=r.get(t, p, "connections", _int_range(0, 1_000_000), d.connections),
        storage=r.get(t, p, "storage", parse_rate_storage, d.storage),
    )


def _check_proxy_protocol(r: _Reader, cfg: Config) -> None:
    """The header is taken only from trusted balancers; without any, every
    connection would be closed."""
    for i, lst in enumerate(cfg.listeners):
        if not lst.proxy_protocol or lst.bind is None:
            continue
        if lst.bind.kind == "unix":
            r.error(f"listeners[{i}].proxy_protocol",
                    "a UNIX socket peer has no address to trust; use a TCP bind")
        elif not cfg.forwarding.trusted_proxies:
            r.error(f"listeners[{i}].proxy_protocol",
                    "the header is accepted only from forwarding.trusted_proxies, which is "
                    "empty: list the balancers' addresses there")


# -- [acme] (docs/DESIGN.md section 8) -----------------------------------------------------

#: One DNS label (RFC 1035 section 2.3.1, with digits first as RFC 1123 allows).
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+\Z")
_LONG_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*d\s*$")


def _acme_domain(value: object) -> str:
    """A name a CA can issue for by HTTP-01 or TLS-ALPN-01: a DNS name, no
    wildcard (that takes DNS-01), no IP address."""
    if not isinstance(value, str) or not value:
        raise _Bad("expected a DNS name such as \"matrix.example.com\"")
    name = value.lower().rstrip(".")
    if name.startswith("*."):
        raise _Bad(f"{value!r}: a wildcard needs the dns-01 challenge, which the gate "
                   "does not answer; list each name")
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        pass
    else:
        raise _Bad(f"{value!r}: an IP address, not a DNS name")
    labels = name.split(".")
    if (len(name) > 253 or len(labels) < 2
            or not all(_DNS_LABEL.match(label) for label in labels)):
        raise _Bad(f"{value!r} is not a DNS name (letters, digits and '-' in dot-separated "
                   "labels, at least two labels)")
    return name


def _acme_directory(value: object) -> str:
    from urllib.parse import urlsplit

    if not isinstance(value, str):
        raise _Bad("expected the https:// URL of an ACME directory")
    try:
        url = urlsplit(value)
        url.port  # noqa: B018 - raises on a bad port
    except ValueError:
        url = None
    # RFC 8555 section 6.1: ACME is spoken over HTTPS only.
    if (url is None or url.scheme != "https" or not url.hostname or url.username
            or url.fragment or any(c.isspace() for c in value)):
        raise _Bad(f"{value!r}: expected the https:// URL of an ACME directory, e.g. "
                   f"{LETS_ENCRYPT!r}")
    return value


def _acme_email(value: object) -> str:
    if not isinstance(value, str) or not _EMAIL.match(value):
        raise _Bad("expected an e-mail address such as \"admin@example.com\"")
    return value


def _long_duration(value: object) -> float:
    """A duration, where days ("30d") are allowed too."""
    if isinstance(value, str):
        m = _LONG_DURATION.match(value)
        if m:
            value = float(m.group(1)) * 86400.0
    try:
        return parse_duration(value)
    except _Bad as exc:
        raise _Bad(str(exc).replace('"2m")', '"2m", "30d")')) from None


def _writable_dir(value: object) -> str:
    """An absolute directory path the gate can create or write into."""
    path = _str(value)
    if not os.path.isabs(path):
        raise _Bad(f"{path}: must be an absolute path")
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise _Bad(f"{path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "not writable" if probe == path else f"cannot be created ({probe} is not writable)"
        raise _Bad(f"{path}: {what} by this user (uid {os.getuid()})")
    return path


def _ca_bundle(value: object) -> str:
    path = _file(value)
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except (ssl.SSLError, ValueError) as exc:
        raise _Bad(f"{path}: not a PEM bundle of CA certificates "
                   f"({getattr(exc, 'reason', None) or exc})") from None
    return path


def _read_acme(r: _Reader, raw: object) -> Acme | None:
    p = "acme"
    t = r.table(raw, p, ("directory", "email", "domains", "state_dir", "ca_bundle",
                         "challenge", "renew_before"))
    if t is None:
        return None
    d = Acme(domains=())
    domains = r.list_of(t, p, "domains", _acme_domain, ())
    if "domains" not in t or t["domains"] == []:
        r.error(f"{p}.domains", "required: at least one DNS name to obtain a certificate for")
    elif len(set(domains)) < len(domains):
        seen: set[str] = set()
        for i, raw_name in enumerate(t["domains"]):
            name = raw_name.lower().rstrip(".") if isinstance(raw_name, str) else None
            if name in seen:
                r.error(f"{p}.domains[{i}]", f"{raw_name!r} is listed twice")
            seen.add(name)  # type: ignore[arg-type]
    return Acme(
        domains=tuple(dict.fromkeys(domains)),
        directory=r.get(t, p, "directory", _acme_directory, d.directory),
        email=r.get(t, p, "email", _acme_email, None),
        state_dir=r.get(t, p, "state_dir", _writable_dir, d.state_dir),
        ca_bundle=r.get(t, p, "ca_bundle", _ca_bundle, None),
        # A bad value leaves "" rather than the default, so that the http-01
        # check below does not report it a second time.
        challenge=r.get(t, p, "challenge", _one_of(*ACME_CHALLENGES),
                        "" if "challenge" in t else d.challenge),
        renew_before=r.get(t, p, "renew_before", _long_duration, d.renew_before),
    )


def _check_acme(r: _Reader, cfg: Config) -> None:
    """What [acme] and the listeners' ``tls.acme`` say of each other."""
    users = [i for i, lst in enumerate(cfg.listeners) if lst.tls is not None and lst.tls.acme]
    if cfg.acme is None:
        for i in users:
            r.error(f"listeners[{i}].tls.acme", "true, but there is no [acme] section "
                    "(directory, domains, state_dir)")
        return
    if not users:
        r.error("acme", "no listener has tls.acme = true: set it in the [listeners.tls] "
                "block of the listeners that should serve these certificates")
    if cfg.acme.challenge == "tls-alpn-01":
        for i in users:
            if cfg.listeners[i].proxy_protocol:
                r.error(f"listeners[{i}].proxy_protocol", "TLS-ALPN-01 is answered from the "
                        "ClientHello, which comes after a PROXY header here: use "
                        "acme.challenge = \"http-01\" on this listener's set-up")
    if cfg.acme.challenge == "http-01" and all(lst.tls is not None for lst in cfg.listeners):
        r.error("acme.challenge", "\"http-01\" is answered on a plain-HTTP listener (the CA "
                "connects to port 80) and there is none: add one, or use \"tls-alpn-01\"")


_SECTIONS = ("server", "upstream", "listeners", "well_known", "admin", "limits",
             "forwarding", "log", "metrics", "rate_limits", "acme")


def from_dict(doc: dict[str, Any], source: str = "<dict>") -> Config:
    """Parse a TOML document (already decoded) into a :class:`Config`."""
    r = _Reader()
    r.table(doc, "", _SECTIONS)
    cfg = Config(
        server=_read_server(r, doc.get("server", {})),
        upstream=_read_upstream(r, doc.get("upstream", {})),
        listeners=_read_listeners(
            r, doc["listeners"] if "listeners" in doc
            else tomllib.loads(DEFAULT_CONFIG_TOML)["listeners"]),
        well_known=_read_well_known(r, doc["well_known"]) if "well_known" in doc else None,
        admin=_read_admin(r, doc.get("admin", {})),
        limits=_read_limits(r, doc.get("limits", {})),
        forwarding=_read_forwarding(r, doc.get("forwarding", {})),
        log=_read_log(r, doc.get("log", {})),
        metrics=_read_metrics(r, doc["metrics"]) if "metrics" in doc else None,
        acme=_read_acme(r, doc["acme"]) if "acme" in doc else None,
        source=source,
        rate_limits=_read_rate_limits(r, doc.get("rate_limits", {})),
    )
    _check_acme(r, cfg)
    if cfg.metrics is not None:
        _check_metrics_bind(r, cfg.metrics.bind, doc.get("listeners"))
    _check_proxy_protocol(r, cfg)
    if r.errors:
        raise ConfigError(r.errors)
    return cfg


def loads(text: str, source: str = "<string>") -> Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: invalid TOML: {exc}"]) from None
    return from_dict(doc, source)


def load(path: str | None) -> Config:
    """Read the config file at *path*; ``None`` gives the embedded default."""
    if path is None:
        return loads(DEFAULT_CONFIG_TOML, "<built-in default>")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    return loads(text, path)


# --------------------------------------------------------------------------
# The effective config, printed by `palpo-gate check` (like `nginx -T`).


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        # A JSON string is a valid TOML basic string (escapes included).
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list | tuple | frozenset):
        items = sorted(v) if isinstance(v, frozenset) else v
        return "[" + ", ".join(_toml_value(x) for x in items) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_value(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return _toml_value(str(v))


def _seconds(x: float) -> str | float:
    return f"{int(x)}s" if x == int(x) else x


def _days(x: float) -> str | float:
    return f"{int(x // 86400)}d" if x % 86400 == 0 else _seconds(x)


def _dump_listener(lst: Listener) -> list[str]:
    """The ``[[listeners]]`` table of one listener, as :func:`dump` writes it."""
    out = ["\n[[listeners]]"]
    out.append(f"name = {_toml_value(lst.name)}")
    out.append(f"bind = {_toml_value(str(lst.bind))}")
    out.append(f"role = {_toml_value(lst.role)}")
    out.append(f"prefixes = {_toml_value(list(lst.prefixes))}")
    if lst.hosts is not None:
        out.append(f"hosts = {_toml_value(lst.hosts)}")
    if lst.proxy_protocol:
        out.append("proxy_protocol = true")
    if lst.tls:
        out.append("[listeners.tls]")
        if lst.tls.cert:
            out.append(f"cert = {_toml_value(lst.tls.cert)}")
            out.append(f"key = {_toml_value(lst.tls.key)}")
        out.append(f"strict_sni = {_toml_value(lst.tls.strict_sni)}")
        if lst.tls.acme:
            out.append("acme = true")
        for s in lst.tls.sni:
            out.append("[[listeners.tls.sni]]")
            out.append(f"names = {_toml_value(list(s.names))}")
            out.append(f"cert = {_toml_value(s.cert)}")
            out.append(f"key = {_toml_value(s.key)}")
    return out


def dump(cfg: Config) -> str:
    """The effective config as TOML that :func:`loads` reads back to the same Config."""
    out: list[str] = [f"# effective configuration from {cfg.source}"]

    def section(name: str, items: list[tuple[str, object]]) -> None:
        out.append(f"\n[{name}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in items if v is not None)

    section("server", [("workers", cfg.server.workers),
                       ("drain_timeout", _seconds(cfg.server.drain_timeout))])
    u = cfg.upstream
    section("upstream", [("url", u.url), ("connect_timeout", _seconds(u.connect_timeout)),
                         ("read_timeout", _seconds(u.read_timeout)), ("pool_size", u.pool_size)])
    for lst in cfg.listeners:
        out.extend(_dump_listener(lst))
    if cfg.well_known:
        w = cfg.well_known
        section("well_known", [("server", w.server or None), ("client", w.client or None),
                               ("identity_server", w.identity_server)])
        if w.client_extra:
            out.append("[well_known.client_extra]")
            out.extend(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in w.client_extra.items())
    section("admin", [("blocked_prefixes", list(cfg.admin.blocked_prefixes)),
                      ("allow_from", [str(n) for n in cfg.admin.allow_from])])
    lim = cfg.limits
    section("limits", [("max_body_size", lim.max_body_size),
                       ("header_timeout", _seconds(lim.header_timeout)),
                       ("body_timeout", _seconds(lim.body_timeout)),
                       ("idle_timeout", _seconds(lim.idle_timeout)),
                       ("max_header_size", lim.max_header_size)])
    section("forwarding", [("trusted_proxies", [str(n) for n in cfg.forwarding.trusted_proxies]),
                           ("request_id_header", cfg.forwarding.request_id_header),
                           ("buffer_chunked_uploads", cfg.forwarding.buffer_chunked_uploads)])
    section("log", [("level", cfg.log.level), ("access", cfg.log.access)])
    if cfg.metrics:
        section("metrics", [("bind", str(cfg.metrics.bind))])
    rl = cfg.rate_limits
    section("rate_limits", [*((k, str(v) if v else "0") for k, v in (
        ("login", rl.login), ("register", rl.register), ("password", rl.password),
        ("requests", rl.requests))), ("connections", rl.connections), ("storage", rl.storage)])
    if cfg.acme:
        a = cfg.acme
        section("acme", [("directory", a.directory), ("email", a.email),
                         ("domains", list(a.domains)), ("state_dir", a.state_dir),
                         ("ca_bundle", a.ca_bundle), ("challenge", a.challenge),
                         ("renew_before", _days(a.renew_before))])
    return "\n".join(out) + "\n"
