"""AGM's Shapley values (ICCV 2023 Eq. 1-3): subset weights, the combination, masked inputs (docs/methods/agm.md)."""

from __future__ import annotations

import torch

from ._common import _acc

__all__ = ["shapley_weights", "shapley_combine", "shapley_masked_inputs", "shapley_subset_grad_scale"]


# ----------------------------------------------------------------------------------------------- Shapley (AGM Eq. 1-3)
def _subset_bits(m: int, device=None) -> torch.Tensor:
    """bits[S-1, j] = True iff modality j is in subset S, S = 1 .. 2^M - 1 (bitmask order)."""
    s = torch.arange(1, 2**m, device=device)
    return ((s.view(-1, 1) >> torch.arange(m, device=device).view(1, -1)) & 1).bool()


def shapley_weights(num_modalities: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """W [2^M - 1, M]: W[S-1, m] = coefficient of v(S) in the Shapley value phi_m, with v(empty) := 0 (AGM Eq. 1-2).

    phi_m = sum_{T not containing m} |T|! (M-|T|-1)! / M! * (v(T + m) - v(T)), hence
    W[S-1, m] =  (|S|-1)! (M-|S|)! / M!   if m in S
    W[S-1, m] = -|S|! (M-|S|-1)! / M!     otherwise.
    Efficiency, sum_m phi_m = v(all): the row of the full set (index 2^M - 2) sums to 1, every other row to 0.
    """
    m = num_modalities
    # 0!, 1!, ..., M! built on the device (exact in fp64): no host data to upload, so no copy that syncs on CUDA
    fact = torch.arange(m + 1, dtype=torch.float64, device=device).clamp(min=1).cumprod(0)
    bits = _subset_bits(m, device)
    size = bits.sum(dim=1, keepdim=True).expand(-1, m)
    pos = fact[size - 1] * fact[m - size] / fact[m]
    neg = -fact[size] * fact[(m - size - 1).clamp(min=0)] / fact[m]
    return torch.where(bits, pos, neg).to(dtype)


def _num_modalities_from_subsets(n: int) -> int:
    m = (n + 1).bit_length() - 1
    if 2**m - 1 != n:
        raise ValueError(f"the number of subset outputs must be 2^M - 1, got {n}")
    return m


def shapley_combine(subset_outputs: torch.Tensor) -> torch.Tensor:
    """Shapley mono-modal responses (AGM Eq. 1-3): phi[m] = sum_S W[S-1, m] * f(S).

    subset_outputs [2^M - 1, B, ...] (index S-1 = model output with only the modalities of bitmask S present; the
    last one is the full model). Returns phi [M, B, ...] in the input dtype, accumulated in fp32 (fp64 for fp64).
    """
    n = subset_outputs.shape[0]
    m = _num_modalities_from_subsets(n)
    x = _acc(subset_outputs)
    w = shapley_weights(m, dtype=x.dtype, device=x.device)
    phi = (w.t() @ x.reshape(n, -1)).reshape((m,) + tuple(subset_outputs.shape[1:]))
    return phi.to(subset_outputs.dtype)


def shapley_masked_inputs(inputs, fill=None) -> list:
    """Batched masked inputs of the muted subsets S = 1 .. 2^M - 2 (full set excluded), in bitmask order.

    inputs: M tensors [B, ...] (shapes may differ after B). Returns M tensors [(2^M - 2) * B, ...]: block S-1
    (rows (S-1)*B .. S*B-1) holds modality m's input iff bit m of S is set, else zeros (AGM: zero-padding 0^m),
    or fill[m] when fill is given: M tensors [1, ...] or [...] (one row of modality m; e.g. enc_m(0) for muted
    features). Differentiable in inputs and fill (fill[m] gets the gradient summed over its muted rows).
    """
    xs = list(inputs)
    m = len(xs)
    bits = _subset_bits(m, xs[0].device)[:-1]  # [2^M - 2, M]
    out = []
    for j, x in enumerate(xs):  # loop over modalities, not rows
        keep = bits[:, j].view((-1,) + (1,) * x.dim())
        if fill is None:
            other = torch.zeros((), dtype=x.dtype, device=x.device)
        else:
            other = fill[j].reshape((1, 1) + tuple(x.shape[1:]))  # one row, broadcast over blocks and rows
        blk = torch.where(keep, x.unsqueeze(0), other)
        out.append(blk.reshape((-1,) + tuple(x.shape[1:])))
    return out


def shapley_subset_grad_scale(kappa) -> torch.Tensor:
    """c(S) = sum_m kappa_m W[S-1, m], [2^M - 1] fp32: the factor on the gradient reaching the output of subset S
    when the gradient reaching phi_m is scaled by kappa_m (AGM Eq. 6)."""
    k = _acc(kappa)
    w = shapley_weights(k.shape[0], dtype=k.dtype, device=k.device)
    return (w @ k).to(torch.float32)
