"""Benchmark of the sample-level valuation op (docs/methods/sample_valuation.md) on one batch of subset outputs [2^M -
1, B, C]: argmax per subset, v(S) = |S| 1[correct], Shapley phi, copy counts.

- mmkernels: mmkernels.sample_valuation (one Triton launch on CUDA; vectorised torch on CPU; no host sync);
- authors: their per-sample loop: each subset's prediction read back to the host (`.cpu().numpy()` argmax), v(S)
  and phi summed in Python per sample.
Shapes: B = 64 (their batch) and 1024, C = 6 / 1000, M = 2 and 3 (reduced: B = 64, C = 6 only).
"""

from itertools import combinations
from math import factorial

import pytest
import torch

from _common import timed
from mmkernels.valuation import sample_valuation

FULL_CASES = [(2, 64, 6), (2, 1024, 1000), (3, 1024, 6), (3, 64, 1000)]
REDUCED_CASES = [(2, 64, 6), (3, 64, 6)]


def _case(full):
    return FULL_CASES if full else REDUCED_CASES


def _inputs(m, b, c, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2**m - 1, b, c), generator=g).to(device)
    y = torch.randint(0, c, (b,), generator=g).to(device)
    return x, y


def _authors(x, y, m):
    """Per sample: v(S) from a host argmax, phi_j by the Shapley sum over the subsets without j."""
    preds = x.argmax(-1).cpu().numpy()  # sync-ok: the authors' loop, benchmarked
    labels = y.cpu().numpy()  # sync-ok: same
    phis = []
    for i in range(labels.shape[0]):
        v = {0: 0.0}
        for s in range(1, 2**m):
            v[s] = bin(s).count("1") * float(preds[s - 1, i] == labels[i])
        row = []
        for j in range(m):
            others = [k for k in range(m) if k != j]
            total = 0.0
            for size in range(m):
                for sub in combinations(others, size):
                    s = sum(1 << k for k in sub)
                    w = factorial(size) * factorial(m - size - 1) / factorial(m)
                    total += w * (v[s | (1 << j)] - v[s])
            row.append(total)
        phis.append(row)
    return phis


@pytest.mark.parametrize("impl", ["mmkernels", "authors"])
@pytest.mark.parametrize("case", ["a", "b", "c", "d"])
def test_bench_valuation(benchmark, impl, case, bench_full, bench_device):
    cases = _case(bench_full)
    i = "abcd".index(case)
    if i >= len(cases):
        pytest.skip("full shapes only (--bench-full)")
    m, b, c = cases[i]
    x, y = _inputs(m, b, c, bench_device)
    fn = (lambda: sample_valuation(x, y)) if impl == "mmkernels" else (lambda: _authors(x, y, m))
    if impl == "mmkernels":  # the two agree (the op's parity tests hold it to the exact-fraction loop)
        got = sample_valuation(x, y)["phi"].t().cpu()
        torch.testing.assert_close(got, torch.tensor(_authors(x, y, m), dtype=got.dtype), atol=1e-6, rtol=0)
    benchmark.group = f"valuation M={m} B={b} C={c}"
    benchmark.extra_info.update({"implementation": impl, "M": m, "B": b, "C": c})
    timed(benchmark, fn, rounds=20 if impl == "mmkernels" else 5, iterations=3, device=bench_device)
