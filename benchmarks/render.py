"""Render pytest-benchmark JSON files into one markdown table per group and a PNG.

    python benchmarks/render.py RESULTS.json [MORE.json|.jsonl ...] --md OUT.md --png OUT.png

A .jsonl file holds the lines benchmarks/_jsonl.py writes as each benchmark ends (the GPU suite's format).

Train-step cases (bench_train_step.py) get a table with the step time, its ratio to the joint step of the same M
and implementation device, host syncs, GPU kernels and peak memory; every other group a generic table (median, mean,
stddev, rounds and the case's extra_info). Only measured numbers are written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def load(paths):
    benches, machine = [], {}
    for p in paths:
        with open(p) as f:
            if p.endswith(".jsonl"):  # benchmarks/_jsonl.py lines: benchmark records, test records skipped
                data = {
                    "benchmarks": [r for r in map(json.loads, filter(str.strip, f)) if r.get("kind") == "benchmark"]
                }
            else:
                data = json.load(f)
        machine = data.get("machine_info", machine)
        for b in data.get("benchmarks", []):
            b["_file"] = os.path.basename(p)
            benches.append(b)
    return benches, machine


def _ms(x):
    return f"{1000 * x:.3f}" if x is not None else "-"


def _num(x, fmt="{:.0f}"):
    return "-" if x is None else fmt.format(x)


def train_step_table(benches):
    rows = [
        b
        for b in benches
        if b.get("extra_info", {}).get("impl") in ("mmkernels", "authors")
        and "method" in b["extra_info"]
        and "M" in b["extra_info"]
    ]
    if not rows:
        return ""
    joint = {}
    for b in rows:
        e = b["extra_info"]
        if e["method"] == "joint":
            joint[(e["M"], e.get("device"))] = b["stats"]["median"]
    out = [
        "| method | M | implementation | step ms (median) | x joint | host syncs | GPU kernels | peak MiB | device |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows.sort(
        key=lambda b: (
            b["extra_info"]["M"],
            b["extra_info"]["method"] != "joint",
            b["extra_info"]["method"],
            b["extra_info"]["impl"],
        )
    )
    for b in rows:
        e, med = b["extra_info"], b["stats"]["median"]
        j = joint.get((e["M"], e.get("device")))
        ratio = f"{med / j:.3f}" if j else "-"
        out.append(
            f"| {e['method']} | {e['M']} | {e['impl']} | {_ms(med)} | {ratio} | {_num(e.get('host_syncs'))} | "
            f"{_num(e.get('kernels'))} | {_num(e.get('peak_mib'), '{:.0f}')} | {e.get('device', '?')} |"
        )
    full = {b["extra_info"].get("full") for b in rows}
    shapes = rows[0]["extra_info"].get("shapes")
    note = (
        f"\nInputs {shapes} (first case), batch {rows[0]['extra_info'].get('batch')}; "
        f"{'full' if full == {True} else 'reduced'} shapes."
    )
    return "\n".join(out) + note


def generic_tables(benches):
    groups = {}
    for b in benches:
        if b.get("extra_info", {}).get("impl") in ("mmkernels", "authors"):
            continue
        groups.setdefault(b.get("group") or b["_file"], []).append(b)
    parts = []
    for g, bs in sorted(groups.items()):
        lines = [
            f"### {g}",
            "",
            "| case | median ms | mean ms | stddev ms | rounds | extra |",
            "|---|---|---|---|---|---|",
        ]
        for b in bs:
            s = b["stats"]
            extra = ", ".join(f"{k}={v}" for k, v in sorted(b.get("extra_info", {}).items()))
            lines.append(
                f"| {b['name']} | {_ms(s['median'])} | {_ms(s['mean'])} | {_ms(s['stddev'])} | "
                f"{s['rounds']} | {extra} |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def render_markdown(benches, machine):
    ts = train_step_table(benches)
    parts = []
    if machine:  # pytest-benchmark JSON carries it; the suite's JSON lines do not (versions.txt does)
        parts.append(
            f"Machine: {machine.get('node', '?')}, {machine.get('cpu', {}).get('brand_raw', '?')}, "
            f"python {machine.get('python_version', '?')}"
        )
    if ts:
        parts += ["## Training step", ts]
    gen = generic_tables(benches)
    if gen:
        parts += ["## Op families", gen]
    return "\n\n".join(parts) + "\n"


def render_png(benches, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib missing: PNG skipped"
    rows = [
        b
        for b in benches
        if b.get("extra_info", {}).get("impl") in ("mmkernels", "authors")
        and "method" in b["extra_info"]
        and "M" in b["extra_info"]
    ]
    if not rows:
        return "no training-step results: PNG skipped"
    labels = [f"{b['extra_info']['method']} M={b['extra_info']['M']} ({b['extra_info']['impl'][:4]})" for b in rows]
    vals = [1000 * b["stats"]["median"] for b in rows]
    colors = ["tab:blue" if b["extra_info"]["impl"] == "mmkernels" else "tab:red" for b in rows]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    ax.barh(range(len(rows)), vals, color=colors)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("training step, ms (median); blue mmkernels, red authors' style")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "json", nargs="+", help="pytest-benchmark --benchmark-json files, or .jsonl files of benchmarks/_jsonl.py"
    )
    p.add_argument("--md", default=None, help="write the markdown here (default: stdout)")
    p.add_argument("--png", default=None, help="write the training-step plot here")
    args = p.parse_args(argv)
    benches, machine = load(args.json)
    md = render_markdown(benches, machine)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    else:
        sys.stdout.write(md)
    if args.png:
        note = render_png(benches, args.png)
        if note:
            print(note, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
