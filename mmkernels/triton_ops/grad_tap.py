"""Triton kernel of the gradient-scaling tap's backward: grad_in = k * grad_out (docs/methods/ogm_ge.md).

The tap's forward is a view (no kernel, no copy): see mmkernels/taps.py. This file holds the kernel and its
launcher; the custom op `mmkernels::grad_scale` that calls it is registered in mmkernels/taps.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._sizes import cdiv

from .._backend import device_guard


@triton.jit
def grad_scale_kernel(
    g_ptr, out_ptr, k_ptr, k_value, n, K_FROM_PTR: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr
):
    """out[i] = k * g[i] over n elements of flat memory; computed in fp32 (fp64 for fp64), stored in g's dtype.
    k is read from device memory (K_FROM_PTR, no host sync) or passed by value."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.float64 if F64 else tl.float32
    if K_FROM_PTR:
        k = tl.load(k_ptr).to(acc)
    else:
        k = k_value
    g = tl.load(g_ptr + offs, mask=mask).to(acc)
    tl.store(out_ptr + offs, (g * k).to(out_ptr.dtype.element_ty), mask=mask)


def _dense(t: torch.Tensor) -> bool:
    """True when t's elements fill a contiguous block of memory in some order (contiguous, transposed, permuted)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def grad_scale_triton(grad: torch.Tensor, k: torch.Tensor | None, k_value: float) -> torch.Tensor:
    """k * grad with k a 1-element device tensor (or the number k_value when k is None).

    Strides: a dense grad (contiguous, or any permutation of it) is processed in its own memory order and the
    result has the same strides (torch.empty_like); a grad with gaps (e.g. a slice) is made contiguous first
    (one explicit copy) and the result is contiguous.
    """
    if not _dense(grad):
        grad = grad.contiguous()
    out = torch.empty_like(grad)
    n = grad.numel()
    if n == 0:
        return out
    if k is None and grad.dtype == torch.float64:
        # Triton passes a Python float as an fp32 scalar: give fp64 math the exact k through memory instead
        # (torch.full is a fill kernel, not a host-to-device copy: no sync)
        k = torch.full((1,), float(k_value), dtype=torch.float64, device=grad.device)
    block = 4096
    grid = (cdiv(n, block),)
    with device_guard(grad.device):  # Triton launches on the current device
        grad_scale_kernel[grid](
            grad,
            out,
            grad if k is None else k,
            float(k_value),
            n,
            K_FROM_PTR=k is not None,
            F64=grad.dtype == torch.float64,
            BLOCK=block,
            num_warps=8,
        )
    return out
