"""AGM's Shapley forwards (ICCV 2023, Eq. 1-3; docs/methods/agm.md), batched.

Subsets of modalities are bitmasks S = 1 .. 2^M - 1 (bit m set = modality m present), always in that order,
subset S at index S - 1; the full set is the last one (index 2^M - 2).

shapley_masked_batch(inputs, *, include_full=False, fill=None)
    The zero-masked copies of the M inputs for every muted subset S = 1 .. 2^M - 2, stacked along the batch in one
    launch: run the model ONCE on them (block S - 1 = rows (S-1)B .. SB-1) instead of 2^M - 2 muted forwards.
    include_full=True appends the full set as a last block (2^M - 1 blocks) for a single pass over all subsets.
    fill: M tensors, one row of each modality ([1, ...] or [...]): muted rows of modality m hold fill[m] instead
    of zeros (e.g. enc_m(0) when masking features: the features of a zero input).
    Differentiable (for features with encoder reuse): input m's gradient is the sum over the blocks keeping it,
    fill[m]'s the sum over every row of the blocks muting it.
shapley_responses(subset_outputs, kappa=None)
    The model's outputs on all 2^M - 1 non-empty subsets [2^M - 1, B, ...] (v(empty) = 0) -> phi [M, B, ...],
    phi_m = sum_S w_m(S) v(S), sum_m phi_m = v(full) (Shapley efficiency). In the backward the gradient reaching
    phi_m is scaled by kappa_m: subset S receives sum_m kappa_m w_m(S) grad_phi_m, which is c(S) g when the loss
    is taken on sum_m phi_m (AGM Eq. 6). kappa: device tensor [M] (detached) or None (exact gradient).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from . import reference
from ._backend import backend_for
from ._validate import as_modality_list, check_float, check_num_modalities, modalities_of_subsets
from .ext_ops import shapley as _ops  # registers mmkernels::shapley_masked_batch, ::shapley_responses(_backward)

_OPS = ("reference", "ext")


def subset_masks(num_modalities: int) -> List[List[bool]]:
    """The documented subset order: entry S - 1 lists, per modality m, whether bit m of S is set (S = 1 .. 2^M - 1)."""
    check_num_modalities(num_modalities)
    return [[bool((s >> m) & 1) for m in range(num_modalities)] for s in range(1, 2**num_modalities)]


def _check_inputs(inputs) -> tuple:
    xs, stacked = as_modality_list(inputs, "inputs", same_dtype=False)  # float dtypes may differ per modality
    if xs[0].shape[0] == 0:
        raise ValueError("inputs must have a non-empty batch (B > 0), got B = 0")
    return xs, stacked


def _check_fill(fill, xs) -> Optional[List[torch.Tensor]]:
    if fill is None:
        return None
    if not isinstance(fill, (list, tuple)):
        raise TypeError(
            f"fill must be None or a list of {len(xs)} tensors (one row per modality), got {type(fill).__name__}"
        )
    if len(fill) != len(xs):
        raise ValueError(f"fill must hold one tensor per modality ({len(xs)}), got {len(fill)}")
    for m, (f, x) in enumerate(zip(fill, xs)):
        name = f"fill[{m}]"
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(f).__name__}")
        row = tuple(x.shape[1:])
        if tuple(f.shape) not in (row, (1,) + row):
            raise ValueError(
                f"{name} must have shape {(1,) + row} or {row} (one row of inputs[{m}]), got {tuple(f.shape)}"
            )
        if f.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of inputs[{m}] ({x.dtype}), got {f.dtype}")
        if f.device != x.device:
            raise ValueError(f"{name} is on {f.device} but inputs[{m}] is on {x.device}")
    return list(fill)


def shapley_masked_batch(inputs, *, include_full: bool = False, fill=None):
    """Masked copies for all muted subsets, batched (module docstring).

    inputs: a list of M (2..8) float tensors [B, ...] (shapes and float dtypes may differ per modality; one device;
    non-contiguous inputs are copied first) or one tensor [M, B, ...]. Returns a list of M tensors
    [n * B, ...] (n = 2^M - 2, or 2^M - 1 with include_full), or one tensor [M, n * B, ...] for a stacked input.
    fill: None (muted rows are zeros) or a list of M tensors [1, ...] or [...] (one row of inputs[m], same dtype
    and device): muted rows of modality m hold fill[m]. Differentiable in fill (sum over its muted rows).
    """
    xs, stacked = _check_inputs(inputs)
    fill = _check_fill(fill, xs)
    M = len(xs)
    n = 2**M - (1 if include_full else 2)
    if backend_for(*xs, op="shapley_masked_batch", available=_OPS) == "ext":
        outs = _ops.shapley_masked_batch(xs, n, fill)
    else:
        outs = reference.shapley_masked_inputs(xs, fill)
        if include_full:
            outs = [torch.cat([o, x]) for o, x in zip(outs, xs)]
    return torch.stack(outs) if stacked else list(outs)


class _ReferenceResponses(torch.autograd.Function):
    """phi = W^T v (reference.shapley_combine); backward: grad_v[S-1] = sum_m kappa_m W[S-1, m] grad_phi[m]."""

    @staticmethod
    def forward(ctx, v, kappa):
        ctx.save_for_backward(kappa)
        ctx.dtype = v.dtype
        return reference.shapley_combine(v)

    @staticmethod
    def backward(ctx, grad_phi):
        (kappa,) = ctx.saved_tensors
        M = grad_phi.shape[0]
        acc = torch.float64 if grad_phi.dtype == torch.float64 else torch.float32
        w = reference.shapley_weights(M, dtype=acc, device=grad_phi.device)
        if kappa is not None:
            w = w * kappa.to(acc).view(1, M)
        gv = (w @ grad_phi.to(acc).reshape(M, -1)).reshape((2**M - 1,) + tuple(grad_phi.shape[1:]))
        return gv.to(ctx.dtype), None


def shapley_responses(subset_outputs, kappa: Optional[torch.Tensor] = None) -> torch.Tensor:
    """phi [M, B, ...] from the outputs of all 2^M - 1 non-empty subsets (module docstring).

    subset_outputs: one float tensor [2^M - 1, B, ...] (M = 2..8; subset S at index S - 1) or a list of 2^M - 1
    tensors [B, ...]; non-contiguous inputs are copied first. Returns phi in the input dtype (fp32 accumulation).
    kappa: None, or a float tensor [M] on the same device (the AGM coefficients; never differentiated).
    """
    if isinstance(subset_outputs, (list, tuple)):
        for i, t in enumerate(subset_outputs):
            check_float(t, f"subset_outputs[{i}]")
        subset_outputs = torch.stack(list(subset_outputs))
    check_float(subset_outputs, "subset_outputs")
    v = subset_outputs
    if v.dim() < 2:
        raise ValueError(f"subset_outputs must have shape [2^M - 1, B, ...], got shape {tuple(v.shape)}")
    M = modalities_of_subsets(v.shape[0], "subset_outputs")
    if v.shape[1] == 0:
        raise ValueError(f"subset_outputs must have a non-empty batch (B > 0), got shape {tuple(v.shape)}")
    if kappa is not None:
        if not isinstance(kappa, torch.Tensor):
            raise TypeError(f"kappa must be None or a float tensor [M], got {type(kappa).__name__}")
        if not kappa.is_floating_point():
            raise TypeError(f"kappa must be a floating tensor, got dtype {kappa.dtype}")
        if kappa.numel() != M:
            raise ValueError(f"kappa must hold one value per modality ({M}), got shape {tuple(kappa.shape)}")
        if kappa.device != v.device:
            raise ValueError(f"kappa is on {kappa.device} but subset_outputs is on {v.device}")
        kappa = kappa.detach().reshape(M)
    if backend_for(v, op="shapley_responses", available=_OPS) == "ext":
        return _ops.shapley_responses(v, kappa)
    return _ReferenceResponses.apply(v, kappa)
