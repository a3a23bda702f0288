"""Reference math of MMPareto (Wei & Hu, ICML 2024; ../shared/METHODS_NEXT.md section 2, authors' code/MMPareto.py),
re-exported by mmkernels.reference.

Per encoder k (its parameter tensors T), with g_m = grad of the multimodal loss and g_u = grad of k's unimodal loss:
  a = <g_m, g_m>, b = <g_m, g_u>, c = <g_u, g_u> summed over the encoder's tensors, cos = b / sqrt(a c)
  cos > 0 (strict): w_m = w_u = 1/2 (no conflict); else w_m = 0.999 if b >= a, 0.001 if b >= c,
  else (c - b) / (a + c - 2b) (the closed-form two-objective min-norm point); w_u = 1 - w_m.
  h_T = 2 (w_m g_m,T + w_u g_u,T); r_T = ||g_m,T + g_u,T|| / ||h_T||; grad_T = gamma max(1, r_T) h_T on conflict,
  gamma (g_m,T + g_u,T) otherwise. rescale="global": one r per encoder from the encoder-wide norms.
Norms follow from the three inner products: ||g_m + g_u||^2 = a + 2b + c, ||h||^2 = 4 (w_m^2 a + 2 w_m w_u b + w_u^2 c).

Degenerate cases (ours; the authors' code divides by zero): cos := 0 when a = 0 or c = 0 (then b = 0 exactly, the
pair counts as a conflict and w_m = 0.999 if a = 0, 0.001 if c = 0 and a > 0; either way grad = gamma (g_m + g_u));
r := 1 where ||h|| = 0 (then h = 0 and the gradient is 0, never 0 * inf). A non-finite a, b or c (a NaN/Inf gradient
or an fp32 overflow) sets the flag and that encoder falls back to gamma (g_m + g_u), the no-conflict rule.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["MMPARETO_GAMMA", "MMPARETO_RESCALE", "mmpareto_inner_products", "mmpareto_weights",
           "mmpareto_scales", "mmpareto_combine"]

MMPARETO_GAMMA = 1.5                      # authors hard-code 1.5 (toolkit: `alpha`)
MMPARETO_RESCALE = ("per_tensor", "global")  # per_tensor: the authors' (one r per parameter tensor)
W_HIGH, W_LOW = 0.999, 0.001              # the authors' clamped solutions when one gradient dominates


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def mmpareto_inner_products(grads_mm: Sequence[torch.Tensor], grads_uni: Sequence[torch.Tensor]) -> torch.Tensor:
    """[T, 3] per tensor (a_T, b_T, c_T) = (<g_m,g_m>, <g_m,g_u>, <g_u,g_u>), accumulated in fp32 (fp64 for fp64)."""
    rows = []
    for gm, gu in zip(grads_mm, grads_uni):
        acc = _acc_dtype(gm.dtype)
        x, y = gm.to(acc).reshape(-1), gu.to(acc).reshape(-1)
        rows.append(torch.stack([x.dot(x), x.dot(y), y.dot(y)]))
    return torch.stack(rows)


def mmpareto_weights(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
    """Per encoder [K]: (cos, w_m, conflict, finite). METHODS_NEXT 2, the weight rule; degenerate cases above."""
    finite = torch.isfinite(a) & torch.isfinite(b) & torch.isfinite(c)
    denom = a.clamp(min=0).sqrt() * c.clamp(min=0).sqrt()
    cos = torch.where(denom > 0, b / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(b))
    solved = (c - b) / (a + c - 2 * b)  # only read where b < a and b < c, so a + c - 2b > 0
    w_m = torch.where(b >= a, torch.full_like(a, W_HIGH), torch.where(b >= c, torch.full_like(a, W_LOW), solved))
    conflict = ~(cos > 0) & finite
    w_m = torch.where(conflict, w_m, torch.full_like(a, 0.5))
    return cos, w_m, conflict, finite


def mmpareto_scales(abc: torch.Tensor, encoder_of: torch.Tensor, num_encoders: int, *, gamma: float = MMPARETO_GAMMA,
                    rescale: str = "per_tensor") -> dict:
    """Per-tensor factors from the per-tensor inner products abc [T, 3] and encoder_of [T] (int64, 0..K-1).

    Returns {"scale": [T, 2] (s_m, s_u) with grad_T = s_m g_m,T + s_u g_u,T = gamma max(1, r_T) h_T on conflict,
    "cos": [K], "weights": [K, 2] (w_m, w_u), "conflict": [K] bool, "flag": [] (1. if some a, b, c non-finite)}.
    """
    acc = abc.dtype
    k = num_encoders
    sums = torch.zeros(k, 3, dtype=acc, device=abc.device).index_add_(0, encoder_of, abc)
    a, b, c = sums.unbind(1)
    cos, w_m, conflict, finite = mmpareto_weights(a, b, c)
    w_u = 1 - w_m
    wm_t, wu_t = w_m[encoder_of], w_u[encoder_of]
    at, bt, ct = abc.unbind(1)
    sum_sq = (at + 2 * bt + ct).clamp(min=0)                                         # ||g_m + g_u||^2
    h_sq = (4 * (wm_t * wm_t * at + 2 * wm_t * wu_t * bt + wu_t * wu_t * ct)).clamp(min=0)  # ||h||^2
    if rescale == "global":
        sum_sq = torch.zeros(k, dtype=acc, device=abc.device).index_add_(0, encoder_of, sum_sq)[encoder_of]
        h_sq = torch.zeros(k, dtype=acc, device=abc.device).index_add_(0, encoder_of, h_sq)[encoder_of]
    elif rescale != "per_tensor":
        raise ValueError(f"rescale must be one of {MMPARETO_RESCALE}, got {rescale!r}")
    r = torch.where(h_sq > 0, (sum_sq / torch.where(h_sq > 0, h_sq, torch.ones_like(h_sq))).sqrt(),
                    torch.ones_like(h_sq))
    f = torch.where(conflict[encoder_of], r.clamp(min=1), torch.ones_like(r))
    scale = torch.stack([2 * gamma * f * wm_t, 2 * gamma * f * wu_t], 1)
    flag = (~finite).any().to(torch.float32)
    return {"scale": scale, "cos": cos.to(torch.float32),
            "weights": torch.stack([w_m, w_u], 1).to(torch.float32), "conflict": conflict, "flag": flag}


def mmpareto_combine(grads_mm, grads_uni, *, gamma: float = MMPARETO_GAMMA, rescale: str = "per_tensor"):
    """MMPareto's encoder gradients (METHODS_NEXT 2).

    grads_mm, grads_uni: K lists (one per encoder) of tensors, g_m,T and g_u,T (same shapes). Returns (out, stats):
    out the K lists of combined gradients in the inputs' dtypes, stats as mmpareto_scales (without "scale").
    """
    flat_m = [g for group in grads_mm for g in group]
    flat_u = [g for group in grads_uni for g in group]
    device = flat_m[0].device
    encoder_of = torch.tensor([k for k, group in enumerate(grads_mm) for _ in group], dtype=torch.int64,
                              device=device)
    acc = torch.float64 if any(g.dtype == torch.float64 for g in flat_m + flat_u) else torch.float32
    abc = mmpareto_inner_products(flat_m, flat_u).to(acc)
    res = mmpareto_scales(abc, encoder_of, len(grads_mm), gamma=gamma, rescale=rescale)
    scale = res.pop("scale").to(acc)
    out, t = [], 0
    for group_m, group_u in zip(grads_mm, grads_uni):
        outs = []
        for gm, gu in zip(group_m, group_u):
            outs.append((scale[t, 0] * gm.to(acc) + scale[t, 1] * gu.to(acc)).to(gu.dtype))
            t += 1
        out.append(outs)
    return out, res
