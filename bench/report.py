"""results.json -> report.md + PNG plots. Every sentence with a number is computed from the records;
nothing here knows what a run "should" show.

    report.write(Path("bench/results"))     # reads results.json, writes report.md, *.png
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

# KEP-3866 first-packet RTT (ms), read from its chart (shared/reference/kube-proxy.md §3.1)
ANCHOR_RTT_MS = {
    ("iptables", 5000): {"p01": 0.016, "p50": 0.047, "p90": 0.118, "p99": 0.154},
    ("iptables", 10000): {"p01": 0.008, "p50": 0.059, "p90": 0.185, "p99": 0.260},
    ("iptables", 30000): {"p01": 0.039, "p50": 0.272, "p90": 0.489, "p99": 0.713},
    ("nftables", 5000): {"p01": 0.008, "p50": 0.012, "p90": 0.020, "p99": 0.035},
    ("nftables", 10000): {"p01": 0.008, "p50": 0.012, "p90": 0.020, "p99": 0.035},
    ("nftables", 30000): {"p01": 0.008, "p50": 0.012, "p90": 0.020, "p99": 0.035},
}
PLOTS = ("latency_vs_services.png", "sync_vs_services.png")
REQUIRED_METRICS = ("first_packet_rtt_s", "full_sync_s", "endpoint_change_s", "add_service_s", "conn_per_s",
                    "throughput_bps", "rss_bytes", "rules", "cpu_s")


def label(r: dict[str, Any]) -> str:
    if r["mode"] == "direct":
        return f"direct (under {r['cell']})"
    return r["cell"] or r["mode"]


def index(records: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(label, metric, services) -> record."""
    return {(label(r), r["metric"], r["services"]): r for r in records}


def _us(v: float | None) -> str:
    return "–" if v is None else f"{v * 1e6:.0f}"


def _s(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v * 1e3:.0f} ms" if v < 1 else f"{v:.2f} s"


def _si(v: float | None, unit: str) -> str:
    if v is None:
        return "–"
    for div, p in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f} {p}{unit}"
    return f"{v:.0f} {unit}"


def cells_of(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["cell"] for r in records if r["cell"]))


def sizes_of(records: list[dict[str, Any]]) -> list[int]:
    return sorted({r["services"] for r in records if r["cell"]})


def plots(doc: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = doc["records"]
    made = []
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, list[tuple[int, float, float, float]]] = defaultdict(list)
    for r in recs:
        if r["metric"] == "first_packet_rtt_s" and r.get("n"):
            key = label(r) if r["mode"] != "direct" else "direct (pod IP)"
            series[key].append((r["services"], r["p50"], r["p01"], r["p99"]))
    for key, pts in sorted(series.items()):
        if key == "direct (pod IP)":  # one line: the median over cells per size
            by: dict[int, list[tuple[int, float, float, float]]] = defaultdict(list)
            for p in pts:
                by[p[0]].append(p)
            pts = [sorted(v, key=lambda p: p[1])[len(v) // 2] for _, v in sorted(by.items())]
        pts.sort()
        xs = [max(p[0], 1) for p in pts]
        ax.errorbar(xs, [p[1] * 1e3 for p in pts],
                    yerr=[[(p[1] - p[2]) * 1e3 for p in pts], [(p[3] - p[1]) * 1e3 for p in pts]],
                    marker="o", capsize=3, label=key, linestyle="--" if key.startswith("direct") else "-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Services (10 endpoints each unless stated)")
    ax.set_ylabel("first-packet connect RTT, ms (p50; bars p01..p99)")
    ax.set_title("New TCP connection to the measured Service, from a client pod")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS[0], dpi=100)
    plt.close(fig)
    made.append(PLOTS[0])

    fig, ax = plt.subplots(figsize=(8, 5))
    for metric, style in (("full_sync_s", "-"), ("endpoint_change_s", ":")):
        by_cell: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in recs:
            if r["metric"] == metric and r.get("value") is not None and r["mode"] != "direct":
                by_cell[label(r)].append((r["services"], r["value"]))
        for key, cpts in sorted(by_cell.items()):
            cpts.sort()
            ax.plot([max(p[0], 1) for p in cpts], [max(p[1], 1e-4) for p in cpts], marker="o", linestyle=style,
                    label=f"{key} {'full sync' if metric == 'full_sync_s' else 'endpoint change'}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Services")
    ax.set_ylabel("seconds (median of repeats)")
    ax.set_title("Control plane: full sync (solid) and one endpoint change (dotted)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / PLOTS[1], dpi=100)
    plt.close(fig)
    made.append(PLOTS[1])
    return made


def _latency_table(recs: list[dict[str, Any]]) -> list[str]:
    rows = ["| mode | Services | n | p01 µs | p50 µs | p90 µs | p99 µs | repeat p50 spread µs | p50 / direct |",
            "|---|---|---|---|---|---|---|---|---|"]
    ix = index(recs)
    for r in recs:
        if r["metric"] != "first_packet_rtt_s" or not r.get("n") or r["mode"] == "client":
            continue
        ratio = ""
        spread = (f"{_us(r['repeat_p50_min'])}–{_us(r['repeat_p50_max'])}" if r.get("repeat_p50_min") is not None
                  else "–")
        if r["mode"] != "direct":
            d = ix.get((f"direct (under {r['cell']})", "first_packet_rtt_s", r["services"]))
            if d and d.get("p50"):
                ratio = f"{r['p50'] / d['p50']:.2f}×"
        rows.append(f"| {label(r)} | {r['services']} | {r['n']} | {_us(r['p01'])} | {_us(r['p50'])} | "
                    f"{_us(r['p90'])} | {_us(r['p99'])} | {spread} | {ratio} |")
    return rows


def _control_table(recs: list[dict[str, Any]]) -> list[str]:
    ix = index(recs)
    rows = ["| mode | Services | full sync (min–max, n) | start → programmed | endpoint change (min–max) | "
            "add Service (min–max) | rules | dump | proxy CPU | proxy peak RSS |",
            "|---|---|---|---|---|---|---|---|---|---|"]

    def spread(r: dict[str, Any] | None) -> str:
        if not r or r.get("value") is None:
            return "–"
        return f"{_s(r['value'])} ({_s(r['min'])}–{_s(r['max'])}, n={r['n']})"

    for cell in cells_of(recs):
        for n in sizes_of(recs):
            g = {m: ix.get((cell, m, n)) for m in ("full_sync_s", "start_to_programmed_s", "endpoint_change_s",
                                                   "add_service_s", "rules", "ruleset_bytes", "cpu_s", "rss_bytes")}
            if not g["full_sync_s"]:
                continue

            def v(m: str, g: dict[str, Any] = g) -> Any:
                r = g[m]
                return r.get("value") if r else None

            rows.append(f"| {cell} | {n} | {spread(g['full_sync_s'])} | {_s(v('start_to_programmed_s'))} | "
                        f"{spread(g['endpoint_change_s'])} | {spread(g['add_service_s'])} | {v('rules')} | "
                        f"{_si(v('ruleset_bytes'), 'B')} | {v('cpu_s') or 0:.1f} s | {_si(v('rss_bytes'), 'B')} |")
    return rows


def _rate_table(recs: list[dict[str, Any]]) -> list[str]:
    rows = ["| mode | Services | new conn/s (min–max) | throughput (min–max) |", "|---|---|---|---|"]
    ix = index(recs)
    for r in recs:
        if r["metric"] != "conn_per_s":
            continue
        t = ix.get((label(r), "throughput_bps", r["services"]))
        tp = (f"{_si(t['value'], 'bit/s')} ({_si(t['min'], '')}–{_si(t['max'], '')})" if t and t.get("n")
              else f"failed: {t.get('error', '')}" if t else "–")
        cr = f"{r['value']:.0f} ({r['min']:.0f}–{r['max']:.0f})" if r.get("n") else "–"
        rows.append(f"| {label(r)} | {r['services']} | {cr} | {tp} |")
    return rows


def summary_table(doc: dict[str, Any]) -> list[str]:
    """One row per mode: first-packet p50 per size, its ratio to direct, full sync, endpoint change."""
    recs = doc["records"]
    ix = index(recs)
    sizes = sizes_of(recs)
    head = " | ".join(f"p50 µs @{n}" for n in sizes)
    rows = [f"| mode | {head} | ÷ direct @{sizes[-1] if sizes else '-'} | "
            + " | ".join(f"full sync @{n}" for n in sizes) + f" | endpoint change @{sizes[-1] if sizes else '-'} |",
            "|---" * (3 + 2 * len(sizes)) + "|"]
    for cell in cells_of(recs):
        p = [ix.get((cell, "first_packet_rtt_s", n)) for n in sizes]
        d = ix.get((f"direct (under {cell})", "first_packet_rtt_s", sizes[-1]))
        last = p[-1]
        ratio = f"{last['p50'] / d['p50']:.2f}×" if last and d and d.get("p50") else "–"
        f = [ix.get((cell, "full_sync_s", n)) for n in sizes]
        ec = ix.get((cell, "endpoint_change_s", sizes[-1]))
        rows.append(f"| {cell} | " + " | ".join(_us(r["p50"]) if r else "–" for r in p) + f" | {ratio} | "
                    + " | ".join(_s(r["value"]) if r else "–" for r in f) + f" | {_s(ec['value']) if ec else '–'} |")
    return rows


def findings(doc: dict[str, Any]) -> list[str]:
    recs = doc["records"]
    ix = index(recs)
    sizes = sizes_of(recs)
    out: list[str] = []
    if not sizes:
        return ["No cell was measured."]
    lo, hi = sizes[0], sizes[-1]

    def p50(cell: str, n: int) -> float | None:
        r = ix.get((cell, "first_packet_rtt_s", n))
        return r.get("p50") if r else None

    for cell in cells_of(recs):
        a, b = p50(cell, lo), p50(cell, hi)
        d = p50(f"direct (under {cell})", hi)
        if a is None or b is None:
            continue
        growth = (b - a) * 1e6
        trend = ("grows" if b > a * 1.25 and growth > 5 else "stays flat" if b < a * 1.25 else "moves little")
        txt = (f"**{cell}: first-packet latency {trend} with the number of Services.** p50 is {a * 1e6:.0f} µs at "
               f"{lo} Service(s) and {b * 1e6:.0f} µs at {hi} ({growth:+.0f} µs)")
        if d:
            txt += f"; the direct pod-IP connection under the same rules is {d * 1e6:.0f} µs, a ratio of {b / d:.2f}×"
        out.append(txt + ".")
    for cell in cells_of(recs):
        f = [(n, ix[(cell, "full_sync_s", n)]["value"]) for n in sizes if (cell, "full_sync_s", n) in ix]
        ec = [(n, ix[(cell, "endpoint_change_s", n)]["value"]) for n in sizes if (cell, "endpoint_change_s", n) in ix]
        if not f:
            continue
        txt = f"**{cell}: control plane.** Full sync " + ", ".join(f"{_s(v)} at {n}" for n, v in f)
        if ec:
            txt += "; one endpoint change (trigger → kernel) " + ", ".join(f"{_s(v)} at {n}" for n, v in ec)
        out.append(txt + ".")
    if "userspace" in cells_of(recs):
        parts = []
        for n in sizes:
            cu, cd = ix.get(("userspace", "conn_per_s", n)), ix.get(("direct (under userspace)", "conn_per_s", n))
            tu = ix.get(("userspace", "throughput_bps", n))
            td = ix.get(("direct (under userspace)", "throughput_bps", n))
            if cu and cd and cd.get("value"):
                txt = f"{cu['value']:.0f} vs {cd['value']:.0f} new connections/s"
                if tu and td and tu.get("value") and td.get("value"):
                    txt += f" and {_si(tu['value'], 'bit/s')} vs {_si(td['value'], 'bit/s')}"
                parts.append(f"{txt} at {n}")
        out.append("**userspace: the cost is in the relay, not the first packet.** A client's connect() returns when "
                   "the proxy's own listener in the node accepts (the proxy dials the backend afterwards), so its "
                   "first-packet figure is a local handshake; the relay shows in the rates: through the Service vs "
                   "the pod directly, " + ("; ".join(parts) or "no rate measured") + ".")
    if "userspace" not in cells_of(recs):
        why = next((s["reason"] for s in doc.get("skipped", []) if s["mode"] == "userspace"), "not requested")
        out.append(f"**userspace: not measured** ({why}).")
    if "ipvs" not in cells_of(recs):
        why = next((s["reason"] for s in doc.get("skipped", []) if s["mode"] == "ipvs"), "not requested")
        out.append(f"**ipvs: not measured in this run** ({why}).")
    floor = next((r for r in recs if r["metric"] == "tool_floor_s"), None)
    if floor and floor.get("n"):
        out.append(f"**The client's own cost.** kpx-connlat connecting to its own loopback listener takes "
                   f"p50 {floor['p50'] * 1e6:.0f} µs (p99 {floor['p99'] * 1e6:.0f} µs, n={floor['n']}): every "
                   f"latency above includes that floor; the direct baseline shows the path without the Service.")
    m = doc["machine"]
    la, le = m.get("loadavg_start"), m.get("loadavg_end")
    if la:
        out.append(f"**Machine load.** The load average was {la[0]:.1f} at the start and "
                   f"{(le or la)[0]:.1f} at the end on {m.get('cpus')} CPUs (a shared machine): wall-clock figures "
                   f"include queueing for a CPU; compare modes within this run, and read the p01 column as the "
                   f"least-disturbed figure.")
    return out


def markdown(doc: dict[str, Any], images: list[str]) -> str:
    m = doc["machine"]
    recs = doc["records"]
    lines = ["# kpx bench report", ""]
    if m.get("emulated"):
        lines += ["**Measured under emulation (qemu VM, Debian kernel): compare only as ratios within this run.**", ""]
    bs = m.get("bench_settings", {})
    lines += ["## Machine and settings", "",
              f"- CPU: {m.get('cpu')} × {m.get('cpus')}, memory {_si(m.get('mem_bytes'), 'B')}, kernel {m.get('kernel')}",
              f"- load average (1/5/15 min) at start: {m.get('loadavg_start')}, at end: {m.get('loadavg_end')}",
              f"- {m.get('iptables_legacy')}; {m.get('iptables_nft')}; {m.get('nft')}; {m.get('ipvsadm')}; "
              f"{m.get('iperf3')}",
              f"- Python {m.get('python')}, kpx commit {m.get('kpx_commit')}, run took "
              f"{(m.get('duration_s') or 0):.0f} s",
              f"- proxy: {json.dumps(m.get('proxy_settings'))}",
              f"- bench: {json.dumps(bs)}",
              "- path: Services and EndpointSlices created through the apiserver (fillers selectorless, hand-written "
              "slices whose endpoints have no pod behind them; the measured Service `bench/zz-target` with real "
              "kpx/echo backends on the other node, re-created after the fillers and sorting last); one `kpx proxy` "
              "on the client's node, started after `kpx proxy --cleanup` for each cell; latency from the client "
              "pod with kpx-connlat (C, connect() until SYN-ACK, RST close), throughput with iperf3.", ""]
    if m.get("vm"):
        v = m["vm"]
        lines += [f"Cells named `vm:` ran inside the qemu VM (kernel {v.get('kernel')}, {v.get('cpus')} vCPU, TCG "
                  "emulation): **measured under emulation**, compare them only with each other (as ratios).", ""]
    for note in m.get("notes") or []:
        lines += [f"- note: {note}"]
    skipped = doc.get("skipped") or []
    if skipped:
        lines += ["## Skipped or failed", ""] + [f"- **{s['cell']}**: {s['reason']}" for s in skipped] + [""]
    if sizes_of(recs):
        lines += ["## Summary", "", *summary_table(doc), ""]
    lines += ["## Findings", ""]
    for f in findings(doc):
        lines += [f, ""]
    lines += ["## First-packet connection latency", "", *_latency_table(recs), ""]
    for img in images:
        lines += [f"![{img}]({img})", ""]
    lines += ["## Control plane", "", *_control_table(recs), "",
              "## Connections per second and throughput", "", *_rate_table(recs), ""]
    obj = [r for r in recs if r["metric"] == "create_objects_per_s"]
    if obj:
        lines += ["Objects created through the apiserver: " +
                  ", ".join(f"{r['value']:.0f}/s filling to {r['services']}" for r in obj), ""]
    lines += ["## Published anchors (KEP-3866 first-packet RTT, ms, read from its chart)", "",
              "| mode | Services | p01 | p50 | p90 | p99 | kpx here p50 |", "|---|---|---|---|---|---|---|"]
    ix = index(recs)
    for (mode, n), a in ANCHOR_RTT_MS.items():
        here = [ix[(c, "first_packet_rtt_s", n)]["p50"] for c in cells_of(recs)
                if c.startswith(mode) and (c, "first_packet_rtt_s", n) in ix]
        lines.append(f"| {mode} | {n} | {a['p01']} | {a['p50']} | {a['p90']} | {a['p99']} | "
                     f"{', '.join(f'{h * 1e3:.3f}' for h in here) or 'not run'} |")
    lines += ["", "Huawei 2017 (iptables -A era, before restore batching): adding one rule took 11 min at 5k Services "
              "and 5 h at 20k; upstream nftables partial sync (PR #126013): adding one Service on top of 10k ≈141 ms.",
              ""]
    return "\n".join(lines)


def write(out: Path) -> Path:
    doc = json.loads((out / "results.json").read_text())
    images = plots(doc, out) if any(r["metric"] == "first_packet_rtt_s" for r in doc["records"]) else []
    p = out / "report.md"
    p.write_text(markdown(doc, images))
    return p
