"""Triton kernels of OPM's modality drop (TPAMI Alg. 1, docs/methods/opm.md).

Random numbers: counter-based Philox (tl.rand), addressed by (seed, offset):
  uniform of modality m, row i   u[m, i] = rand(seed, offset + m * B + i)      m < M, i < B
  the per-call p_exe gate        u_gate  = rand(seed, offset + M * B)            execute iff u_gate < p_exe
so one call consumes M * B + 1 counters; a caller advancing `offset` by M * B + 1 per call never reuses one.
keep[m, i] = u[m, i] >= q_m (P(drop) = q_m); a row with no modality kept keeps all of them.
Row scale (kept rows): 'official' 1/(1 - theta), theta = sum_m d_m q_m / sum_m d_m (d_m = elements per row);
'per_modality' 1/(1 - q_m); 'none' 1; a zero denominator gives 1 (as mmkernels.reference.modality_drop_ref).

Every program recomputes the keep decision of its rows from (seed, offset) (Philox over all M modalities of
the row, cheap next to the feature tile), so the same kernel applied to the incoming gradient is the exact
backward and no mask is stored (docs/architecture.md, memory).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._sizes import cdiv, next_pow2

from .._backend import device_guard

RESCALE_MODES = ("official", "per_modality", "none")
MAX_M = 8


@triton.jit
def _theta(q_ptr, M, w0, w1, w2, w3, w4, w5, w6, w7):
    """theta = sum_m w_m q_m with w_m = d_m / sum_k d_k (TPAMI code's rescale; weights of absent modalities 0)."""
    t = w0 * tl.load(q_ptr).to(tl.float32) + w1 * tl.load(q_ptr + 1).to(tl.float32)
    t += w2 * tl.load(q_ptr + 2, mask=M > 2, other=0.0).to(tl.float32)
    t += w3 * tl.load(q_ptr + 3, mask=M > 3, other=0.0).to(tl.float32)
    t += w4 * tl.load(q_ptr + 4, mask=M > 4, other=0.0).to(tl.float32)
    t += w5 * tl.load(q_ptr + 5, mask=M > 5, other=0.0).to(tl.float32)
    t += w6 * tl.load(q_ptr + 6, mask=M > 6, other=0.0).to(tl.float32)
    t += w7 * tl.load(q_ptr + 7, mask=M > 7, other=0.0).to(tl.float32)
    return t


@triton.jit
def _row_scale(
    q_ptr,
    seed,
    offset,
    m,
    rows,
    M,
    B,
    p_exe,
    w0,
    w1,
    w2,
    w3,
    w4,
    w5,
    w6,
    w7,
    RESCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Scale of rows `rows` of modality m: 0 (dropped), the rescale factor (kept), 1 (gate closed)."""
    mi = tl.arange(0, BLOCK_M)
    mm = mi < M
    q = tl.load(q_ptr + mi, mask=mm, other=0.0).to(tl.float32)
    ctr = mi.to(tl.int64)[:, None] * B + rows.to(tl.int64)[None, :] + offset
    u = tl.rand(seed, ctr)
    keep = (u >= q[:, None]) & mm[:, None]
    any_keep = tl.max(keep.to(tl.int32), axis=0) > 0
    keep_m = tl.max(tl.where(mi[:, None] == m, keep.to(tl.int32), 0), axis=0) > 0
    keep_m = keep_m | (~any_keep)  # a sample never loses every modality
    if RESCALE == 0:
        theta = _theta(q_ptr, M, w0, w1, w2, w3, w4, w5, w6, w7)
        s = tl.where(theta < 1.0, 1.0 / (1.0 - theta), 1.0)
    elif RESCALE == 1:
        q_m = tl.load(q_ptr + m).to(tl.float32)
        s = tl.where(q_m < 1.0, 1.0 / (1.0 - q_m), 1.0)
    else:
        s = 1.0
    gate = tl.max(tl.rand(seed, (tl.zeros([1], dtype=tl.int64) + M) * B + offset), axis=0)  # counter M * B
    return tl.where(gate < p_exe, tl.where(keep_m, s, 0.0), 1.0)


@triton.jit(do_not_specialize=["seed", "offset"])
def modality_drop_kernel(
    x_ptr,
    out_ptr,
    sxm,
    sxb,
    sxd,
    q_ptr,
    seed,
    offset,
    m_base,
    M,
    B,
    D,
    p_exe,
    w0,
    w1,
    w2,
    w3,
    w4,
    w5,
    w6,
    w7,
    RESCALE: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """out[j, i, :] = scale(m_base + j, i) * x[j, i, :] for x viewed as [Mx, B, D] (any strides); out contiguous.
    Grid (cdiv(B, BLOCK_B), cdiv(D, BLOCK_D), Mx): the row blocks on axis 0 (limit 2^31 - 1; axes 1 and 2 stop at
    65535, so D <= 65535 * BLOCK_D and Mx <= 8 fit there). Used for the forward (x = features) and the backward
    (x = incoming gradient) with the same (seed, offset), hence the same mask."""
    j = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    scale = _row_scale(
        q_ptr, seed, offset, m_base + j, rows, M, B, p_exe, w0, w1, w2, w3, w4, w5, w6, w7, RESCALE, BLOCK_M
    )
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    mask = (rows < B)[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + j.to(tl.int64) * sxm + rows64[:, None] * sxb + cols64[None, :] * sxd, mask=mask)
    acc = tl.float64 if F64 else tl.float32
    y = x.to(acc) * scale.to(acc)[:, None]
    o = out_ptr + (j.to(tl.int64) * B + rows64[:, None]) * D + cols64[None, :]
    tl.store(o, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset"])
def drop_uniforms_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
    """out[c] = rand(seed, offset + c), c < n: the uniforms the drop kernel uses (for tests and inspection)."""
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + c, tl.rand(seed, c + offset), mask=c < n)


# ------------------------------------------------------------------------------------------- launchers
def _weights(widths) -> list:
    total = float(sum(widths))
    w = [float(d) / total if total > 0 else 0.0 for d in widths]
    return w + [0.0] * (MAX_M - len(w))


# Each program draws BLOCK_M * BLOCK_B Philox uniforms (its rows' keep decisions over all modalities); capping
# BLOCK_B at 128 keeps that at 8 per thread with 4 warps, so narrow rows (D = 1, 3, ...) do not spill registers.
_MAX_BLOCK_B = 128


def _drop_blocks(b: int, d: int) -> tuple:
    block_d = min(next_pow2(d), 2048)
    block_b = max(1, min(next_pow2(b), 4096 // block_d, _MAX_BLOCK_B))
    return block_d, block_b


def modality_drop_apply_triton(
    x: torch.Tensor, q: torch.Tensor, seed: int, offset: int, m_base: int, widths: list, rescale: int, p_exe: float
) -> torch.Tensor:
    """x [Mx, B, D] holding modalities m_base .. m_base + Mx - 1 of M = len(widths); returns scale * x, contiguous."""
    mx, b, d = x.shape
    out = torch.empty((mx, b, d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d, block_b = _drop_blocks(b, d)
    grid = (cdiv(b, block_b), cdiv(d, block_d), mx)  # row blocks on axis 0 (may exceed 65535)
    if grid[1] > 65535:
        raise ValueError(f"modality_drop: {d} elements per row exceed the kernel's limit {65535 * block_d}")
    with device_guard(x.device):  # Triton launches on the current device
        modality_drop_kernel[grid](
            x,
            out,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            q,
            int(seed),
            int(offset),
            int(m_base),
            len(widths),
            b,
            d,
            float(p_exe),
            *_weights(widths),
            RESCALE=int(rescale),
            F64=x.dtype == torch.float64,
            BLOCK_B=block_b,
            BLOCK_D=block_d,
            BLOCK_M=MAX_M,
            num_warps=4,
        )
    return out


def drop_uniforms_triton(seed: int, offset: int, num_modalities: int, batch: int, device) -> tuple:
    """(u [M, B] fp32, u_gate [] fp32): exactly the uniforms modality_drop_kernel draws for (seed, offset)."""
    n = num_modalities * batch + 1
    out = torch.empty(n, dtype=torch.float32, device=device)
    block = 1024
    with device_guard(out.device):
        drop_uniforms_kernel[(cdiv(n, block),)](out, int(seed), int(offset), n, BLOCK=block)
    return out[:-1].view(num_modalities, batch), out[-1]
