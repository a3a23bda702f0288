"""balance_coefficients: per-modality scores -> discrepancy ratios -> coefficients (DESIGN.md section 3).

Validation happens here, once; then the backend runs: the fused Triton kernel on CUDA tensors (ONE launch,
zero host syncs; mmkernels/triton_ops/coefficients.py) or the pure-PyTorch reference elsewhere
(mmkernels/reference.py), which computes the same numbers.
"""
from __future__ import annotations

import numbers

import torch

from . import reference
from ._backend import backend_for
from ._validate import as_stacked, check_choice, check_labels

METHODS = ("ogm_ge", "ogm", "opm", "agm", "mlb")
METHOD_DEFAULTS = reference.METHOD_DEFAULTS  # hyperparameters each method accepts, with their defaults
_ALL_HP = {"alpha": 1.0, "q_base": 0.5, "lam": 0.5, "beta_max": 2.0, "clip": None, "z": "tanh", "ratio": "ratio"}


def _check_number(value, name: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value or abs(value) == float("inf"):
        raise ValueError(f"{name} must be a finite real number{' or None' if allow_none else ''}, got {value!r}")


def _check_hyperparameters(method: str, hp: dict) -> dict:
    allowed = METHOD_DEFAULTS[method]
    unknown = set(hp) - set(allowed)
    if unknown:
        raise TypeError(f"unknown hyperparameter(s) {sorted(unknown)} for method {method!r}; expected {sorted(allowed)}")
    p = {**_ALL_HP, **allowed, **hp}
    for name in ("alpha", "q_base", "lam", "beta_max"):
        _check_number(p[name], name)
    _check_number(p["clip"], "clip", allow_none=True)
    check_choice(p["z"], ("tanh", "sigmoid"), "z")
    check_choice(p["ratio"], ("ratio", "difference"), "ratio")
    return p


def _check_state(state, m: int, device: torch.device) -> None:
    if state is None:
        return
    if not isinstance(state, dict) or "s_hat" not in state or "steps" not in state:
        raise TypeError(f"state must be None or a dict with tensors 's_hat' [M] and 'steps' [] "
                        f"(see mmkernels.reference.new_agm_state), got {type(state).__name__}")
    for key, shape in (("s_hat", (m,)), ("steps", ())):
        t = state[key]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != shape:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"state[{key!r}] must be a float32 tensor of shape {shape}, got {got}")
        if t.device != device:
            raise ValueError(f"state[{key!r}] is on {t.device} but the logits are on {device}")


def balance_coefficients(unimodal_logits, labels: torch.Tensor, method: str, *, state: dict | None = None,
                         ignore_index: int = -100, sync: bool = False, group=None, **hyperparameters) -> dict:
    """Scores, discrepancy ratios and coefficients of M modalities for one batch, without a host sync.

    unimodal_logits: a list of M tensors [B, C] or one tensor [M, B, C] (any strides, not copied), float.
    labels: int [B]; rows equal to `ignore_index` count nowhere.
    method and its hyperparameters (defaults in METHOD_DEFAULTS):
      "ogm_ge": authors' CVPR 2022 coefficient k (alpha)
      "ogm":    TPAMI Eq. 11, k = max(0, 1 - alpha z(rho)) where rho > 1 (alpha, z="tanh"|"sigmoid", ratio="ratio"|"difference")
      "opm":    TPAMI Eq. 8, drop probability q (q_base, lam, z, ratio)
      "agm":    AGM Eq. 7-10, ratios r and coefficients kappa (alpha, clip=None); `state` (from
                mmkernels.reference.new_agm_state) holds the running means and is updated IN PLACE
      "mlb":    Kontras et al. Eq. 5-7, ratios r and k (alpha, beta_max)
    sync: when torch.distributed is initialised, all-reduce the score sums and counts (over `group`) before
      forming ratios, so every rank gets the coefficients of the global batch.
    Returns dict(scores [M], ratios [M], coefficients [M], flag []) of fp32 device tensors. flag: 0 ok,
    1 a non-finite score, ratio or coefficient (coefficients neutral: k = 1, q = 0, kappa = 1; AGM state
    untouched; scores and ratios returned as computed), 2 no valid row (same neutral result; 2 wins over 1).
    Labels outside [0, C) that are not ignore_index give a non-finite score (flag 1); a 'prob' score sum of
    exactly 0 (softmax[y] underflows on every row) gives an inf or NaN ratio (flag 1).
    """
    logits = as_stacked(unimodal_logits, "unimodal_logits", ndim=2)
    m, b, c = logits.shape
    if b < 1 or c < 1:
        raise ValueError(f"unimodal_logits must have at least one row and one class, got shape [M, B, C] = {[m, b, c]}")
    check_labels(labels, b, logits.device)
    check_choice(method, METHODS, "method")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    p = _check_hyperparameters(method, hyperparameters)
    if method == "agm":
        _check_state(state, m, logits.device)
    distributed = bool(sync) and torch.distributed.is_available() and torch.distributed.is_initialized()

    backend = backend_for(logits, labels, op="balance_coefficients", available=("reference", "triton"))
    if backend == "triton":
        from .triton_ops.coefficients import balance_coefficients_triton

        return balance_coefficients_triton(logits, labels, method, state=state, ignore_index=ignore_index,
                                           sync=distributed, group=group, **p)
    hp = {k: p[k] for k in METHOD_DEFAULTS[method]}
    if not distributed:
        return reference.balance_coefficients_ref(logits, labels, method, state=state, ignore_index=ignore_index, **hp)
    return _reference_synced(logits, labels, method, state, ignore_index, group, hp)


def _reference_synced(logits, labels, method, state, ignore_index, group, hp) -> dict:
    """Reference path with the score sums and counts all-reduced across ranks (DESIGN sec. 3, Distributed); the
    rest of the pipeline is built from mmkernels/reference.py's own pieces."""
    kind = "ce" if method == "agm" else "prob"
    sums, count = reference.score_sums(logits, labels, kind=kind, ignore_index=ignore_index)
    packed = torch.cat([sums, count.view(1)])
    torch.distributed.all_reduce(packed, group=group)
    sums, count = packed[:-1], packed[-1]
    return reference.balance_from_sums_ref(sums, count, method, state=state, **hp)
