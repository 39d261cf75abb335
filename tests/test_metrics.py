"""Metrics (palpo_gate.metrics): the exposition read back by a strict parser
of the text format 0.0.4 written here, the merge of worker snapshots, the
snapshot files, and the scrape handler over a real socket."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from palpo_gate import errors, metrics
from palpo_gate.metrics import BUCKETS, Registry

LE = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30",
      "60", "120", "+Inf"]

# -- a strict parser of the text exposition format 0.0.4 ------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_HELP_RE = re.compile(rf"# HELP ({_NAME}) (.*)\Z")
_TYPE_RE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)\Z")
_SAMPLE_RE = re.compile(rf"({_NAME})(\{{.*\}})? (\S+)\Z")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}
_SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}

Sample = tuple[str, dict[str, str], float]


def _unescape(text: str, allowed: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\":
            nxt = text[i + 1: i + 2]
            assert nxt and nxt in allowed, f"bad escape in {text!r}"
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            assert text[i] != "\n"
            out.append(text[i])
            i += 1
    return "".join(out)


def _labels(text: str) -> dict[str, str]:
    """``{a="x",b="y"}`` → dict; only \\\\, \\" and \\n escapes; no duplicates."""
    assert text[0] == "{" and text[-1] == "}"
    body, labels, i = text[1:-1], {}, 0
    while i < len(body):
        m = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="').match(body, i)
        assert m, f"bad label at {body[i:]!r}"
        j = m.end()
        while body[j] != '"':
            j += 2 if body[j] == "\\" else 1
        assert m.group(1) not in labels, f"duplicate label {m.group(1)}"
        labels[m.group(1)] = _unescape(body[m.end():j], '\\"n')
        i = j + 1
        if i < len(body):
            assert body[i] == ",", f"expected , at {body[i:]!r}"
            i += 1
    return labels


def _float(text: str) -> float:
    special = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    if text in special:
        return special[text]
    assert re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text), text
    return float(text)


def parse(data: bytes) -> dict[str, dict[str, Any]]:
    """Families by name, in order: {"type", "help", "samples": [Sample]}. Strict:
    UTF-8, LF line ends, HELP then TYPE once per family before its samples,
    families not interleaved, sample names the family's, no blank lines,
    label sets unique, histograms well-formed."""
    text = data.decode("utf-8")
    assert text.endswith("\n")
    families: dict[str, dict[str, Any]] = {}
    current: str | None = None
    for line in text[:-1].split("\n"):
        assert line and "\r" not in line
        if m := _HELP_RE.match(line):
            name = m.group(1)
            assert name not in families, f"family {name} twice"
            families[name] = {"help": _unescape(m.group(2), "\\n"), "type": None, "samples": []}
            current = name
        elif m := _TYPE_RE.match(line):
            assert current is not None and m.group(1) == current
            assert families[current]["type"] is None
            families[current]["type"] = m.group(2)
        else:
            m = _SAMPLE_RE.match(line)
            assert m, f"bad line {line!r}"
            assert current is not None and families[current]["type"] is not None
            suffix = m.group(1)[len(current):]
            assert m.group(1).startswith(current)
            assert suffix in _SUFFIXES[families[current]["type"]], line
            labels = _labels(m.group(2)) if m.group(2) else {}
            families[current]["samples"].append((m.group(1), labels, _float(m.group(3))))
    for name, family in families.items():
        keys = [(s[0], tuple(sorted(s[1].items()))) for s in family["samples"]]
        assert len(keys) == len(set(keys)), f"{name}: a label set twice"
        if family["type"] == "histogram":
            _check_histogram(name, family["samples"])
    return families


def _check_histogram(name: str, samples: list[Sample]) -> None:
    """Buckets ascending by le, cumulative, ending at +Inf == _count; a _sum."""
    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for sample_name, sample_labels, value in samples:
        labels = dict(sample_labels)
        le = labels.pop("le", None)
        s = series.setdefault(tuple(sorted(labels.items())), {"buckets": []})
        if sample_name == name + "_bucket":
            assert le is not None
            s["buckets"].append((_float(le), value))
        else:
            assert le is None
            s[sample_name[len(name):]] = value
    for s in series.values():
        les = [le for le, _ in s["buckets"]]
        counts = [n for _, n in s["buckets"]]
        assert les == sorted(les) and les[-1] == math.inf
        assert counts == sorted(counts), "buckets not cumulative"
        assert counts[-1] == s["_count"] and "_sum" in s


def values(families: dict[str, dict[str, Any]], name: str,
           sample: str | None = None) -> dict[tuple[str, ...], float]:
    """{label values in order: value} of the samples *sample* (default *name*)."""
    return {tuple(labels.values()): v for n, labels, v in families[name]["samples"]
            if n == (sample or name)}


# -- the registry and its exposition -------------------------------------------

def busy_registry() -> Registry:
    reg = Registry(["client", "federation"])
    reg.register_gauge(metrics.UPSTREAM_CONNECTIONS, "Open upstream connections.", lambda: 5)
    reg.register_gauge(metrics.UPSTREAM_IDLE_CONNECTIONS, "Idle upstream connections.",
                       lambda: 2)
    reg.observe("client", "forward", 200, 0.003, 100, 1000)
    reg.observe("client", "forward", 200, 0.2, 0, 50)
    reg.observe("client", "forward", 502, 0.04, 10, 70)
    reg.observe("client", "health", 200, 0.0001, 0, 3)
    reg.observe("federation", "admin", 403, 0.001, 0, 60)
    reg.upstream_error("connect_error")
    reg.client_connection("client", 1)
    return reg


def test_render_is_valid_exposition_in_a_stable_order() -> None:
    reg = busy_registry()
    data = reg.render()
    families = parse(data)
    assert list(families) == [
        "palpo_gate_requests_total", "palpo_gate_request_duration_seconds",
        "palpo_gate_upstream_errors_total", "palpo_gate_request_bytes_total",
        "palpo_gate_response_bytes_total", "palpo_gate_client_connections",
        "palpo_gate_upstream_connections", "palpo_gate_upstream_idle_connections",
        "palpo_gate_config_generation", "palpo_gate_reload_failures_total",
        "palpo_gate_workers", "palpo_gate_start_time_seconds",
        "palpo_gate_log_lines_dropped_total",
    ]
    types = {name: f["type"] for name, f in families.items()}
    assert types["palpo_gate_requests_total"] == "counter"
    assert types["palpo_gate_request_duration_seconds"] == "histogram"
    assert types["palpo_gate_client_connections"] == "gauge"
    assert types["palpo_gate_reload_failures_total"] == "counter"
    assert all(f["help"] for f in families.values())
    # Same state, same bytes; samples sorted by label values.
    assert reg.render() == data
    assert list(values(families, "palpo_gate_requests_total")) == [
        ("client", "forward", "200"), ("client", "forward", "502"),
        ("client", "health", "200"), ("federation", "admin", "403")]


def test_render_with_prometheus_client_parser() -> None:
    """The reference parser (prometheus_client, here through matrix-synapse)
    reads the same families and values."""
    parser = pytest.importorskip("prometheus_client.parser")
    reg = busy_registry()
    reg.observe('we"ird\\na\nme', "other", 599, 7.5, 1, 2)
    families = {f.name: f for f in parser.text_string_to_metric_families(reg.render().decode())}
    requests = families["palpo_gate_requests"]  # the reference parser drops _total
    assert requests.type == "counter"
    assert {(s.labels["listener"], s.labels["status"]): s.value for s in requests.samples}[
        ('we"ird\\na\nme', "599")] == 1
    duration = families["palpo_gate_request_duration_seconds"]
    assert duration.type == "histogram"
    les = [s.labels["le"] for s in duration.samples
           if s.name.endswith("_bucket") and s.labels["route"] == "other"]
    assert les == LE


def test_an_empty_registry_shows_its_zeroes() -> None:
    before = time.time()
    families = parse(Registry(["client"]).render())
    assert families["palpo_gate_requests_total"]["samples"] == []
    assert families["palpo_gate_request_duration_seconds"]["samples"] == []
    assert values(families, "palpo_gate_upstream_errors_total") == {
        ("broken",): 0, ("connect_error",): 0, ("connect_timeout",): 0, ("timeout",): 0}
    assert values(families, "palpo_gate_request_bytes_total") == {("client",): 0}
    assert values(families, "palpo_gate_client_connections") == {("client",): 0}
    assert values(families, "palpo_gate_config_generation") == {(): 1}
    assert values(families, "palpo_gate_reload_failures_total") == {(): 0}
    assert values(families, "palpo_gate_workers") == {(): 1}
    start = values(families, "palpo_gate_start_time_seconds")[()]
    assert before - 5 <= start <= time.time()


def test_observe_moves_the_counters() -> None:
    families = parse(busy_registry().render())
    assert values(families, "palpo_gate_requests_total") == {
        ("client", "forward", "200"): 2, ("client", "forward", "502"): 1,
        ("client", "health", "200"): 1, ("federation", "admin", "403"): 1}
    # Bytes are per listener, summed over routes.
    assert values(families, "palpo_gate_request_bytes_total") == {
        ("client",): 110, ("federation",): 0}
    assert values(families, "palpo_gate_response_bytes_total") == {
        ("client",): 1123, ("federation",): 60}
    count = values(families, "palpo_gate_request_duration_seconds",
                   "palpo_gate_request_duration_seconds_count")
    assert count == {("client", "forward"): 3, ("client", "health"): 1,
                     ("federation", "admin"): 1}
    total = values(families, "palpo_gate_request_duration_seconds",
                   "palpo_gate_request_duration_seconds_sum")
    assert total[("client", "forward")] == pytest.approx(0.243)


def test_a_held_series_counts_as_observe_does_and_shows_once_counted() -> None:
    # The proxy holds its (listener, route) series (Registry.series) and counts
    # into them directly: nothing is exported before the first request, and
    # then the same as through observe().
    held = Registry(["client"])
    fwd = held.series("client", "forward")
    other = held.series("client", "no-such-route")
    assert held.series("client", "forward") is fwd
    assert held.series("client", "other") is other
    direct = Registry(["client"])
    direct.start_time = held.start_time
    assert held.render() == direct.render()
    for reg_observe, args in ((fwd.observe, (200, 0.012, 10, 100)),
                              (fwd.observe, (502, 0.2, 0, 60)),
                              (other.observe, (404, 0.0, 0, 0))):
        reg_observe(*args)
    direct.observe("client", "forward", 200, 0.012, 10, 100)
    direct.observe("client", "forward", 502, 0.2, 0, 60)
    direct.observe("client", "no-such-route", 404, 0.0, 0, 0)
    assert held.render() == direct.render()


#: duration → the smallest `le` whose bucket counts it ("le" means "<=").
BUCKET_OF = [
    (0.0, "0.005"), (0.005, "0.005"), (0.0050001, "0.01"), (0.01, "0.01"), (0.3, "0.5"),
    (1.0, "1"), (1.5, "2.5"), (30.0, "30"), (45.0, "60"), (120.0, "120"),
    (120.5, "+Inf"), (1e9, "+Inf"),
]


@pytest.mark.parametrize(("duration", "le"), BUCKET_OF)
def test_one_observation_lands_in_its_bucket(duration: float, le: str) -> None:
    reg = Registry()
    reg.observe("l", "forward", 200, duration, 0, 0)
    buckets = values(parse(reg.render()), "palpo_gate_request_duration_seconds",
                     "palpo_gate_request_duration_seconds_bucket")
    counts = [buckets["l", "forward", x] for x in LE]
    assert counts == [0] * LE.index(le) + [1] * (len(LE) - LE.index(le))


def test_histogram_buckets_are_cumulative_and_count_every_observation() -> None:
    reg = Registry()
    durations = [d for d, _ in BUCKET_OF] * 3
    for d in durations:
        reg.observe("l", "forward", 200, d, 0, 0)
    families = parse(reg.render())  # the parser checks cumulative order and +Inf == _count
    name = "palpo_gate_request_duration_seconds"
    buckets = values(families, name, name + "_bucket")
    assert [k[2] for k in buckets] == LE  # every bound, in order, formatted as Prometheus does
    assert buckets["l", "forward", "+Inf"] == len(durations)
    assert buckets["l", "forward", "0.005"] == 6
    assert buckets["l", "forward", "120"] == len(durations) - 6
    assert values(families, name, name + "_count") == {("l", "forward"): len(durations)}
    assert values(families, name, name + "_sum")["l", "forward"] == pytest.approx(sum(durations))


def test_label_values_and_help_are_escaped() -> None:
    reg = Registry()
    weird = 'a"b\\c\nd'
    reg.observe(weird, "forward", 200, 0.1, 0, 0)
    reg.register_gauge("palpo_gate_test", 'say "hi"\\ or\nnot', lambda: {(weird,): 1},
                       labels=("who",))
    data = reg.render()
    assert b'listener="a\\"b\\\\c\\nd"' in data
    assert b'# HELP palpo_gate_test say "hi"\\\\ or\\nnot\n' in data
    families = parse(data)
    assert values(families, "palpo_gate_requests_total") == {(weird, "forward", "200"): 1}
    assert families["palpo_gate_test"]["help"] == 'say "hi"\\ or\nnot'
    assert values(families, "palpo_gate_test") == {(weird,): 1}


def test_an_unknown_route_counts_as_other() -> None:
    reg = Registry()
    reg.observe("l", "/_matrix/client/v3/sync", 200, 0.1, 0, 0)
    reg.observe("l", "other", 200, 0.1, 0, 0)
    assert values(parse(reg.render()), "palpo_gate_requests_total") == {
        ("l", "other", "200"): 2}


def test_errors_connections_and_reloads() -> None:
    reg = Registry(["client"])
    for kind in ("timeout", "timeout", "broken"):
        reg.upstream_error(kind)
    for listener, delta in (("client", 1), ("client", 1), ("federation", 1), ("client", -1)):
        reg.client_connection(listener, delta)
    reg.reload_succeeded(2)
    reg.reload_failed()
    reg.reload_succeeded(3)
    reg.reload_failed()
    families = parse(reg.render())
    assert values(families, "palpo_gate_upstream_errors_total") == {
        ("broken",): 1, ("connect_error",): 0, ("connect_timeout",): 0, ("timeout",): 2}
    assert values(families, "palpo_gate_client_connections") == {
        ("client",): 1, ("federation",): 1}
    assert values(families, "palpo_gate_config_generation") == {(): 3}
    assert values(families, "palpo_gate_reload_failures_total") == {(): 2}


def test_every_upstream_failure_class_has_a_kind() -> None:
    kinds = [row.metric for row in errors.FAILURES.values() if row.metric is not None]
    assert sorted(kinds) == sorted(metrics.UPSTREAM_ERROR_KINDS)
    for cls, row in errors.FAILURES.items():
        assert (row.metric is not None) == cls.__name__.startswith("Upstream"), cls


def test_registered_gauges_are_evaluated_at_scrape_time() -> None:
    reg = Registry()
    pool = {"open": 1}
    reg.register_gauge("palpo_gate_upstream_connections", "Open.", lambda: pool["open"])
    reg.register_gauge("palpo_gate_by_listener", "Per listener.",
                       lambda: {("b",): 2.5, ("a",): 1}, labels=("listener",))
    pool["open"] = 7  # no call on the hot path: the value is read when scraped
    families = parse(reg.render())
    assert values(families, "palpo_gate_upstream_connections") == {(): 7}
    assert list(values(families, "palpo_gate_by_listener").items()) == [(("a",), 1),
                                                                        (("b",), 2.5)]
    # Registering again replaces the callable (a reload builds a new pool).
    reg.register_gauge("palpo_gate_upstream_connections", "Open.", lambda: 0)
    assert values(parse(reg.render()), "palpo_gate_upstream_connections") == {(): 0}


def test_a_failing_gauge_is_left_out_not_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    reg = Registry()
    reg.register_gauge("palpo_gate_broken", "Raises.", lambda: 1 / 0)
    reg.register_gauge("palpo_gate_wrong_labels", "Wrong arity.", lambda: {("a", "b"): 1},
                       labels=("x",))
    reg.register_gauge("palpo_gate_not_a_number", "A string.", lambda: "3")  # type: ignore[arg-type,return-value]
    reg.register_gauge("palpo_gate_fine", "Fine.", lambda: 4)
    families = parse(reg.render())
    for name in ("palpo_gate_broken", "palpo_gate_wrong_labels", "palpo_gate_not_a_number"):
        assert families[name]["samples"] == []
    assert values(families, "palpo_gate_fine") == {(): 4}
    assert "palpo_gate_broken" in caplog.text


@pytest.mark.parametrize(("name", "labels"), [
    ("palpo_gate_requests_total", ()),  # built in
    ("palpo_gate_workers", ()),
    ("9starts_with_a_digit", ()),
    ("has-dash", ()),
    ("palpo_gate_ok", ("le",)),
    ("palpo_gate_ok", ("__reserved",)),
    ("palpo_gate_ok", ("bad-label",)),
])
def test_register_gauge_refuses_bad_names(name: str, labels: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        Registry().register_gauge(name, "h", lambda: 1, labels=labels)


@pytest.mark.parametrize(("value", "text"), [
    (0.005, "0.005"), (1.0, "1"), (2.5, "2.5"), (120.0, "120"), (math.inf, "+Inf"),
    (-math.inf, "-Inf"), (1e6, "1e+06"), (123456.0, "123456"), (1234567.0, "1.234567e+06"),
    (1e-05, "1e-05"), (0.0001, "0.0001"), (0.0, "0"), (-2.5, "-2.5"),
])
def test_le_is_formatted_as_go_formats_floats(value: float, text: str) -> None:
    assert metrics._go_float(value) == text


# -- several workers ----------------------------------------------------------

def worker(start: float, generation: int, requests: int, connections: int) -> Registry:
    reg = Registry(["client"])
    reg.start_time = start
    reg.register_gauge(metrics.UPSTREAM_CONNECTIONS, "Open.", lambda: connections)
    for i in range(requests):
        reg.observe("client", "forward", 200, 0.01 * (i + 1), 10, 100)
    reg.upstream_error("timeout")
    reg.client_connection("client", connections)
    reg.reload_succeeded(generation)
    return reg


def test_snapshot_is_json() -> None:
    snap = busy_registry().snapshot()
    assert json.loads(json.dumps(snap)) == snap
    assert snap["version"] == metrics.SNAPSHOT_VERSION and snap["pid"] == os.getpid()


def test_merge_of_one_snapshot_is_the_render() -> None:
    reg = busy_registry()
    assert metrics.merge([json.loads(json.dumps(reg.snapshot()))]) == reg.render()


def test_merge_adds_counters_and_histograms() -> None:
    a = worker(start=1000.0, generation=2, requests=3, connections=4)
    b = worker(start=900.0, generation=5, requests=2, connections=1)
    b.reload_failed()
    families = parse(metrics.merge([a.snapshot(), b.snapshot()]))
    assert values(families, "palpo_gate_requests_total") == {("client", "forward", "200"): 5}
    name = "palpo_gate_request_duration_seconds"
    assert values(families, name, name + "_count") == {("client", "forward"): 5}
    assert values(families, name, name + "_sum")["client", "forward"] == pytest.approx(0.09)
    buckets = values(families, name, name + "_bucket")
    assert buckets["client", "forward", "0.01"] == 2  # 0.01 from each
    assert buckets["client", "forward", "0.025"] == 4
    assert buckets["client", "forward", "+Inf"] == 5
    assert values(families, "palpo_gate_request_bytes_total") == {("client",): 50}
    assert values(families, "palpo_gate_response_bytes_total") == {("client",): 500}
    assert values(families, "palpo_gate_upstream_errors_total")["timeout",] == 2
    assert values(families, "palpo_gate_reload_failures_total") == {(): 1}
    # Gauges: connections and workers add up; generation is the max, start the min.
    assert values(families, "palpo_gate_client_connections") == {("client",): 5}
    assert values(families, "palpo_gate_upstream_connections") == {(): 5}
    assert values(families, "palpo_gate_workers") == {(): 2}
    assert values(families, "palpo_gate_config_generation") == {(): 5}
    assert values(families, "palpo_gate_start_time_seconds") == {(): 900.0}


def test_merge_keeps_a_dead_workers_counters_but_not_its_gauges() -> None:
    live = worker(start=1000.0, generation=2, requests=1, connections=3).snapshot()
    dead = worker(start=500.0, generation=9, requests=4, connections=7).snapshot()
    dead["time"] = live["time"] - 60
    data = metrics.merge([dead, live], stale_after=5, now=live["time"])
    families = parse(data)
    assert values(families, "palpo_gate_requests_total") == {("client", "forward", "200"): 5}
    assert values(families, "palpo_gate_client_connections") == {("client",): 3}
    assert values(families, "palpo_gate_workers") == {(): 1}
    assert values(families, "palpo_gate_config_generation") == {(): 2}
    # The order of the families does not depend on which worker is stale.
    assert list(families) == list(parse(live_render := metrics.merge([live])))
    assert live_render != data


def test_merge_leaves_out_a_family_of_another_layout() -> None:
    a = worker(start=1.0, generation=1, requests=1, connections=0).snapshot()
    b = worker(start=1.0, generation=1, requests=1, connections=0).snapshot()
    for family in b["families"]:
        if family["name"] == "palpo_gate_requests_total":
            family["labels"] = ["listener", "route", "code"]  # a newer worker, say
    families = parse(metrics.merge([a, b]))
    assert values(families, "palpo_gate_requests_total") == {("client", "forward", "200"): 1}
    assert values(families, "palpo_gate_response_bytes_total") == {("client",): 200}


def test_write_and_read_snapshots(tmp_path: Path) -> None:
    a = worker(start=1.0, generation=1, requests=2, connections=1)
    b = worker(start=2.0, generation=2, requests=3, connections=2)
    a.write_snapshot(tmp_path / "worker-1.json")
    b.write_snapshot(str(tmp_path / "worker-2.json"))
    a.observe("client", "forward", 200, 0.1, 0, 0)
    a.write_snapshot(tmp_path / "worker-1.json")  # replaced in place
    # What read_snapshots must leave out:
    good = (tmp_path / "worker-2.json").read_text()
    (tmp_path / "partial.json").write_text(good[: len(good) // 2])
    (tmp_path / "garbage.json").write_bytes(b"\xff\xfe not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "old.json").write_text(json.dumps({**json.loads(good), "version": 0}))
    (tmp_path / "bad-sample.json").write_text(good.replace('"buckets":[', '"buckets":["x",', 1))
    (tmp_path / "a-dir.json").mkdir()
    (tmp_path / ".worker-3.json.abc.tmp").write_text(good)
    (tmp_path / "notes.txt").write_text(good)

    snaps = metrics.read_snapshots(tmp_path)
    assert len(snaps) == 2
    assert [s["time"] for s in snaps] == [json.loads((tmp_path / n).read_text())["time"]
                                          for n in ("worker-1.json", "worker-2.json")]
    families = parse(metrics.merge(snaps))
    assert values(families, "palpo_gate_requests_total") == {("client", "forward", "200"): 6}
    assert values(families, "palpo_gate_workers") == {(): 2}


def test_read_snapshots_of_a_missing_directory(tmp_path: Path) -> None:
    assert metrics.read_snapshots(tmp_path / "nowhere") == []


def test_write_snapshot_leaves_no_temporary_file(tmp_path: Path) -> None:
    reg = busy_registry()
    reg.write_snapshot(tmp_path / "w.json")
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        reg.write_snapshot(tmp_path / "taken")  # os.replace onto a directory fails
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "w.json"]


# -- the scrape handler over a real socket ----------------------------------------

@asynccontextmanager
async def scrape_server(render: Any) -> AsyncIterator[str]:
    server = web.Server(metrics.make_handler(render))
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(server, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.close()
        await server.shutdown(1)
        await srv.wait_closed()


async def test_handler_serves_metrics() -> None:
    reg = busy_registry()
    async with scrape_server(reg.render) as base, aiohttp.ClientSession() as session:
        for path in ("/metrics", "/", "/metrics?name[]=x"):
            async with session.get(base + path) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == metrics.CONTENT_TYPE
                body = await resp.read()
                assert body == reg.render()
                parse(body)
        async with session.head(base + "/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == metrics.CONTENT_TYPE
            assert await resp.read() == b""
        for method in ("POST", "PUT", "DELETE"):
            async with session.request(method, base + "/metrics", data=b"x") as resp:
                assert resp.status == 405
                assert resp.headers["Allow"] == "GET, HEAD"
        for path in ("/other", "/metrics/", "/metricsx"):
            async with session.get(base + path) as resp:
                assert resp.status == 404


async def test_handler_renders_at_each_scrape() -> None:
    reg = Registry()
    async with scrape_server(reg.render) as base, aiohttp.ClientSession() as session:
        reg.observe("client", "forward", 200, 0.1, 0, 0)
        async with session.get(base + "/metrics") as resp:
            first = values(parse(await resp.read()), "palpo_gate_requests_total")
        reg.observe("client", "forward", 200, 0.1, 0, 0)
        async with session.get(base + "/metrics") as resp:
            second = values(parse(await resp.read()), "palpo_gate_requests_total")
    assert first == {("client", "forward", "200"): 1}
    assert second == {("client", "forward", "200"): 2}


def test_buckets_are_the_specified_ones() -> None:
    assert [metrics._go_float(b) for b in BUCKETS] + ["+Inf"] == LE


@pytest.mark.parametrize("bad", [
    b"# HELP x h\n# TYPE x counter\nx 1",  # no final line feed
    b"# HELP x h\n# TYPE x counter\n\nx 1\n",  # blank line
    b"# TYPE x counter\nx 1\n",  # no HELP
    b"# HELP x h\nx 1\n",  # sample before TYPE
    b"# HELP x h\n# TYPE x counter\ny 1\n",  # sample of another family
    b'# HELP x h\n# TYPE x counter\nx{a="1\\t"} 1\n',  # unknown escape
    b'# HELP x h\n# TYPE x counter\nx{a="1",a="2"} 1\n',  # duplicate label
    b'# HELP x h\n# TYPE x counter\nx{a="1"} 1\nx{a="1"} 2\n',  # same series twice
    b"# HELP x h\n# TYPE x counter\nx one\n",  # not a number
    b'# HELP x h\n# TYPE x histogram\nx_bucket{le="1"} 2\nx_bucket{le="+Inf"} 1\n'
    b"x_sum 1\nx_count 1\n",  # not cumulative
    b'# HELP x h\n# TYPE x histogram\nx_bucket{le="1"} 1\nx_bucket{le="+Inf"} 1\n'
    b"x_sum 1\nx_count 2\n",  # +Inf != _count
])
def test_the_test_parser_is_strict(bad: bytes) -> None:
    with pytest.raises((AssertionError, KeyError, IndexError)):
        parse(bad)
