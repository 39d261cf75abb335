"""The summary over rounds: medians, per-round ratios to a base arm, and the
targets table."""

from __future__ import annotations

import statistics
from typing import Any

from palpo_bench.common import FIGURE_BY_KEY, FIGURES, TARGETS

# ---------------------------------------------------------------------------
# Summary: medians, ratios to nginx, targets


def medians(rounds: list[dict[str, Any]], arms: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        out[arm] = {}
        for fig in FIGURES:
            vals = [r["arms"][arm].get(fig.key) for r in rounds if arm in r["arms"]]
            vals = [v for v in vals if v is not None]
            out[arm][fig.key] = statistics.median(vals) if vals else None
    return out


def ratios(rounds: list[dict[str, Any]], arms: list[str], meds: dict[str, dict[str, Any]],
           base: str = "nginx", of: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """arm / *base* per round, the median of those, and the ratio of the medians,
    for every arm (or those in *of*)."""
    out: dict[str, dict[str, Any]] = {}
    if base not in arms:
        return out
    for arm in arms:
        if arm == base or (of is not None and arm not in of):
            continue
        out[arm] = {}
        for fig in FIGURES:
            per_round = []
            for r in rounds:
                a, b = r["arms"].get(arm, {}).get(fig.key), r["arms"][base].get(fig.key)
                per_round.append(a / b if a is not None and b else None)
            valid = [x for x in per_round if x is not None]
            a, b = meds[arm][fig.key], meds[base][fig.key]
            out[arm][fig.key] = {
                "per_round": per_round,
                "median_of_rounds": statistics.median(valid) if valid else None,
                "of_medians": a / b if a is not None and b else None,
            }
    return out


def evaluate_targets(rounds: list[dict[str, Any]], meds: dict[str, dict[str, Any]],
                     rats: dict[str, dict[str, Any]], n: int,
                     rats_bare: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        measured: float | None = None
        shown = "n/a"
        if t.kind in ("ratio", "bare"):
            base = "nginx" if t.kind == "ratio" else "bare"
            table = rats if t.kind == "ratio" else (rats_bare or {})
            measured = table.get("gate", {}).get(t.key, {}).get("median_of_rounds")
            if measured is not None:
                shown = f"{measured:.2f}x {base}"
        elif t.kind == "abs":
            measured = meds.get("gate", {}).get(t.key)
            if measured is not None:
                shown = f"{measured:.1f} {FIGURE_BY_KEY[t.key].unit}"
        else:  # all: every round's count equals the number sent
            counts = [r["arms"]["gate"].get(t.key) for r in rounds if "gate" in r["arms"]]
            if counts and None not in counts:
                measured = min(counts) / n
                shown = " / ".join(f"{c}/{n}" for c in counts)
        met = None if measured is None else (
            measured >= t.bound if t.op == ">=" else measured <= t.bound)
        out.append({"target": t.text, "figure": t.key, "kind": t.kind, "op": t.op,
                    "bound": t.bound, "measured": measured, "shown": shown, "met": met})
    return out
