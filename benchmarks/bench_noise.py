"""Benchmarks of the covariance-noise tap's backward and sample_cov_noise (docs/architecture.md).

cov_noise_tap backward (mmkernels::cov_noise_tap_backward, one launch) against a device copy of the same bytes
(target >= 80% of copy bandwidth), the eager reference (torch.randn + reference.cov_noise_tap_backward) and
torch.compile of that reference. Reported: time, GB/s (read + write of the gradient) in extra_info.
GPU only (skipped, but collectable, on CPU); shapes are module-level lists so a reduced CPU set is easy to add.
"""

import pytest
import torch

from _common import bench_copy, nbytes, timed_gbps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

TAP_SHAPES = [(64, 512), (256, 2048), (4096, 512), (4096, 4096), (64, 512, 14, 14)]
TAP_DTYPES = [torch.float32, torch.bfloat16]
PER_SAMPLE_SHAPES = [(64, 1_000_000), (256, 100_000)]


def _reference_backward(g, k, seed, offset):
    from mmkernels import reference

    gen = torch.Generator(device=g.device)
    gen.manual_seed(seed * 1_000_003 + offset)
    z = torch.randn(g.shape[0], generator=gen, device=g.device)
    return reference.cov_noise_tap_backward(g, k, z, sigma=1.0)


@pytest.mark.parametrize("dtype", TAP_DTYPES)
@pytest.mark.parametrize("shape", TAP_SHAPES)
def test_bench_tap_copy_baseline(benchmark, shape, dtype):
    benchmark.group = f"cov_noise_tap {shape} {dtype}"
    bench_copy(benchmark, torch.randn(shape, device="cuda", dtype=dtype))


@pytest.mark.parametrize("dtype", TAP_DTYPES)
@pytest.mark.parametrize("shape", TAP_SHAPES)
def test_bench_tap_backward_ext(benchmark, shape, dtype):
    import mmkernels.noise  # noqa: F401  (registers the op)

    g = torch.randn(shape, device="cuda", dtype=dtype)
    k = torch.tensor(0.7, device="cuda")
    op = torch.ops.mmkernels.cov_noise_tap_backward
    benchmark.group = f"cov_noise_tap {shape} {dtype}"
    timed_gbps(benchmark, lambda: op(g, k, 1.0, 1, 0), 2 * nbytes(g))


@pytest.mark.parametrize("dtype", TAP_DTYPES)
@pytest.mark.parametrize("shape", TAP_SHAPES)
def test_bench_tap_backward_reference(benchmark, shape, dtype):
    g = torch.randn(shape, device="cuda", dtype=dtype)
    k = torch.tensor(0.7, device="cuda")
    benchmark.group = f"cov_noise_tap {shape} {dtype}"
    timed_gbps(benchmark, lambda: _reference_backward(g, k, 1, 0), 2 * nbytes(g))


@pytest.mark.parametrize("dtype", TAP_DTYPES)
@pytest.mark.parametrize("shape", TAP_SHAPES[:3])
def test_bench_tap_backward_compiled_reference(benchmark, shape, dtype):
    from mmkernels import reference

    g = torch.randn(shape, device="cuda", dtype=dtype)
    k = torch.tensor(0.7, device="cuda")
    fn = torch.compile(lambda g, k, z: reference.cov_noise_tap_backward(g, k, z, sigma=1.0))
    benchmark.group = f"cov_noise_tap {shape} {dtype}"
    timed_gbps(benchmark, lambda: fn(g, k, torch.randn(shape[0], device="cuda")), 2 * nbytes(g))


@pytest.mark.parametrize("shape", PER_SAMPLE_SHAPES)
def test_bench_sample_cov_noise_ext(benchmark, shape):
    from mmkernels.noise import sample_cov_noise

    G = torch.randn(shape, device="cuda")
    benchmark.group = f"sample_cov_noise {shape}"
    timed_gbps(benchmark, lambda: sample_cov_noise(G, seed=0, offset=0), nbytes(G), rounds=10, iterations=3)


@pytest.mark.parametrize("shape", PER_SAMPLE_SHAPES)
def test_bench_sample_cov_noise_reference(benchmark, shape):
    from mmkernels import reference

    G = torch.randn(shape, device="cuda")
    benchmark.group = f"sample_cov_noise {shape}"
    timed_gbps(
        benchmark,
        lambda: reference.cov_noise_from_per_sample(G, torch.randn(shape[0], device="cuda")),
        nbytes(G),
        rounds=10,
        iterations=3,
    )
