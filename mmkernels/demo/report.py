"""The demo's tables (accuracy and cost; the diagnostics of mmkernels.metrics), as text and markdown, its JSON and
its PNG, for any number of views."""

from __future__ import annotations

import json
import math
import os

from ..metrics import imbalance
from .methods import label


MIN_SEEDS_FOR_VERDICT = 3  # "helps"/"hurts" needs a standard deviation over at least this many seeds


def _mean_sd(xs):
    xs = [x for x in xs if x is not None and x == x]  # drop None and nan
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _alone_accuracy(results, names):
    """{(seed, m): accuracy of view m's encoder trained alone} (its unimodal logits are its own fused logits)."""
    return {
        (r.seed, names.index(r.method[: -len(" alone")])): r.fused_acc
        for r in results
        if r.method.endswith(" alone") and r.method[: -len(" alone")] in names
    }


def _imbalances(r, alone, names):
    """(spread of unimodal accuracies, spread of unimodal accuracy / alone accuracy) of one joint run (nan if n/a)."""
    if r.method.endswith(" alone") or len(r.unimodal_acc) != len(names):
        return float("nan"), float("nan")
    spread = imbalance(r.unimodal_acc).item()
    ref = [alone.get((r.seed, m)) for m in range(len(names))]
    relative = imbalance(r.unimodal_acc, reference=ref).item() if None not in ref else float("nan")
    return spread, relative


def summarize(results, names):
    """Group RunResults by method (joint and the methods first, the alone references last, each in order of first
    appearance): mean and sd over seeds of every column. names: the M view names."""
    order, groups = [], {}
    for r in results:
        if r.method not in groups:
            order.append(r.method)
            groups[r.method] = []
        groups[r.method].append(r)
    order = [n for n in order if not n.endswith(" alone")] + [n for n in order if n.endswith(" alone")]
    alone = _alone_accuracy(results, names)
    rows = []
    for name in order:
        rs = groups[name]
        per_view = lambda key: [
            _mean_sd([(getattr(r, key) or [None] * len(names))[m] for r in rs]) for m in range(len(names))
        ]
        imb = [_imbalances(r, alone, names) for r in rs]
        rows.append(
            {
                "method": name,
                "label": label(name),
                "seeds": [r.seed for r in rs],
                "fused": _mean_sd([r.fused_acc for r in rs]),
                "ms_per_step": _mean_sd([r.ms_per_step for r in rs]),
                "balance_share": _mean_sd([r.balance_share for r in rs]),
                "peak_mib": _mean_sd([r.peak_mib for r in rs]),
                "probe": per_view("modality_acc"),
                "unimodal": per_view("unimodal_acc"),
                "competition": per_view("competition"),
                "update_ratio": per_view("update_ratio"),
                "update_coef": per_view("update_coef"),
                "imbalance": _mean_sd([a for a, _ in imb]),
                "imbalance_rel": _mean_sd([b for _, b in imb]),
            }
        )
    joint = next((r for r in rows if r["method"] == "joint"), None)
    for row in rows:
        row["verdict"] = _verdict(row, joint, rows, names)
    return rows


def lagging_view(joint, rows):
    """Index of the view joint training under-trains most: the largest (alone probe - joint probe); without alone
    runs, the lowest joint probe."""
    alone = {
        m: acc for r in rows if r["method"].endswith(" alone") for m, (acc, _) in enumerate(r["probe"]) if acc == acc
    }
    gaps = [(alone[m] - acc) if m in alone else -acc for m, (acc, _) in enumerate(joint["probe"])]
    return max(range(len(gaps)), key=gaps.__getitem__)


def _verdict(row, joint, rows, names):
    if joint is None or row["method"] == "joint":
        return ""
    if row["method"].endswith(" alone"):
        return "reference (one encoder alone)"
    (m, sd), (mj, sdj) = row["fused"], joint["fused"]
    delta = 100 * (m - mj)
    lag = lagging_view(joint, rows)
    dv = 100 * (row["probe"][lag][0] - joint["probe"][lag][0])
    seeds = min(len(row["seeds"]), len(joint["seeds"]))
    if seeds < MIN_SEEDS_FOR_VERDICT:  # one or two seeds give no spread to compare a difference with
        plural = "s" if seeds > 1 else ""
        return f"{delta:+.1f} pts fused, {dv:+.1f} pts {names[lag]} ({seeds} seed{plural}: no verdict)"
    noise = 100 * max(sd, sdj, 0.005)
    tag = "helps" if delta > noise else ("hurts" if delta < -noise else "no clear gain")
    return f"{delta:+.1f} pts fused, {dv:+.1f} pts {names[lag]}: {tag}"


def _pct(ms):
    m, sd = ms
    if m != m:
        return "-"
    return f"{100 * m:.1f} ± {100 * sd:.1f}"


def _render(head, body, markdown):
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def format_table(rows, names, markdown=False):
    """Accuracy and cost: fused accuracy, each view's linear probe, ms/step, balancing share, peak CUDA MiB."""
    head = ["method", "fused acc %", *(f"{n} acc %" for n in names), "ms/step", "balancing %", "peak MiB", "vs joint"]
    body = []
    for r in rows:
        plain = r["method"] == "joint" or r["method"].endswith(" alone")
        share = "-" if plain else f"{100 * r['balance_share'][0]:.0f}"
        peak = "-" if r["peak_mib"][0] != r["peak_mib"][0] else f"{r['peak_mib'][0]:.0f}"
        body.append(
            [
                r["label"],
                _pct(r["fused"]),
                *(_pct(p) for p in r["probe"]),
                f"{r['ms_per_step'][0]:.2f}",
                share,
                peak,
                r["verdict"],
            ]
        )
    return _render(head, body, markdown)


def format_diagnostics(rows, names, markdown=False):
    """mmkernels.metrics per method: unimodal accuracy and AGM competition strength d^m per view, the imbalance."""
    head = ["method", *(f"{n}: acc % / d" for n in names), "imbalance (pts)", "imbalance / alone"]
    body = []
    for r in rows:
        cells = []
        for (acc, _), (d, _) in zip(r["unimodal"], r["competition"]):
            a = "-" if acc != acc else f"{100 * acc:.1f}"
            cells.append(a if d != d else f"{a} / {d:.2f}")
        spread, rel = r["imbalance"][0], r["imbalance_rel"][0]
        body.append(
            [
                r["label"],
                *cells,
                "-" if spread != spread else f"{100 * spread:.1f}",
                "-" if rel != rel else f"{rel:.2f}",
            ]
        )
    return _render(head, body, markdown)


def format_update_ratios(rows, names, markdown=False):
    """Parameter-mode rows: per view the update-norm ratio achieved and the mean coefficient k ("" if none)."""
    have = [r for r in rows if any(m == m for m, _ in r["update_ratio"])]
    if not have:
        return ""
    head = ["method", *(f"{n}: achieved / k" for n in names)]
    body = [
        [r["label"], *(f"{a:.2f} / {k:.2f}" for (a, _), (k, _) in zip(r["update_ratio"], r["update_coef"]))]
        for r in have
    ]
    return _render(head, body, markdown)


def write_json(path, config, results, rows):
    payload = {"config": config, "summary": rows, "runs": [r.__dict__ for r in results]}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def write_png(path, results, rows, names):
    """Accuracy per method (mean ± sd over seeds) and, for the first seed, the ratio and coefficient traces of the
    first view (solid) and of the last (dashed). Returns None on success, or a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): PNG skipped"
    fig = plt.figure(figsize=(14, 9))
    axes = [fig.add_subplot(2, 1, 1), fig.add_subplot(2, 2, 3), fig.add_subplot(2, 2, 4)]
    ax = axes[0]
    n, bars = len(rows), ["fused"] + list(names)
    width = 0.8 / len(bars)
    for j, key in enumerate(bars):
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(n)]
        vals = [r["fused"] if j == 0 else r["probe"][j - 1] for r in rows]
        ax.bar(
            xs,
            [100 * v[0] for v in vals],
            width,
            yerr=[100 * v[1] for v in vals],
            color=f"C{j}",
            label=key if j == 0 else f"{key} (linear probe)",
        )
    ax.set_xticks(range(n))
    ax.set_xticklabels([r["method"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("test accuracy %")
    ax.set_ylim(0, 100)
    ax.set_title("accuracy (mean ± sd over seeds)")
    ax.legend(loc="lower left", fontsize=7, ncol=len(bars))
    first = {}
    for r in results:
        if r.ratio_trace and r.method not in first:
            first[r.method] = r
    a, z = names[0], names[-1]
    for ax, key, title in (
        (axes[1], "ratio_trace", f"ratio of {a} (rho; AGM: r; MLB: r; OLM: lambda)"),
        (axes[2], "coef_trace", f"coefficient, {a} solid / {z} dashed"),
    ):
        for name, r in first.items():
            i = [row["method"] for row in rows].index(name)
            pts = [(s, t) for s, t in zip(r.trace_steps, getattr(r, key)) if t is not None]
            if not pts:
                continue
            steps = [s for s, _ in pts]
            ax.plot(steps, [t[0] for _, t in pts], color=f"C{i}", label=name, lw=1)
            if key == "coef_trace":
                ax.plot(steps, [t[-1] for _, t in pts], color=f"C{i}", ls="--", lw=1)
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    axes[1].axhline(1.0, color="grey", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_all(out_dir, config, results, rows, names):
    """results.json, table.md (both tables) and demo.png in out_dir. Returns write_png's note (None when written)."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "results.json"), config, results, rows)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(format_table(rows, names, markdown=True) + "\n\n")
        f.write(format_diagnostics(rows, names, markdown=True) + "\n")
        updates = format_update_ratios(rows, names, markdown=True)
        if updates:
            f.write("\n" + updates + "\n")
    return write_png(os.path.join(out_dir, "demo.png"), results, rows, names)
