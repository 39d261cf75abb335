"""The benchmark's pure parts, with tables: wrk's report parsed into numbers,
the summary over rounds (medians, ratios to a base arm, the targets), and the
workers scaling figures (CPU busy shares from /proc/stat, workers 2 / 1).

bench/ is on sys.path (pyproject's ``pythonpath``), as it is for
``python bench/run.py``."""

from __future__ import annotations

from typing import Any

import pytest
from palpo_bench import scaling, stats
from palpo_bench.common import TARGETS
from palpo_bench.wrk import parse_wrk

MiB = 1024 * 1024

# -- wrk's report ------------------------------------------------------------------------

WRK_LATENCY = """\
Running 1s test @ http://127.0.0.1:40123/_matrix/client/versions
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   612.34us  201.45us   5.12ms   89.12%
    Req/Sec    98.76k     5.43k  105.12k    80.00%
  Latency Distribution
     50%  580.00us
     75%  690.00us
     90%    0.85ms
     99%    1.23s
  98234 requests in 1.00s, 32.45MB read
  Socket errors: connect 0, read 2, write 1, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:  98180.12
Transfer/sec:     32.43MB
"""

WRK_PLAIN = """\
Running 2m test @ http://127.0.0.1:40123/_matrix/media/v3/download/bench/file16m
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    40.12ms    3.01ms  60.00ms   70.00%
    Req/Sec    24.00      4.00    30.00     80.00%
  2880 requests in 2.00m, 45.00GB read
Requests/sec:     24.00
Transfer/sec:    384.00MB
"""


def test_a_full_report_becomes_numbers() -> None:
    out = parse_wrk(WRK_LATENCY)
    assert out["requests"] == 98234
    assert out["duration_s"] == pytest.approx(1.0)
    assert out["bytes_read"] == pytest.approx(32.45 * MiB)  # binary prefixes
    assert out["rps"] == pytest.approx(98180.12)
    assert out["transfer_bps"] == pytest.approx(32.43 * MiB)
    assert out["p50_ms"] == pytest.approx(0.58)  # us
    assert out["p75_ms"] == pytest.approx(0.69)
    assert out["p90_ms"] == pytest.approx(0.85)  # ms
    assert out["p99_ms"] == pytest.approx(1230.0)  # s
    assert out["socket_errors"] == 2 + 1 + 3
    assert out["non_2xx"] == 7


def test_a_report_without_latency_or_errors() -> None:
    out = parse_wrk(WRK_PLAIN)
    assert out["requests"] == 2880
    assert out["duration_s"] == pytest.approx(120.0)  # minutes
    assert out["bytes_read"] == pytest.approx(45 * 1024**3)
    assert out["transfer_bps"] == pytest.approx(384 * MiB)
    assert not [k for k in out if k.startswith("p") and k.endswith("_ms")]
    assert out["socket_errors"] == 0 and out["non_2xx"] == 0


@pytest.mark.parametrize(("line", "seconds", "read"), [
    ("10 requests in 500.00us, 1.00B read", 0.0005, 1),
    ("10 requests in 2.50ms, 2.00KB read", 0.0025, 2048),
    ("10 requests in 1.00h, 1.50TB read", 3600.0, 1.5 * 1024**4),
])
def test_units_of_time_and_size(line: str, seconds: float, read: float) -> None:
    out = parse_wrk(f"  {line}\n")
    assert out["duration_s"] == pytest.approx(seconds)
    assert out["bytes_read"] == pytest.approx(read)


def test_output_without_a_requests_line_is_an_error() -> None:
    with pytest.raises(ValueError, match="N requests in"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


# -- the summary -------------------------------------------------------------------------


def rounds_of(*per_round: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"round": i, "arms": arms} for i, arms in enumerate(per_round, 1)]


ROUNDS = rounds_of(
    {"nginx": {"get_rps": 100.0, "get_p99_ms": 2.0}, "gate": {"get_rps": 50.0, "get_p99_ms": 4.0},
     "bare": {"get_rps": 80.0}},
    {"nginx": {"get_rps": 200.0, "get_p99_ms": 1.0}, "gate": {"get_rps": 60.0, "get_p99_ms": None},
     "bare": {"get_rps": 90.0}},
    {"nginx": {"get_rps": 300.0, "get_p99_ms": 0.0}, "gate": {"get_rps": 30.0, "get_p99_ms": 9.0},
     "bare": {}},
)
ARMS = ["nginx", "gate", "bare"]


def test_medians_skip_what_was_not_measured() -> None:
    meds = stats.medians(ROUNDS, ARMS)
    assert meds["nginx"]["get_rps"] == 200.0
    assert meds["gate"]["get_rps"] == 50.0
    assert meds["gate"]["get_p99_ms"] == pytest.approx(6.5)  # None left out: (4 + 9) / 2
    assert meds["bare"]["get_rps"] == 85.0  # measured in two rounds only
    assert meds["bare"]["get_p99_ms"] is None  # never measured
    assert meds["nginx"]["idle_rss_mib"] is None


def test_ratios_per_round_and_of_medians() -> None:
    meds = stats.medians(ROUNDS, ARMS)
    rats = stats.ratios(ROUNDS, ARMS, meds)
    assert set(rats) == {"gate", "bare"}
    get = rats["gate"]["get_rps"]
    assert get["per_round"] == [0.5, 0.3, 0.1]
    assert get["median_of_rounds"] == pytest.approx(0.3)
    assert get["of_medians"] == pytest.approx(50.0 / 200.0)
    # A missing value or a zero base gives no ratio for that round.
    assert rats["gate"]["get_p99_ms"]["per_round"] == [2.0, None, None]
    assert rats["bare"]["get_rps"]["per_round"] == [0.8, 0.45, None]


def test_ratios_to_another_base_and_without_it() -> None:
    meds = stats.medians(ROUNDS, ARMS)
    to_bare = stats.ratios(ROUNDS, ARMS, meds, base="bare", of=("gate",))
    assert set(to_bare) == {"gate"}
    assert to_bare["gate"]["get_rps"]["per_round"] == [50 / 80, 60 / 90, None]
    assert stats.ratios(ROUNDS, ["gate"], meds) == {}


def test_targets_are_met_missed_or_not_measured() -> None:
    n = 50
    rounds = rounds_of(
        {"gate": {"longpoll_completed": 50, "rss_kib_per_held": 8.0, "idle_rss_mib": 60.0}},
        {"gate": {"longpoll_completed": 49, "rss_kib_per_held": 9.0, "idle_rss_mib": 40.0}},
    )
    meds = stats.medians(rounds, ["gate"])
    rats = {"gate": {"get_req_per_cpu_s": {"median_of_rounds": 0.5},
                     "get_p99_ms": {"median_of_rounds": 6.0}}}
    rats_bare = {"gate": {"get_cpu_us_per_req": {"median_of_rounds": 1.2}}}
    out = stats.evaluate_targets(rounds, meds, rats, n, rats_bare)
    assert [row["target"] for row in out] == [t.text for t in TARGETS]
    met = {(row["figure"], row["kind"]): row["met"] for row in out}
    assert met[("get_req_per_cpu_s", "ratio")] is True      # 0.5 >= 0.25
    assert met[("get_p99_ms", "ratio")] is False            # 6.0 > 5
    assert met[("get_cpu_us_per_req", "bare")] is True      # 1.2 <= 1.5
    assert met[("get_p99_ms", "bare")] is None              # not measured
    assert met[("longpoll_completed", "all")] is False      # 49 of 50 in one round
    assert met[("rss_kib_per_held", "abs")] is True         # median 8.5 <= 12
    assert met[("idle_rss_mib", "abs")] is False            # median 50 > 45
    shown = {(row["figure"], row["kind"]): row["shown"] for row in out}
    assert shown[("longpoll_completed", "all")] == "50/50 / 49/50"
    assert shown[("get_req_per_cpu_s", "ratio")] == "0.50x nginx"
    assert shown[("get_p99_ms", "bare")] == "n/a"


# -- workers scaling -----------------------------------------------------------------------

PROC_STAT_0 = """\
cpu  300 0 100 1000 0 0 0 0 0 0
cpu0 200 0 50 400 0 0 0 0 0 0
cpu1 100 0 50 600 0 0 0 0 0 0
intr 12345
ctxt 678
"""
# CPU 0: 100 more busy ticks of 100; CPU 1: 40 user + 20 system + 10 steal busy, 80 idle
# + 10 iowait not: 70 of 160.
PROC_STAT_1 = """\
cpu  420 0 140 1080 10 0 0 10 0 0
cpu0 280 0 70 400 0 0 0 0 0 0
cpu1 140 0 70 680 10 0 0 10 0 0
"""


def test_cpu_busy_shares_from_proc_stat() -> None:
    before, after = scaling.parse_proc_stat(PROC_STAT_0), scaling.parse_proc_stat(PROC_STAT_1)
    assert before == {0: (250, 650), 1: (150, 750)}  # the "cpu" total line is not a CPU
    busy = scaling.busy_shares(before, after)
    assert busy[0] == pytest.approx(1.0)
    assert busy[1] == pytest.approx(70 / 160)  # iowait is idle, steal is busy
    assert scaling.busy_shares(after, after) == {0: 0.0, 1: 0.0}


def run_of(rps: float, cpu: float, busy0: float, busy1: float) -> dict[str, Any]:
    return {"rps": rps, "cpu_us_per_req": cpu, "gate_cores": 1.2, "wrk_cores": 0.4,
            "upstream_cores": 0.3, "p99_ms": 2.0, "cpu_busy": {0: busy0, 1: busy1}}


def test_scaling_ratios_per_round_and_the_limit() -> None:
    rounds = [{"round": 1, "1": run_of(1000, 100, 0.7, 1.0), "2": run_of(1500, 110, 1.0, 1.0)},
              {"round": 2, "1": run_of(1000, 100, 0.7, 1.0), "2": run_of(1300, 120, 0.99, 1.0)},
              {"round": 3, "1": run_of(0, 100, 0.7, 1.0)}]  # workers 2 failed: no ratio
    sc = scaling.summarise(rounds)
    assert sc["ratio_2_to_1"]["rps"]["per_round"] == [1.5, 1.3]
    assert sc["ratio_2_to_1"]["rps"]["median"] == pytest.approx(1.4)
    assert sc["ratio_2_to_1"]["cpu_us_per_req"]["per_round"] == [1.1, 1.2]
    assert sc["medians"]["1"]["rps"] == 1000
    assert sc["medians"]["2"]["cpu_busy"] == {0: pytest.approx(0.995), 1: 1.0}
    assert sc["limit"].startswith("every CPU busy")
    assert "gate used 1.20 cores" in sc["limit"]


@pytest.mark.parametrize(("busy", "verdict"), [
    ({0: 1.0, 1: 0.5}, "CPU 0 saturated"),
    ({0: 0.5, 1: 0.6}, "no CPU saturated"),
])
def test_scaling_limit_names_the_saturated_cpu(busy: dict[int, float], verdict: str) -> None:
    med = {"2": {"gate_cores": 1.0, "wrk_cores": None, "upstream_cores": None,
                 "cpu_busy": busy}}
    assert scaling.limit_note(med).startswith(verdict)
    assert scaling.limit_note({"2": {}}) == "not measured"
