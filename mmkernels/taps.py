"""Feature taps: the gradient-scaling tap (docs/methods/ogm_ge.md) and OPM's modality drop (docs/methods/opm.md).

grad_tap(feature, k): identity forward (a view, nothing allocated); the backward multiplies the gradient by k.
  This is how OGM, MLB and AGM scale an encoder's gradient without knowing its parameters.
modality_drop(features, q, seed=, offset=): per-sample per-modality Bernoulli(q_m) drop with the OPM rescale,
  the keep mask regenerated from (seed, offset) in the backward rather than stored.

Both validate here, once, and dispatch with mmkernels._backend.backend_for: Triton kernels on CUDA tensors
(custom ops `mmkernels::grad_scale` and `mmkernels::modality_drop_apply`, opaque to torch.compile, with fake
implementations), the reference (mmkernels/reference/taps.py) elsewhere. The drop's uniforms are the same on both:
the reference transcribes Triton's tl.rand Philox stream (mmkernels.reference.philox_uniforms_triton).
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional

import torch

from . import reference
from ._backend import backend_for, forced_backend, load_ext
from ._validate import as_modality_list, check_choice, check_coefficient, check_counter, check_float

RESCALE_MODES = ("official", "per_modality", "none")


# ============================================================================================ grad tap
@torch.library.custom_op("mmkernels::grad_scale", mutates_args=())
def grad_scale(grad: torch.Tensor, k: Optional[torch.Tensor], k_value: float) -> torch.Tensor:
    """k * grad (k a 1-element tensor, or the number k_value when k is None), in grad's dtype (fp32 math).

    Output strides: a dense grad keeps its layout; a grad with gaps comes back contiguous."""
    if backend_for(grad, op="grad_tap", available=("reference", "triton")) == "triton":
        from .triton_ops.grad_tap import grad_scale_triton

        return grad_scale_triton(grad, k, k_value)
    out = torch.empty_like(grad)
    torch.mul(grad, k.reshape(()) if k is not None else k_value, out=out)
    return out


@grad_scale.register_fake
def _grad_scale_fake(grad, k, k_value):
    return torch.empty_like(grad)


class _GradTap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feature, k, k_value):
        ctx.save_for_backward(k)
        ctx.k_value = k_value
        return feature.view_as(feature)

    @staticmethod
    def backward(ctx, grad):
        (k,) = ctx.saved_tensors
        return torch.ops.mmkernels.grad_scale(grad, k, ctx.k_value), None, None


def grad_tap(feature: torch.Tensor, k) -> torch.Tensor:
    """Identity in the forward (returns a view of `feature`, no copy); in the backward the gradient of `feature`
    is multiplied by k (docs/methods/ogm_ge.md, feature tap).

    feature: any float tensor [B, ...] (any strides). k: a 1-element float tensor on feature's device (e.g. a
    coefficient from balance_coefficients; read on the device, no host sync, never differentiated) or a number.
    """
    check_float(feature, "feature")
    if feature.dim() < 1:
        raise ValueError("feature must have a batch dimension [B, ...], got a 0-dim tensor")
    check_coefficient(k, feature)
    if isinstance(k, torch.Tensor):
        return _GradTap.apply(feature, k.detach(), 1.0)
    return _GradTap.apply(feature, None, float(k))


# ======================================================================================= modality drop
@torch.library.custom_op("mmkernels::modality_drop_apply", mutates_args=())
def modality_drop_apply(
    x: torch.Tensor, q: torch.Tensor, seed: int, offset: int, m_base: int, widths: List[int], rescale: int, p_exe: float
) -> torch.Tensor:
    """Triton drop of x [Mx, B, D] = modalities m_base .. m_base + Mx - 1 of len(widths); returns a contiguous
    tensor."""
    from .triton_ops.modality_drop import modality_drop_apply_triton

    return modality_drop_apply_triton(x, q, seed, offset, m_base, widths, rescale, p_exe)


@modality_drop_apply.register_fake
def _modality_drop_apply_fake(x, q, seed, offset, m_base, widths, rescale, p_exe):
    return x.new_empty(x.shape)


def _drop_setup(ctx, inputs, output):
    x, q, *rest = inputs
    ctx.save_for_backward(q)
    ctx.rest = rest


def _drop_backward(ctx, grad):
    # the same kernel on the gradient, same (seed, offset): the same mask and scale, regenerated, not stored
    (q,) = ctx.saved_tensors
    return (modality_drop_apply(grad, q, *ctx.rest),) + (None,) * 7


modality_drop_apply.register_autograd(_drop_backward, setup_context=_drop_setup)


def _reference_uniforms(seed: int, offset: int, num_modalities: int, batch: int, device) -> tuple:
    """Uniforms of the reference backend: Triton's tl.rand stream transcribed in PyTorch
    (mmkernels.reference.philox_uniforms_triton), so the same numbers as the Triton backend, bit for bit. On CPU with
    the extension built, the Philox words come from its C++ twin (mmkernels._C.philox_words: the same words, tested
    equal; about 30x faster than the transcription's ~100 small tensor ops)."""
    n = num_modalities * batch + 1
    ext = load_ext() if torch.device(device).type == "cpu" and forced_backend() != "reference" else None
    if ext is not None:
        u = reference.uniforms_from_words(ext.philox_words(int(seed), int(offset), n)[:, 0])
    else:
        u = reference.philox_uniforms_triton(seed, offset, n, device)
    return u[:-1].view(num_modalities, batch), u[-1]


def drop_uniforms(seed: int, offset: int, num_modalities: int, batch: int, device="cpu") -> tuple:
    """(u [M, B], u_gate []) fp32: the uniforms modality_drop draws on this device's backend for (seed, offset).

    Both backends (Philox, tl.rand's stream): u[m, i] = rand(seed, offset + m * B + i), u_gate = rand(seed, offset + M *
    B); the reference computes the same numbers as the Triton kernel (mmkernels.reference.philox_uniforms_triton).
    keep[m, i] = u[m, i] >= q_m; the drop runs iff u_gate < p_exe. Feed them to
    mmkernels.reference.modality_drop_ref to reproduce a call."""
    device = torch.device(device)
    if backend_for(torch.empty(0, device=device), op="modality_drop", available=("reference", "triton")) == "triton":
        from .triton_ops.modality_drop import drop_uniforms_triton

        return drop_uniforms_triton(seed, offset, num_modalities, batch, device)
    return _reference_uniforms(seed, offset, num_modalities, batch, device)


def modality_drop(
    features, q, *, seed: int, offset: int, rescale: str = "official", p_exe: float = 1.0, training: bool = True
):
    """OPM's modality drop (TPAMI Eq. 8 and Alg. 1; docs/methods/opm.md) on M per-modality features.

    features: a list of M tensors [B, ...] (widths may differ; returns a list) or one tensor [M, B, ...] (returns
    one tensor). q: drop probabilities [M] (a tensor on the features' device, e.g. balance_coefficients(...,
    "opm")["coefficients"]; detached) or a sequence of M numbers. keep[m, i] ~ Bernoulli(1 - q_m); a sample never
    loses every modality (all dropped -> all kept). rescale: 'official' (all kept features by 1/(1 - theta),
    theta = sum d_m q_m / sum d_m), 'per_modality' (1/(1 - q_m)) or 'none'. p_exe: the whole drop runs with this
    probability (a per-call draw from the same stream, decided on the device). (seed, offset) address the random
    stream (see drop_uniforms); the backward reuses the same mask. Identity when training is False.
    """
    xs, stacked = as_modality_list(features, "features")
    m, b = len(xs), xs[0].shape[0]
    device = xs[0].device
    if isinstance(q, torch.Tensor):
        if not q.is_floating_point() or q.numel() != m:
            raise ValueError(
                f"q must be a float tensor of {m} drop probabilities, got dtype {q.dtype} shape {tuple(q.shape)}"
            )
        if q.device != device:
            raise ValueError(f"q is on {q.device} but the features are on {device}")
        q = q.detach().reshape(m)
    else:
        try:
            vals = [float(v) for v in q]
        except TypeError:
            raise TypeError(f"q must be a tensor [M] or a sequence of M numbers, got {type(q).__name__}") from None
        if len(vals) != m or not all(0.0 <= v <= 1.0 for v in vals):
            raise ValueError(f"q must hold {m} probabilities in [0, 1], got {vals}")
        q = torch.tensor(vals, dtype=torch.float32, device=device)
    check_counter(seed, "seed")
    check_counter(offset, "offset")
    check_choice(rescale, RESCALE_MODES, "rescale")
    if isinstance(p_exe, bool) or not isinstance(p_exe, numbers.Real) or not 0.0 <= p_exe <= 1.0:
        raise ValueError(f"p_exe must be a probability in [0, 1], got {p_exe!r}")
    if not training or p_exe == 0.0:
        return features if stacked else list(features)

    widths = [math.prod(x.shape[1:]) for x in xs]
    mode = RESCALE_MODES.index(rescale)
    if b > 0 and backend_for(xs[0], q, op="modality_drop", available=("reference", "triton")) == "triton":
        if stacked:  # (B = 0: the reference below, which handles empty features)
            out = modality_drop_apply(features.reshape(m, b, -1), q, seed, offset, 0, widths, mode, float(p_exe))
            return out.view(features.shape)
        return [
            modality_drop_apply(x.reshape(1, b, -1), q, seed, offset, j, widths, mode, float(p_exe)).view(x.shape)
            for j, x in enumerate(xs)
        ]
    u, u_gate = _reference_uniforms(seed, offset, m, b, device)
    dropped = reference.modality_drop_ref(xs, q, u, rescale=rescale)
    run = u_gate < p_exe  # device-side gate, no host sync
    outs = [torch.where(run, d, x) for d, x in zip(dropped, xs)]
    return torch.stack(outs) if stacked else outs
