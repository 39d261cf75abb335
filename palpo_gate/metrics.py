"""Prometheus metrics: the per-process registry, the text exposition format,
the merge of several workers' snapshots and the scrape handler (docs/DESIGN.md section 6,
``[metrics] bind``).

This module owns every metric name, label set and bucket bound the gate
exports, and the bytes of the exposition. It knows nothing of routing,
upstreams or listeners beyond the label values it is handed: the proxy calls
:meth:`Registry.observe` once per request, the pool's connection counts are
read by callables registered with :meth:`Registry.register_gauge` at setup
and evaluated only at scrape time. It must not do IO on the hot path, and it
must not allocate a series per request: label values come from small fixed
sets (listener names from the config, :data:`ROUTES`, HTTP statuses).

Why the text format is written by hand rather than with ``prometheus_client``:
the per-request cost. Measured with timeit (CPython 3.11.7, prometheus_client
0.26.0, AMD EPYC, best of 7 x 200 000 calls, two runs, the same labels every
call; an empty call costs 0.03 us of it):

- ``Registry.observe()`` (request count, histogram, both byte counters):
  0.34-0.36 us per request;
- prometheus_client ``Counter.labels().inc()`` + ``Histogram.labels().observe()``:
  3.2-3.3 us (about 9x);
- prometheus_client updating the same four series as ``observe()``: 5.8-6.3 us
  (about 17x).

``observe()`` is one dict lookup on a ``(listener, route)`` tuple, a
:func:`bisect.bisect_left` over the bucket bounds and a few integer adds, with
no lock: each worker is one thread, one event loop. prometheus_client pays, per
series, for ``labels()`` (a tuple of ``str()`` label values and a lock), a lock
per value it adds to, and a linear scan of the buckets. The scrape side is
cheap enough to leave unoptimised: ``render()`` of 105 (listener, route,
status) series takes about 0.35 ms, ``write_snapshot()`` 0.45 ms, ``merge()``
of 8 snapshot files 2.2 ms. The format itself is small and stable
(https://prometheus.io/docs/instrumenting/exposition_formats/, version 0.0.4).

Several workers (``server.workers`` > 1): each keeps its own
:class:`Registry` and writes :meth:`Registry.snapshot` (plain JSON) every
second to ``<runtime dir>/<name>.json`` with :meth:`Registry.write_snapshot`;
the process that serves ``/metrics`` answers ``merge(read_snapshots(dir),
stale_after=...)``. Counters and histograms add up; gauges add up too
(connections; ``palpo_gate_workers`` is 1 per process) except
``palpo_gate_config_generation`` (max) and ``palpo_gate_start_time_seconds``
(min), see :data:`GAUGE_MERGE`. A worker that died leaves its last file: with
*stale_after* its counters still count (a total never goes down, which
Prometheus would read as a reset) but its gauges do not.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any

from aiohttp import web

logger = logging.getLogger("palpo_gate.metrics")

#: The ``route`` label: what the gate did with the request (docs/DESIGN.md section 2).
ROUTES: tuple[str, ...] = (
    "forward", "admin", "health", "well_known", "not_found", "bad_request", "rate_limited",
    "other",
)

#: The ``kind`` label of ``palpo_gate_upstream_errors_total``, one per upstream
#: failure class of :mod:`errors` (the ``metric`` column of ``errors.FAILURES``).
UPSTREAM_ERROR_KINDS: tuple[str, ...] = ("connect_error", "connect_timeout", "timeout", "broken")

#: Upper bounds of the duration histogram, in seconds; ``+Inf`` is implicit.
#: Up to 120 s because a /sync long-poll is held 30 s and more, up to
#: upstream.read_timeout [120 s].
BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)

#: The scrape response's Content-Type (text exposition format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Names of the gauges the gate registers with :meth:`Registry.register_gauge`.
UPSTREAM_CONNECTIONS = "palpo_gate_upstream_connections"
UPSTREAM_IDLE_CONNECTIONS = "palpo_gate_upstream_idle_connections"

#: Version of the :meth:`Registry.snapshot` layout; other versions are ignored.
SNAPSHOT_VERSION = 1

#: How :func:`merge` combines one gauge across workers; any other gauge is summed.
GAUGE_MERGE: dict[str, Callable[[float, float], float]] = {
    "palpo_gate_config_generation": max,
    "palpo_gate_start_time_seconds": min,
    # the certificate that expires first, of those the workers serve
    "palpo_gate_certificate_expiry_timestamp_seconds": min,
}

#: What a registered gauge callable returns: one value, or one value per
#: tuple of label values (in the order of the gauge's label names).
GaugeValue = float | Mapping[tuple[str, ...], float]

#: One metric family of a snapshot, as JSON: ``{"name", "type", "help",
#: "labels": [label names], "samples": [[[label values], value]]}``; a
#: histogram has ``"bounds"`` too and its values are ``{"buckets": [count per
#: bucket, not cumulative, +Inf last], "sum": float}``.
Family = dict[str, Any]

Handler = Callable[[web.BaseRequest], Awaitable[web.Response]]

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_TYPES = frozenset({"counter", "gauge", "histogram"})

_REQUESTS = "palpo_gate_requests_total"
_DURATION = "palpo_gate_request_duration_seconds"
_UPSTREAM_ERRORS = "palpo_gate_upstream_errors_total"
_REQUEST_BYTES = "palpo_gate_request_bytes_total"
_RESPONSE_BYTES = "palpo_gate_response_bytes_total"
_CLIENT_CONNECTIONS = "palpo_gate_client_connections"
_GENERATION = "palpo_gate_config_generation"
_RELOAD_FAILURES = "palpo_gate_reload_failures_total"
_WORKERS = "palpo_gate_workers"
_START_TIME = "palpo_gate_start_time_seconds"
_LOG_DROPPED = "palpo_gate_log_lines_dropped_total"

#: The ``stream`` label of ``palpo_gate_log_lines_dropped_total``.
LOG_STREAMS: tuple[str, ...] = ("stdout", "stderr")

#: The families the registry fills itself: (name, type, help, label names).
_BUILTIN: dict[str, tuple[str, str, tuple[str, ...]]] = {
    _REQUESTS: ("counter", "Requests answered, by listener, route and HTTP status.",
                ("listener", "route", "status")),
    _DURATION: ("histogram", "Time from request head to the end of the response, in seconds.",
                ("listener", "route")),
    _UPSTREAM_ERRORS: ("counter", "Upstream failures, by kind.", ("kind",)),
    _REQUEST_BYTES: ("counter", "Request body bytes sent from clients to the upstream.",
                     ("listener",)),
    _RESPONSE_BYTES: ("counter", "Response body bytes sent to clients.", ("listener",)),
    _CLIENT_CONNECTIONS: ("gauge", "Open client connections.", ("listener",)),
    _GENERATION: ("gauge", "Configuration generation: 1 at start, +1 per successful reload.", ()),
    _RELOAD_FAILURES: ("counter", "Reloads refused (bad configuration); the old one serves.", ()),
    _WORKERS: ("gauge", "Worker processes serving the listeners.", ()),
    _START_TIME: ("gauge", "Start time of the process, in seconds since the epoch.", ()),
    _LOG_DROPPED: ("counter", "Log lines dropped because nothing read stdout (access lines) "
                   "or stderr (messages) fast enough.", ("stream",)),
}


class Series:
    """One (listener, route): the duration histogram, byte counts and the
    request count per status, updated in place by :meth:`observe`. The proxy
    holds the series of its (listener, route) pairs (:meth:`Registry.series`)
    and counts into them directly: no label lookup per request."""

    __slots__ = ("by_status", "bytes_in", "bytes_out", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # per bucket, not cumulative; +Inf last
        self.sum = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.by_status: dict[int, int] = {}

    def observe(self, status: int, duration: float, bytes_in: int, bytes_out: int) -> None:
        """Count one answered request: *duration* in seconds, *bytes_in* the
        request body bytes sent upstream, *bytes_out* the response body bytes
        sent to the client."""
        # bisect_left: the first bound >= duration, as `le` means "<=".
        self.counts[bisect_left(BUCKETS, duration)] += 1
        self.sum += duration
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        by_status = self.by_status
        by_status[status] = by_status.get(status, 0) + 1


class Registry:
    """The metrics of one process. Not thread-safe: call it from the thread
    of the event loop that serves the requests."""

    def __init__(self, listeners: Iterable[str] = (),
                 log_drops: Callable[[], Mapping[str, int]] | None = None) -> None:
        """*listeners*: names whose per-listener series show 0 before any traffic;
        *log_drops*: read at scrape time, the log lines dropped so far per
        stream (:func:`logpipe.dropped`)."""
        self._series: dict[tuple[str, str], Series] = {}
        self._upstream_errors: dict[str, int] = dict.fromkeys(UPSTREAM_ERROR_KINDS, 0)
        self._client_connections: dict[str, int] = dict.fromkeys(listeners, 0)
        self._gauges: dict[str, tuple[str, tuple[str, ...], Callable[[], GaugeValue]]] = {}
        self._counters: set[str] = set()  # of the registered ones (register_counter)
        self.generation = 1
        self.reload_failures = 0
        self.start_time = time.time()
        self._log_drops = log_drops

    # -- hot path: once per request or connection ---------------------------

    def observe(self, listener: str, route: str, status: int, duration: float,
                bytes_in: int, bytes_out: int) -> None:
        """Count one answered request (:meth:`Series.observe`) under
        (*listener*, *route*)."""
        try:
            s = self._series[listener, route]
        except KeyError:
            s = self.series(listener, route)
        s.observe(status, duration, bytes_in, bytes_out)

    def series(self, listener: str, route: str) -> Series:
        """The series of (*listener*, *route*), to count into directly. It is
        exported from its first request on, as with :meth:`observe`."""
        # An unknown route is counted as "other" and never stored under its
        # own key: the label set stays the fixed ROUTES whatever the caller passes.
        if route not in ROUTES:
            route = "other"
        return self._series.setdefault((listener, route), Series())

    def upstream_error(self, kind: str) -> None:
        """Count one upstream failure; *kind* is one of :data:`UPSTREAM_ERROR_KINDS`."""
        errors = self._upstream_errors
        errors[kind] = errors.get(kind, 0) + 1

    def client_connection(self, listener: str, delta: int) -> None:
        """A client connection opened (*delta* = 1) or closed (-1) on *listener*."""
        conns = self._client_connections
        conns[listener] = conns.get(listener, 0) + delta

    # -- setup and reload ---------------------------------------------------

    def register_gauge(self, name: str, help: str, fn: Callable[[], GaugeValue],
                       labels: tuple[str, ...] = ()) -> None:
        """A gauge whose value *fn* returns at scrape time: a number, or, when
        the gauge has label names *labels*, a mapping from tuples of label
        values to numbers. Registering a name again replaces its callable (a
        reload that builds a new pool re-registers its counts)."""
        if not _NAME_RE.match(name) or name in _BUILTIN:
            raise ValueError(f"metric name {name!r} is invalid or taken")
        for label in labels:
            if not _LABEL_RE.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"label name {label!r} is invalid")
        self._gauges[name] = (help, labels, fn)

    def register_counter(self, name: str, help: str, fn: Callable[[], GaugeValue],
                         labels: tuple[str, ...] = ()) -> None:
        """As :meth:`register_gauge`, for a total its owner keeps (it never
        goes down; :func:`merge` keeps a dead worker's share)."""
        self.register_gauge(name, help, fn, labels)
        self._counters.add(name)

    def reload_succeeded(self, generation: int) -> None:
        self.generation = generation

    def reload_failed(self) -> None:
        self.reload_failures += 1

    # -- scrape ---------------------------------------------------------------

    def render(self) -> bytes:
        """This process's metrics in the text exposition format."""
        return render_families(self.families())

    def snapshot(self) -> dict[str, Any]:
        """This process's metrics as JSON-serialisable data, gauges evaluated."""
        return {"version": SNAPSHOT_VERSION, "pid": os.getpid(), "time": time.time(),
                "families": self.families()}

    def write_snapshot(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`snapshot` to *path* atomically: a reader sees the old
        file or the new one, never a part (temporary file + ``os.replace``).
        No fsync: the runtime directory is a tmpfs and a snapshot is rewritten
        every second."""
        data = json.dumps(self.snapshot(), separators=(",", ":")).encode()
        path = os.fspath(path)
        directory, base = os.path.split(path)
        # A leading dot: read_snapshots() skips the file while it is written.
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def families(self) -> list[Family]:
        """The metric families, in exposition order, samples sorted by label values."""
        requests: list[list[Any]] = []
        durations: list[list[Any]] = []
        bytes_in = dict.fromkeys(self._client_connections, 0)
        bytes_out = dict.fromkeys(self._client_connections, 0)
        for (listener, route), s in list(self._series.items()):
            if not s.by_status:
                continue  # held by a handler (series()), never counted into yet
            for status, n in list(s.by_status.items()):
                requests.append([[listener, route, str(status)], n])
            durations.append([[listener, route], {"buckets": list(s.counts), "sum": s.sum}])
            bytes_in[listener] = bytes_in.get(listener, 0) + s.bytes_in
            bytes_out[listener] = bytes_out.get(listener, 0) + s.bytes_out
        connections = self._client_connections

        families = [
            _builtin(_REQUESTS, requests),
            _builtin(_DURATION, durations),
            _builtin(_UPSTREAM_ERRORS, [[[k], v] for k, v in self._upstream_errors.items()]),
            _builtin(_REQUEST_BYTES, [[[k], v] for k, v in bytes_in.items()]),
            _builtin(_RESPONSE_BYTES, [[[k], v] for k, v in bytes_out.items()]),
            _builtin(_CLIENT_CONNECTIONS, [[[k], v] for k, v in list(connections.items())]),
        ]
        for name, (help, labels, fn) in list(self._gauges.items()):
            typ = "counter" if name in self._counters else "gauge"
            families.append(_family(name, typ, help, labels, _gauge_samples(name, labels, fn)))
        drops = dict.fromkeys(LOG_STREAMS, 0)
        if self._log_drops is not None:
            drops.update(self._log_drops())
        families += [
            _builtin(_GENERATION, [[[], self.generation]]),
            _builtin(_RELOAD_FAILURES, [[[], self.reload_failures]]),
            # 1 per process: merge() sums it to the number of workers.
            _builtin(_WORKERS, [[[], 1]]),
            _builtin(_START_TIME, [[[], self.start_time]]),
            _builtin(_LOG_DROPPED, [[[k], v] for k, v in drops.items()]),
        ]
        return families


def _family(name: str, typ: str, help: str, labels: Iterable[str],
            samples: list[list[Any]]) -> Family:
    samples.sort(key=lambda sample: sample[0])
    family: Family = {"name": name, "type": typ, "help": help, "labels": list(labels),
                      "samples": samples}
    if typ == "histogram":
        family["bounds"] = list(BUCKETS)
    return family


def _builtin(name: str, samples: list[list[Any]]) -> Family:
    typ, help, labels = _BUILTIN[name]
    return _family(name, typ, help, labels, samples)


def _gauge_samples(name: str, labels: tuple[str, ...],
                   fn: Callable[[], GaugeValue]) -> list[list[Any]]:
    """Evaluate a registered gauge; one that fails is left out of this scrape
    rather than failing the scrape."""
    try:
        value = fn()
        if isinstance(value, Mapping):
            samples = []
            for key, v in value.items():
                values = [key] if isinstance(key, str) else [str(x) for x in key]
                if len(values) != len(labels):
                    raise ValueError(f"label values {key!r} do not match {labels!r}")
                samples.append([values, _number(v)])
            return samples
        if labels:
            raise ValueError(f"a number, but the gauge has labels {labels!r}")
        return [[[], _number(value)]]
    except Exception:
        logger.warning("metrics: gauge %s left out of this scrape", name, exc_info=True)
        return []


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"not a number: {v!r}")
    return v


# -- the text exposition format, version 0.0.4 -------------------------------

def render_families(families: Iterable[Family]) -> bytes:
    """Families (as in a snapshot) in the text exposition format."""
    out: list[str] = []
    for family in families:
        name = family["name"]
        typ = family["type"]
        labels = family["labels"]
        out.append(f"# HELP {name} {_escape_help(family['help'])}\n# TYPE {name} {typ}\n")
        if typ == "histogram":
            les = [_go_float(b) for b in family["bounds"]] + ["+Inf"]
            for values, value in family["samples"]:
                pairs = _label_pairs(labels, values)
                prefix = name + "_bucket{" + "".join(p + "," for p in pairs) + 'le="'
                cumulative = 0
                for le, n in zip(les, value["buckets"], strict=True):
                    cumulative += n
                    out.append(f'{prefix}{le}"}} {cumulative}\n')
                braces = "{" + ",".join(pairs) + "}" if pairs else ""
                out.append(f"{name}_sum{braces} {_value(value['sum'])}\n")
                out.append(f"{name}_count{braces} {cumulative}\n")
        else:
            for values, value in family["samples"]:
                pairs = _label_pairs(labels, values)
                braces = "{" + ",".join(pairs) + "}" if pairs else ""
                out.append(f"{name}{braces} {_value(value)}\n")
    return "".join(out).encode()


def _label_pairs(labels: list[str], values: list[str]) -> list[str]:
    return [f'{label}="{_escape_label(value)}"' for label, value in zip(labels, values,
                                                                         strict=True)]


def _escape_label(value: str) -> str:
    # "label_value can be any sequence of UTF-8 characters, but the backslash
    # (\), double-quote ("), and line feed (\n) characters have to be escaped
    # as \\, \", and \n, respectively."
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    # "HELP lines may contain any sequence of UTF-8 characters (after the metric
    # name), but the backslash and the line feed characters have to be escaped
    # as \\ and \n, respectively." A double quote stays as it is.
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _value(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _go_float(v: float) -> str:
    """*v* as Go's ``strconv.FormatFloat(v, 'g', -1, 64)`` writes it, which is
    how Prometheus' own clients write ``le``: 1.0 → "1", 0.005 → "0.005",
    1e6 → "1e+06", inf → "+Inf"."""
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    if v == 0:
        return "0"
    # repr() gives the shortest digits that read back as v, as Go's -1 precision does.
    sign, digit_tuple, exponent = Decimal(repr(float(v))).normalize().as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple))
    exp10 = len(digits) + exponent - 1  # the exponent of the first digit
    minus = "-" if sign else ""
    if exp10 < -4 or exp10 >= 6:  # Go: %e when exp < -4 || exp >= 6 at shortest precision
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{minus}{mantissa}e{'-' if exp10 < 0 else '+'}{abs(exp10):02d}"
    if exp10 < 0:
        return f"{minus}0.{'0' * (-exp10 - 1)}{digits}"
    whole, frac = digits[:exp10 + 1].ljust(exp10 + 1, "0"), digits[exp10 + 1:]
    return f"{minus}{whole}.{frac}" if frac else f"{minus}{whole}"


# -- several workers -----------------------------------------------------------

def merge(snapshots: Iterable[Mapping[str, Any]], *, stale_after: float | None = None,
          now: float | None = None) -> bytes:
    """The sum of several workers' snapshots, in the text exposition format.

    Counters and histograms add up; a gauge is combined by :data:`GAUGE_MERGE`
    (default: sum). With *stale_after* (seconds), a snapshot older than that
    (a worker that died) still adds its counters and histograms, so that the
    totals never go down, but not its gauges: its connections are gone.
    """
    return render_families(merge_families(snapshots, stale_after=stale_after, now=now))


def merge_families(snapshots: Iterable[Mapping[str, Any]], *,
                   stale_after: float | None = None, now: float | None = None) -> list[Family]:
    """:func:`merge` before rendering: the merged families."""
    if now is None:
        now = time.time()
    merged: dict[str, Family] = {}  # in order of first appearance
    acc: dict[str, dict[tuple[str, ...], Any]] = {}
    for snap in snapshots:
        stale = stale_after is not None and snap["time"] < now - stale_after
        for family in snap["families"]:
            name, typ = family["name"], family["type"]
            have = merged.get(name)
            if have is None:
                have = merged[name] = {k: v for k, v in family.items() if k != "samples"}
                acc[name] = {}
            elif (have["type"], have["labels"], have.get("bounds")) != (
                    typ, family["labels"], family.get("bounds")):
                continue  # a worker of another version, mid-upgrade: leave it out
            if typ == "gauge" and stale:
                continue
            samples = acc[name]
            combine = GAUGE_MERGE.get(name, _add) if typ == "gauge" else _add
            for values, value in family["samples"]:
                key = tuple(values)
                old = samples.get(key)
                if typ == "histogram":
                    if old is None:
                        samples[key] = {"buckets": list(value["buckets"]), "sum": value["sum"]}
                    else:
                        old["buckets"] = [a + b for a, b in zip(old["buckets"], value["buckets"],
                                                                strict=True)]
                        old["sum"] += value["sum"]
                else:
                    samples[key] = value if old is None else combine(old, value)
    families = []
    for name, family in merged.items():
        family["samples"] = sorted(([list(k), v] for k, v in acc[name].items()),
                                   key=lambda sample: sample[0])
        families.append(family)
    return families


def _add(a: float, b: float) -> float:
    return a + b


def read_snapshots(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every snapshot ``*.json`` in *directory*, in file name order. A file
    that cannot be read, is not JSON or is not a snapshot of this version is
    left out: a worker may be writing or may have died mid-way."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    snapshots = []
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, name), "rb") as f:
                snap = json.loads(f.read())
        except (OSError, ValueError):
            continue
        if _is_snapshot(snap):
            snapshots.append(snap)
    return snapshots


def _is_snapshot(snap: Any) -> bool:
    """Whether *snap* has the layout :func:`merge` relies on."""
    try:
        if snap["version"] != SNAPSHOT_VERSION or not isinstance(snap["time"], int | float):
            return False
        for family in snap["families"]:
            labels = family["labels"]
            if (not isinstance(family["name"], str) or not _NAME_RE.match(family["name"])
                    or family["type"] not in _TYPES or not isinstance(family["help"], str)
                    or not all(isinstance(label, str) for label in labels)):
                return False
            nbuckets = 0
            if family["type"] == "histogram":
                for bound in family["bounds"]:
                    _number(bound)
                nbuckets = len(family["bounds"]) + 1
            for values, value in family["samples"]:
                if len(values) != len(labels) or not all(isinstance(v, str) for v in values):
                    return False
                if nbuckets:
                    if len(value["buckets"]) != nbuckets or not all(
                            isinstance(n, int) for n in value["buckets"]):
                        return False
                    _number(value["sum"])
                else:
                    _number(value)
    except (KeyError, TypeError, ValueError):
        return False
    return True


# -- the scrape listener ---------------------------------------------------------

_PATHS = frozenset({"/metrics", "/"})
_METHODS = frozenset({"GET", "HEAD"})


def make_handler(render_fn: Callable[[], bytes]) -> Handler:
    """The handler of a ``web.Server`` bound to ``[metrics] bind``: ``GET``
    or ``HEAD`` of ``/metrics`` (or ``/``) answers ``render_fn()``."""

    async def handler(request: web.BaseRequest) -> web.Response:
        if request.path not in _PATHS:
            return web.Response(status=404, text="404 Not Found\n")
        if request.method not in _METHODS:
            return web.Response(status=405, text="405 Method Not Allowed\n",
                                headers={"Allow": "GET, HEAD"})
        return web.Response(body=render_fn(), headers={"Content-Type": CONTENT_TYPE})

    return handler
