"""Gradient noise of OGM-GE: batch-covariance noise (TPAMI Eq. 13-17) and the authors' isotropic rule.

cov_noise_tap(feature, k, *, sigma=1.0, seed, offset)   docs/methods/ogm_ge.md
    Identity forward (a view, nothing allocated). Backward: row i of the incoming gradient times
    k + sigma * (z_i - mean(z)), z_i ~ N(0, 1). With a batch-mean loss this adds h = sigma/B sum_i (z_i - z_bar) g_i
    to every parameter gradient upstream of `feature`, and Cov(h) = sigma^2 U_hat / B, U_hat the mini-batch
    covariance of the per-sample gradients g_i (TPAMI Eq. 16), without computing them. BatchNorm (or anything
    that mixes rows) upstream of the tap makes the identity approximate.
sample_cov_noise(per_sample_grads, *, seed, offset)      docs/methods/ogm_ge.md
    h = (z - mean z)^T G / B from explicit per-sample gradients G [B, P]; the same z as cov_noise_tap with the same
    (seed, offset), so the two agree exactly when G holds the per-sample gradients behind the tap.
ge_isotropic_(grads, k, *, seed, offset, group_index=None) docs/methods/ogm_ge.md (authors' OGM-GE code)
    In place for every tensor t: grad_t = k_t * grad_t + N(0, (std_t + 1e-8)^2), std_t the unbiased std of the
    unmodulated grad_t (0 for a tensor with fewer than 2 elements), k read on the device. Two multi-tensor passes
    over all tensors, no host sync.

Randomness (docs/architecture.md): (seed, offset) address a counter-based Philox4x32-10 stream (csrc/philox.h). The
extension backend (C++ CPU twins and CUDA kernels) gives the same z on CPU and CUDA: z_i is normal n0 of counter
offset + i; ge_isotropic_ takes normal (base_t + j) % 4 of counter offset + (base_t + j) // 4 for element j of
tensor t, base_t = sum_{s<t} 4 ceil(numel_s / 4). A call consumes B counters (tap, sample_cov_noise) or
sum_t ceil(numel_t / 4) (ge_isotropic_): advance `offset` by at least that between calls. Under DDP the caller
seeds the tap per rank (seed, step, rank) and ge_isotropic_ identically on every rank (seed, step).
The reference backend (extension missing, or MMKERNELS_BACKEND=reference) draws the same normals from a PyTorch
transcription of the same stream (mmkernels.reference.philox_normals / philox_ge_normals): the same z on every
backend and device for the same (seed, offset) (bit-identical in the tests; at most 1 fp32 ulp apart where the
double log/cos/sin of torch, the C library, SLEEF (the CPU twins' vector paths) or CUDA round differently). Only the
arithmetic after the draw may differ in the last bits (the reference's fp32 mean and std against the extension's
double accumulation).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from . import reference
from ._backend import backend_for
from ._validate import check_coefficient, check_counter, check_float, check_nonneg
from .ext_ops import cov_noise as _cov_ops  # registers mmkernels::cov_noise_tap_backward, ::sample_cov_noise
from .ext_ops import ge_isotropic as _ge_ops  # registers mmkernels::ge_isotropic_

_OPS = ("reference", "ext")


def _reference_normals(batch: int, seed: int, offset: int, device) -> torch.Tensor:
    """z [B] fp32 on the reference backend: normal n0 of Philox positions offset + i (the extension's z)."""
    return reference.philox_normals(seed, offset, batch, device)[:, 0].contiguous()


def cov_noise_normals(batch: int, *, seed: int, offset: int, device="cpu") -> torch.Tensor:
    """z [B] fp32: the normals cov_noise_tap and sample_cov_noise draw for (seed, offset): n0 of Philox position
    offset + i, the same numbers on every backend (the extension's kernel, or the reference's transcription)."""
    check_counter(seed, "seed")
    check_counter(offset, "offset")
    device = torch.device(device)
    if backend_for(torch.empty(0, device=device), op="cov_noise_tap", available=_OPS) == "ext":
        return _cov_ops.philox_normals(seed, offset, batch, device)[:, 0].contiguous()
    return _reference_normals(batch, seed, offset, device)


def _as_k_tensor(k, feature: torch.Tensor) -> torch.Tensor:
    """k (checked) as a 0-dim float tensor on feature's device (a number becomes one; a tensor is only
    detached/reshaped)."""
    check_coefficient(k, feature)
    if isinstance(k, torch.Tensor):
        if k.dim() == 0 and not k.requires_grad:  # already what the op takes: no view ops (host time per call)
            return k
        return k.detach().reshape(())
    return torch.full((), float(k), dtype=torch.float32, device=feature.device)


class _CovNoiseTap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feature, k, sigma, seed, offset, backend):
        ctx.save_for_backward(k)
        ctx.cfg = (sigma, seed, offset, backend)
        return feature.view_as(feature)

    @staticmethod
    def backward(ctx, grad):
        (k,) = ctx.saved_tensors
        sigma, seed, offset, backend = ctx.cfg
        if backend == "ext" and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # eager, no double backward: the extension directly (the custom op's dispatch costs more host time
            # than the whole kernel at small shapes); same function, same bits
            g = _cov_ops.ext().cov_noise_tap_backward(grad.contiguous(), k, sigma, seed, offset)
        elif backend == "ext":  # create_graph=True or traced: the differentiable, traceable custom op
            g = torch.ops.mmkernels.cov_noise_tap_backward(grad, k, sigma, seed, offset)
        else:
            z = _reference_normals(grad.shape[0], seed, offset, grad.device)
            g = reference.cov_noise_tap_backward(grad, k, z, sigma=sigma)
        return g, None, None, None, None, None


def cov_noise_tap(feature: torch.Tensor, k, *, sigma: float = 1.0, seed: int, offset: int) -> torch.Tensor:
    """Identity forward; backward multiplies row i of the gradient by k + sigma * (z_i - mean z) (module docstring).

    feature: float tensor [B, ...] (fp32/fp16/bf16/fp64, any strides), B > 0. k: the modality's coefficient, a
    1-element float tensor on feature's device (read on the device, never differentiated) or a number.
    sigma >= 0: noise scale (1 = TPAMI Eq. 16). seed, offset: the Philox stream (B counters from offset).
    """
    check_float(feature, "feature")
    if feature.dim() < 1 or feature.shape[0] == 0:
        raise ValueError(f"feature must have shape [B, ...] with B > 0, got shape {tuple(feature.shape)}")
    k = _as_k_tensor(k, feature)
    check_nonneg(sigma, "sigma")
    if not math.isfinite(sigma):
        raise ValueError(f"sigma must be finite, got {sigma!r}")
    check_counter(seed, "seed")
    check_counter(offset, "offset")
    backend = backend_for(feature, k, op="cov_noise_tap", available=_OPS)
    return _CovNoiseTap.apply(feature, k, float(sigma), int(seed), int(offset), backend)


def sample_cov_noise(per_sample_grads: torch.Tensor, *, seed: int, offset: int) -> torch.Tensor:
    """h = (z - mean z)^T G / B (docs/methods/ogm_ge.md) from per-sample gradients G [B, P]
    (e.g. torch.func.vmap(grad)).

    Returns [P] fp32 (fp64 for fp64 G); z as in cov_noise_tap for the same (seed, offset). Not differentiable.
    """
    check_float(per_sample_grads, "per_sample_grads")
    if per_sample_grads.dim() != 2 or per_sample_grads.shape[0] == 0:
        raise ValueError(
            f"per_sample_grads must have shape [B, P] with B > 0, got shape {tuple(per_sample_grads.shape)}"
        )
    check_counter(seed, "seed")
    check_counter(offset, "offset")
    G = per_sample_grads.detach()
    if backend_for(G, op="sample_cov_noise", available=_OPS) == "ext":
        return _cov_ops.sample_cov_noise(G, int(seed), int(offset))
    z = _reference_normals(G.shape[0], seed, offset, G.device)
    out = reference.cov_noise_from_per_sample(G, z)
    return out.to(torch.float64 if G.dtype == torch.float64 else torch.float32)


def _check_grads(grads, name: str = "grads") -> List[torch.Tensor]:
    if isinstance(grads, torch.Tensor) or not isinstance(grads, (list, tuple)):
        raise TypeError(f"{name} must be a list of gradient tensors, got {type(grads).__name__}")
    gs = list(grads)
    for i, g in enumerate(gs):
        if g is None:
            raise TypeError(f"{name}[{i}] is None (a parameter without a gradient); leave it out of the list")
        check_float(g, f"{name}[{i}]")
        if not g.is_contiguous():
            raise ValueError(
                f"{name}[{i}] must be contiguous (it is updated in place), got shape {tuple(g.shape)} "
                f"with strides {g.stride()}"
            )
        if g.device != gs[0].device:
            raise ValueError(
                f"{name}[{i}] is on {g.device} but {name}[0] is on {gs[0].device}; all tensors must share a device"
            )
    return gs


def _ge_arguments(grads, k, seed: int, offset: int, group_index):
    """ge_isotropic_'s checked arguments: (grads as a list, k as a flat device tensor, group_index as a list)."""
    gs = _check_grads(grads)
    check_counter(seed, "seed")
    check_counter(offset, "offset")
    if not gs:
        return gs, k, []
    device = gs[0].device
    if isinstance(k, torch.Tensor):
        if not k.is_floating_point():
            raise TypeError(f"k must be a floating tensor, got dtype {k.dtype}")
        if k.device != device:
            raise ValueError(f"k is on {k.device} but grads are on {device}; put k on the gradients' device")
        k = k.detach().reshape(-1)
    else:
        try:
            k = torch.tensor([float(v) for v in k], dtype=torch.float32, device=device)
        except TypeError:
            raise TypeError(f"k must be a tensor or a sequence of numbers, got {type(k).__name__}") from None
    T = len(gs)
    if group_index is None:
        if k.numel() != T:
            raise ValueError(
                f"k must hold one value per tensor ({T}) when group_index is not given, got {k.numel()} values"
            )
        groups: List[int] = []
    else:
        groups = [int(g) for g in group_index]
        if len(groups) != T:
            raise ValueError(f"group_index must have one entry per tensor ({T}), got {len(groups)}")
        bad = [g for g in groups if not 0 <= g < k.numel()]
        if bad:
            raise ValueError(
                f"group_index entries must be in [0, {k.numel()}) (k has {k.numel()} values), got {bad[0]}"
            )
    return gs, k, groups


def ge_isotropic_(
    grads: Sequence[torch.Tensor], k, *, seed: int, offset: int, group_index: Optional[Sequence[int]] = None
) -> List[torch.Tensor]:
    """The authors' OGM-GE rule over many gradient tensors, in place (module docstring). Returns `grads` as a list.

    grads: T contiguous float tensors on one device (e.g. [p.grad for p in encoder.parameters()]).
    k: device tensor of coefficients, [T] (one per tensor) or, with group_index, [G] (e.g. the M per-modality
       coefficients) with group_index[t] in [0, G) naming tensor t's entry (a list of ints, host data).
       A sequence of numbers is accepted too. Read on the device: no host sync.
    seed, offset: the Philox stream, identical on every DDP rank so replicas stay equal.
    A tensor with a single element (a PReLU weight, a scalar bias) has no unbiased std: it is defined as 0 (noise
    1e-8 * n), on every backend; torch.std and the authors' loop would give NaN and a NaN parameter.
    """
    gs, k, groups = _ge_arguments(grads, k, seed, offset, group_index)
    if not gs:
        return gs
    device = gs[0].device
    if backend_for(*gs, k, op="ge_isotropic_", available=_OPS) == "ext":
        _ge_ops.ge_isotropic_(gs, k, groups, int(seed), int(offset))
        return gs
    kt = k if not groups else k[torch.tensor(groups, device=device)]
    flat = reference.philox_ge_normals([g.numel() for g in gs], seed, offset, device)
    normals = [n.view(g.shape) for n, g in zip(flat, gs)]
    with torch.no_grad():
        for g, new in zip(gs, reference.ge_isotropic(gs, kt, normals)):
            g.copy_(new)
    return gs


def _ge_normals_at(first: int, count: int, seed: int, offset: int, device, backend: str) -> torch.Tensor:
    """fp32 [count]: the GE normals of stream indices first .. first + count - 1 (index i is slot i % 4 of Philox
    position offset + i // 4), drawn by the extension's kernel or the reference's transcription (the same numbers)."""
    lo, hi = first // 4, (first + count + 3) // 4
    if backend == "ext":
        z = _cov_ops.philox_normals(seed, offset + lo, hi - lo, device)
    else:
        z = reference.philox_normals(seed, offset + lo, hi - lo, device)
    return z.reshape(-1)[first - 4 * lo : first - 4 * lo + count]


def ge_isotropic_shards_(
    shards: Sequence[torch.Tensor],
    k,
    *,
    seed: int,
    offset: int,
    numels: Sequence[int],
    starts: Sequence[int],
    all_reduce,
    group_index: Optional[Sequence[int]] = None,
) -> List[torch.Tensor]:
    """ge_isotropic_ on shards of the gradients (FSDP2: each rank holds a contiguous slice of every tensor), in place,
    with the numbers ge_isotropic_ gives on the full tensors:

    shards[t]: the local slice of tensor t, elements starts[t] .. starts[t] + shards[t].numel() - 1 of its flattened
    full tensor of numels[t] elements. all_reduce(x): sums a small fp64 tensor over the ranks holding the other
    slices, in place (called once, by every rank). std_t = unbiased std over the full tensor from the reduced
    (sum, sum of squares) [T, 2]; the normal of element j is the one ge_isotropic_ draws for the full tensor's
    element starts[t] + j (Philox addressed by the global index), so a sharded run draws the unsharded numbers.
    std agrees with ge_isotropic_'s to fp32 rounding (one fp64 pass here, fp32 two-pass torch.std in the reference).
    """
    gs, k, groups = _ge_arguments(shards, k, seed, offset, group_index)
    if len(numels) != len(gs) or len(starts) != len(gs):
        raise ValueError(f"numels and starts must have one entry per shard ({len(gs)})")
    if not gs:
        all_reduce(torch.zeros(0, 2, dtype=torch.float64))
        return gs
    device = gs[0].device
    backend = backend_for(*gs, k, op="ge_isotropic_", available=_OPS)
    kt = k if not groups else k[torch.tensor(groups, device=device)]
    with torch.no_grad():
        stats = torch.stack([torch.stack([g.double().sum(), g.double().square().sum()]) for g in gs])
        all_reduce(stats)  # [T, 2]: (sum, sum of squares) over the full tensors
        n = torch.tensor([float(v) for v in numels], dtype=torch.float64, device=device)
        var = (stats[:, 1] - stats[:, 0] * stats[:, 0] / n).clamp_min(0) / (n - 1).clamp_min(1)
        std = torch.where(n >= 2, var.sqrt(), torch.zeros_like(var)) + reference.GE_STD_EPS
        base = 0
        for t, g in enumerate(gs):
            z = _ge_normals_at(base + int(starts[t]), g.numel(), seed, offset, device, backend)
            acc = torch.float64 if g.dtype == torch.float64 else torch.float32
            new = kt[t].to(acc) * g.to(acc) + std[t].to(acc) * z.to(acc).view(g.shape)
            g.copy_(new)
            base += 4 * ((int(numels[t]) + 3) // 4)
    return gs
