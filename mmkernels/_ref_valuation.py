"""Reference math of sample-level and modality-level valuation (Wei, Feng, Wang, Hu, CVPR 2024; docs/methods/sample_valuation.md,
authors' code/sample_level.py and modality_level.py), re-exported by mmkernels.reference.

Subsets are bitmasks S = 1 .. 2^M - 1 (bit m = modality m kept), subset S at index S - 1, as in mmkernels.shapley.
  v(S) = |S| 1[argmax f_S = y] (authors; first maximum wins, as torch/numpy), v(empty) = 0;
         value="toolkit": v(S) = 1[argmax f_S = y] (GeWu-Lab/BalanceBenchmark).
  phi_m = sum_{S not containing m} |S|! (M - |S| - 1)! / M! (v(S + m) - v(S))  (Shapley; sum_m phi_m = v(all)).
  copies_m = 1 if 0.4 < phi_m < 1, 2 if -0.1 < phi_m < 0.4, 3 if phi_m < -0.1, else 0; copy m keeps only modality m.
  Modality level: gap_m = 1 - mean of phi_m over the drawn samples; d = mean over unordered pairs |gap_m - gap_j|
  (M = 2: |gap_a - gap_v|); p = (2/3) d alpha ("linear"), tanh((2/3) d alpha) ("tanh"), ((2/3) d)^1.5 alpha
  ("square"); floor(p N) extra rows keep only argmax_m gap_m. rate="toolkit": p = (2/3) sum over ordered pairs
  |gap_m - gap_j| / (M - 1) (alpha ignored; 2x the authors' at M = 2).
"""
from __future__ import annotations

import math

import torch

__all__ = ["VALUATION_LOW", "VALUATION_MID", "VALUATION_HIGH", "valuation_values", "valuation_weight_table",
           "valuation_shapley", "valuation_copies", "sample_valuation", "modality_gaps", "modality_rate",
           "valuation_rows"]

VALUATION_LOW, VALUATION_MID, VALUATION_HIGH = -0.1, 0.4, 1.0   # the authors' copy thresholds
CURVES = ("linear", "tanh", "square")


def valuation_values(subset_logits: torch.Tensor, labels: torch.Tensor, *, value: str = "authors") -> torch.Tensor:
    """v [2^M - 1, B] fp32 from the subset outputs [2^M - 1, B, C] (subset S at index S - 1) and labels [B]."""
    from .reference import _subset_bits

    n = subset_logits.shape[0]
    m = (n + 1).bit_length() - 1
    correct = (subset_logits.argmax(dim=2) == labels.view(1, -1)).to(torch.float32)
    if value == "toolkit":
        return correct
    size = _subset_bits(m, subset_logits.device).sum(1).to(torch.float32)
    return correct * size.view(-1, 1)


def valuation_weight_table(num_modalities: int, device=None) -> tuple:
    """(W M! [2^M - 1, M] fp32, M!): the Shapley weights times M!, small integers (exact in fp32)."""
    from .reference import shapley_weights

    fact = float(math.factorial(num_modalities))
    w = shapley_weights(num_modalities, dtype=torch.float64, device=device) * fact
    return w.round().to(torch.float32), fact


def _copies_of_scaled(p: torch.Tensor, fact: float) -> torch.Tensor:
    """Copy counts from P = M! phi (exact integers): the thresholds compared as 10 P vs (-1, 4, 10) M!, exactly."""
    p10 = 10 * p
    low, mid, high = -fact, 4 * fact, 10 * fact
    one = (p10 > mid) & (p10 < high)
    two = (p10 > low) & (p10 < mid)
    three = p10 < low
    return one.long() + 2 * two.long() + 3 * three.long()


def valuation_shapley(values: torch.Tensor) -> torch.Tensor:
    """phi [M, B] fp32 from v [2^M - 1, B] (v(empty) = 0), as M! phi in exact integer arithmetic, then / M!."""
    n = values.shape[0]
    w, fact = valuation_weight_table((n + 1).bit_length() - 1, values.device)
    return (w.t() @ values.to(torch.float32)) / fact


def valuation_copies(phi: torch.Tensor) -> torch.Tensor:
    """copies [M, B] int64 from phi [M, B] (the authors' thresholds; boundaries give 0 as in their strict tests).
    Compared in phi's dtype: an fp32 phi = P / M! of sample_valuation is the correctly rounded value, so a Shapley
    value on a threshold (e.g. 1 at M = 4, 0.4 at M = 5) equals the fp32 threshold: the copies exact arithmetic
    gives."""
    one = (phi > VALUATION_MID) & (phi < VALUATION_HIGH)
    two = (phi > VALUATION_LOW) & (phi < VALUATION_MID)
    three = phi < VALUATION_LOW
    return one.long() + 2 * two.long() + 3 * three.long()


def sample_valuation(subset_logits: torch.Tensor, labels: torch.Tensor, *, value: str = "authors") -> dict:
    """{"values" [2^M - 1, B], "phi" [M, B] fp32, "copies" [M, B] int64} for one batch (docs/methods/sample_valuation.md).
    M! phi is accumulated exactly (integers below 2^24), so phi and the copies do not depend on summation order."""
    v = valuation_values(subset_logits, labels, value=value)
    w, fact = valuation_weight_table(v.shape[0].bit_length(), v.device)
    p = w.t() @ v
    return {"values": v, "phi": p / fact, "copies": _copies_of_scaled(p, fact)}


def modality_gaps(phi: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """gap_m = 1 - mean_i phi[m, i] over the drawn samples `index` (all samples when None), [M] fp32."""
    p = phi if index is None else phi[:, index]
    return 1.0 - p.to(torch.float32).mean(dim=1)


def modality_rate(gaps: torch.Tensor, *, alpha: float = 1.0, curve: str = "linear", rate: str = "authors"):
    """(p, modality): the extra-row rate [] fp32 and the modality the extra rows keep (argmax gap) []."""
    m = gaps.shape[0]
    diff = (gaps.view(-1, 1) - gaps.view(1, -1)).abs()
    keep = torch.argmax(gaps)
    if rate == "toolkit":
        return (2.0 / 3.0) * diff.sum() / (m - 1), keep
    d = diff.sum() / (m * (m - 1))                   # mean over unordered pairs (each pair counted twice above)
    x = (2.0 / 3.0) * d
    if curve == "linear":
        p = x * alpha
    elif curve == "tanh":
        p = torch.tanh(x * alpha)
    elif curve == "square":
        p = x.pow(1.5) * alpha
    else:
        raise ValueError(f"curve must be one of {CURVES}, got {curve!r}")
    return p, keep


def valuation_rows(copies: torch.Tensor, *, extra_index: torch.Tensor | None = None, extra_modality=None):
    """The next epoch's rows before shuffling: (index [R] int64, keep [R, M] bool).

    Originals first (all modalities kept), then for each modality m the copies of copies[m] (sample i repeated
    copies[m, i] times, keeping only m), then the modality-level extra rows extra_index (keeping only
    extra_modality). copies: [M, N] integer counts (zeros for the modality-level variant)."""
    m, n = copies.shape
    device = copies.device
    idx = [torch.arange(n, device=device)]
    keep = [torch.ones(n, m, dtype=torch.bool, device=device)]
    eye = torch.eye(m, dtype=torch.bool, device=device)
    for j in range(m):
        rep = torch.repeat_interleave(torch.arange(n, device=device), copies[j].long())
        idx.append(rep)
        keep.append(eye[j].expand(rep.shape[0], m))
    if extra_index is not None:
        idx.append(extra_index.to(device))
        keep.append(eye[extra_modality].view(1, m).expand(extra_index.shape[0], m))
    return torch.cat(idx), torch.cat(keep)
