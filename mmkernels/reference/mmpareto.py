"""Reference math of MMPareto (Wei & Hu, ICML 2024; the authors' code/MMPareto.py), re-exported by
mmkernels.reference.

Per encoder k (its parameter tensors T), with g_m = grad of the multimodal loss and g_u = grad of k's unimodal loss:
  a = <g_m, g_m>, b = <g_m, g_u>, c = <g_u, g_u> summed over the encoder's tensors, cos = b / sqrt(a c)
  cos > 0 (strict): w_m = w_u = 1/2 (no conflict); else w_m = 0.999 if b >= a, 0.001 if b >= c,
  else (c - b) / (a + c - 2b) (the closed-form two-objective min-norm point); w_u = 1 - w_m.
  h_T = 2 (w_m g_m,T + w_u g_u,T); r_T = ||g_m,T + g_u,T|| / ||h_T||; grad_T = gamma max(1, r_T) h_T on conflict,
  gamma (g_m,T + g_u,T) otherwise. rescale="global": one r per encoder from the encoder-wide norms.
Norms follow from the three inner products: ||g_m + g_u||^2 = a + 2b + c, ||h||^2 = 4 (w_m^2 a + 2 w_m w_u b + w_u^2 c).
The inner products, the weights and the scales are float64 whatever the gradients' dtype: the product of two fp32
(fp16, bf16) values is exact in float64, so ||h||^2 keeps its digits when the Pareto point nearly cancels (in fp32
the quadratic form lost 1e-3 relative at cos = -0.99993); the combination is formed in float64 and rounded once.

Degenerate cases (ours; defined, documented in README "What differs"):
- a = 0 or c = 0: cos := 0, b = 0 exactly, the pair counts as a conflict, w_m = 0.999 if a = 0, 0.001 if c = 0 and
  a > 0; either way grad = gamma (g_m + g_u) (the authors' code gives the same: NaN > 0 is false, their solver
  returns the same clamped weight, and the restore brings h back to the sum).
- Vanishing Pareto point: ||h_T|| <= tau (2 w_m ||g_m,T|| + 2 w_u ||g_u,T||) with ||h_T|| > 0 possible only through
  rounding (g_u = -lambda g_m exactly: h = 0; e.g. B = 1, C = 2). The restore would scale rounding noise up to
  gamma ||g_m + g_u|| in a meaningless direction (the authors' code does; once NaN). We fall back to
  gamma (g_m,T + g_u,T), the no-conflict rule: the same magnitude the restore aims at, and the only defined
  direction; zero would freeze the encoder on every such step. flag = 2. tau = max(4 eps(dtype), 1e-6) of the
  gradient's dtype (rescale="global": per encoder, from the encoder-wide norms). Both zero: gradient 0, no flag.
- A non-finite a, b or c (a NaN/Inf gradient): that encoder's gradient is 0 (no NaN/Inf reaches a parameter),
  weights (1/2, 1/2), flag = 1 (takes precedence over 2).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "MMPARETO_GAMMA",
    "MMPARETO_RESCALE",
    "MMPARETO_VANISH_MIN",
    "mmpareto_vanish_tol",
    "mmpareto_inner_products",
    "mmpareto_weights",
    "mmpareto_scales",
    "mmpareto_combine",
]

MMPARETO_GAMMA = 1.5  # authors hard-code 1.5 (toolkit: `alpha`)
MMPARETO_RESCALE = ("per_tensor", "global")  # per_tensor: the authors' (one r per parameter tensor)
MMPARETO_VANISH_MIN = 1e-6  # floor of the vanishing tolerance (float64 inner products resolve ~1e-8)
W_HIGH, W_LOW = 0.999, 0.001  # the authors' clamped solutions when one gradient dominates


def mmpareto_vanish_tol(dtype: torch.dtype) -> float:
    """tau of a gradient dtype: ||h_T|| at or below tau times its bound counts as a vanished Pareto point."""
    return max(4.0 * torch.finfo(dtype).eps, MMPARETO_VANISH_MIN)


def mmpareto_inner_products(grads_mm: Sequence[torch.Tensor], grads_uni: Sequence[torch.Tensor]) -> torch.Tensor:
    """[T, 3] float64 per tensor (a_T, b_T, c_T) = (<g_m,g_m>, <g_m,g_u>, <g_u,g_u>), accumulated in float64."""
    rows = []
    for gm, gu in zip(grads_mm, grads_uni):
        x, y = gm.double().reshape(-1), gu.double().reshape(-1)
        rows.append(torch.stack([x.dot(x), x.dot(y), y.dot(y)]))
    return torch.stack(rows)


def mmpareto_weights(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
    """Per encoder [K]: (cos, w_m, conflict, finite). The weight rule above; degenerate cases above."""
    finite = torch.isfinite(torch.stack([a, b, c])).all(0)
    denom = a.clamp(min=0).sqrt() * c.clamp(min=0).sqrt()
    cos = torch.where(denom > 0, b / denom, 0.0)
    solved = (c - b) / (a + c - 2 * b)  # only read where b < a and b < c, so a + c - 2b > 0
    conflict = (cos <= 0) & finite
    w_m = torch.where(conflict, torch.where(b >= a, W_HIGH, torch.where(b >= c, W_LOW, solved)), 0.5)
    return cos, w_m, conflict, finite


def _per_encoder(x: torch.Tensor, encoder_of: torch.Tensor, k: int) -> torch.Tensor:
    """Sums over each encoder's tensors: x [T, ...] -> [K, ...]."""
    return torch.zeros((k, *x.shape[1:]), dtype=x.dtype, device=x.device).index_add_(0, encoder_of, x)


def mmpareto_scales(
    abc: torch.Tensor,
    encoder_of: torch.Tensor,
    num_encoders: int,
    *,
    gamma: float = MMPARETO_GAMMA,
    rescale: str = "per_tensor",
    tau=MMPARETO_VANISH_MIN,
) -> dict:
    """Per-tensor factors from the per-tensor inner products abc [T, 3] (float64) and encoder_of [T] (int64).

    tau: the vanishing tolerance, a float or [T] (mmpareto_vanish_tol of each tensor's dtype).
    Returns {"scale": [T, 2] (s_m, s_u) with grad_T = s_m g_m,T + s_u g_u,T (= gamma max(1, r_T) h_T on conflict),
    "keep": [T] bool (False: the encoder is not finite, grad_T = 0), "cos": [K], "weights": [K, 2] (w_m, w_u),
    "conflict": [K] bool, "flag": [] (1. some a, b, c non-finite; else 2. a Pareto point vanished; else 0.)}.
    """
    if rescale not in MMPARETO_RESCALE:
        raise ValueError(f"rescale must be one of {MMPARETO_RESCALE}, got {rescale!r}")
    k = num_encoders
    a, b, c = _per_encoder(abc, encoder_of, k).unbind(1)
    cos, w_m, conflict, finite = mmpareto_weights(a, b, c)
    w = torch.stack([w_m, 1 - w_m], 1)  # [K, 2]
    wt = w[encoder_of]  # [T, 2]
    at, bt, ct = abc.unbind(1)
    sum_sq = (at + 2 * bt + ct).clamp(min=0)  # ||g_m + g_u||^2
    wm_t, wu_t = wt.unbind(1)
    h_sq = (4 * (wm_t * wm_t * at + 2 * wm_t * wu_t * bt + wu_t * wu_t * ct)).clamp(min=0)  # ||h||^2
    tau_t = torch.as_tensor(tau, dtype=abc.dtype, device=abc.device).expand(at.shape)
    if rescale == "global":
        sum_sq = _per_encoder(sum_sq, encoder_of, k)[encoder_of]
        h_sq = _per_encoder(h_sq, encoder_of, k)[encoder_of]
        bound = (2 * (w * torch.stack([a, c], 1).clamp(min=0).sqrt()).sum(1))[encoder_of]
        tau_t = torch.zeros(k, dtype=abc.dtype, device=abc.device).scatter_reduce_(0, encoder_of, tau_t, "amax")[
            encoder_of
        ]
    else:
        bound = 2 * (wt * torch.stack([at, ct], 1).clamp(min=0).sqrt()).sum(1)  # >= ||h_T||
    h = h_sq.sqrt()
    conflict_t = conflict[encoder_of]
    vanished = conflict_t & (bound > 0) & (h <= tau_t * bound)
    pareto = conflict_t & ~vanished
    r = torch.where(h_sq > 0, (sum_sq / h_sq).sqrt(), 1.0)
    scale = torch.where(pareto.unsqueeze(1), (2 * gamma) * r.clamp(min=1).unsqueeze(1) * wt, gamma)  # (s_m, s_u)
    flag = torch.where(finite.all(), torch.where(vanished.any(), 2.0, 0.0), 1.0).to(torch.float32)
    return {
        "scale": scale,
        "keep": finite[encoder_of],
        "cos": cos.to(torch.float32),
        "weights": w.to(torch.float32),
        "conflict": conflict,
        "flag": flag,
    }


def mmpareto_combine(grads_mm, grads_uni, *, gamma: float = MMPARETO_GAMMA, rescale: str = "per_tensor"):
    """MMPareto's encoder gradients (module docstring).

    grads_mm, grads_uni: K lists (one per encoder) of tensors, g_m,T and g_u,T (same shapes). Returns (out, stats):
    out the K lists of combined gradients in the inputs' dtypes (formed in float64, rounded once), stats as
    mmpareto_scales (without "scale" and "keep").
    """
    flat_m = [g for group in grads_mm for g in group]
    flat_u = [g for group in grads_uni for g in group]
    device = flat_m[0].device
    encoder_of = torch.tensor([k for k, group in enumerate(grads_mm) for _ in group], dtype=torch.int64, device=device)
    tau = torch.tensor([mmpareto_vanish_tol(g.dtype) for g in flat_u], dtype=torch.float64, device=device)
    abc = mmpareto_inner_products(flat_m, flat_u)
    res = mmpareto_scales(abc, encoder_of, len(grads_mm), gamma=gamma, rescale=rescale, tau=tau)
    scale, keep = res.pop("scale"), res.pop("keep")
    out, t = [], 0
    for group_m, group_u in zip(grads_mm, grads_uni):
        outs = []
        for gm, gu in zip(group_m, group_u):
            v = scale[t, 0] * gm.double() + scale[t, 1] * gu.double()
            outs.append(torch.where(keep[t], v, torch.zeros_like(v)).to(gu.dtype))
            t += 1
        out.append(outs)
    return out, res
