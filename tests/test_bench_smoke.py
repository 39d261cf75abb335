"""The benchmark runs end to end: ``python bench/run.py --smoke`` as a subprocess.

It needs nginx, wrk, openssl and taskset on the machine (Debian packages nginx,
wrk, openssl, util-linux) and matplotlib in this Python (bench/requirements.txt);
run.py installs what is missing when it may (root with apt-get, pip). The test
checks that every figure of every arm is there and sane, not how fast anything
is: CI machines are shared.
"""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
RUNNER = REPO / "bench" / "run.py"

# Figures every arm has; the proxy-only ones are measured on a proxy's processes
# (CPU, RSS), so the `direct` arm has none of them.
ALL_ARMS = ("get_rps", "get_p50_ms", "get_p99_ms", "tls_rps", "tls_p50_ms", "tls_p99_ms",
            "download_mibps", "upload_mibps", "longpoll_completed", "longpoll_peak_held")
PROXY_ONLY = ("get_cpu_us_per_req", "get_req_per_cpu_s", "tls_cpu_us_per_req",
              "tls_req_per_cpu_s", "download_cpu_s_per_gib", "upload_cpu_s_per_gib",
              "idle_rss_mib", "idle_pss_mib", "held_rss_mib", "rss_kib_per_held")
# The bare aiohttp server answers from memory: small GETs, their CPU, idle RSS.
BARE = ("get_rps", "get_p50_ms", "get_p99_ms", "get_cpu_us_per_req", "get_req_per_cpu_s",
        "tls_rps", "tls_p50_ms", "tls_p99_ms", "tls_cpu_us_per_req", "tls_req_per_cpu_s",
        "idle_rss_mib", "idle_pss_mib")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, pathlib.Path]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--smoke", "--out", str(out), "--name", "smoke"],
        capture_output=True, text=True, timeout=170, cwd=REPO, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"bench/run.py --smoke failed:\n{proc.stderr[-5000:]}"
    return json.loads((out / "smoke.json").read_text()), out


@pytest.mark.timeout(180)
def test_smoke_writes_json_markdown_and_chart(smoke: tuple[dict, pathlib.Path]) -> None:
    result, out = smoke
    assert result["arms"] == ["direct", "nginx", "bare", "gate"]
    assert len(result["rounds"]) == 1
    for key in ("cpu_model", "cores", "kernel", "python", "nginx", "wrk"):
        assert result["machine"][key], key
    assert result["date"]
    md = (out / "smoke.md").read_text()
    assert "| target | measured | met? |" in md
    assert "## The gate against nginx and against its own floor" in md
    assert len(result["targets"]) == 10
    png = (out / "smoke.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


@pytest.mark.timeout(180)
def test_smoke_has_every_figure_for_every_arm(smoke: tuple[dict, pathlib.Path]) -> None:
    result, _ = smoke
    n = result["settings"]["longpolls"]
    for arm in ("direct", "nginx", "gate"):
        figures = result["rounds"][0]["arms"][arm]
        wanted = ALL_ARMS + (PROXY_ONLY if arm != "direct" else ())
        for key in wanted:
            value = figures.get(key)
            assert isinstance(value, int | float) and math.isfinite(value), (arm, key, value)
            # RSS growth over a few dozen polls is within page noise: may be <= 0.
            if key != "rss_kib_per_held":
                assert value > 0, (arm, key, value)
        # Every held long-poll came back 200, all were held at once.
        assert figures["longpoll_completed"] == n, (arm, figures["_longpoll_outcomes"])
        assert figures["longpoll_peak_held"] == n, arm
        # Small GETs: no error answers; latencies ordered.
        assert figures["_get_errors"] == 0 and figures["_tls_errors"] == 0, arm
        assert figures["get_p50_ms"] <= figures["get_p99_ms"], arm
        assert figures["tls_p50_ms"] <= figures["tls_p99_ms"], arm
        assert figures["_download_errors"] == 0 and figures["_upload_errors"] == 0, arm
        assert figures["_download_responses"] >= 1 and figures["_upload_requests"] >= 1, arm
    for key in ALL_ARMS + PROXY_ONLY:
        assert result["medians"]["gate"][key] is not None, key
        assert result["ratios"]["gate"][key]["median_of_rounds"] is not None, key


@pytest.mark.timeout(180)
def test_smoke_has_the_bare_arm_and_gate_over_bare(smoke: tuple[dict, pathlib.Path]) -> None:
    result, _ = smoke
    figures = result["rounds"][0]["arms"]["bare"]
    for key in BARE:
        value = figures.get(key)
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, value)
    assert figures["_get_errors"] == 0 and figures["_tls_errors"] == 0
    # Nothing to download, upload or hold: those figures are absent, not zero.
    assert "download_mibps" not in figures and "longpoll_completed" not in figures
    to_bare = result["ratios_to_bare"]["gate"]
    for key in ("get_cpu_us_per_req", "get_p99_ms", "tls_cpu_us_per_req", "tls_p99_ms"):
        assert to_bare[key]["median_of_rounds"] > 0, key
    targets = {(t["figure"], t["kind"]): t for t in result["targets"]}
    assert targets["get_cpu_us_per_req", "bare"]["shown"].endswith("x bare")
    assert targets["get_p99_ms", "bare"]["measured"] is not None
