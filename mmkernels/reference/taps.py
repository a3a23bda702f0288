"""OPM's modality drop (TPAMI Eq. 8, Alg. 1) and the gradient tap (docs/methods/opm.md, docs/methods/ogm_ge.md)."""

from __future__ import annotations

import math

import torch

from ._common import _acc, _acc_like

__all__ = ["modality_drop_ref", "grad_tap_backward"]


# ----------------------------------------------------------------------------------------------- modality drop (OPM)
def modality_drop_ref(features, q, uniforms: torch.Tensor, *, rescale: str = "official", execute: bool = True) -> list:
    """OPM modality drop (TPAMI Alg. 1, docs/methods/opm.md) on M feature tensors [B, ...] (widths may differ).

    keep[m, i] = uniforms[m, i] >= q[m] (so P(drop) = q_m); a row where no modality is kept keeps all of them.
    Kept entries are scaled, dropped entries are 0:
      'official'    : every kept entry by 1/(1 - theta), theta = sum_m d_m q_m / sum_m d_m, d_m = elements per row of m
      'per_modality': kept entries of modality m by 1/(1 - q_m)
      'none'        : no scaling.
    A denominator of 0 (q_m = 1, or theta = 1) gives scale 1 instead of inf (only the fallback rows can then be kept).
    execute False -> the features unchanged (the p_exe gate is decided by the caller). Returns a list of M tensors
    in the features' dtypes (scaled in fp32, fp64 for fp64).
    """
    xs = list(features)
    if not execute:
        return xs
    m = len(xs)
    u = _acc(uniforms)
    qq = _acc_like(q, u).view(m)
    keep = u >= qq.view(m, 1)  # [M, B]
    keep = keep | ~keep.any(dim=0, keepdim=True)
    one = torch.ones((), dtype=u.dtype, device=u.device)
    if rescale == "official":
        d = torch.tensor(
            [float(x[0].numel()) if x.shape[0] > 0 else float(math.prod(x.shape[1:])) for x in xs],
            dtype=u.dtype,
            device=u.device,
        )
        theta = (d * qq).sum() / d.sum()
        scale = torch.where(theta < 1.0, 1.0 / (1.0 - theta), one).expand(m)
    elif rescale == "per_modality":
        scale = torch.where(qq < 1.0, 1.0 / (1.0 - qq), one)
    elif rescale == "none":
        scale = one.expand(m)
    else:
        raise ValueError(f"rescale must be 'official', 'per_modality' or 'none', got {rescale!r}")
    out = []
    for j, x in enumerate(xs):  # loop over modalities, not rows
        shape = (-1,) + (1,) * (x.dim() - 1)
        xa = _acc(x)
        y = torch.where(
            keep[j].view(shape), xa * scale[j].to(xa.dtype), torch.zeros((), dtype=xa.dtype, device=x.device)
        )
        out.append(y.to(x.dtype))
    return out


# ----------------------------------------------------------------------------------------------- grad tap
def grad_tap_backward(grad: torch.Tensor, k) -> torch.Tensor:
    """Backward of the feature tap (docs/methods/ogm_ge.md): grad * k (k a number or 0-d tensor), in grad's dtype."""
    g = _acc(grad)
    return (g * _acc_like(k, g)).to(grad.dtype)
