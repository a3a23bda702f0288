"""Triton kernels of MMPareto's gradient combination (Wei & Hu, ICML 2024), three launches, no host sync:

1. reduce   grid (blocks,): block j covers elements [start_j, end_j) of ONE tensor inside a flat buffer (all tensors
            of one dtype laid end to end); partial (a, b, c) = (<g_m,g_m>, <g_m,g_u>, <g_u,g_u>) of its chunk,
            float64 (exact products of fp32 values: ||h_T|| keeps its digits near cancellation), stored per block
            (no atomics: the sums are deterministic).
2. finalize one program: per tensor the sum of its blocks' partials, per encoder (a, b, c), cos and the weights,
            then per tensor the factors (s_m, s_u, keep) with grad_T = s_m g_m,T + s_u g_u,T = 2 gamma max(1, r_T)
            (w_m g_m,T + w_u g_u,T) (r_T = 1 without conflict; rescale "global": one r per encoder); the fallbacks
            of mmkernels.reference.mmpareto (vanished Pareto point: gamma (g_m + g_u); non-finite encoder: keep = 0).
3. write    grid (blocks,): g_u <- s_m g_m + s_u g_u in place (float64 math, stored via fp32 in the gradient's dtype).

Multi-tensor without a pointer table: the tensors of one dtype live in one flat buffer (the balancer owns it and the
parameters' .grad are views of it), so a block is just an element range; the block tables are built once on the host
and uploaded once (mmkernels.mmpareto.MMParetoLayout). Launches 1 and 3 run once per dtype group (usually one);
the finalize runs once for all encoders, whatever their dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import device_guard

BLOCK = 1024  # elements per tile
ITERS = 8  # tiles per block: a block (chunk) is BLOCK * ITERS elements of one tensor
CHUNK = BLOCK * ITERS
BLOCK_T = 16  # tensors per tile in the finalize (float64 tiles: 64 and 32 spilled on sm_90 / sm_80)
BLOCK_K = 8  # encoders (M <= 8)


@triton.jit
def _load_pair(gm_ptr, gu_ptr, offs, mask, SUMMED: tl.constexpr):
    """(g_m, g_u) in float64 at offs; SUMMED: the second buffer holds g_m + g_u, so g_u is the difference (exact in
    float64 for fp32/fp16/bf16 buffers)."""
    gm = tl.load(gm_ptr + offs, mask=mask, other=0.0).to(tl.float32).to(tl.float64)  # exact; via fp32 for bf16
    gu = tl.load(gu_ptr + offs, mask=mask, other=0.0).to(tl.float32).to(tl.float64)
    if SUMMED:
        gu = gu - gm
    return gm, gu


@triton.jit
def mmpareto_reduce_kernel(
    gm_ptr,
    gu_ptr,
    blk_start_ptr,
    blk_end_ptr,
    part_ptr,
    blk_base,
    SUMMED: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """part[blk_base + j] = (sum g_m^2, sum g_m g_u, sum g_u^2) over block j's element range, float64 (the products
    of fp32 values are exact: ||h_T||^2 rebuilt from them keeps its digits when the Pareto point nearly cancels).
    SUMMED: the second buffer holds g_m + g_u (one backward of the summed loss, the DDP path): g_u = it - g_m."""
    j = tl.program_id(0)
    start = tl.load(blk_start_ptr + j)
    end = tl.load(blk_end_ptr + j)
    acc_a = tl.zeros([BLOCK], dtype=tl.float64)
    acc_b = tl.zeros([BLOCK], dtype=tl.float64)
    acc_c = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(0, ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < end
        gm, gu = _load_pair(gm_ptr, gu_ptr, offs, mask, SUMMED)
        acc_a += gm * gm
        acc_b += gm * gu
        acc_c += gu * gu
    p = part_ptr + (blk_base + j).to(tl.int64) * 3
    tl.store(p, tl.sum(acc_a, axis=0))
    tl.store(p + 1, tl.sum(acc_b, axis=0))
    tl.store(p + 2, tl.sum(acc_c, axis=0))


@triton.jit
def _tensor_abc(part_ptr, t_blk0_ptr, t_nblk_ptr, t, tmask, max_nblk):
    """Per tensor t (a vector of tensor indices) the float64 sums of its blocks' partials."""
    blk0 = tl.load(t_blk0_ptr + t, mask=tmask, other=0).to(tl.int64)
    nblk = tl.load(t_nblk_ptr + t, mask=tmask, other=0)
    a = tl.zeros(t.shape, dtype=tl.float64)
    b = tl.zeros(t.shape, dtype=tl.float64)
    c = tl.zeros(t.shape, dtype=tl.float64)
    for j in range(0, max_nblk):
        m = tmask & (j < nblk)
        p = part_ptr + (blk0 + j) * 3
        a += tl.load(p, mask=m, other=0.0)
        b += tl.load(p + 1, mask=m, other=0.0)
        c += tl.load(p + 2, mask=m, other=0.0)
    return a, b, c


@triton.jit
def _gather(hit, per_encoder):
    """Per tensor the value of its encoder: hit [BLOCK_T, BLOCK_K] one-hot, per_encoder [BLOCK_K]."""
    return tl.sum(tl.where(hit, per_encoder[None, :], 0.0), axis=1)


@triton.jit
def _norms(a, b, c, wm, wu):
    """||g_m + g_u||^2, ||h||^2 = 4 (w_m^2 a + 2 w_m w_u b + w_u^2 c) and the bound 2 (w_m ||g_m|| + w_u ||g_u||)."""
    ss = tl.maximum(a + 2.0 * b + c, 0.0)
    hh = tl.maximum(4.0 * (wm * wm * a + 2.0 * wm * wu * b + wu * wu * c), 0.0)
    bound = 2.0 * (wm * tl.sqrt(tl.maximum(a, 0.0)) + wu * tl.sqrt(tl.maximum(c, 0.0)))
    return ss, hh, bound


@triton.jit
def mmpareto_finalize_kernel(
    part_ptr,
    t_blk0_ptr,
    t_nblk_ptr,
    t_enc_ptr,
    t_tau_ptr,
    scale_ptr,
    cos_ptr,
    w_ptr,
    conflict_ptr,
    flag_ptr,
    T,
    K,
    max_nblk,
    gamma,
    GLOBAL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program, float64. Per encoder k: (a, b, c), cos, w (the weight rule of mmkernels.reference.mmpareto); per
    tensor scale[t] = (s_m, s_u, keep): on conflict 2 gamma max(1, r) (w_m, w_u), or (gamma, gamma) where the
    Pareto point vanished (||h|| <= tau bound) or without conflict; keep = 0 for a non-finite encoder (written 0)."""
    kk = tl.arange(0, BLOCK_K)
    A = tl.zeros([BLOCK_K], dtype=tl.float64)
    B = tl.zeros([BLOCK_K], dtype=tl.float64)
    C = tl.zeros([BLOCK_K], dtype=tl.float64)
    TAU = tl.zeros([BLOCK_K], dtype=tl.float64)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < T
        a, b, c = _tensor_abc(part_ptr, t_blk0_ptr, t_nblk_ptr, t, tm, max_nblk)
        hit = tl.load(t_enc_ptr + t, mask=tm, other=-1)[:, None] == kk[None, :]
        A += tl.sum(tl.where(hit, a[:, None], 0.0), axis=0)
        B += tl.sum(tl.where(hit, b[:, None], 0.0), axis=0)
        C += tl.sum(tl.where(hit, c[:, None], 0.0), axis=0)
        tau = tl.load(t_tau_ptr + t, mask=tm, other=0.0)
        TAU = tl.maximum(TAU, tl.max(tl.where(hit, tau[:, None], 0.0), axis=0))
    finite = (A - A == 0.0) & (B - B == 0.0) & (C - C == 0.0)  # x - x is NaN for inf and NaN
    denom = tl.sqrt(tl.maximum(A, 0.0)) * tl.sqrt(tl.maximum(C, 0.0))
    cos = tl.where(denom > 0.0, B / tl.where(denom > 0.0, denom, 1.0), 0.0)
    solved = (C - B) / (A + C - 2.0 * B)  # read only where b < a and b < c
    wm = tl.where(B >= A, 0.999, tl.where(B >= C, 0.001, solved))
    conflict = finite & ~(cos > 0.0)
    wm = tl.where(conflict, wm, 0.5)
    wu = 1.0 - wm
    kmask = kk < K
    tl.store(cos_ptr + kk, cos.to(tl.float32), mask=kmask)
    tl.store(w_ptr + 2 * kk, wm.to(tl.float32), mask=kmask)
    tl.store(w_ptr + 2 * kk + 1, wu.to(tl.float32), mask=kmask)
    nonfinite = tl.max(tl.where(kmask & ~finite, 1.0, 0.0), axis=0)
    conflict_f = tl.where(conflict, 1.0, 0.0)
    finite_f = tl.where(finite, 1.0, 0.0)
    tl.store(conflict_ptr + kk, conflict_f.to(tl.float32), mask=kmask)
    R = tl.full([BLOCK_K], 1.0, dtype=tl.float64)
    VAN = tl.zeros([BLOCK_K], dtype=tl.float64)
    if GLOBAL:  # one r per encoder: sqrt(sum_T ||g_m + g_u||^2 / sum_T ||h_T||^2)
        SS = tl.zeros([BLOCK_K], dtype=tl.float64)
        HH = tl.zeros([BLOCK_K], dtype=tl.float64)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tm = t < T
            a, b, c = _tensor_abc(part_ptr, t_blk0_ptr, t_nblk_ptr, t, tm, max_nblk)
            hit = tl.load(t_enc_ptr + t, mask=tm, other=-1)[:, None] == kk[None, :]
            ss, hh, _ = _norms(a, b, c, _gather(hit, wm), _gather(hit, wu))
            SS += tl.sum(tl.where(hit, ss[:, None], 0.0), axis=0)
            HH += tl.sum(tl.where(hit, hh[:, None], 0.0), axis=0)
        R = tl.where(HH > 0.0, tl.sqrt(SS / tl.where(HH > 0.0, HH, 1.0)), 1.0)
        _, _, BOUND = _norms(A, B, C, wm, wu)
        VAN = tl.where(conflict & (BOUND > 0.0) & (tl.sqrt(HH) <= TAU * BOUND), 1.0, 0.0)
    vanished_any = tl.max(tl.where(kmask, VAN, 0.0), axis=0)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < T
        hit = tl.load(t_enc_ptr + t, mask=tm, other=-1)[:, None] == kk[None, :]
        wmt = _gather(hit, wm)
        wut = _gather(hit, wu)
        conf_t = _gather(hit, conflict_f) > 0.0
        if GLOBAL:
            r = _gather(hit, R)
            van = _gather(hit, VAN) > 0.0
        else:
            a, b, c = _tensor_abc(part_ptr, t_blk0_ptr, t_nblk_ptr, t, tm, max_nblk)
            ss, hh, bound = _norms(a, b, c, wmt, wut)
            r = tl.where(hh > 0.0, tl.sqrt(ss / tl.where(hh > 0.0, hh, 1.0)), 1.0)
            tau = tl.load(t_tau_ptr + t, mask=tm, other=0.0)
            van = tm & conf_t & (bound > 0.0) & (tl.sqrt(hh) <= tau * bound)
            vanished_any = tl.maximum(vanished_any, tl.max(tl.where(van, 1.0, 0.0), axis=0))
        pareto = conf_t & ~van
        f = tl.where(pareto, tl.maximum(r, 1.0), 1.0)
        tl.store(scale_ptr + 3 * t, tl.where(pareto, 2.0 * gamma * f * wmt, gamma), mask=tm)
        tl.store(scale_ptr + 3 * t + 1, tl.where(pareto, 2.0 * gamma * f * wut, gamma), mask=tm)
        tl.store(scale_ptr + 3 * t + 2, _gather(hit, finite_f), mask=tm)
    tl.store(flag_ptr, tl.where(nonfinite > 0.0, 1.0, tl.where(vanished_any > 0.0, 2.0, 0.0)).to(tl.float32))


@triton.jit
def mmpareto_write_kernel(
    gm_ptr,
    gu_ptr,
    blk_start_ptr,
    blk_end_ptr,
    blk_tensor_ptr,
    scale_ptr,
    SUMMED: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """g_u <- s_m g_m + s_u g_u over block j's element range (float64, rounded to fp32, then to g_u's dtype); 0
    where the tensor's encoder was not finite (keep = 0: no NaN/Inf is written)."""
    j = tl.program_id(0)
    start = tl.load(blk_start_ptr + j)
    end = tl.load(blk_end_ptr + j)
    t = tl.load(blk_tensor_ptr + j).to(tl.int64)
    sm = tl.load(scale_ptr + 3 * t)
    su = tl.load(scale_ptr + 3 * t + 1)
    keep = tl.load(scale_ptr + 3 * t + 2) > 0.0
    for i in range(0, ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < end
        gm, gu = _load_pair(gm_ptr, gu_ptr, offs, mask, SUMMED)
        out = tl.where(keep, sm * gm + su * gu, 0.0)
        tl.store(gu_ptr + offs, out.to(tl.float32).to(gu_ptr.dtype.element_ty), mask=mask)


def mmpareto_combine_triton(flats_mm, flats, tables: dict, *, gamma: float, rescale: str, summed: bool = False) -> dict:
    """flats_mm[g], flats[g]: 1-D flat buffers of dtype group g (g_m and g_u; flats[g] is overwritten with the
    combined gradient; summed: flats[g] holds g_m + g_u instead of g_u). tables: the device tables of
    MMParetoLayout.tables() (block ranges per group, per-tensor block spans, encoders and vanishing tolerances tau)
    and its host ints. Returns {"cos" [K], "weights" [K, 2], "conflict" [K] (1. where the Pareto rule acted),
    "flag" [] (1. non-finite encoder, else 2. vanished Pareto point, else 0.)} fp32."""
    device = flats[0].device
    n_tensors, k, n_blocks = tables["num_tensors"], tables["num_encoders"], tables["num_blocks"]
    part = torch.empty((max(n_blocks, 1), 3), dtype=torch.float64, device=device)
    scale = torch.empty((max(n_tensors, 1), 3), dtype=torch.float64, device=device)
    cos = torch.empty(k, dtype=torch.float32, device=device)
    w = torch.empty((k, 2), dtype=torch.float32, device=device)
    conflict = torch.empty(k, dtype=torch.float32, device=device)
    flag = torch.empty((), dtype=torch.float32, device=device)
    with device_guard(device):
        for g, (fm, fu) in enumerate(zip(flats_mm, flats)):
            start, end, _, base = tables["groups"][g]
            if start.numel():
                mmpareto_reduce_kernel[(start.numel(),)](
                    fm, fu, start, end, part, base, SUMMED=summed, BLOCK=BLOCK, ITERS=ITERS, num_warps=4
                )
        mmpareto_finalize_kernel[(1,)](
            part,
            tables["t_blk0"],
            tables["t_nblk"],
            tables["t_enc"],
            tables["tau"],
            scale,
            cos,
            w,
            conflict,
            flag,
            n_tensors,
            k,
            tables["max_nblk"],
            float(gamma),
            GLOBAL=rescale == "global",
            BLOCK_T=BLOCK_T,
            BLOCK_K=BLOCK_K,
            num_warps=4,
        )
        for g, (fm, fu) in enumerate(zip(flats_mm, flats)):
            start, end, tensor, _ = tables["groups"][g]
            if start.numel():
                mmpareto_write_kernel[(start.numel(),)](
                    fm, fu, start, end, tensor, scale, SUMMED=summed, BLOCK=BLOCK, ITERS=ITERS, num_warps=4
                )
    return {"cos": cos, "weights": w, "conflict": conflict, "flag": flag}
