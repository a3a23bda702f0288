"""OGM-GE's generalisation enhancement noise: the covariance tap and the isotropic parameter noise
(docs/methods/ogm_ge.md)."""

from __future__ import annotations

import torch

from ._common import GE_STD_EPS, _acc, _acc_like

__all__ = ["cov_noise_row_factor", "cov_noise_tap_backward", "cov_noise_from_per_sample", "ge_isotropic"]


# ------------------------------------------------------------------------------------ noise (docs/methods/ogm_ge.md)
def cov_noise_row_factor(k, z: torch.Tensor, *, sigma: float = 1.0) -> torch.Tensor:
    """Row factor of the covariance-noise tap (docs/methods/ogm_ge.md, TPAMI Eq. 13-17): k + sigma * (z_i - mean(z)),
    [B] fp32 (fp64 when z is fp64).

    Multiplying row i of the feature gradient of a batch-mean loss by this factor adds
    h = 1/B sum_i sigma (z_i - z_bar) g_i to every encoder parameter gradient, Cov(h) ~ sigma^2 U_hat / B.
    """
    zz = _acc(z)
    return _acc_like(k, zz) + sigma * (zz - zz.mean())


def cov_noise_tap_backward(grad: torch.Tensor, k, z: torch.Tensor, *, sigma: float = 1.0) -> torch.Tensor:
    """Backward of the covariance-noise tap: grad [B, ...] * row_factor[B] broadcast over trailing dims, in grad's dtype
    (computed in fp32, fp64 for fp64)."""
    g = _acc(grad)
    rf = cov_noise_row_factor(k, z, sigma=sigma).to(g.dtype).view((-1,) + (1,) * (g.dim() - 1))
    return (g * rf).to(grad.dtype)


def cov_noise_from_per_sample(per_sample_grads: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """docs/methods/ogm_ge.md: h = (z - z_bar)^T G / B from explicit per-sample gradients G [B, P] and normals z [B] ->
    [P]
    (G's accumulation dtype: fp32, fp64 for fp64)."""
    g = _acc(per_sample_grads)
    zc = _acc(z).to(g.dtype)
    zc = zc - zc.mean()
    return (zc @ g) / g.shape[0]


def ge_isotropic(grads, k, normals) -> list:
    """Parameter-mode GE as in the authors' OGM-GE code (docs/methods/ogm_ge.md): g <- k * g + (std(g) + 1e-8) * n per
    tensor, std = unbiased std of the unmodulated grad over all its elements, n ~ N(0, 1) given (same shapes as grads).
    A tensor with fewer than 2 elements (a PReLU weight, a scalar bias) has no unbiased std: it is defined as 0 here
    (noise 1e-8 * n), where torch.std (and the authors' loop) would give NaN and turn the parameter into NaN.

    grads: list of T tensors; k: T numbers / 0-d tensors or a tensor [T]; normals: list of T tensors.
    Returns a new list in each grad's dtype (computed in fp32, fp64 for fp64). The loop is over tensors, not rows.
    """
    out = []
    for i, (g, n) in enumerate(zip(grads, normals)):
        ga = _acc(g)
        ki = _acc_like(k[i], ga)
        std = (ga.std(unbiased=True) if ga.numel() >= 2 else ga.new_zeros(())) + GE_STD_EPS
        out.append((ki * ga + std * _acc(n).to(ga.dtype)).to(g.dtype))
    return out
