"""gpu-compile launch plan of the sample-valuation kernel (tests/gpu_compile.py loads it): one call of the launcher
sample_valuation_triton per specialization of tests/test_triton_valuation.py and of the balancer on CUDA. The kernel
specializes on the logits' dtype, SCALED (value rule), BLOCK_B / BLOCK_C (from B and C) and the integer arguments
(strides, B, C, 2^M - 1, M: == 1, % 16 == 0); tensors are CPU torch.empty. The non-finite tests and the kernel
properties (tests/test_valuation_properties.py) reuse these shapes: NaN/inf logits change no specialization."""
from __future__ import annotations

CASES = [(2, 2, 3), (2, 70, 5), (3, 33, 4), (4, 9, 300), (5, 17, 2), (8, 5, 3)]  # (M, B, C) of the parity test


def _call(m, b, c, *, dtype="float32", layout="contiguous", scaled=True):
    import torch

    from mmkernels.reference import valuation_weight_table
    from mmkernels.triton_ops.valuation import sample_valuation_triton

    n = 2 ** m - 1
    x = torch.empty((n, b, c), dtype=getattr(torch, dtype))
    if layout == "bmc":
        x = torch.empty((b, n, c), dtype=getattr(torch, dtype)).transpose(0, 1)
    w, fact = valuation_weight_table(m)
    sample_valuation_triton(x, torch.empty(b, dtype=torch.int64), w, fact, scaled=scaled)


def plan() -> list:
    out = []

    def add(note, m, b, c, **kw):
        out.append((f"sample_valuation M={m} B={b} C={c} {kw} [{note}]", lambda: _call(m, b, c, **kw)))

    for m, b, c in CASES:
        for scaled in (True, False):
            add("parity", m, b, c, scaled=scaled)
    add("tie across class tiles", 2, 2, 600)
    for dtype in ("float16", "bfloat16"):
        add("half precision, [B, 2^M - 1, C] buffer", 3, 33, 4, dtype=dtype, layout="bmc")
    add("worked example", 2, 2, 3)
    add("thresholds M=4", 4, 1, 2)
    add("thresholds M=5", 5, 1, 2)
    add("balancer tests", 2, 10, 3)
    add("balancer tests, last batch", 2, 4, 3)
    add("bench-like", 2, 64, 309)
    add("bench-like bf16", 3, 256, 1000, dtype="bfloat16")
    return out
