"""Instructions per request: ``python bench/run.py --rounds 0 --instructions N``.

The bare server runs under callgrind as in a real measurement (a minute at
most: valgrind makes it 30-100x slower); the figure is checked for being there
and stable across the three measurements, not for its size. run.py installs
valgrind (Debian package) when it is missing and may. The perf-stat and dump
parsers are checked with tables.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import instructions  # bench/ is on sys.path (pyproject's pythonpath)
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
RUNNER = REPO / "bench" / "run.py"


@pytest.mark.timeout(300)
def test_instructions_of_the_bare_server_under_callgrind(tmp_path: pathlib.Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--rounds", "0", "--instructions", "200",
         "--instructions-conns", "8", "--only", "bare", "--out", str(tmp_path),
         "--name", "inst"],
        capture_output=True, text=True, timeout=290, cwd=REPO, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads((tmp_path / "inst.json").read_text())
    assert result["rounds"] == [] and result["arms"] == ["bare"]
    inst = result["instructions"]
    assert inst["requests"] == 200 and inst["connections"] == 8
    cg = inst["servers"]["bare"]["callgrind"]
    runs = cg["ir_per_request_runs"]
    assert len(runs) == 3
    # A Python HTTP server answers in thousands to a few million instructions;
    # zeroing and dumping around the requests keeps start-up out of it.
    assert all(5_000 < r < 5_000_000 for r in runs), runs
    assert cg["spread_pct"] < 5, runs
    md = (tmp_path / "inst.md").read_text()
    assert "## Instructions per request" in md and "| bare |" in md
    assert "## Targets" not in md  # no rounds: no wall-clock tables
    assert not (tmp_path / "inst.png").exists()


@pytest.mark.parametrize(("text", "expected"), [
    ("12345,,instructions:u,1000,100.00,,\n678,,instructions,1000,100.00,,\n",
     {"instructions:u": 12345, "instructions": 678}),
    ("<not supported>,,instructions:u,0,100.00,,\n", {"instructions:u": None}),
    ("# started on Tue\n\n", {}),
])
def test_parse_perf_csv(text: str, expected: dict) -> None:
    assert instructions.parse_perf_csv(text) == expected


def test_dump_summary_and_parts(tmp_path: pathlib.Path) -> None:
    base = tmp_path / "callgrind.x"
    base.write_text("")
    for part, ir in ((1, 10), (2, 2000), (10, 30)):
        (tmp_path / f"callgrind.x.{part}").write_text(
            f"# callgrind format\nevents: Ir\nsummary: {ir}\n\nfn=(1) f\n0 {ir}\n"
            f"totals: {ir * 3}\n")
    (tmp_path / "callgrind.x.notes").write_text("")
    parts = instructions.dump_parts(base)
    assert [p.name for p in parts] == ["callgrind.x.1", "callgrind.x.2", "callgrind.x.10"]
    assert [instructions.dump_summary(p) for p in parts] == [10, 2000, 30]
