"""Triton kernels of PMR (docs/methods/pmr.md): the fused forward, its backward, the prototype refresh.

Layers: the @triton.jit kernels, then the launchers (allocations, block sizes, no checks: mmkernels/pmr.py validates).
Layout: z [M, B, D] (any strides), prototypes P [M, C, D] (any strides), labels [B] int.

Forward, ONE launch, grid (cdiv(B, BLOCK_B), M): program (b, m) streams the C prototypes of modality m in tiles of
BLOCK_C, forms the distances d = ||z_i - P_k|| from the differences (tiles of BLOCK_D; d = 0 exactly when z_i = P_k)
and an online log-sum-exp of -d; per row log p[y] = -d_y - lse (log space: the PCE stays finite when p[y] underflows).
It stores lse per row for the backward and adds the block's sum of p[y], sum of -log p[y] and valid-row count into a
fp32 workspace with atomics; the last program (int32 ticket) forms scores, PCE, ratios, coefficients, loss and flag,
and resets the workspace (no memset on the next call). Workspace ws[2M + 2]: [0:M] score sums, [M] global count
(these M + 1 entries are all-reduced under sync), [M+1 : 2M+1] PCE sums, [2M+1] local count.
Output out[4M + 3] fp32: scores [0:M], pce [M:2M], ratios [2M:3M], coefficients [3M:4M], loss [4M], flag [4M+1],
local count [4M+2].

Backward, one launch, same grid: dz_i = g c_m / n sum_k (p_ik - 1[k = y_i]) (P_k - z_i) / d_ik, term 0 where d_ik = 0;
p from the stored lse; per C tile the weights w [BLOCK_B, BLOCK_C], then dz accumulated in place over D tiles.

Refresh: the accumulate kernel adds each row into sums[m, y] and 1 into counts[m, y] (atomics, ignored rows skipped;
a row of modality m holding a NaN/Inf feature is skipped for m and counted in counts[m, C]); PHASE 0 also takes a
ticket (counts[M, 0] is the fp32 ticket slot) and its last program applies the mean and the EMA (the mean where an
old prototype entry is not finite) to every prototype (one launch for a one-batch refresh); PHASE 1 only accumulates (a
refresh over many batches, or before an all-reduce) and the finalize kernel then runs over the [M, C, D] entries.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._backend import device_guard, interpreting
from ._sizes import cdiv, next_pow2

MAX_M = 8


# --------------------------------------------------------------------------------------------- forward
@triton.jit
def _load_tiles(z_base, p_base, szd, spc, spd, rows_ok, cols, col_ok, dd, d_ok):
    """fp32 tiles z[rows, dd] [BLOCK_B, BLOCK_D] and P[cols, dd] [BLOCK_C, BLOCK_D] (masked entries 0)."""
    zt = tl.load(z_base[:, None] + dd.to(tl.int64)[None, :] * szd, mask=rows_ok[:, None] & d_ok[None, :], other=0.0).to(
        tl.float32
    )
    pt = tl.load(
        p_base + cols.to(tl.int64)[:, None] * spc + dd.to(tl.int64)[None, :] * spd,
        mask=col_ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    return zt, pt


@triton.jit
def _sq_dist(
    z_base,
    p_base,
    szd,
    spc,
    spd,
    rows_ok,
    cols,
    col_ok,
    D,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """sum_d (z[i, d] - P[k, d])^2 for a [BLOCK_B, BLOCK_C] tile, fp32, from the differences."""
    sq = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        zt, pt = _load_tiles(z_base, p_base, szd, spc, spd, rows_ok, cols, col_ok, dd, d_ok)
        diff = zt[:, None, :] - pt[None, :, :]
        sq += tl.sum(diff * diff, axis=2)
    return sq


@triton.jit
def _pmr_finalize(ws_ptr, cnt_ptr, out_ptr, loss_ptr, M, alpha, BLOCK_M: tl.constexpr):
    mi = tl.arange(0, BLOCK_M)
    mm = mi < M
    s = tl.load(ws_ptr + mi, mask=mm, other=0.0, volatile=True)
    count = tl.load(ws_ptr + M, volatile=True)
    pce_sum = tl.load(ws_ptr + M + 1 + mi, mask=mm, other=0.0, volatile=True)
    local = tl.load(ws_ptr + 2 * M + 1, volatile=True)
    pce = tl.where(local > 0.0, pce_sum / tl.maximum(local, 1.0), 0.0)
    # docs/methods/pmr.md: c_m = alpha * 1[s_m < max_j s_j] (M = 2: the authors' switch, tie -> (0, 0))
    s_max = tl.max(tl.where(mm, s, float("-inf")), axis=0)
    coef = tl.where(s < s_max, alpha, 0.0)
    # ratio_m = s_m / max_{j != m} s_j
    others = tl.where((mi[:, None] != mi[None, :]) & mm[None, :], s[None, :], float("-inf"))
    ratio = s / tl.max(others, axis=1)
    bad = (s != s) | (tl.abs(s) == float("inf")) | (pce != pce) | (tl.abs(pce) == float("inf"))
    n_bad = tl.sum(tl.where(mm & bad, 1, 0), axis=0)
    flag = tl.where(count == 0.0, 2.0, tl.where(n_bad > 0, 1.0, 0.0))
    coef = tl.where(flag == 0.0, coef, 0.0)
    loss = tl.sum(tl.where(mm & (coef != 0.0), coef * pce, 0.0), axis=0)
    tl.store(out_ptr + mi, s, mask=mm)
    tl.store(out_ptr + M + mi, pce, mask=mm)
    tl.store(out_ptr + 2 * M + mi, ratio, mask=mm)
    tl.store(out_ptr + 3 * M + mi, coef, mask=mm)
    tl.store(out_ptr + 4 * M, loss)
    tl.store(loss_ptr, loss)
    tl.store(out_ptr + 4 * M + 1, flag)
    tl.store(out_ptr + 4 * M + 2, local)
    zero = tl.zeros([BLOCK_M], dtype=tl.float32)
    tl.store(ws_ptr + mi, zero, mask=mm)
    tl.store(ws_ptr + M + 1 + mi, zero, mask=mm)
    tl.store(ws_ptr + M, 0.0)
    tl.store(ws_ptr + 2 * M + 1, 0.0)
    tl.atomic_xchg(cnt_ptr, 0)


@triton.jit
def pmr_forward_kernel(
    z_ptr,
    szm,
    szb,
    szd,
    p_ptr,
    spm,
    spc,
    spd,
    y_ptr,
    sy,
    lse_ptr,
    ws_ptr,
    cnt_ptr,
    out_ptr,
    loss_ptr,
    M,
    B,
    C,
    D,
    ignore_index,
    n_programs,
    alpha,
    PHASE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """PHASE 0: accumulate + the last program finalizes; 1: accumulate only; 2: finalize only (grid (1, 1))."""
    if PHASE != 2:
        pid_m = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_in = rows < B
        rows64 = rows.to(tl.int64)
        lab = tl.load(y_ptr + rows64 * sy, mask=row_in, other=ignore_index).to(tl.int64)
        valid = row_in & (lab != ignore_index)
        z_base = z_ptr + pid_m.to(tl.int64) * szm + rows64 * szb
        p_base = p_ptr + pid_m.to(tl.int64) * spm
        # online log-sum-exp of -d over the C tiles: running max m_i, running sum l_i of exp(-d - m_i)
        m_i = tl.full([BLOCK_B], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_B], dtype=tl.float32)
        d_y = tl.zeros([BLOCK_B], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            dist = tl.sqrt(_sq_dist(z_base, p_base, szd, spc, spd, valid, cols, col_ok, D, BLOCK_B, BLOCK_C, BLOCK_D))
            nd = tl.where(col_ok[None, :], -dist, float("-inf"))
            new_m = tl.maximum(m_i, tl.max(nd, axis=1))
            l_i = l_i * tl.exp(m_i - new_m) + tl.sum(tl.exp(nd - new_m[:, None]), axis=1)
            m_i = new_m
            d_y += tl.sum(tl.where(cols[None, :] == lab[:, None], dist, 0.0), axis=1)
        lse = m_i + tl.log(l_i)
        tl.store(lse_ptr + pid_m.to(tl.int64) * B + rows64, lse, mask=row_in)
        logp = -d_y - lse
        in_range = (lab >= 0) & (lab < C)
        logp = tl.where(in_range, logp, float("nan"))
        tl.atomic_add(ws_ptr + pid_m, tl.sum(tl.where(valid, tl.exp(logp), 0.0), axis=0))
        tl.atomic_add(ws_ptr + M + 1 + pid_m, tl.sum(tl.where(valid, -logp, 0.0), axis=0))
        n_valid = tl.sum(valid.to(tl.float32), axis=0)
        if pid_m == 0:
            tl.atomic_add(ws_ptr + M, n_valid)
            tl.atomic_add(ws_ptr + 2 * M + 1, n_valid)
        if PHASE == 0:
            ticket = tl.atomic_add(cnt_ptr, 1)  # acq_rel: our adds are visible to the last ticket holder
            if ticket == n_programs - 1:
                _pmr_finalize(ws_ptr, cnt_ptr, out_ptr, loss_ptr, M, alpha, BLOCK_M)
    else:
        _pmr_finalize(ws_ptr, cnt_ptr, out_ptr, loss_ptr, M, alpha, BLOCK_M)


# -------------------------------------------------------------------------------------------- backward
@triton.jit
def pmr_backward_kernel(
    z_ptr,
    szm,
    szb,
    szd,
    p_ptr,
    spm,
    spc,
    spd,
    y_ptr,
    sy,
    lse_ptr,
    out_ptr,
    g_ptr,
    dz_ptr,
    sdm,
    sdb,
    M,
    B,
    C,
    D,
    ignore_index,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_in = rows < B
    rows64 = rows.to(tl.int64)
    lab = tl.load(y_ptr + rows64 * sy, mask=row_in, other=ignore_index).to(tl.int64)
    valid = row_in & (lab != ignore_index) & (lab >= 0) & (lab < C)
    coef = tl.load(out_ptr + 3 * M + pid_m)
    local = tl.load(out_ptr + 4 * M + 2)
    scale = tl.load(g_ptr).to(tl.float32) * coef / tl.maximum(local, 1.0)
    live = valid & ((coef + tl.zeros([BLOCK_B], dtype=tl.float32)) != 0.0)  # (a vector: the interpreter)
    lse = tl.load(lse_ptr + pid_m.to(tl.int64) * B + rows64, mask=live, other=0.0)
    z_base = z_ptr + pid_m.to(tl.int64) * szm + rows64 * szb
    p_base = p_ptr + pid_m.to(tl.int64) * spm
    dz_base = dz_ptr + pid_m.to(tl.int64) * sdm + rows64 * sdb
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        dist = tl.sqrt(_sq_dist(z_base, p_base, szd, spc, spd, live, cols, col_ok, D, BLOCK_B, BLOCK_C, BLOCK_D))
        p = tl.exp(-dist - lse[:, None])
        onehot = tl.where(cols[None, :] == lab[:, None], 1.0, 0.0)
        # dPCE_i/dz_i = sum_k (p_ik - 1[k = y_i]) (P_k - z_i) / d_ik ; the term is 0 where d_ik = 0
        ok = live[:, None] & col_ok[None, :] & (dist > 0.0)
        w = tl.where(ok, scale * (p - onehot) / tl.where(ok, dist, 1.0), 0.0)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            zt, pt = _load_tiles(z_base, p_base, szd, spc, spd, live, cols, col_ok, dd, d_ok)
            term = tl.where(w[:, :, None] != 0.0, w[:, :, None] * (pt[None, :, :] - zt[:, None, :]), 0.0)
            part = tl.sum(term, axis=1)
            o_ptrs = dz_base[:, None] + dd.to(tl.int64)[None, :]
            o_mask = row_in[:, None] & d_ok[None, :]
            acc = tl.load(o_ptrs, mask=o_mask & (c0 > 0), other=0.0).to(tl.float32)  # this program owns these rows
            tl.store(o_ptrs, (acc + part).to(dz_ptr.dtype.element_ty), mask=o_mask)


# --------------------------------------------------------------------------------------------- refresh
@triton.jit
def _refresh_entries(sums_ptr, counts_ptr, p_ptr, spm, spc, spd, offs, M, C, D, mu, FIRST: tl.constexpr):
    """mean = sums / n; P = mean (first refresh) or (1 - mu) mean + mu P_old (the mean where P_old is not finite);
    a class with n = 0 keeps P_old. offs: flat indices into [M, C, D] (contiguous sums); n = counts[m, k] of the
    [M + 1, C + 1] counts."""
    offs = offs.to(tl.int64)
    ok = offs < M * C * D
    m = offs // (C * D)
    k = (offs // D) % C
    d = offs % D
    ptrs = p_ptr + m * spm + k * spc + d * spd
    total = tl.load(sums_ptr + offs, mask=ok, other=0.0, volatile=True)
    n = tl.load(counts_ptr + m * (C + 1) + k, mask=ok, other=0.0, volatile=True)
    old = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    mean = total / tl.maximum(n, 1.0)
    if FIRST:
        new = mean
    else:
        old_ok = tl.abs(old) < float("inf")  # false for NaN and +-Inf
        new = tl.where(old_ok, (1.0 - mu) * mean + mu * old, mean)
    tl.store(ptrs, tl.where(n > 0.0, new, old).to(p_ptr.dtype.element_ty), mask=ok)


@triton.jit
def pmr_accumulate_kernel(
    z_ptr,
    szm,
    szb,
    szd,
    y_ptr,
    sy,
    sums_ptr,
    counts_ptr,
    p_ptr,
    spm,
    spc,
    spd,
    M,
    B,
    C,
    D,
    ignore_index,
    n_programs,
    mu,
    PHASE: tl.constexpr,
    FIRST: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """sums[m, y_i] += z[m, i], counts[m, y_i] += 1 (index_add by label) for the rows of modality m whose features
    are all finite; the others add 1 to counts[m, C] (skipped). PHASE 0: the last program then refreshes P."""
    pid_m = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_in = rows < B
    rows64 = rows.to(tl.int64)
    lab = tl.load(y_ptr + rows64 * sy, mask=row_in, other=ignore_index).to(tl.int64)
    valid = row_in & (lab != ignore_index) & (lab >= 0) & (lab < C)
    z_base = z_ptr + pid_m.to(tl.int64) * szm + rows64 * szb
    s_base = sums_ptr + (pid_m.to(tl.int64) * C + lab) * D
    bad = tl.zeros([BLOCK_B], dtype=tl.int32)  # non-finite entries per row (first pass: no write)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = valid[:, None] & (dd < D)[None, :]
        zt = tl.load(z_base[:, None] + dd.to(tl.int64)[None, :] * szd, mask=mask, other=0.0).to(tl.float32)
        bad += tl.sum((~(tl.abs(zt) < float("inf"))).to(tl.int32), axis=1)
    keep = valid & (bad == 0)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = keep[:, None] & (dd < D)[None, :]
        zt = tl.load(z_base[:, None] + dd.to(tl.int64)[None, :] * szd, mask=mask, other=0.0).to(tl.float32)
        tl.atomic_add(s_base[:, None] + dd[None, :], zt, mask=mask)
    c_base = counts_ptr + pid_m.to(tl.int64) * (C + 1)
    tl.atomic_add(c_base + lab, tl.where(keep, 1.0, 0.0), mask=keep)
    tl.atomic_add(c_base + C, tl.sum((valid & (bad > 0)).to(tl.float32), axis=0))
    if PHASE == 0:
        ticket = tl.atomic_add(counts_ptr + M * (C + 1), 1.0)  # fp32 ticket slot (exact below 2^24 programs)
        if ticket == n_programs - 1:
            for f0 in range(0, M * C * D, BLOCK_F):
                offs = f0 + tl.arange(0, BLOCK_F)
                _refresh_entries(sums_ptr, counts_ptr, p_ptr, spm, spc, spd, offs, M, C, D, mu, FIRST)


@triton.jit
def pmr_refresh_kernel(
    sums_ptr, counts_ptr, p_ptr, spm, spc, spd, M, C, D, mu, FIRST: tl.constexpr, BLOCK_F: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    _refresh_entries(sums_ptr, counts_ptr, p_ptr, spm, spc, spd, offs, M, C, D, mu, FIRST)


# ------------------------------------------------------------------------------------------- launchers
_WORKSPACES: dict = {}


def _workspace(device: torch.device):
    """(ws fp32 [2 MAX_M + 2], ticket int32 [1]) per device and stream, zeroed once, kept clean by the kernel."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = (
            torch.zeros(2 * MAX_M + 2, dtype=torch.float32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device),
        )
        _WORKSPACES[key] = ws
    return ws


@functools.lru_cache(maxsize=1024)
def _blocks(B: int, C: int, D: int, interp: bool):
    """(BLOCK_B, BLOCK_C, BLOCK_D, num_warps): a [B, C, D] difference tile of <= 4096 fp32 (compiled; 32 per thread
    at 4 warps) or 65536 (interpreter: fewer Python-level programs)."""
    block_c = min(next_pow2(C), 64 if interp else 16)
    block_d = min(next_pow2(D), 64 if interp else 16)
    tile = 65536 if interp else 4096
    block_b = max(1, min(next_pow2(B), tile // (block_c * block_d), 1024 if interp else 64))
    return block_b, block_c, block_d, 4


def pmr_forward_launch(
    z: torch.Tensor,
    protos: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    ignore_index: int,
    sync: bool = False,
    group=None,
):
    """z [M, B, D], protos [M, C, D] (any strides), labels [B] -> (out fp32 [4M + 3], lse fp32 [M, B], loss fp32 [],
    a copy of out[4M]); module doc.
    sync under torch.distributed: accumulate, all-reduce the score sums and global count, finalize (2 launches)."""
    M, B, D = z.shape
    C = protos.shape[1]
    device = z.device
    ws, ticket = _workspace(device)
    out = torch.empty(4 * M + 3, dtype=torch.float32, device=device)
    loss = torch.empty((), dtype=torch.float32, device=device)
    lse = torch.empty(M, B, dtype=torch.float32, device=device)
    bb, bc, bd, warps = _blocks(B, C, D, interpreting())
    grid = (max(1, cdiv(B, bb)), M)  # B = 0: one block per modality, all rows masked (flag 2; a synced rank joins)
    args = (
        z,
        z.stride(0),
        z.stride(1),
        z.stride(2),
        protos,
        protos.stride(0),
        protos.stride(1),
        protos.stride(2),
        labels,
        labels.stride(0),
        lse,
        ws,
        ticket,
        out,
        loss,
        M,
        B,
        C,
        D,
        int(ignore_index),
        grid[0] * grid[1],
        float(alpha),
    )
    meta = dict(BLOCK_B=bb, BLOCK_C=bc, BLOCK_D=bd, BLOCK_M=MAX_M)
    distributed = sync and torch.distributed.is_available() and torch.distributed.is_initialized()
    with device_guard(device):
        if not distributed:
            pmr_forward_kernel[grid](*args, PHASE=0, num_warps=warps, **meta)
        else:
            pmr_forward_kernel[grid](*args, PHASE=1, num_warps=warps, **meta)
            torch.distributed.all_reduce(ws[: M + 1], group=group)  # score sums and the global count, in place
            pmr_forward_kernel[(1, 1)](*args, PHASE=2, num_warps=1, **meta)
    return out, lse, loss


def pmr_backward_launch(
    grad: torch.Tensor,
    z: torch.Tensor,
    protos: torch.Tensor,
    labels: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    ignore_index: int,
) -> torch.Tensor:
    """dL/dz [M, B, D] (contiguous, z's dtype) for the loss out[4M]; grad: the 0-d upstream gradient (device)."""
    M, B, D = z.shape
    C = protos.shape[1]
    dz = torch.empty((M, B, D), dtype=z.dtype, device=z.device)
    if B == 0 or D == 0:
        return dz
    bb, bc, bd, warps = _blocks(B, C, D, interpreting())
    grid = (cdiv(B, bb), M)
    with device_guard(z.device):
        pmr_backward_kernel[grid](
            z,
            z.stride(0),
            z.stride(1),
            z.stride(2),
            protos,
            protos.stride(0),
            protos.stride(1),
            protos.stride(2),
            labels,
            labels.stride(0),
            lse,
            out,
            grad,
            dz,
            dz.stride(0),
            dz.stride(1),
            M,
            B,
            C,
            D,
            int(ignore_index),
            BLOCK_B=bb,
            BLOCK_C=bc,
            BLOCK_D=bd,
            num_warps=warps,
        )
    return dz


def _refresh_blocks(B: int, D: int, interp: bool):
    block_d = min(next_pow2(D), 128 if interp else 64)
    block_b = max(1, min(next_pow2(B), (16384 if interp else 2048) // block_d))
    return block_b, block_d, (4096 if interp else 1024)


def pmr_accumulate_launch(
    z: torch.Tensor,
    labels: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    protos: torch.Tensor,
    *,
    ignore_index: int,
    finalize: bool = False,
    mu: float = 0.0,
    first: bool = False,
) -> None:
    """sums [M, C, D] (contiguous fp32) += per-class row sums of z [M, B, D]; counts [M + 1, C + 1] fp32
    (contiguous; counts[m, C]: skipped non-finite rows of modality m; counts[M, 0]: the ticket slot, zero before the
    call) += rows per class and modality. finalize: the last program also refreshes protos [M, C, D] in place (one
    launch for a one-batch refresh)."""
    M, B, D = z.shape
    C = protos.shape[1]
    bb, bd, bf = _refresh_blocks(B, D, interpreting())
    grid = (max(1, cdiv(B, bb)), M)
    with device_guard(z.device):
        pmr_accumulate_kernel[grid](
            z,
            z.stride(0),
            z.stride(1),
            z.stride(2),
            labels,
            labels.stride(0),
            sums,
            counts,
            protos,
            protos.stride(0),
            protos.stride(1),
            protos.stride(2),
            M,
            B,
            C,
            D,
            int(ignore_index),
            grid[0] * grid[1],
            float(mu),
            PHASE=0 if finalize else 1,
            FIRST=bool(first),
            BLOCK_B=bb,
            BLOCK_D=bd,
            BLOCK_F=bf,
            num_warps=4,
        )


def pmr_refresh_launch(
    sums: torch.Tensor, counts: torch.Tensor, protos: torch.Tensor, *, mu: float, first: bool
) -> None:
    """protos [M, C, D] <- the EMA of the class means sums / counts (in place; one launch over the entries)."""
    M, C, D = protos.shape
    _, _, bf = _refresh_blocks(1, D, interpreting())
    n = M * C * D
    if n == 0:
        return
    with device_guard(protos.device):
        pmr_refresh_kernel[(cdiv(n, bf),)](
            sums,
            counts,
            protos,
            protos.stride(0),
            protos.stride(1),
            protos.stride(2),
            M,
            C,
            D,
            float(mu),
            FIRST=bool(first),
            BLOCK_F=bf,
            num_warps=4,
        )
