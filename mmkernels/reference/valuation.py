"""Reference math of sample-level and modality-level valuation (Wei, Feng, Wang, Hu, CVPR 2024;
docs/methods/sample_valuation.md, authors' code/sample_level.py and modality_level.py), re-exported by
mmkernels.reference.

Subsets are bitmasks S = 1 .. 2^M - 1 (bit m = modality m kept), subset S at index S - 1, as in mmkernels.shapley.
  v(S) = |S| 1[argmax f_S = y] (authors; first maximum wins, as torch/numpy), v(empty) = 0;
         value="toolkit": v(S) = 1[argmax f_S = y] (GeWu-Lab/BalanceBenchmark).
  phi_m = sum_{S not containing m} |S|! (M - |S| - 1)! / M! (v(S + m) - v(S))  (Shapley; sum_m phi_m = v(all)).
  copies_m = 1 if 0.4 < phi_m < 1, 2 if -0.1 < phi_m < 0.4, 3 if phi_m < -0.1, else 0; copy m keeps only modality m.
  Non-finite logits: a row f_S holding any NaN or +-inf is never correct (v(S) = 0 for that sample), and the flag
  is 1 (docs/methods/sample_valuation.md, "Edge cases").
  Modality level: gap_m = 1 - mean of phi_m over the drawn samples; d = mean over unordered pairs |gap_m - gap_j|
  (M = 2: |gap_a - gap_v|); p = (2/3) d alpha ("linear"), tanh((2/3) d alpha) ("tanh"), ((2/3) d)^1.5 alpha
  ("square"); floor(p N) extra rows keep only argmax_m gap_m. rate="toolkit": p = (2/3) sum over ordered pairs
  |gap_m - gap_j| / (M - 1) (alpha ignored; 2x the authors' at M = 2). modality_gaps_exact / modality_extra_rows
  count floor(p N) in exact rational arithmetic (M! phi are integers), modality_gaps / modality_rate in fp32.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from .shapley import _subset_bits, shapley_weights

__all__ = [
    "VALUATION_LOW",
    "VALUATION_MID",
    "VALUATION_HIGH",
    "valuation_values",
    "valuation_finite_rows",
    "valuation_weight_table",
    "valuation_shapley",
    "valuation_copies",
    "sample_valuation",
    "modality_gaps",
    "modality_rate",
    "modality_gaps_exact",
    "modality_extra_rows",
    "valuation_rows",
]

VALUATION_LOW, VALUATION_MID, VALUATION_HIGH = -0.1, 0.4, 1.0  # the authors' copy thresholds
CURVES = ("linear", "tanh", "square")


def valuation_finite_rows(subset_logits: torch.Tensor) -> torch.Tensor:
    """[2^M - 1, B] bool: every logit of the row f_S[i] is finite (a row that is not is never correct)."""
    return torch.isfinite(subset_logits).all(dim=2)


def valuation_values(subset_logits: torch.Tensor, labels: torch.Tensor, *, value: str = "authors") -> torch.Tensor:
    """v [2^M - 1, B] fp32 from the subset outputs [2^M - 1, B, C] (subset S at index S - 1) and labels [B].
    A row holding a non-finite logit counts as wrong, whatever its argmax."""
    n = subset_logits.shape[0]
    m = (n + 1).bit_length() - 1
    hit = subset_logits.argmax(dim=2) == labels.view(1, -1).long()
    correct = (hit & valuation_finite_rows(subset_logits)).to(torch.float32)
    if value == "toolkit":
        return correct
    size = _subset_bits(m, subset_logits.device).sum(1).to(torch.float32)
    return correct * size.view(-1, 1)


def valuation_weight_table(num_modalities: int, device=None) -> tuple:
    """(W M! [2^M - 1, M] fp32, M!): the Shapley weights times M!, small integers (exact in fp32)."""
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


def _scaled_shapley(values: torch.Tensor) -> tuple:
    """(M! phi [M, B] fp32, M!) from v [2^M - 1, B]: integer weights times integer values, exact in fp32. Autocast is
    off for the product (a bf16 matmul would round M! phi)."""
    n = values.shape[0]
    w, fact = valuation_weight_table((n + 1).bit_length() - 1, values.device)
    with torch.autocast(values.device.type, enabled=False):
        return w.t() @ values.to(torch.float32), fact


def valuation_shapley(values: torch.Tensor) -> torch.Tensor:
    """phi [M, B] fp32 from v [2^M - 1, B] (v(empty) = 0), as M! phi in exact integer arithmetic, then / M!."""
    p, fact = _scaled_shapley(values)
    return p / fact


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
    """{"values" [2^M - 1, B], "phi" [M, B] fp32, "copies" [M, B] int64, "flag" [] fp32} for one batch
    (docs/methods/sample_valuation.md). M! phi is accumulated exactly (integers below 2^24), so phi and the copies do
    not depend on summation order. flag: 1 when a row of some f_S holds a non-finite logit (counted as wrong),
    else 0."""
    v = valuation_values(subset_logits, labels, value=value)
    p, fact = _scaled_shapley(v)
    flag = (~valuation_finite_rows(subset_logits)).any().to(torch.float32)
    return {"values": v, "phi": p / fact, "copies": _copies_of_scaled(p, fact), "flag": flag}


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
    d = diff.sum() / (m * (m - 1))  # mean over unordered pairs (each pair counted twice above)
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


def modality_gaps_exact(scaled_sums: torch.Tensor, counts: torch.Tensor, fact: int) -> list:
    """gap_m = 1 - mean of phi_m over the valued draws, as exact Fractions (host, once per epoch).

    scaled_sums [M, K]: per drawn sample (with multiplicity) the integer sum of M! phi over its valuations; counts [K]:
    how many valuations that sum holds (0: not valued, left out of the mean). fact = M!. Every phi_m of a draw is
    scaled_sum / (count M!), so the mean is a ratio of integers. No valued draw: every gap is 1 (p = 0)."""
    m = scaled_sums.shape[0]
    counts = counts.long().cpu()
    valued = counts > 0
    k = int(valued.sum())  # sync-ok: CPU tensor
    if k == 0:
        return [Fraction(1)] * m
    sums = scaled_sums.long().cpu()
    total = [Fraction(0)] * m
    for c in counts[valued].unique().tolist():  # a few distinct counts: exact integer sums per count
        for j, s in enumerate(sums[:, counts == c].sum(1).tolist()):
            total[j] += Fraction(s, c)
    return [1 - t / (k * fact) for t in total]


def modality_extra_rows(
    gaps, num_samples: int, *, alpha: float = 1.0, curve: str = "linear", rate: str = "authors"
) -> tuple:
    """(floor(p N), p as a float, the kept modality argmax_m gap_m (first maximum)) from exact gaps (Fractions).

    "linear" and rate="toolkit" are rational in the gaps and alpha (a float is an exact binary fraction), so floor(p N)
    is exact; "square": floor(p N) = isqrt(floor(x^3 alpha^2 N^2)) with x = (2/3) d, exact too; "tanh": tanh of a
    non-zero rational is irrational, so p N is never an integer and float64 decides."""
    m = len(gaps)
    keep = max(range(m), key=lambda j: gaps[j])
    pair_sum = sum(abs(gaps[i] - gaps[j]) for i in range(m) for j in range(i + 1, m))
    if rate == "toolkit":
        p = Fraction(2, 3) * 2 * pair_sum / (m - 1)  # ordered pairs: twice the unordered sum
        return math.floor(p * num_samples), float(p), keep
    x = Fraction(2, 3) * pair_sum / (m * (m - 1) // 2)  # (2/3) d, d the mean over unordered pairs
    a = Fraction(alpha)
    if curve == "linear":
        return math.floor(x * a * num_samples), float(x * a), keep
    if curve == "square":
        n_extra = math.isqrt(math.floor(x**3 * a**2 * num_samples**2))
        return n_extra, float(x) ** 1.5 * float(alpha), keep
    if curve == "tanh":
        p = math.tanh(float(x * a))
        return math.floor(p * num_samples), p, keep
    raise ValueError(f"curve must be one of {CURVES}, got {curve!r}")


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
