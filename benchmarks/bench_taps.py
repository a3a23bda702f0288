"""Benchmarks of grad_tap's backward and modality_drop (docs/architecture.md): GB/s against a device copy
(torch.Tensor.copy_ of the same bytes). Target: >= 80% of copy bandwidth for large features.

GPU only (skipped, but collectable, on CPU). Shapes are module-level lists so a reduced set is easy to pass.
"""

import pytest
import torch

from _common import bench_copy, nbytes, timed_gbps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

FEATURE_SHAPES = [(64, 512), (256, 2048), (4096, 4096), (64, 512, 14, 14)]
DTYPES = [torch.float32, torch.bfloat16]
DROP_M = [2, 4]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FEATURE_SHAPES)
def test_bench_copy_baseline(benchmark, shape, dtype):
    benchmark.group = f"taps {shape} {dtype}"
    bench_copy(benchmark, torch.randn(shape, device="cuda", dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FEATURE_SHAPES)
def test_bench_grad_scale(benchmark, shape, dtype):
    g = torch.randn(shape, device="cuda", dtype=dtype)
    k = torch.tensor(0.5, device="cuda")
    import mmkernels.taps  # noqa: F401  (registers the op before it is looked up)

    op = torch.ops.mmkernels.grad_scale

    benchmark.group = f"taps {shape} {dtype}"
    timed_gbps(benchmark, lambda: op(g, k, 1.0), 2 * nbytes(g))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FEATURE_SHAPES)
def test_bench_grad_scale_eager_reference(benchmark, shape, dtype):
    from mmkernels import reference as R

    g = torch.randn(shape, device="cuda", dtype=dtype)
    k = torch.tensor(0.5, device="cuda")
    benchmark.group = f"taps {shape} {dtype}"
    timed_gbps(benchmark, lambda: R.grad_tap_backward(g, k), 2 * nbytes(g))


@pytest.mark.parametrize("m", DROP_M)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FEATURE_SHAPES)
def test_bench_modality_drop(benchmark, shape, dtype, m):
    from mmkernels.taps import modality_drop

    x = torch.randn((m,) + shape, device="cuda", dtype=dtype)
    q = torch.full((m,), 0.3, device="cuda")
    benchmark.group = f"drop M={m} {shape} {dtype}"
    timed_gbps(benchmark, lambda: modality_drop(x, q, seed=0, offset=0), 2 * nbytes(x))


@pytest.mark.parametrize("m", DROP_M)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FEATURE_SHAPES)
def test_bench_modality_drop_copy_baseline(benchmark, shape, dtype, m):
    benchmark.group = f"drop M={m} {shape} {dtype}"
    bench_copy(benchmark, torch.randn((m,) + shape, device="cuda", dtype=dtype))


@pytest.mark.parametrize("m", DROP_M)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FEATURE_SHAPES)
def test_bench_modality_drop_eager_reference(benchmark, shape, dtype, m):
    from mmkernels import reference as R

    x = torch.randn((m,) + shape, device="cuda", dtype=dtype)
    q = torch.full((m,), 0.3, device="cuda")
    u = torch.rand(m, shape[0], device="cuda")
    benchmark.group = f"drop M={m} {shape} {dtype}"
    timed_gbps(benchmark, lambda: R.modality_drop_ref(x, q, u), 2 * nbytes(x))
