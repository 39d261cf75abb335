"""The result files: JSON, Markdown (with the notes) and the PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from palpo_bench.common import FIGURE_BY_KEY, FIGURES, Figure

# ---------------------------------------------------------------------------
# Output: JSON, Markdown, PNG


def fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if a >= 0.1 else f"{v:.3f}"


def markdown(result: dict[str, Any]) -> str:
    arms, m, s = result["arms"], result["machine"], result["settings"]
    warmup = f" after a {s['warmup_s']} s warm-up" if s["warmup_s"] else ""
    if result["rounds"]:
        what = (f"mode **{result['mode']}** · {s['rounds']} round(s), arms interleaved "
                f"({', '.join(arms)}) · wrk {s['get_s']} s per small-GET figure{warmup}, "
                f"{s['transfer_s']} s per transfer figure · {s['longpolls']:,} long-polls "
                f"held {s['hold_s']:g} s")
    else:
        what = " and ".join(w for w, on in (("instructions per request", "instructions" in result),
                                            ("workers scaling", "scaling" in result)) if on)
        what += f" only ({', '.join(arms)}; no rounds of the arms)"
    lines = [
        f"# palpo_gate benchmark `{result['name']}`",
        "",
        f"{result['date']} · {what} · pinning: {s['pinning']} · "
        f"gate workers: {s['gate_workers']}",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, kernel {m['kernel']}, {m['os']}; "
        f"Python {m['python']}; {m['nginx']}; {m['wrk']}; {m['openssl']}. "
        f"Load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end "
        "(the machine may be shared: compare CPU per request, not req/s, across runs).",
        "",
    ]
    if result["rounds"]:
        lines += _figures_markdown(result)
    if "instructions" in result:
        import instructions

        lines += ["", *instructions.markdown(result["instructions"])]
    if "scaling" in result:
        from palpo_bench import scaling

        lines += ["", *scaling.markdown(result["scaling"], s["get_s"])]
    lines += ["", "## How these were measured", ""]
    lines += [f"- {note}" for note in result["notes"]]
    if result["flags"]:
        lines += ["", "## Flags raised during the run", ""]
        lines += [f"- {f}" for f in result["flags"]]
    return "\n".join(lines) + "\n"


def _figures_markdown(result: dict[str, Any]) -> list[str]:
    arms, s = result["arms"], result["settings"]
    lines = [
        "## Targets (gate)",
        "",
        "| target | measured | met? |",
        "|---|---|---|",
    ]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['shown']} | {met} |")
    lines += ["", f"## Figures (median over {s['rounds']} round(s))", ""]
    head = "| figure | unit | " + " | ".join(arms) + " |"
    sep = "|---|---|" + "---|" * len(arms)
    show_ratio = "gate" in result["ratios"]
    to_bare = result.get("ratios_to_bare", {}).get("gate")
    if show_ratio:
        head += " gate / nginx | per round |"
        sep += "---|---|"
    if to_bare:
        head += " gate / bare |"
        sep += "---|"
    lines += [head, sep]
    for fig in FIGURES:
        row = f"| {fig.label} ({fig.better} is better) | {fig.unit} | "
        row += " | ".join(fmt(result["medians"][a][fig.key]) for a in arms) + " |"
        if show_ratio:
            r = result["ratios"]["gate"][fig.key]
            per = ", ".join(fmt(x) for x in r["per_round"])
            row += f" {fmt(r['median_of_rounds'])} | {per} |"
        if to_bare:
            row += f" {fmt(to_bare[fig.key]['median_of_rounds'])} |"
        lines.append(row)
    if to_bare and show_ratio:
        lines += ["", "## The gate against nginx and against its own floor", "",
                  "gate / nginx moves with how busy the machine is (Python slows more than "
                  "nginx under contention); gate / bare compares the gate with aiohttp's "
                  "web.Server alone, on the same loop and parser, pinned the same way, and "
                  "holds across machines. Median of per-round ratios (single rounds in "
                  "brackets).", "",
                  "| figure | gate | bare | nginx | gate / bare | gate / nginx |",
                  "|---|---|---|---|---|---|"]
        med = result["medians"]
        for key in ("get_cpu_us_per_req", "get_p99_ms", "tls_cpu_us_per_req", "tls_p99_ms"):
            fig = FIGURE_BY_KEY[key]
            cells = []
            for r in (to_bare[key], result["ratios"]["gate"][key]):
                per = ", ".join(fmt(x) for x in r["per_round"])
                cells.append(f"{fmt(r['median_of_rounds'])}x ({per})")
            lines.append(f"| {fig.label} ({fig.unit}) | {fmt(med['gate'][key])} | "
                         f"{fmt(med['bare'][key])} | {fmt(med['nginx'][key])} | "
                         f"{cells[0]} | {cells[1]} |")
    return lines


def _bar_color(f: Figure, med: float, target: dict[str, Any] | None) -> str:
    if target is not None and target["met"] is not None:
        return "tab:green" if target["met"] else "tab:red"
    good = med >= 1 if f.better == "higher" else med <= 1
    return "tab:blue" if good else "tab:orange"


def _chart_label(f: Figure, target: dict[str, Any] | None) -> str:
    label = f"{f.label} [{f.better} is better]"
    if target is not None and target["kind"] == "abs":
        label += f"\ntarget {target['op']} {target['bound']:g} {f.unit}: gate {target['shown']}"
    return label


def chart(result: dict[str, Any], path: Path) -> None:
    """Horizontal bars of gate / nginx per figure, drawn from 1.0 on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, NullLocator

    rats = result["ratios"].get("gate")
    # The chart is gate / nginx: the gate / bare targets are in the Markdown.
    targets = {t["figure"]: t for t in result["targets"] if t["kind"] != "bare"}
    figs = [f for f in FIGURES if f.key not in ("longpoll_completed", "longpoll_peak_held")]
    fig_, ax = plt.subplots(figsize=(11, 0.45 * len(figs) + 2.2))
    if not rats:
        ax.text(0.5, 0.5, "no gate and nginx arms: no ratios", ha="center", va="center")
        ax.set_axis_off()
    else:
        ys = list(range(len(figs)))[::-1]
        values = []
        for y, f in zip(ys, figs, strict=True):
            r, t = rats[f.key], targets.get(f.key)
            med = r["median_of_rounds"]
            if med is None or med <= 0:
                ax.text(1.0, y, "  n/a", va="center", fontsize=8)
                continue
            values += [med, *(x for x in r["per_round"] if x)]
            ax.barh(y, med - 1, left=1, color=_bar_color(f, med, t), alpha=0.75, height=0.6)
            pts = [x for x in r["per_round"] if x is not None and x > 0]
            ax.scatter(pts, [y] * len(pts), color="black", s=10, zorder=3)
            rounds = ", ".join(f"{x:.2f}" for x in pts) if len(pts) > 1 else ""
            ax.text(1.01, y, f"{med:.2f}x" + (f"  ({rounds})" if rounds else ""),
                    transform=ax.get_yaxis_transform(), va="center", ha="left", fontsize=8)
            if t is not None and t["kind"] == "ratio":
                values.append(t["bound"])
                ax.plot([t["bound"]] * 2, [y - 0.4, y + 0.4], color="black", lw=2.5, zorder=4)
        ax.set_yticks(ys)
        ax.set_yticklabels([_chart_label(f, targets.get(f.key)) for f in figs], fontsize=8)
        ax.axvline(1.0, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        lo, hi = min([*values, 0.5]) / 1.6, max([*values, 2.0]) * 1.6
        ax.set_xlim(lo, hi)
        ticks = [x for x in (0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50) if lo <= x <= hi]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{x:g}x" for x in ticks])
        ax.set_xlabel("gate / nginx, median of per-round ratios (dots and brackets: single "
                      "rounds; thick tick: target)", fontsize=9)
        ax.legend(handles=[Patch(color="tab:green", alpha=0.75, label="target met"),
                           Patch(color="tab:red", alpha=0.75, label="target missed"),
                           Patch(color="tab:blue", alpha=0.75, label="gate better (no target)"),
                           Patch(color="tab:orange", alpha=0.75, label="gate worse (no target)")],
                  loc="lower right", fontsize=7, framealpha=0.9)
    ax.set_title(f"palpo_gate vs nginx, one core each: {result['name']} "
                 f"({result['mode']}, {result['date'][:10]}, {result['settings']['rounds']} "
                 "round(s))", fontsize=10)
    fig_.tight_layout()
    fig_.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig_)


NOTES = [
    "Arms: `direct` = wrk / the asyncio client straight to the upstreams (no proxy); "
    "`nginx` = nginx 1 worker configured like Palpo's reverse-proxy page "
    "(bench/nginx_proxy.conf.tmpl: upstream {} keepalive 64, HTTP/1.1, Connection \"\", "
    "X-Forwarded-For/Proto, Host $host:$server_port, client_max_body_size 50M, default "
    "proxy buffering); `gate` = `python -m palpo_gate` with `server.workers` as shown, "
    "metrics on, access log off (nginx: access_log off); `bare` = bench/bare_server.py, aiohttp's "
    "web.Server on uvloop answering the upstream's /versions body from memory (small GETs "
    "and idle RSS only).",
    "gate / bare compares the gate with the floor of its own stack (same interpreter, loop, "
    "parser and pinning, same rounds) and holds across hosts; gate / nginx moves with how "
    "contended the host is, as Python slows more than nginx.",
    "Pinning: the proxy under test (and the bare server) on CPU 1 (taskset -c 1); wrk, both "
    "upstreams and this runner (incl. its asyncio long-poll client) on CPU 0, so every proxy "
    "figure is per core.",
    "Small GET: `wrk -t1 -c64 --latency` on GET /_matrix/client/versions (a fixed ~240-byte "
    "JSON from the upstream nginx); req/s, and p50 / p99 from wrk's latency distribution.",
    "CPU per request: utime+stime of the proxy's processes (/proc/PID/stat; nginx master + "
    "worker, the gate process and any children) before and after the wrk run, divided by the "
    "requests wrk completed; req per CPU-second is its inverse. 10 ms tick resolution. "
    "For the plain small GET also split: utime (user space) and stime (kernel) per request.",
    "TLS small GET: the same over HTTPS, both proxies on the same self-signed RSA-2048 "
    "certificate (openssl req); `direct` TLS is wrk over TLS straight to the upstream nginx, "
    "which then terminates TLS itself.",
    "Download: `wrk -t1 -c4` on a 16 MiB file the upstream nginx serves with sendfile; MiB/s "
    "is wrk's Transfer/sec (bytes read, partial responses included).",
    "Upload: `wrk -t1 -c4` with a Lua script POSTing a 20 MiB body to the slow upstream, "
    "which answers after the whole body; MiB/s = completed uploads x 20 MiB / duration "
    "(uploads still in flight at the end are not counted, the same for every arm).",
    "Long-polls: an asyncio client opens N connections (at most 64 connects in flight) and "
    "sends GET /_matrix/client/v3/sync on each; the slow upstream answers each after the "
    "hold. Completed = answered 200. Peak held = the most the upstream held at once.",
    "RSS: VmRSS from /proc/PID/status summed over the proxy's processes. Idle = a fresh "
    "proxy after 20 requests, then 0.3 s idle. Held = sampled while the upstream held the "
    "most long-polls; per held long-poll = (held - idle) / peak held, in KiB.",
    "Ratios: arm / nginx within each round (rounds interleave the arms so that each ratio "
    "compares runs seconds apart), then the median over rounds.",
]


def write_results(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    exts = ("json", "md", "png") if result["rounds"] else ("json", "md")  # no ratios to chart
    paths = {ext: out_dir / f"{result['name']}.{ext}" for ext in exts}
    paths["json"].write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    paths["md"].write_text(markdown(result))
    if "png" in paths:
        chart(result, paths["png"])
    return paths
