"""gpu-compile plan of the PMR kernels (mmkernels/triton_ops/pmr.py): one call per launcher specialization of
tests/test_triton_pmr.py and tests/test_api_pmr.py (loaded by tests/gpu_compile.py, PLAN_MODULES).

The launchers run on CPU torch.empty tensors shaped, strided and typed like the tests' (compiled block sizes follow
from the shapes; Triton specializes on dtypes, 16-byte alignment and integer arguments == 1 / % 16 == 0)."""
from __future__ import annotations

import contextlib

import torch

F32, F16 = torch.float32, torch.float16

# tests/test_triton_pmr.py CASES, plus the other shapes of that file and of tests/test_api_pmr.py (TinyModel: B 12,
# FEAT 6, C 4; M 2 and 3)
LOSS_CASES = [(2, 1, 1, 1), (2, 2, 3, 2), (3, 7, 5, 9), (5, 33, 70, 20), (8, 6, 4, 3), (2, 70, 3, 130),
              (4, 17, 31, 17), (3, 20, 7, 6), (2, 5, 3, 4), (2, 4, 3, 2), (2, 12, 4, 6), (3, 12, 4, 6), (2, 8, 4, 5),
              (2, 0, 4, 3)]


def _z(m, b, d, dtype=F32, layout="contiguous"):
    if layout == "bdm":
        return torch.empty(b, m, d, dtype=dtype).permute(1, 0, 2)
    if layout == "dmajor":
        return torch.empty(m, d, b, dtype=dtype).permute(0, 2, 1)
    return torch.empty(m, b, d, dtype=dtype)


def _protos(m, c, d, layout="contiguous"):
    if layout == "cmajor":
        return torch.empty(m, d, c).transpose(1, 2)
    return torch.empty(m, c, d)


def loss_call(m, b, c, d, *, dtype=F32, layout="contiguous", p_layout="contiguous", sync=False):
    from mmkernels.triton_ops.pmr import pmr_backward_launch, pmr_forward_launch

    z, P, y = _z(m, b, d, dtype, layout), _protos(m, c, d, p_layout), torch.empty(b, dtype=torch.int64)
    ctx = contextlib.nullcontext()
    if sync:
        from gpu_compile import fake_process_group

        ctx = fake_process_group()
    with ctx:
        out, lse, _ = pmr_forward_launch(z, P, y, alpha=0.8, ignore_index=-100, sync=sync)
    if b > 0:
        pmr_backward_launch(torch.empty(()), z, P, y, out, lse, ignore_index=-100)


def refresh_call(m, b, c, d, *, first, one_launch, dtype=F32, rows=None):
    """rows: the tests' z[:, :half] views (row stride of the full batch `rows`)."""
    from mmkernels.triton_ops.pmr import pmr_accumulate_launch, pmr_refresh_launch

    z = torch.empty(m, rows, d, dtype=dtype)[:, :b] if rows else torch.empty(m, b, d, dtype=dtype)
    y = torch.empty(b, dtype=torch.int64)
    P = torch.empty(m, c, d)
    sums, counts = torch.empty(m, c, d), torch.empty(c + 1)
    pmr_accumulate_launch(z, y, sums, counts, P if one_launch else sums, ignore_index=-100, finalize=one_launch,
                          mu=0.3, first=first)
    if not one_launch:
        pmr_refresh_launch(sums, counts, P, mu=0.3, first=first)


def plan() -> list:
    out = []

    def add(label, fn, *args, **kw):
        out.append((f"pmr {label} {args}{kw if kw else ''}", lambda: fn(*args, **kw)))

    for case in LOSS_CASES:
        add("loss fp32", loss_call, *case)
    for case in [(3, 7, 5, 9), (2, 70, 3, 130)]:
        add("loss fp16", loss_call, *case, dtype=F16)
    for layout in ("bdm", "dmajor"):
        add("loss layout", loss_call, 3, 9, 6, 5, layout=layout, p_layout="cmajor")
    add("loss sync PHASE 1 + 2", loss_call, 3, 12, 4, 6, sync=True)
    for first in (True, False):
        for m, b, c, d in [(2, 1, 1, 1), (3, 40, 6, 9), (8, 9, 4, 130)]:
            add("refresh one launch", refresh_call, m, b, c, d, first=first, one_launch=True)
            half = b // 2
            if half:
                add("refresh accumulate view", refresh_call, m, half, c, d, first=first, one_launch=False, rows=b)
            add("refresh accumulate list", refresh_call, m, b - half, c, d, first=first, one_launch=False)
        for m in (2, 3):  # tests/test_api_pmr.py: refresh passes of 12 rows, update_prototypes of 12 / 8 rows
            add("refresh api", refresh_call, m, 12, 4, 6, first=first, one_launch=False)
            add("refresh api one launch", refresh_call, m, 12, 4, 6, first=first, one_launch=True)
    add("refresh fp16", refresh_call, 2, 10, 3, 5, first=True, one_launch=True, dtype=F16)
    add("refresh widths", refresh_call, 2, 8, 4, 5, first=True, one_launch=True)
    return out
