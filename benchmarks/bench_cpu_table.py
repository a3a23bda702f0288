"""CPU comparison table (docs/architecture.md, CPU targets): mmkernels against the plain PyTorch a user would write
instead, measured side by side in one run on this machine, printed as a Markdown table with the machine and command.

    .venv/bin/python benchmarks/bench_cpu_table.py [--repeat 15] [--threads N] [--tiny]

Rows (each implementation is timed in interleaved rounds, so a busy neighbour slows all of them alike; the table
shows the median and the minimum over the rounds, and the ratio of the medians to the first baseline):
- ge_isotropic_ over ResNet-18's conv-weight gradients (11.2M values): mmkernels (two multithreaded passes) vs the
  authors' per-tensor loop (`g.std().item()`, `g.mul_(k).add_(zeros_like(g).normal_(0, std))`); the fraction of the
  copy bandwidth counts 3 passes over the gradient bytes (statistics read, update read + write).
- cov_noise_tap forward + backward at B = 4096 and B = 64, D = 512: mmkernels vs plain torch (`torch.randn(B, 1)`,
  centre, multiply, autograd).
- balance_coefficients (OGM, M = 2) at B = 64, C = 6 and B = 4096, C = 1000: mmkernels vs a minimal vectorised torch
  version (softmax, gather, sum, ratio, where) and the package's reference.
- copy: `out.copy_(x)` of the ge gradient bytes, the bandwidth yardstick.
Under pytest (the benchmarks lane, `--benchmark-disable`) the same code runs once with tiny shapes, untimed checks only.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

import mmkernels
from mmkernels import reference as R
from mmkernels.noise import cov_noise_tap, ge_isotropic_


def plain_torch_ogm(x, y):
    """The few lines a user would write for OGM's coefficients (TPAMI Eq. 11 with tanh, alpha = 1), M = 2."""
    s = torch.softmax(x.float(), dim=-1).gather(2, y.view(1, -1, 1).expand(x.shape[0], -1, 1)).sum(dim=(1, 2))
    rho = s / s.flip(0)
    return torch.where(rho > 1, (1 - torch.tanh(rho - 1)).clamp_min(0), torch.ones_like(rho))


def _conv_grads(tiny: bool):
    if tiny:
        shapes = [(8, 3, 3, 3), (5,), (16, 8, 3, 3)]
    else:
        from mmkernels.demo.models import ResNet18Encoder

        shapes = [tuple(p.shape) for p in ResNet18Encoder(3).parameters() if p.dim() == 4]
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) * 1e-3 for s in shapes]


def ge_case(tiny: bool):
    grads = _conv_grads(tiny)
    saved = [g.clone() for g in grads]
    n = sum(g.numel() for g in grads)
    k = torch.full((len(grads),), 0.6)
    step = [0]

    def reset():  # outside the timed calls: the in-place update would grow the gradients round after round
        for g, s in zip(grads, saved):
            g.copy_(s)

    def ours():
        step[0] += 1
        ge_isotropic_(grads, k, seed=0, offset=step[0] * n)

    def authors():
        for g in grads:
            std = g.std().item() + 1e-8  # sync-ok: the authors' loop, benchmarked
            g.mul_(0.6).add_(torch.zeros_like(g).normal_(0, std))

    x = torch.randn(n)
    out = torch.empty_like(x)
    impls = {"mmkernels": ours, "authors' loop": authors, "copy (torch)": lambda: out.copy_(x)}
    return (
        f"ge_isotropic_ (ResNet-18 conv grads, {n / 1e6:.1f}M fp32)",
        impls,
        reset,
        {"bytes": 3 * 4 * n, "copy": 2 * 4 * n},
    )


def tap_case(B: int, D: int):
    g = torch.Generator().manual_seed(1)
    feat, grad = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    k, sigma = torch.tensor(0.7), 1.0
    step = [0]

    def ours():
        step[0] += 1
        x = feat.detach().requires_grad_()
        cov_noise_tap(x, k, sigma=sigma, seed=1, offset=step[0] * B).backward(grad)
        return x.grad

    def plain():
        x = feat.detach().requires_grad_()
        z = torch.randn(B, 1)
        (x * (k + sigma * (z - z.mean()))).backward(grad)
        return x.grad

    return f"cov_noise_tap fwd+bwd (B={B}, D={D})", {"mmkernels": ours, "plain torch": plain}, None, {}


def coef_case(M: int, B: int, C: int):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(M, B, C, generator=g), torch.randint(0, C, (B,), generator=g)
    impls = {
        "mmkernels": lambda: mmkernels.balance_coefficients(x, y, "ogm"),
        "plain torch (vectorised)": lambda: plain_torch_ogm(x, y),
        "reference": lambda: R.balance_coefficients_ref(x, y, "ogm"),
    }
    return f"balance_coefficients ogm (M={M}, B={B}, C={C})", impls, None, {}


def cases(tiny: bool):
    if tiny:
        return [ge_case(True), tap_case(8, 16), coef_case(2, 8, 6)]
    return [ge_case(False), tap_case(4096, 512), tap_case(64, 512), coef_case(2, 64, 6), coef_case(2, 4096, 1000)]


def measure(impls: dict, reset, *, repeat: int, number: int) -> dict:
    """Interleaved rounds: each round times `number` calls of every implementation. Returns name -> seconds/call
    list."""
    times = {name: [] for name in impls}
    for fn in impls.values():  # warm-up (allocator, thread pool, lazy imports)
        if reset:
            reset()
        fn()
    for _ in range(repeat):
        for name, fn in impls.items():
            if reset:
                reset()
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            times[name].append((time.perf_counter() - t0) / number)
    return times


def _number(title: str, tiny: bool) -> int:
    if tiny:
        return 1
    if title.startswith("ge_isotropic_"):
        return 2
    return 200 if "B=64," in title else 10


def run(tiny: bool = False, repeat: int = 15) -> list:
    """[(op, implementation, median s, min s, ratio of medians to the first baseline, note)]."""
    rows = []
    for title, impls, reset, info in cases(tiny):
        t = measure(impls, reset, repeat=repeat, number=_number(title, tiny))
        med = {k: statistics.median(v) for k, v in t.items()}
        names = list(impls)
        base = names[1]
        for name in names:
            note = ""
            if info and name == "mmkernels":
                copy_gbps = info["copy"] / med["copy (torch)"] / 1e9
                gbps = info["bytes"] / med[name] / 1e9
                note = f"{gbps:.1f} GB/s = {gbps / copy_gbps:.0%} of the copy bandwidth"
            if info and name == "copy (torch)":
                note = f"{info['copy'] / med[name] / 1e9:.1f} GB/s (read + write)"
            ratio = med[name] / med[base] if name != base and not name.startswith("copy") else None
            rows.append((title, name, med[name], min(t[name]), ratio, note))
    return rows


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def markdown(rows, command: str) -> str:
    lines = [
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}. "
        f"Command: `{command}`",
        "",
        "| op (shape) | implementation | median | min | median / baseline | note |",
        "|---|---|---|---|---|---|",
    ]
    for title, name, med, mn, ratio, note in rows:
        r = "" if ratio is None else f"{ratio:.2f}x"
        lines.append(f"| {title} | {name} | {_fmt_time(med)} | {_fmt_time(mn)} | {r} | {note} |")
    lines.append("")
    lines.append(
        "Baseline: the second implementation of each op (the authors' loop or the plain torch a user would write)."
    )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=15, help="interleaved rounds per op (median and min over them)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for every implementation")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = " ".join(
        [os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else "python"]
        + [os.path.relpath(__file__)]
        + (argv if argv is not None else sys.argv[1:])
    )
    print(markdown(run(args.tiny, args.repeat), command))


def test_cpu_table_tiny():
    """The benchmarks lane: every row runs with tiny shapes and renders (no timing assertions)."""
    rows = run(tiny=True, repeat=1)
    text = markdown(rows, "pytest")
    for op in ("ge_isotropic_", "cov_noise_tap", "balance_coefficients"):
        assert any(r[0].startswith(op) and r[1] == "mmkernels" for r in rows), op
    assert all(r[2] > 0 and r[3] > 0 for r in rows)
    assert text.count("\n| ") == len(rows) + 1


if __name__ == "__main__":
    main()
