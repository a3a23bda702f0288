"""Benchmark of MMPareto's combine op (docs/methods/mmpareto.md): the encoders' multimodal and unimodal gradients -> the
Pareto gradient, in place, as MMPareto.backward() runs it (flat per-dtype buffers, mmkernels.mmpareto_combine_flat_).

- mmkernels: the flat op (3 launches on CUDA: reduce, finalize, write; a torch path on CPU; no host sync);
- authors: their per-encoder loop: inner products read on the host (`if cos > 0`, the solver on CPU), then per tensor
  the combination, a norm ratio and `if r > 1` (one sync per tensor);
- copy: a device copy of the gradient bytes (the yardstick: target >= 60% of its bandwidth on a GPU; the op reads
  g_m and g_u twice and writes once: 5 passes are counted in GB/s).
Gradients: two torchvision ResNet-18 encoders (audio 1-channel stem, visual 3-channel; 22.3M values each side) with
--bench-full, else two small MLP-sized encoders (a few hundred thousand values). Conflicting by construction.
"""

import pytest
import torch

import authors_style

from _common import bench_copy, nbytes, timed_gbps
from mmkernels.mmpareto import MMParetoLayout, mmpareto_combine_flat_


def _encoder_shapes(full):
    if full:
        from mmkernels.demo.models import ResNet18Encoder

        return [[tuple(p.shape) for p in ResNet18Encoder(c).parameters()] for c in (1, 3)]
    return [[(256, 128), (256,), (128, 256), (128,)], [(256, 96), (256,), (128, 256), (128,)]]


def _grads(full, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shapes = _encoder_shapes(full)
    mm = [[torch.randn(s, generator=g).to(device, dtype) for s in enc] for enc in shapes]
    uni = [[(-0.5 * t + 0.3 * torch.randn(t.shape, generator=g).to(device, dtype)) for t in enc] for enc in mm]
    return mm, uni


@pytest.fixture
def grads(bench_full, bench_device):
    return _grads(bench_full, bench_device)


def test_bench_mmpareto_copy(benchmark, grads, bench_device):
    n = sum(t.numel() for enc in grads[0] for t in enc)
    benchmark.group = "mmpareto combine"
    bench_copy(benchmark, torch.randn(n, device=bench_device), rounds=20, iterations=3, device=bench_device)


def test_bench_mmpareto_mmkernels(benchmark, grads, bench_device):
    mm, uni = grads
    layout = MMParetoLayout(mm)
    flat_mm = [torch.cat([t.reshape(-1) for enc in mm for t in enc])]
    flat_u = [torch.cat([t.reshape(-1) for enc in uni for t in enc])]
    work = [f.clone() for f in flat_u]

    def combine():
        work[0].copy_(flat_u[0])  # the op is in place: restart from g_u (counted in the copy's bytes, not the op's)
        return mmpareto_combine_flat_(layout, flat_mm, work)

    stats = combine()
    assert bool((stats["cos"] < 0).all())  # sync-ok: set-up check, the case benchmarked is the conflicting one
    benchmark.group = "mmpareto combine"
    timed_gbps(benchmark, combine, 5 * nbytes(flat_u), rounds=20, iterations=3, device=bench_device)


def test_bench_mmpareto_authors(benchmark, grads, bench_device):
    mm, uni = grads
    out = [[t.clone() for t in enc] for enc in uni]

    def loop():
        for dst, new in zip(out, authors_style.mmpareto_combine_loop(mm, uni, gamma=1.5)):
            torch._foreach_copy_(dst, new)

    benchmark.group = "mmpareto combine"
    timed_gbps(benchmark, loop, 5 * nbytes(*uni), rounds=10, iterations=2, device=bench_device)
