"""Benchmark of ge_isotropic_ (the authors' OGM-GE noise, docs/methods/ogm_ge.md) over the encoder gradients of two
torchvision ResNet-18 encoders (audio 1-channel stem, visual 3-channel; 22.3M gradient values).

- ext: mmkernels.noise.ge_isotropic_ on all tensors at once (two multi-tensor passes, k on the device, no sync);
- authors: the loop of the authors' code, one `.std().item()` per tensor, then grad * k + N(0, (std + 1e-8)^2);
- copy: a device copy of the same bytes (the bandwidth yardstick; target >= 60% of it, >= 10x the authors' loop).
GB/s in extra_info counts 3 passes over the gradient bytes for ext (statistics read, update read + write).
`which`: "conv" = the 4-D conv weights the authors modulate, "all" = every encoder parameter.
GPU only (skipped, but collectable, on CPU).
"""

import pytest
import torch

from _common import bench_copy, nbytes, timed_gbps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

WHICH = ["conv", "all"]
DTYPES = [torch.float32, torch.bfloat16]


def _encoder_grads(which, dtype, device="cuda"):
    from mmkernels.demo.models import ResNet18Encoder

    grads, groups = [], []
    for m, channels in enumerate((1, 3)):
        enc = ResNet18Encoder(channels)
        for p in enc.parameters():
            if which == "all" or p.dim() == 4:
                grads.append(torch.randn(p.shape, device=device, dtype=dtype) * 1e-3)
                groups.append(m)
    return grads, groups


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", WHICH)
def test_bench_ge_copy_baseline(benchmark, which, dtype):
    grads, _ = _encoder_grads(which, dtype)
    n = sum(g.numel() for g in grads)
    benchmark.group = f"ge_isotropic_ {which} {dtype}"
    bench_copy(benchmark, torch.randn(n, device="cuda", dtype=dtype), rounds=20, iterations=3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", WHICH)
def test_bench_ge_ext(benchmark, which, dtype):
    from mmkernels.noise import ge_isotropic_

    grads, groups = _encoder_grads(which, dtype)
    k = torch.tensor([0.6, 1.0], device="cuda")
    benchmark.group = f"ge_isotropic_ {which} {dtype}"
    benchmark.extra_info["tensors"] = len(grads)
    timed_gbps(
        benchmark,
        lambda: ge_isotropic_(grads, k, seed=0, offset=0, group_index=groups),
        3 * nbytes(grads),
        rounds=20,
        iterations=3,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", WHICH)
def test_bench_ge_authors_loop(benchmark, which, dtype):
    grads, groups = _encoder_grads(which, dtype)
    coeffs = [0.6, 1.0]

    def loop():
        for g, m in zip(grads, groups):
            std = g.std().item() + 1e-8  # sync-ok: the authors' loop, benchmarked
            g.mul_(coeffs[m]).add_(torch.zeros_like(g).normal_(0, std))

    benchmark.group = f"ge_isotropic_ {which} {dtype}"
    timed_gbps(benchmark, loop, 3 * nbytes(grads), rounds=10, iterations=2)
