"""Benchmarks of balance_coefficients (docs/architecture.md): the fused Triton op vs the eager reference vs
torch.compile(reference) vs the authors' style (a Python loop over rows with .item()).

GPU only (skipped, but collectable, on CPU). Run: pytest benchmarks/bench_coefficients.py --benchmark-only
Each benchmark records extra_info: host syncs per call (counted with torch.cuda.set_sync_debug_mode) and, for
the fused op, Triton launches per call. Targets: 1 launch, 0 syncs, >= 5x eager, >= 1.5x compiled reference over
B in [32, 4096], C in [6, 1000], M in [2, 4]. Shapes are module-level lists so a reduced set is easy to pass.
"""

import pytest
import torch

from _common import count_syncs, count_triton_launches, timed
from mmkernels import reference as R

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

M_VALUES = [2, 4]
B_VALUES = [32, 256, 4096]
C_VALUES = [6, 1000]
METHODS = ["ogm", "agm"]
SHAPES = [(m, b, c) for m in M_VALUES for b in B_VALUES for c in C_VALUES]
AUTHORS_SHAPES = [(2, 32, 6), (2, 256, 1000)]  # the Python-loop baseline is slow: a few points only


def _data(m, b, c, device="cuda", dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, b, c, device=device, dtype=dtype, generator=g)
    y = torch.randint(0, c, (b,), device=device, generator=g)
    return x, y


def authors_style(x, y, method):
    """What the authors' trainers do: a Python loop over the batch, a softmax per row, .item() per score."""
    m, b, _ = x.shape
    s = [0.0] * m
    for j in range(m):
        for i in range(b):
            p = torch.softmax(x[j, i], dim=0)[y[i]]
            s[j] += (-torch.log(p.clamp(min=1e-8))).item() if method == "agm" else p.item()
    if method == "agm":
        s = [v / b for v in s]
    return s


def _bench_timed_and_syncs(benchmark, fn, m, b, c, method):
    """Times fn(x, y, method, state=...) on one case, records its host syncs per call; returns the call."""
    x, y = _data(m, b, c)
    st = R.new_agm_state(m, "cuda") if method == "agm" else None
    benchmark.group = f"coefficients {method} M={m} B={b} C={c}"
    call = lambda: fn(x, y, method, state=st)  # noqa: E731
    timed(benchmark, call, rounds=50)
    benchmark.extra_info["syncs_per_call"] = count_syncs(call)
    return call


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m,b,c", SHAPES)
def test_bench_fused(benchmark, m, b, c, method):
    from mmkernels.coefficients import balance_coefficients

    call = _bench_timed_and_syncs(benchmark, balance_coefficients, m, b, c, method)
    benchmark.extra_info["triton_launches_per_call"] = count_triton_launches(call)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m,b,c", SHAPES)
def test_bench_eager_reference(benchmark, m, b, c, method):
    _bench_timed_and_syncs(benchmark, R.balance_coefficients_ref, m, b, c, method)


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m,b,c", SHAPES)
def test_bench_compiled_reference(benchmark, m, b, c, method):
    # A fresh Dynamo cache per case: one shared compiled function would hit Dynamo's recompile limit after
    # 8 shapes and silently run the later cases eager while they are labelled compiled.
    torch._dynamo.reset()
    before = _graphs_compiled()
    fn = torch.compile(R.balance_coefficients_ref, dynamic=False)
    _bench_timed_and_syncs(benchmark, fn, m, b, c, method)
    graphs = _graphs_compiled() - before
    assert graphs >= 1, "torch.compile built no graph for this case: its timing would be eager"
    benchmark.extra_info["compiled_graphs"] = graphs


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m,b,c", AUTHORS_SHAPES)
def test_bench_authors_style(benchmark, m, b, c, method):
    x, y = _data(m, b, c)
    benchmark.group = f"coefficients {method} M={m} B={b} C={c}"
    for _ in range(2):
        authors_style(x, y, method)
    benchmark.pedantic(authors_style, args=(x, y, method), rounds=5, iterations=1)
    benchmark.extra_info["syncs_per_call"] = count_syncs(authors_style, x, y, method)
