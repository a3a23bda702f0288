"""OLM (Zong et al.): learning rates, rebalance factors, logit norms and the weight update (docs/methods/olm.md)."""

from __future__ import annotations

import torch

from ._common import OLM_EPS, _acc, _stack

__all__ = ["olm_rates", "olm_rebalance_factors", "olm_update", "olm_targets", "logit_norms", "OLM_TARGETS"]


# ----------------------------------------------------------------------------------------------- OLM
def olm_rates(train_loss0, dev_loss0, train_loss, dev_loss):
    """OLM Eq. 6-7 per modality (each argument [M]; '0' = at the first evaluation, Theta^[0]).

    G_m = |L_dev0 - L_dev|   (generalisation rate, Eq. 6)
    C_m = ||L_dev - L_train| - |L_dev0 - L_train0||   (convergence rate, Eq. 7)
    Returns (G [M] fp32, C [M] fp32).
    """
    tr0, dv0, tr, dv = (_acc(t) for t in (train_loss0, dev_loss0, train_loss, dev_loss))
    g = (dv0 - dv).abs()
    c = ((dv - tr).abs() - (dv0 - tr0).abs()).abs()
    return g.to(torch.float32), c.to(torch.float32)


def olm_rebalance_factors(gen_rate, conv_rate) -> torch.Tensor:
    """OLM Eq. 8: lambda = softmax(G / C) over modalities. C >= 0 by Eq. 7; C = 0 is guarded by clamping C below at
    OLM_EPS = 1e-8 (so G = C = 0 gives 0 and G > 0 = C gives a large but finite logit)."""
    g, c = _acc(gen_rate), _acc(conv_rate)
    return torch.softmax(g / c.clamp(min=OLM_EPS), dim=0).to(torch.float32)


def logit_norms(logits) -> torch.Tensor:
    """OLM: ||s_m||_2 per row, averaged over the rows. logits [M, B, C] (or a list) -> [M] fp32."""
    x = _acc(_stack(logits))
    return torch.linalg.vector_norm(x, dim=-1).mean(dim=-1).to(torch.float32)


OLM_TARGETS = ("budget", "paper")


def olm_targets(w, logit_norms, lam, *, target: str = "budget") -> torch.Tensor:
    """OLM Eq. 9 target logit magnitudes t_m, [M] in the accumulation dtype (w >= 0, so ||w_k s_k|| = w_k n_k).

    "paper" (Eq. 9 as printed): t_m = lam_m * s_bar, s_bar = mean_k w_k n_k. The targets sum to s_bar = (1/M) of the
      total sum_k w_k n_k, so every fixed point of Alg. 1 has w_m n_m = t_m summing to S = S/M: S = 0, w = 0.
    "budget" (our reading, the default): t_m = M * lam_m * s_bar = lam_m * sum_k w_k n_k. The targets sum to the total,
      so w_m n_m = lam_m S is a fixed point for every S (the budget is kept); uniform lam asks for equal norms.
    """
    if target not in OLM_TARGETS:
        raise ValueError(f"target must be one of {OLM_TARGETS}, got {target!r}")
    w, n, lam = _acc(w), _acc(logit_norms), _acc(lam)
    total = (w * n).sum()
    return lam * (total if target == "budget" else total / n.numel())


def olm_update(w, logit_norms, lam, *, lr: float, steps: int, target: str = "budget") -> torch.Tensor:
    """OLM Alg. 1: `steps` SGD steps on Eq. 9, L = sum_m |w_m n_m - t_m|, t_m from `olm_targets` (see there).

    w [M] current coefficients (>= 0), logit_norms n [M] (mean row norm ||s_m||_2), lam [M] from Eq. 8.
    At each step the targets are recomputed from the current w (Alg. 1 recomputes s_bar in its loop) and then treated
    as constants (detached), so dL/dw_m = sign(w_m n_m - t_m) * n_m (sign(0) = 0); w <- max(0, w - lr * dL/dw).
    Why "budget" is the default: with "paper" the targets sum to 1/M of sum_k w_k n_k, so the only fixed point is
    w = 0 and the updates pull w towards it; with "budget" they sum to the total, and w_m n_m = lam_m * total is a
    fixed point.
    Note: only the targets keep the budget; far from the fixed point the sign steps move w_m n_m by lr * n_m^2 each,
    unequal when the norms differ, so the total can drift during the approach (near the fixed point it stays within a
    few steps' granularity). w is clamped at 0 after each step (a coefficient on a logit magnitude: the paper keeps
    the directions), in both variants. Returns w_new [M] fp32. (The loop runs over SGD steps, not rows.)
    """
    if target not in OLM_TARGETS:
        raise ValueError(f"target must be one of {OLM_TARGETS}, got {target!r}")
    w, n = _acc(w), _acc(logit_norms)
    for _ in range(int(steps)):
        t = olm_targets(w, n, lam, target=target)
        w = (w - lr * torch.sign(w * n - t) * n).clamp(min=0.0)
    return w.to(torch.float32)
