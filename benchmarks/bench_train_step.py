"""End-to-end training step: joint training vs each balancing method, (a) with mmkernels, (b) in the authors' style.

Model: M torchvision ResNet-18 encoders (no pretrained weights; audio stem with 1 channel) and a concat head, batch 64,
SGD with momentum. Full shapes (GPU, `--bench-full` / MMKERNELS_BENCH_FULL=1): audio 1 x 257 x 299, visual
3 x 224 x 224 (and a second visual stream for M = 3). Reduced (CPU default): 24 x 24 inputs, batch 4.
Per case, besides pytest-benchmark's timing, extra_info records: host syncs per step (CUDA sync-debug warnings),
GPU kernels per step (profiler), peak memory (CUDA), the joint step's time is its own case (render.py divides).
Targets (docs/architecture.md): OGM-GE, OPM, MLB <= 1.02 x joint; AGM <= 1.25 x joint at M = 2, <= 1.5 x at M = 3;
PMR, MMPareto <= 1.05 x joint (issue 14; MMPareto's second backward is inherent: the combine op's share is reported by
bench_mmpareto.py). Valuation adds nothing per step (a per-epoch pass: bench_valuation.py).
"""

from __future__ import annotations

import random

import pytest
import torch

import authors_style
from _common import count_syncs, sync as _sync, timed
from mmkernels.demo.methods import make_method
from mmkernels.demo.models import ConcatClassifier, ResNet18Encoder

NUM_CLASSES = 6
MM_CASES = [
    ("joint", 2),
    ("ogm_ge", 2),
    ("ogm_ge_cov", 2),
    ("ogm", 2),
    ("opm", 2),
    ("agm", 2),
    ("agm_eval", 2),
    ("mlb", 2),
    ("olm", 2),
    ("pmr", 2),
    ("mmpareto", 2),
    ("joint", 3),
    ("opm", 3),
    ("agm", 3),
    ("agm_eval", 3),
    ("mlb", 3),
    ("pmr", 3),
    ("mmpareto", 3),
]
AUTHOR_CASES = [
    ("ogm_ge", 2),
    ("opm", 2),
    ("agm", 2),
    ("mlb", 2),
    ("pmr", 2),
    ("mmpareto", 2),
    ("opm", 3),
    ("agm", 3),
    ("mlb", 3),
    ("mmpareto", 3),
]


class _NoTimer:
    from contextlib import nullcontext as balancing


def shapes(full: bool, M: int):
    if full:
        s = [(1, 257, 299), (3, 224, 224), (3, 224, 224)]
        return 64, s[:M]
    s = [(1, 24, 24), (3, 24, 24), (3, 24, 24)]
    return 4, s[:M]


def build(full, M, device, seed=0):
    torch.manual_seed(seed)
    batch, shp = shapes(full, M)
    model = ConcatClassifier([ResNet18Encoder(in_channels=c[0]) for c in shp], NUM_CLASSES).to(device)
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn((batch,) + c, generator=g).to(device) for c in shp]
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    return model, inputs, y


def count_host_syncs(fn, device):
    """Synchronising CUDA calls made by one step (torch.cuda sync-debug mode warnings); None on CPU."""
    return count_syncs(fn) if torch.device(device).type == "cuda" else None


def count_kernels(fn, device):
    """GPU kernels (and memcpy/memset) launched by one step, from the profiler; None on CPU."""
    if torch.device(device).type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def peak_memory_mib(fn, device):
    if torch.device(device).type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats()
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated() / 2**20


def _mm_step(method, model, device):
    name = "agm" if method == "agm_eval" else method
    runner = make_method(name, model, num_classes=NUM_CLASSES, seed=0, total_steps=10**6)
    if method == "agm_eval":  # the authors' numbers: muted passes of the encoders in eval mode (BatchNorm stats)
        runner.bal = runner.bal.__class__(len(model.encoders), alpha=1.0, clip=10.0, muted_mode="eval", seed=0)
    elif method == "agm":
        pass  # muted_mode="reuse": the encoders run once
    opt = torch.optim.SGD(runner.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    step = [0]

    def run(inputs, y):
        runner.step(inputs, y, opt, _NoTimer)
        runner.end_step(step[0], None)
        step[0] += 1

    return run


def _authors_step(method, model, device, M):
    params = list(model.parameters())
    if method in ("mlb", "mmpareto"):
        heads = torch.nn.ModuleList([torch.nn.Linear(d, NUM_CLASSES) for d in model.widths]).to(device)
        params += list(heads.parameters())
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    if method == "ogm_ge":
        return lambda inputs, y: authors_style.ogm_ge_step(model, inputs, y, opt, alpha=0.8)
    if method == "opm":
        rng = random.Random(0)
        return lambda inputs, y: authors_style.opm_step(model, inputs, y, opt, rng=rng)
    if method == "agm":
        state = authors_style.AGMState(M)
        return lambda inputs, y: authors_style.agm_step(model, inputs, y, opt, state, alpha=1.0, clip=10.0)
    if method == "mlb":
        return lambda inputs, y: authors_style.mlb_step(model, heads, inputs, y, opt, alpha=0.8)
    if method == "mmpareto":
        return lambda inputs, y: authors_style.mmpareto_step(model, heads, inputs, y, opt, gamma=1.5)
    if method == "pmr":
        protos = []

        def pmr(inputs, y):
            if not protos:
                protos.extend(authors_style.pmr_prototypes(model, inputs, y, NUM_CLASSES))
            return authors_style.pmr_step(model, inputs, y, opt, protos, alpha=1.0)

        return pmr
    raise ValueError(method)


def _run_case(benchmark, impl, method, M, bench_full, bench_device):
    model, inputs, y = build(bench_full, M, bench_device)
    try:
        step = (
            _mm_step(method, model, bench_device)
            if impl == "mmkernels"
            else _authors_step(method, model, bench_device, M)
        )
    except ImportError as exc:  # a balancer not in mmkernels.api yet
        pytest.skip(str(exc))
    one = lambda: step(inputs, y)
    for _ in range(2 if bench_full else 1):  # warm-up (cudnn autotune, lazy inits, first Triton compiles)
        one()
    _sync(bench_device)
    batch, shp = shapes(bench_full, M)
    benchmark.group = f"train_step M={M}"
    benchmark.extra_info.update(
        {
            "impl": impl,
            "method": method,
            "M": M,
            "batch": batch,
            "shapes": [list(s) for s in shp],
            "device": torch.cuda.get_device_name() if bench_device == "cuda" else "cpu",
            "full": bench_full,
            "host_syncs": count_host_syncs(one, bench_device),
            "kernels": count_kernels(one, bench_device),
            "peak_mib": peak_memory_mib(one, bench_device),
        }
    )
    timed(benchmark, one, rounds=20 if bench_full else 3, iterations=1, warmup=0, warmup_rounds=1, device=bench_device)


@pytest.mark.parametrize("method,M", MM_CASES, ids=[f"{m}-M{k}" for m, k in MM_CASES])
def test_train_step_mmkernels(benchmark, method, M, bench_full, bench_device):
    _run_case(benchmark, "mmkernels", method, M, bench_full, bench_device)


@pytest.mark.parametrize("method,M", AUTHOR_CASES, ids=[f"{m}-M{k}" for m, k in AUTHOR_CASES])
def test_train_step_authors(benchmark, method, M, bench_full, bench_device):
    _run_case(benchmark, "authors", method, M, bench_full, bench_device)
