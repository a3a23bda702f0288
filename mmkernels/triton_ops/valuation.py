"""Triton kernel of sample-level valuation (docs/methods/sample_valuation.md): one launch per batch, no host sync.

Grid (cdiv(B, BLOCK_B),): each program takes a block of rows and loops over the subsets S = 1 .. 2^M - 1: argmax of
f_S over C (tiles of BLOCK_C, the first maximum wins as in torch.argmax), v(S) = |S| 1[argmax = y] (SCALED, the
authors') or 1[argmax = y], P_m += W[S-1, m] M! v(S) with W the Shapley weight table (mmkernels.reference.
valuation_weight_table: integers, so P = M! phi is exact in fp32 and the thresholds are compared exactly, as
10 P against (-1, 4, 10) M!), then phi = P / M! and the copy counts. Out: phi [M, B] fp32, copies [M, B] int64,
flag [] fp32 (zeroed by the launcher, atomic max: 1 when a row holds a non-finite logit).
Non-finite logits (docs/methods/sample_valuation.md, "Edge cases"): a row f_S[i] holding a NaN or +-inf is never
correct, as in the reference; its logits are replaced by -inf before the max, so no NaN reaches a reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import device_guard
from ._sizes import cdiv, next_pow2


@triton.jit
def sample_valuation_kernel(
    x_ptr,
    sxs,
    sxb,
    sxc,
    y_ptr,
    w_ptr,
    phi_ptr,
    copies_ptr,
    flag_ptr,
    B,
    C,
    NS,
    M,
    fact,
    SCALED: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rm = rows < B
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows64, mask=rm, other=-1)
    mi = tl.arange(0, BLOCK_M)
    mm = mi < M
    phi = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.float32)
    any_bad = tl.zeros([BLOCK_B], dtype=tl.int32)
    for s in range(0, NS):
        best = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
        arg = tl.zeros([BLOCK_B], dtype=tl.int64)
        bad = tl.zeros([BLOCK_B], dtype=tl.int32)  # the row holds a non-finite logit
        base = x_ptr + tl.cast(s, tl.int64) * sxs + rows64[:, None] * sxb
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cm = rm[:, None] & (cols < C)[None, :]
            x = tl.load(base + cols.to(tl.int64)[None, :] * sxc, mask=cm, other=0.0).to(tl.float32)
            nonfinite = cm & ((x != x) | (tl.abs(x) == float("inf")))
            bad = tl.maximum(bad, tl.max(nonfinite.to(tl.int32), axis=1))
            x = tl.where(cm & (nonfinite == 0), x, float("-inf"))
            tmax = tl.max(x, axis=1)
            targ = tl.argmax(x, axis=1).to(tl.int64) + c0
            upd = tmax > best  # strict: an earlier tile keeps a tie
            arg = tl.where(upd, targ, arg)
            best = tl.where(upd, tmax, best)
        any_bad = tl.maximum(any_bad, bad)
        correct = (arg == y) & (bad == 0)  # a non-finite row is never correct
        if SCALED:
            size = tl.sum(((s + 1) >> mi) & 1, axis=0).to(tl.float32)  # |S| = popcount(S)
        else:
            size = 1.0
        v = tl.where(correct, size, 0.0)
        w = tl.load(w_ptr + s * M + mi, mask=mm, other=0.0)
        phi += v[:, None] * w[None, :]
    out = mi.to(tl.int64)[None, :] * B + rows64[:, None]
    om = rm[:, None] & mm[None, :]
    tl.store(phi_ptr + out, phi / fact, mask=om)
    p10 = 10.0 * phi  # phi holds M! phi: integers, exact in fp32
    copies = (
        tl.where((p10 > 4.0 * fact) & (p10 < 10.0 * fact), 1, 0)
        + tl.where((p10 > -fact) & (p10 < 4.0 * fact), 2, 0)
        + tl.where(p10 < -fact, 3, 0)
    )
    tl.store(copies_ptr + out, copies.to(tl.int64), mask=om)
    tl.atomic_max(flag_ptr, tl.max(any_bad, axis=0).to(tl.float32))


def sample_valuation_triton(
    subset_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, fact: float, *, scaled: bool
):
    """subset_logits [2^M - 1, B, C] (any strides, float), labels [B] int64, weights [2^M - 1, M] fp32 contiguous
    (Shapley weights times fact = M!).
    Returns (phi [M, B] fp32, copies [M, B] int64, flag [] fp32: 1 when a row holds a non-finite logit)."""
    ns, b, c = subset_logits.shape
    m = weights.shape[1]
    phi = torch.empty((m, b), dtype=torch.float32, device=subset_logits.device)
    copies = torch.empty((m, b), dtype=torch.int64, device=subset_logits.device)
    flag = torch.zeros((), dtype=torch.float32, device=subset_logits.device)
    block_c = min(next_pow2(c), 256)
    block_b = max(1, min(next_pow2(b), 1024 // block_c, 64))  # <= 8 logits per thread (4 warps): no spills
    with device_guard(subset_logits.device):
        sample_valuation_kernel[(cdiv(b, block_b),)](
            subset_logits,
            *subset_logits.stride(),
            labels,
            weights,
            phi,
            copies,
            flag,
            b,
            c,
            ns,
            m,
            fact,
            SCALED=scaled,
            BLOCK_B=block_b,
            BLOCK_C=block_c,
            BLOCK_M=8,
            num_warps=4,
        )
    return phi, copies, flag
