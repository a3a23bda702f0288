"""The demo's table (text and markdown), its JSON and its PNG."""
from __future__ import annotations

import json
import math
import os

from .methods import LABELS

MODALITIES = ("audio", "visual")


def _mean_sd(xs):
    xs = [x for x in xs if x == x]  # drop nan
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def summarize(results):
    """Group RunResults by method (in order of first appearance): mean and sd over seeds."""
    order, groups = [], {}
    for r in results:
        if r.method not in groups:
            order.append(r.method)
            groups[r.method] = []
        groups[r.method].append(r)
    rows = []
    for name in order:
        rs = groups[name]
        row = {"method": name, "label": LABELS.get(name, name), "seeds": [r.seed for r in rs],
               "fused": _mean_sd([r.fused_acc for r in rs]),
               "ms_per_step": _mean_sd([r.ms_per_step for r in rs]),
               "balance_share": _mean_sd([r.balance_share for r in rs])}
        for m, mod in enumerate(MODALITIES):
            row[mod] = _mean_sd([r.modality_acc[m] for r in rs])
        rows.append(row)
    joint = next((r for r in rows if r["method"] == "joint"), None)
    for row in rows:
        row["verdict"] = _verdict(row, joint)
    return rows


def _verdict(row, joint):
    if joint is None or row["method"] == "joint":
        return ""
    if row["method"].endswith("alone"):
        return "reference (one encoder alone)"
    (m, sd), (mj, sdj) = row["fused"], joint["fused"]
    delta = 100 * (m - mj)
    noise = 100 * max(sd, sdj, 0.005)
    tag = "helps" if delta > noise else ("hurts" if delta < -noise else "no clear gain")
    dv = 100 * (row["visual"][0] - joint["visual"][0])
    return f"{delta:+.1f} pts fused, {dv:+.1f} pts visual: {tag}"


def _pct(ms):
    m, sd = ms
    if m != m:
        return "-"
    return f"{100 * m:.1f} ± {100 * sd:.1f}"


def format_table(rows, markdown=False):
    head = ["method", "fused acc %", "audio acc %", "visual acc %", "ms/step", "balancing %", "vs joint"]
    body = []
    for r in rows:
        share = "-" if r["method"] in ("joint",) or r["method"].endswith("alone") else f"{100 * r['balance_share'][0]:.0f}"
        body.append([r["label"], _pct(r["fused"]), _pct(r["audio"]), _pct(r["visual"]),
                     f"{r['ms_per_step'][0]:.2f}", share, r["verdict"]])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def write_json(path, config, results, rows):
    payload = {"config": config, "summary": rows, "runs": [r.__dict__ for r in results]}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def write_png(path, results, rows):
    """Accuracy per method (mean ± sd over seeds) and, for the first seed, the ratio and coefficient traces.
    Returns None on success, or a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): PNG skipped"
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    n = len(rows)
    for j, (key, color) in enumerate((("fused", "tab:green"), ("audio", "tab:blue"), ("visual", "tab:orange"))):
        xs = [i + (j - 1) * 0.27 for i in range(n)]
        ax.bar(xs, [100 * r[key][0] for r in rows], 0.27, yerr=[100 * r[key][1] for r in rows], color=color,
               label=key if key == "fused" else f"{key} (linear probe)")
    ax.set_xticks(range(n))
    ax.set_xticklabels([r["method"] for r in rows], rotation=40, ha="right")
    ax.set_ylabel("test accuracy %")
    ax.set_ylim(0, 100)
    ax.set_title("accuracy (mean ± sd over seeds)")
    ax.legend(loc="lower right", fontsize=8)
    first = {}
    for r in results:
        if r.ratio_trace and r.method not in first:
            first[r.method] = r
    for ax, key, title in ((axes[1], "ratio_trace", "ratio of audio (rho_a; AGM: r_a; MLB: r_a; OLM: lambda_a)"),
                           (axes[2], "coef_trace", "coefficient, audio solid / visual dashed")):
        for name, r in first.items():
            i = [row["method"] for row in rows].index(name)
            trace = getattr(r, key)
            pts = [(s, t) for s, t in zip(r.trace_steps, trace) if t is not None]
            if not pts:
                continue
            color = f"C{i}"
            steps = [s for s, _ in pts]
            ax.plot(steps, [t[0] for _, t in pts], color=color, label=name, lw=1)
            if key == "coef_trace":
                ax.plot(steps, [t[1] for _, t in pts], color=color, ls="--", lw=1)
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    axes[1].axhline(1.0, color="grey", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_all(out_dir, config, results, rows):
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "results.json"), config, results, rows)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(format_table(rows, markdown=True) + "\n")
    note = write_png(os.path.join(out_dir, "demo.png"), results, rows)
    return note
