"""Constants and dtype helpers shared by the reference modules."""

from __future__ import annotations

import math

import torch

PROB_FLOOR = 1e-8  # AGM Eq. 4: p < 1e-8 is treated as 1e-8 in the 'ce' score
LOG_PROB_FLOOR = math.log(PROB_FLOOR)
OLM_EPS = 1e-8  # guard for C_m = 0 in OLM Eq. 8 (G/C with C clamped below at this value)
GE_STD_EPS = 1e-8  # authors' OGM-GE: noise std = unbiased std of the grad + 1e-8


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 accumulate in fp32, fp64 in fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(t) -> torch.Tensor:
    """A tensor in its accumulation dtype (fp32, fp64 for fp64); numbers / lists of numbers become fp64."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.float64)  # Python numbers: keep their precision
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t.to(_acc_dtype(t.dtype))


def _acc_like(x, ref: torch.Tensor) -> torch.Tensor:
    """A scalar or tensor hyperparameter (e.g. k) as a tensor on ref's device in ref's accumulation dtype."""
    dtype = _acc_dtype(ref.dtype)
    if isinstance(x, torch.Tensor):
        return x.to(device=ref.device, dtype=dtype)
    return torch.as_tensor(x, dtype=dtype, device=ref.device)  # a Python float straight into the target dtype


def _stack(x) -> torch.Tensor:
    """A list of M tensors [B, ...] or a stacked tensor [M, B, ...] -> the stacked tensor (no copy if already
    stacked)."""
    return x if isinstance(x, torch.Tensor) else torch.stack(list(x))


def _z(x: torch.Tensor, z: str) -> torch.Tensor:
    """The monotone map z of TPAMI Eq. 8 and 11: 'tanh' -> tanh(x - 1) (main text),
    'sigmoid' -> sigmoid(x) (Tab. 15)."""
    if z == "tanh":
        return torch.tanh(x - 1.0)
    if z == "sigmoid":
        return torch.sigmoid(x)
    raise ValueError(f"z must be 'tanh' or 'sigmoid', got {z!r}")


def _offdiag(m: int, device) -> torch.Tensor:
    return ~torch.eye(m, dtype=torch.bool, device=device)
