"""The public mmkernels ops the balancers call, in one place (no math here).

Each name below forwards to the public op module (mmkernels.coefficients, .taps, .noise, .shapley). While a
module has not landed yet, a thin stand-in built only from mmkernels.reference keeps the API usable; every
stand-in is marked `# stand-in` and computes the reference's numbers (its random draws come from a seeded
torch.Generator instead of the kernels' Philox stream).
"""
from __future__ import annotations

import torch

from mmkernels import reference
from mmkernels.coefficients import balance_coefficients  # noqa: F401  (public op, DESIGN sec. 3)

try:  # DESIGN 4.1 feature tap and 4.4 modality drop
    from mmkernels.taps import grad_tap as _grad_tap, modality_drop as _modality_drop
except ImportError:  # pragma: no cover - until mmkernels/taps.py lands
    _grad_tap = _modality_drop = None
try:  # DESIGN 4.1 covariance-noise tap and 4.2 parameter-mode GE
    from mmkernels.noise import cov_noise_tap as _cov_noise_tap, ge_isotropic_ as _ge_isotropic_
except ImportError:  # pragma: no cover
    _cov_noise_tap = _ge_isotropic_ = None
try:  # DESIGN 4.5 Shapley forward
    from mmkernels.shapley import shapley_masked_batch as _masked_batch, shapley_responses as _responses
except ImportError:  # pragma: no cover
    _masked_batch = _responses = None


def _gen(seed: int, offset: int, device) -> torch.Generator:  # stand-in randomness
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(offset)) % (2 ** 63))
    return g


class _ScaleGrad(torch.autograd.Function):  # stand-in for mmkernels.taps.grad_tap
    @staticmethod
    def forward(ctx, x, k):
        ctx.save_for_backward(k)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (k,) = ctx.saved_tensors
        return reference.grad_tap_backward(g, k), None


class _CovTap(torch.autograd.Function):  # stand-in for mmkernels.noise.cov_noise_tap
    @staticmethod
    def forward(ctx, x, k, sigma, seed, offset):
        ctx.save_for_backward(k)
        ctx.cfg = (sigma, seed, offset)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (k,) = ctx.saved_tensors
        sigma, seed, offset = ctx.cfg
        z = torch.randn(g.shape[0], generator=_gen(seed, offset, g.device), device=g.device)
        return reference.cov_noise_tap_backward(g, k, z, sigma=sigma), None, None, None, None


def grad_tap(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Identity forward; backward multiplies the gradient by k (0-d device tensor). DESIGN 4.1."""
    if _grad_tap is not None:
        return _grad_tap(x, k)
    return _ScaleGrad.apply(x, k)  # stand-in


def cov_noise_tap(x: torch.Tensor, k: torch.Tensor, *, sigma: float, seed: int, offset: int) -> torch.Tensor:
    """Identity forward; backward multiplies row i by k + sigma (z_i - mean z), z from (seed, offset). DESIGN 4.1."""
    if _cov_noise_tap is not None:
        return _cov_noise_tap(x, k, sigma=sigma, seed=seed, offset=offset)
    return _CovTap.apply(x, k, sigma, seed, offset)  # stand-in


def ge_isotropic_(grads: list, k: torch.Tensor, *, seed: int, offset: int) -> None:
    """In place: g <- k_t g + (std(g) + 1e-8) n, per tensor t (authors' OGM-GE, DESIGN 4.2). k [T] device tensor."""
    if _ge_isotropic_ is not None:
        _ge_isotropic_(grads, k, seed=seed, offset=offset)
        return
    gen = _gen(seed, offset, grads[0].device)  # stand-in
    normals = [torch.randn(g.shape, generator=gen, device=g.device, dtype=torch.float32) for g in grads]
    for g, new in zip(grads, reference.ge_isotropic(grads, k, normals)):
        g.copy_(new)


def modality_drop(feats: list, q: torch.Tensor, *, seed: int, offset: int, rescale: str, p_exe: float) -> list:
    """OPM drop (DESIGN 4.4): per-row per-modality Bernoulli(q_m) drops, a row never loses every modality; the whole
    drop runs with probability p_exe (decided on the device)."""
    if _modality_drop is not None:
        return list(_modality_drop(feats, q, seed=seed, offset=offset, rescale=rescale, p_exe=p_exe))
    u = torch.rand(len(feats), feats[0].shape[0], generator=_gen(seed, offset, feats[0].device),
                   device=feats[0].device)  # stand-in
    return reference.modality_drop_ref(feats, q.detach(), u, rescale=rescale)


def shapley_masked_batch(inputs: list) -> list:
    """Zero-masked inputs of the muted subsets S = 1 .. 2^M - 2, batched: M tensors [(2^M - 2) B, ...]. AGM Eq. 1-3."""
    if _masked_batch is not None:
        return list(_masked_batch(inputs))
    return reference.shapley_masked_inputs(inputs)  # stand-in (differentiable torch.where)


def shapley_fused(subset_outputs: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """sum_m phi_m (= f(all)) whose backward sends c(S) g = sum_m kappa_m W[S-1, m] g to subset S (AGM Eq. 6)."""
    if _responses is not None:
        return _responses(subset_outputs, kappa).sum(0)
    phi = reference.shapley_combine(subset_outputs)  # stand-in: phi_m, then a per-modality tap by kappa_m
    return torch.stack([grad_tap(phi[m], kappa[m]) for m in range(phi.shape[0])]).sum(0)


def shapley_combine(subset_outputs: torch.Tensor) -> torch.Tensor:
    """phi [M, B, ...] from the subset outputs [2^M - 1, B, ...] (AGM Eq. 1-3); used on detached outputs for scores."""
    return reference.shapley_combine(subset_outputs)
