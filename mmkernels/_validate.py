"""Argument checks done once at the public boundary (docs/architecture.md).

Each raises ValueError or TypeError naming the argument, what was expected and what was received.
Nothing here reads a device value (no host sync).
"""

from __future__ import annotations

import math
import numbers
from typing import List, Sequence, Tuple

import torch

from . import _methods

MIN_MODALITIES, MAX_MODALITIES = 2, 8
MAX_COUNTER = 2**63 - 1  # Philox seeds and counter offsets are int64 on the device side
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# The ranges of the coefficient hyperparameters: ONE table (mmkernels/_methods.py), used by
# mmkernels.balance_coefficients and by the balancers' constructors. name: (low, high, low_open, high_open, None
# allowed).
HYPERPARAMETER_RANGES = _methods.HYPERPARAMETER_RANGES
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got dtype {t.dtype}")


def check_num_modalities(m: int, name: str = "num_modalities") -> None:
    if not MIN_MODALITIES <= m <= MAX_MODALITIES:
        raise ValueError(f"{name} must be between {MIN_MODALITIES} and {MAX_MODALITIES}, got {m}")


def modalities_of_subsets(n: int, name: str) -> int:
    """M from the leading dimension n = 2^M - 1 of a tensor of subset outputs (M in 2..8), or a ValueError naming it."""
    m = (n + 1).bit_length() - 1
    if 2**m - 1 != n or not MIN_MODALITIES <= m <= MAX_MODALITIES:
        raise ValueError(
            f"{name}.shape[0] must be 2^M - 1 for M in {MIN_MODALITIES}..{MAX_MODALITIES} modalities "
            f"(3, 7, 15, ..., 255), got {n}"
        )
    return m


def check_modalities(
    x, name: str, *, ndim: int | None = None, same_shape: bool = True, same_dtype: bool = True
) -> bool:
    """A list of M (2..8) tensors [B, ...] (checked with `check_same`) or one float tensor [M, B, ...].

    Returns True for one stacked tensor. `ndim` is the number of dims per modality (2 for logits [B, C]).
    """
    if isinstance(x, torch.Tensor):
        check_float(x, name)
        if ndim is not None and x.dim() != ndim + 1:
            raise ValueError(
                f"{name} as one tensor must have shape [M, B, ...] with {ndim + 1} dims, got shape {tuple(x.shape)}"
            )
        if x.dim() < 2:
            raise ValueError(f"{name} as one tensor must have shape [M, B, ...], got shape {tuple(x.shape)}")
        check_num_modalities(x.shape[0], f"{name}.shape[0] (number of modalities)")
        return True
    if not isinstance(x, (list, tuple)):
        raise TypeError(
            f"{name} must be a list of M tensors or one stacked tensor, got {type(x).__name__} "
            f"(expected M tensors [B, ...] or one tensor [M, B, ...])"
        )
    check_num_modalities(len(x), f"len({name}) (number of modalities)")
    check_same(x, name, ndim=ndim, same_shape=same_shape, same_dtype=same_dtype)
    return False


def as_stacked(x, name: str, *, ndim: int | None = None) -> torch.Tensor:
    """A list of M tensors [B, ...] or one tensor [M, B, ...] -> a tensor [M, B, ...].

    A stacked tensor is returned as is (strides kept, no copy); a list is stacked (one copy).
    `ndim` is the number of dims per modality (2 for logits [B, C]).
    """
    return x if check_modalities(x, name, ndim=ndim) else torch.stack(list(x))


def as_modality_list(x, name: str, *, same_dtype: bool = True) -> Tuple[List[torch.Tensor], bool]:
    """A list of M tensors [B, ...] (shapes past the batch dim may differ) or one tensor [M, B, ...] -> (the M
    tensors, whether x was one stacked tensor). A stacked tensor is unbound (views, no copy)."""
    stacked = check_modalities(x, name, same_shape=False, same_dtype=same_dtype)
    return (list(x.unbind(0)) if stacked else list(x)), stacked


def check_same(
    xs: Sequence[torch.Tensor], name: str, *, ndim: int | None = None, same_shape: bool = True, same_dtype: bool = True
) -> None:
    """Per-modality tensors: all float, same device, same batch size (and same shape, same dtype if asked)."""
    for i, t in enumerate(xs):
        check_float(t, f"{name}[{i}]")
        if ndim is not None and t.dim() != ndim:
            raise ValueError(f"{name}[{i}] must have {ndim} dims, got shape {tuple(t.shape)}")
        if t.dim() < 1:
            raise ValueError(f"{name}[{i}] must have a batch dimension, got a scalar")
    first = xs[0]
    for i, t in enumerate(xs[1:], 1):
        if t.device != first.device:
            raise ValueError(
                f"{name}[{i}] is on {t.device} but {name}[0] is on {first.device}; all modalities must share a device"
            )
        if t.shape[0] != first.shape[0]:
            raise ValueError(
                f"{name}[{i}] has batch size {t.shape[0]} but {name}[0] has {first.shape[0]}; batch sizes must match"
            )
        if same_shape and t.shape != first.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but {name}[0] has {tuple(first.shape)}")
        if same_dtype and t.dtype != first.dtype:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype} but {name}[0] has {first.dtype}")


def check_labels(labels: torch.Tensor, batch: int, device: torch.device, name: str = "labels") -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype int64, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer (int64) tensor of class indices, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"{name} must have shape [{batch}] (one class index per row), got shape {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the logits are on {device}")


def check_nonneg(value: float, name: str) -> None:
    if not isinstance(value, (int, float)) or value != value or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def check_real(value, name: str, *, low=None, high=None, low_open=False, high_open=False, allow_none=False) -> None:
    """A finite real number (not a bool) in [low, high] (open ends where asked); the message names the argument and
    the range."""
    if value is None and allow_none:
        return
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and value == value
        and abs(value) != float("inf")
    )
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        rng = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must be a finite number in {rng}{' or None' if allow_none else ''}, got {value!r}")


def check_hyperparameter(value, name: str) -> None:
    """A coefficient hyperparameter against HYPERPARAMETER_RANGES (the same check in the op and the balancers)."""
    low, high, low_open, high_open, allow_none = HYPERPARAMETER_RANGES[name]
    check_real(value, name, low=low, high=high, low_open=low_open, high_open=high_open, allow_none=allow_none)


def check_ignore_index(value, name: str = "ignore_index") -> None:
    """A label value that counts nowhere: a Python int (not a bool) that fits in int64 (the kernels compare in
    int64)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must fit in int64 [-2**63, 2**63), got {value!r}")


def check_choice(value, choices, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_counter(value, name: str) -> None:
    """A Philox seed or counter offset: a Python int (not a bool) in [0, 2**63)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= MAX_COUNTER:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {value!r}")


def check_coefficient(k, feature: torch.Tensor, name: str = "k") -> None:
    """A per-modality coefficient for a feature tap: a 1-element floating tensor on feature's device (read on the
    device, no sync) or a finite real number (not a bool)."""
    if isinstance(k, torch.Tensor):
        if not k.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor or a number, got a tensor of dtype {k.dtype}")
        if k.numel() != 1:
            raise ValueError(f"{name} must hold one value (a 0-dim tensor), got shape {tuple(k.shape)}")
        if k.device != feature.device:
            raise ValueError(
                f"{name} is on {k.device} but feature is on {feature.device}; put {name} on the feature's device"
            )
        return
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not math.isfinite(k):
        raise TypeError(f"{name} must be a finite number or a 1-element tensor, got {k!r}")
