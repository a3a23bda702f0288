"""Unimodal logits from a fused head: concatenation, summation and zero-out conventions (docs/methods/README.md)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ._common import _acc, _acc_like

__all__ = ["concat_unimodal_logits", "summation_unimodal_logits", "zero_out_unimodal_logits"]


# ----------------------------------------------------------------------------------------------- unimodal logits
def concat_unimodal_logits(feats, weight: torch.Tensor, bias: torch.Tensor | None, *, gamma=None) -> torch.Tensor:
    """Unimodal logits of a concatenation head (TPAMI Eq. 6, Sec. 4.5.2): u_m = feat_m W_m^T + gamma_m * b.

    feats: M tensors [B, D_m]; weight [C, sum_m D_m] = [W_1 ... W_M]; bias [C] or None; gamma [M] (default 1/M each).
    Returns [M, B, C] in the features' dtype (matmul accumulated in fp32; fp64 stays fp64). Differentiable.
    """
    xs = list(feats)
    m = len(xs)
    widths = [x.shape[-1] for x in xs]
    out_dtype = xs[0].dtype
    ws = _acc(weight).split(widths, dim=1)
    u = torch.stack([_acc(x) @ w_m.t() for x, w_m in zip(xs, ws)])  # [M, B, C]
    if bias is not None:
        g = torch.full((m,), 1.0 / m, dtype=u.dtype, device=u.device) if gamma is None else _acc_like(gamma, u).view(m)
        u = u + g.view(m, 1, 1) * _acc(bias).view(1, 1, -1)
    return u.to(out_dtype)


def summation_unimodal_logits(feats, heads: Sequence[Callable]) -> torch.Tensor:
    """Summation fusion (docs/architecture.md): u_m = head_m(feat_m), each head with its own full bias. Returns [M, B,
    C]."""
    return torch.stack([h(x) for h, x in zip(heads, feats)])


def zero_out_unimodal_logits(head: Callable, feats) -> torch.Tensor:
    """Zero-out unimodal estimate for a multi-layer head (TPAMI Sec. 4.3.7): u_m = head(feats with all j != m zeroed).

    head: callable on a list of M tensors [N, D_j] -> [N, C]. The M zeroed copies are concatenated along the batch
    (copy m = rows m*B .. (m+1)*B - 1) and the head is called ONCE. Returns [M, B, C].
    """
    xs = list(feats)
    m, b = len(xs), xs[0].shape[0]
    eye = torch.eye(m, dtype=torch.bool, device=xs[0].device)
    batched = []
    for j, x in enumerate(xs):  # loop over modalities, not rows
        keep = eye[:, j].view((m,) + (1,) * x.dim())
        batched.append(
            torch.where(keep, x.unsqueeze(0), torch.zeros((), dtype=x.dtype, device=x.device)).reshape(
                (m * b,) + tuple(x.shape[1:])
            )
        )
    out = head(batched)
    return out.reshape((m, b) + tuple(out.shape[1:]))
