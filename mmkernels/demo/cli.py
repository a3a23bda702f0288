"""`python -m mmkernels demo`: modality imbalance and its fix on a synthetic audio-visual set, in a few minutes on CPU."""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .data import make_dataset
from .methods import METHODS, LABELS
from .progress import Progress
from .report import format_table, summarize, write_all
from .train import DemoConfig, train_method, train_unimodal

QUICK = dict(steps=300, seeds=1, probe_iters=50)
DEFAULT = dict(steps=1000, seeds=3, probe_iters=100)


def build_parser(parser=None):
    p = parser or argparse.ArgumentParser(prog="python -m mmkernels demo", description=__doc__)
    p.add_argument("--quick", action="store_true", help=f"short run: {QUICK['steps']} steps, 1 seed (under a minute on 2 CPU cores)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--backbone", default="mlp", choices=["mlp", "resnet18"],
                   help="mlp (default, CPU-sized) or torchvision resnet18 encoders, no pretrained weights (the papers' setup; use a GPU)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 1000; 300 with --quick)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-alone", action="store_true", help="skip the one-encoder-alone reference runs")
    p.add_argument("--out", default="mmkernels_demo_out", help="folder for results.json, table.md and demo.png")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 for the CPU MLP run, else torch's choice)")
    return p


def run(args) -> int:
    preset = QUICK if args.quick else DEFAULT
    steps = args.steps or preset["steps"]
    n_seeds = args.seeds or preset["seeds"]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(f"unknown method(s) {bad}; choose from {METHODS}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda asked for, but no CUDA device is visible", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.device == "cpu" and args.backbone == "mlp":
        torch.set_num_threads(1)  # tiny MLP steps: one thread is faster and steadier than two
    cfg = DemoConfig(steps=steps, batch_size=args.batch_size, backbone=args.backbone, device=args.device,
                     probe_iters=preset["probe_iters"])
    import mmkernels

    print(f"mmkernels {mmkernels.__version__} demo: synthetic audio-visual set (audio learns fast, visual is informative "
          f"but slow); {len(methods)} method(s) x {n_seeds} seed(s), {steps} steps of batch {cfg.batch_size}, "
          f"backbone {cfg.backbone}, device {cfg.device}", flush=True)
    jobs = [(m, s) for s in range(n_seeds) for m in methods]
    if not args.no_alone:
        jobs += [(f"{mod} alone", s) for s in range(n_seeds) for mod in ("audio", "visual")]
    bar = Progress(len(jobs) * steps)
    results = []
    t0 = time.perf_counter()
    for method, seed in jobs:
        data = make_dataset(seed)
        bar.start_run(f"{method} seed {seed}")
        tick = lambda step: bar.advance()
        if method.endswith("alone"):
            results.append(train_unimodal(data, ("audio", "visual").index(method.split()[0]), seed, cfg, on_step=tick))
        else:
            results.append(train_method(data, method, seed, cfg, on_step=tick))
        bar.end_run()
    bar.close()
    wall = time.perf_counter() - t0
    rows = summarize(results)
    config = dict(vars(args), steps=steps, seeds=n_seeds, wall_seconds=round(wall, 1), torch=torch.__version__,
                  threads=torch.get_num_threads())
    note = write_all(args.out, config, results, rows)
    print()
    print(format_table(rows))
    print()
    print(f"accuracies on the test split, mean ± sd over {n_seeds} seed(s); audio/visual: linear probe on each frozen "
          f"encoder; ms/step: one training step on {cfg.device}; balancing %: share of the step spent in the balancing "
          f"calls; wall time {wall:.0f}s")
    print(f"wrote {os.path.join(args.out, 'results.json')}, {os.path.join(args.out, 'table.md')}"
          + ("" if note else f", {os.path.join(args.out, 'demo.png')}"))
    if note:
        print(note)
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))
