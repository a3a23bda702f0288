"""Sample-level modality valuation (Wei, Feng, Wang, Hu, CVPR 2024; docs/methods/sample_valuation.md): per sample,
Shapley values of the modalities from the argmax correctness of every subset's output, and the copy counts of the next
epoch.

sample_valuation(subset_logits, labels, *, value="authors") -> {"values", "phi" [M, B] fp32, "copies" [M, B] int64,
    "flag" [] fp32}
    subset_logits: [2^M - 1, B, C] (subset S at index S - 1, e.g. a head on mmkernels.shapley_masked_batch(feats,
    include_full=True, fill=...)), labels [B] int64 (or int32). value "authors" (v(S) = |S| 1[correct]) or "toolkit"
    (1[correct]). A row f_S[i] holding a NaN or +-inf is never correct; flag = 1 when one does (every backend).
valuation_subset_logits(feats, head, *, fill=None) -> [2^M - 1, B, C]
    The head on all non-empty feature subsets in one batched call (features of muted modalities zeroed, or fill[m]).

Backends: on CUDA tensors the fused Triton kernel (ONE launch per batch: argmax per subset, v(S), phi, copies;
mmkernels/triton_ops/valuation.py), elsewhere the vectorised reference (argmax over C, the [2^M - 1, M] Shapley weight
matrix, thresholds). No host sync on either. "values" (v [2^M - 1, B]) is returned by the reference only.
"""

from __future__ import annotations

import torch

from . import reference
from ._backend import backend_for
from ._validate import check_choice, check_float, check_labels, modalities_of_subsets
from .shapley import shapley_masked_batch

VALUES = ("authors", "toolkit")


def check_subset_logits(subset_logits, labels) -> int:
    """Validates [2^M - 1, B, C] float logits and labels [B]; returns M."""
    check_float(subset_logits, "subset_logits")
    if subset_logits.dim() != 3:
        raise ValueError(f"subset_logits must have shape [2^M - 1, B, C], got {tuple(subset_logits.shape)}")
    m = modalities_of_subsets(subset_logits.shape[0], "subset_logits")
    if subset_logits.shape[2] == 0:
        raise ValueError("subset_logits must have at least one class (C > 0)")
    check_labels(labels, subset_logits.shape[1], subset_logits.device, "labels")
    return m


def sample_valuation(subset_logits: torch.Tensor, labels: torch.Tensor, *, value: str = "authors") -> dict:
    """Per-sample Shapley values and copy counts (module docstring)."""
    m = check_subset_logits(subset_logits, labels)
    check_choice(value, VALUES, "value")
    x = subset_logits.detach()
    if backend_for(x, op="sample_valuation", available=("reference", "triton")) == "triton" and x.shape[1] > 0:
        from .triton_ops.valuation import sample_valuation_triton

        w, fact = _weights(m, x.device)
        phi, copies, flag = sample_valuation_triton(x, labels.long(), w, fact, scaled=value == "authors")
        return {"phi": phi, "copies": copies, "flag": flag}
    return reference.sample_valuation(x, labels, value=value)


_WEIGHTS: dict = {}


def _weights(m: int, device) -> tuple:
    """(M! x the Shapley weight table [2^M - 1, M] fp32, M!) on `device`, built once per (M, device) on the device."""
    key = (m, str(device))
    if key not in _WEIGHTS:
        w, fact = reference.valuation_weight_table(m, device)
        _WEIGHTS[key] = (w.contiguous(), fact)
    return _WEIGHTS[key]


def valuation_subset_logits(feats, head, *, fill=None) -> torch.Tensor:
    """head(features with only the modalities of S kept) for S = 1 .. 2^M - 1, stacked [2^M - 1, B, C].

    feats: M tensors [B, ...]; head: a callable on the M masked feature tensors [(2^M - 1) B, ...] returning logits
    [(2^M - 1) B, C]; fill: None (zeros, the authors') or M rows (e.g. enc_m(0), the toolkit's input zeroing)."""
    masked = shapley_masked_batch(list(feats), include_full=True, fill=fill)
    out = head(masked)
    n = 2 ** len(masked) - 1
    b = masked[0].shape[0] // n
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[0] != n * b:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"head must return logits [(2^M - 1) * B, C] = [{n} * {b} = {n * b}, C] (one row per subset "
            f"and sample, M = {len(masked)}), got {got}"
        )
    return out.reshape((n, b) + tuple(out.shape[1:]))
