"""Sample- and modality-level valuation reference (docs/methods/sample_valuation.md): the worked example (authors and toolkit), a
literal loop transcription on random logits, Shapley efficiency, thresholds, the M > 2 rate, the public op."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmkernels import reference as R
from mmkernels.valuation import sample_valuation


def worked_example():
    """B = 2, C = 3; subsets in bitmask order: S=1 audio, S=2 visual, S=3 both."""
    f_a = [[0, 3, 1], [1, 2, 0]]
    f_v = [[1, 0, 0], [0, 0, 2]]
    f_av = [[2, 1, 0], [3, 0, 1]]
    return torch.tensor([f_a, f_v, f_av], dtype=torch.float32), torch.tensor([0, 2])


def test_worked_example_authors():
    f, y = worked_example()
    res = R.sample_valuation(f, y)
    torch.testing.assert_close(res["phi"], torch.tensor([[0.5, -0.5], [1.5, 0.5]]))
    assert res["copies"].tolist() == [[1, 3], [0, 1]]
    idx, keep = R.valuation_rows(res["copies"])
    assert idx.shape[0] == 7                                              # next epoch: 7 rows
    assert idx.tolist() == [0, 1, 0, 1, 1, 1, 1]
    assert keep.tolist() == [[True, True]] * 2 + [[True, False]] * 4 + [[False, True]]
    gaps = R.modality_gaps(res["phi"])                                    # Z = both samples
    torch.testing.assert_close(gaps, torch.tensor([1.0, 0.0]))
    p, m = R.modality_rate(gaps)
    assert p.item() == pytest.approx(2 / 3) and m.item() == 0
    assert math.floor(p.item() * 2) == 1                                  # one audio-only copy


def test_worked_example_toolkit():
    f, y = worked_example()
    res = R.sample_valuation(f, y, value="toolkit")
    torch.testing.assert_close(res["phi"], torch.tensor([[0.0, -0.5], [1.0, 0.5]]))
    assert res["copies"].tolist() == [[2, 3], [0, 1]]
    p, _ = R.modality_rate(R.modality_gaps(R.sample_valuation(f, y)["phi"]), rate="toolkit")
    assert p.item() == pytest.approx(4 / 3)


def literal_phi(subset_logits, labels, value="authors"):
    """Our loop transcription: per sample, per modality, the Shapley sum over the subsets without m (exact
    fractions, so values on a threshold stay on it)."""
    n, b, _ = subset_logits.shape
    m = (n + 1).bit_length() - 1

    def v(s, i):
        if s == 0:
            return 0.0
        row = subset_logits[s - 1, i].tolist()
        correct = row.index(max(row)) == int(labels[i])                   # first maximum wins
        return float(correct) * (bin(s).count("1") if value == "authors" else 1)

    phi = [[Fraction(0)] * b for _ in range(m)]
    for i in range(b):
        for j in range(m):
            others = [k for k in range(m) if k != j]
            for r in range(m):
                for subset in itertools.combinations(others, r):
                    s = sum(1 << k for k in subset)
                    w = Fraction(math.factorial(r) * math.factorial(m - r - 1), math.factorial(m))
                    phi[j][i] += w * (Fraction(v(s | (1 << j), i)) - Fraction(v(s, i)))
    return phi


def literal_copies(x):
    low, mid, high = Fraction(-1, 10), Fraction(4, 10), Fraction(1)
    return 1 if mid < x < high else 2 if low < x < mid else 3 if x < low else 0


@pytest.mark.parametrize("value", ["authors", "toolkit"])
@pytest.mark.parametrize("m,b,c", [(2, 9, 3), (3, 11, 4), (4, 6, 2), (5, 4, 3)])
def test_matches_the_literal_loop(m, b, c, value):
    g = torch.Generator().manual_seed(m * 100 + b)
    f = torch.randint(0, 3, (2 ** m - 1, b, c), generator=g).float()       # small integers: ties happen
    y = torch.randint(0, c, (b,), generator=g)
    res = R.sample_valuation(f, y, value=value)
    want = literal_phi(f, y, value)
    torch.testing.assert_close(res["phi"].double(), torch.tensor([[float(x) for x in row] for row in want],
                                                                  dtype=torch.float64), atol=1e-6, rtol=0)
    assert res["copies"].tolist() == [[literal_copies(x) for x in row] for row in want]
    assert R.valuation_copies(res["phi"]).tolist() == res["copies"].tolist()


@pytest.mark.parametrize("m,correct,modality,want_phi,want_copies", [
    (4, (0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1), 3, 1.0, 0),   # a plain fp32 sum gives 0.99999994: 1 copy
    (5, (0,) * 28 + (1, 1, 1), 0, 0.4, 0),                             # a plain fp32 sum gives 0.39999998: 2 copies
])
def test_thresholds_hit_exactly(m, correct, modality, want_phi, want_copies):
    """phi = 1 and phi = 0.4 are Shapley values of integer v(S) (found by enumerating every correctness pattern);
    M! phi is summed exactly, so they give the copies exact arithmetic gives (0), not the side rounding picks."""
    ok = torch.tensor(correct, dtype=torch.bool)
    f = torch.zeros(2 ** m - 1, 1, 2)
    f[:, 0, 0] = ok.float()               # class 0 wins (y = 0) exactly where `correct` says
    f[:, 0, 1] = 0.5
    res = R.sample_valuation(f, torch.tensor([0]))
    assert res["phi"][modality, 0].item() == pytest.approx(want_phi, abs=1e-7)
    assert res["copies"][modality, 0].item() == want_copies
    naive = R.shapley_combine(res["values"])
    assert R.valuation_copies(naive)[modality, 0].item() != want_copies   # the pitfall is real


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 8), st.integers(0, 10_000))
def test_shapley_values_of_each_sample_sum_to_v_all(m, b, seed):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(2 ** m - 1, b, 3, generator=g)
    y = torch.randint(0, 3, (b,), generator=g)
    res = R.sample_valuation(f, y)
    torch.testing.assert_close(res["phi"].sum(0), res["values"][-1], atol=1e-5, rtol=0)


def test_threshold_boundaries():
    phi = torch.tensor([[1.0, 0.99, 0.4, 0.41, 0.39, -0.1, -0.09, -0.11, 2.0]])
    assert R.valuation_copies(phi).tolist() == [[0, 1, 0, 1, 2, 0, 2, 3, 0]]


@pytest.mark.parametrize("curve,want", [("linear", 0.2), ("tanh", math.tanh(0.2)), ("square", 0.3 ** 1.5 * 2 / 3)])
def test_rate_curves(curve, want):
    gaps = torch.tensor([0.75, 0.3])     # d = 0.45; (2/3) d = 0.3; alpha 2/3
    p, m = R.modality_rate(gaps, alpha=2 / 3, curve=curve)
    assert p.item() == pytest.approx(want, rel=1e-6) and m.item() == 0


def test_rate_beyond_two_modalities():
    gaps = torch.tensor([0.1, 0.7, 0.4])  # pairs: 0.6, 0.3, 0.3 -> mean 0.4
    p, m = R.modality_rate(gaps)
    assert p.item() == pytest.approx(2 / 3 * 0.4) and m.item() == 1
    p_tk, _ = R.modality_rate(gaps, rate="toolkit")   # ordered pairs sum 2.4 / (M - 1)
    assert p_tk.item() == pytest.approx(2 / 3 * 1.2)


def test_public_op_validates():
    f, y = worked_example()
    assert sample_valuation(f, y)["copies"].tolist() == [[1, 3], [0, 1]]
    with pytest.raises(ValueError, match="2\\^M - 1"):
        sample_valuation(f[:2], y)
    with pytest.raises(ValueError, match="labels"):
        sample_valuation(f, y[:1])
    with pytest.raises(ValueError, match="value"):
        sample_valuation(f, y, value="paper")
    with pytest.raises(TypeError):
        sample_valuation(f.long(), y)
