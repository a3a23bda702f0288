"""Sample- and modality-level valuation reference (docs/methods/sample_valuation.md): the worked example (authors and
toolkit), a literal loop transcription on random logits, Shapley efficiency, thresholds, the M > 2 rate, the public
op, non-finite logits, autocast, and floor(p N) of the modality level against Fractions."""

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
    assert idx.shape[0] == 7  # next epoch: 7 rows
    assert idx.tolist() == [0, 1, 0, 1, 1, 1, 1]
    assert keep.tolist() == [[True, True]] * 2 + [[True, False]] * 4 + [[False, True]]
    gaps = R.modality_gaps(res["phi"])  # Z = both samples
    torch.testing.assert_close(gaps, torch.tensor([1.0, 0.0]))
    p, m = R.modality_rate(gaps)
    assert p.item() == pytest.approx(2 / 3) and m.item() == 0
    assert math.floor(p.item() * 2) == 1  # one audio-only copy


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
        correct = row.index(max(row)) == int(labels[i])  # first maximum wins
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
    f = torch.randint(0, 3, (2**m - 1, b, c), generator=g).float()  # small integers: ties happen
    y = torch.randint(0, c, (b,), generator=g)
    res = R.sample_valuation(f, y, value=value)
    want = literal_phi(f, y, value)
    torch.testing.assert_close(
        res["phi"].double(),
        torch.tensor([[float(x) for x in row] for row in want], dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    assert res["copies"].tolist() == [[literal_copies(x) for x in row] for row in want]
    assert R.valuation_copies(res["phi"]).tolist() == res["copies"].tolist()


@pytest.mark.parametrize(
    "m,correct,modality,want_phi,want_copies",
    [
        (4, (0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1), 3, 1.0, 0),  # a plain fp32 sum gives 0.99999994: 1 copy
        (5, (0,) * 28 + (1, 1, 1), 0, 0.4, 0),  # a plain fp32 sum gives 0.39999998: 2 copies
    ],
)
def test_thresholds_hit_exactly(m, correct, modality, want_phi, want_copies):
    """phi = 1 and phi = 0.4 are Shapley values of integer v(S) (found by enumerating every correctness pattern);
    M! phi is summed exactly, so they give the copies exact arithmetic gives (0), not the side rounding picks."""
    ok = torch.tensor(correct, dtype=torch.bool)
    f = torch.zeros(2**m - 1, 1, 2)
    f[:, 0, 0] = ok.float()  # class 0 wins (y = 0) exactly where `correct` says
    f[:, 0, 1] = 0.5
    res = R.sample_valuation(f, torch.tensor([0]))
    assert res["phi"][modality, 0].item() == pytest.approx(want_phi, abs=1e-7)
    assert res["copies"][modality, 0].item() == want_copies
    naive = R.shapley_combine(res["values"])
    assert R.valuation_copies(naive)[modality, 0].item() != want_copies  # the pitfall is real


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 8), st.integers(0, 10_000))
def test_shapley_values_of_each_sample_sum_to_v_all(m, b, seed):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(2**m - 1, b, 3, generator=g)
    y = torch.randint(0, 3, (b,), generator=g)
    res = R.sample_valuation(f, y)
    torch.testing.assert_close(res["phi"].sum(0), res["values"][-1], atol=1e-5, rtol=0)


def test_threshold_boundaries():
    phi = torch.tensor([[1.0, 0.99, 0.4, 0.41, 0.39, -0.1, -0.09, -0.11, 2.0]])
    assert R.valuation_copies(phi).tolist() == [[0, 1, 0, 1, 2, 0, 2, 3, 0]]


@pytest.mark.parametrize("curve,want", [("linear", 0.2), ("tanh", math.tanh(0.2)), ("square", 0.3**1.5 * 2 / 3)])
def test_rate_curves(curve, want):
    gaps = torch.tensor([0.75, 0.3])  # d = 0.45; (2/3) d = 0.3; alpha 2/3
    p, m = R.modality_rate(gaps, alpha=2 / 3, curve=curve)
    assert p.item() == pytest.approx(want, rel=1e-6) and m.item() == 0


def test_rate_beyond_two_modalities():
    gaps = torch.tensor([0.1, 0.7, 0.4])  # pairs: 0.6, 0.3, 0.3 -> mean 0.4
    p, m = R.modality_rate(gaps)
    assert p.item() == pytest.approx(2 / 3 * 0.4) and m.item() == 1
    p_tk, _ = R.modality_rate(gaps, rate="toolkit")  # ordered pairs sum 2.4 / (M - 1)
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


# ----------------------------------------------------------------------------------------------- non-finite logits
def test_nonfinite_row_is_never_correct():
    """docs/methods/sample_valuation.md "Edge cases": a row holding NaN or +-inf counts as wrong (torch.argmax
    would pick the NaN, here at the label), and the flag is 1; finite rows are valued as usual."""
    nan, inf = float("nan"), float("inf")
    f = torch.tensor(
        [
            [[nan, 0.0, 0.0], [0.0, 0.0, inf]],  # S=1: argmax would be the label 0 / 2
            [[1.0, 0.0, 0.0], [nan, nan, nan]],  # S=2: finite, correct / all NaN
            [[5.0, -inf, 0.0], [0.0, 0.0, 1.0]],
        ]
    )  # S=3: -inf too / finite, correct
    y = torch.tensor([0, 2])
    res = R.sample_valuation(f, y)
    assert res["values"].tolist() == [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
    assert res["flag"].item() == 1.0 and torch.isfinite(res["phi"]).all()
    finite = R.sample_valuation(torch.zeros_like(f).index_fill_(2, torch.tensor([0]), 1.0), torch.tensor([0, 1]))
    assert finite["flag"].item() == 0.0 and finite["flag"].dtype == torch.float32


def test_nan_encoder_output_values_only_the_subsets_without_it():
    """A NaN in modality 0's features makes every subset containing modality 0 non-finite: those are wrong, the
    subset {1} is valued as usual (the reference used to count the NaN rows as correct)."""
    from mmkernels.valuation import valuation_subset_logits

    feats = [torch.tensor([[float("nan"), 1.0]]), torch.tensor([[1.0, 0.0]])]
    head = lambda xs: torch.cat(xs, 1) @ torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])  # noqa: E731
    f = valuation_subset_logits(feats, head)
    res = sample_valuation(f, torch.tensor([0]))
    assert res["flag"].item() == 1.0
    # v({0}) = v({0, 1}) = 0 (non-finite), v({1}) = 1 (class 0 wins): phi_0 = -1/2, phi_1 = 1/2
    assert res["phi"][:, 0].tolist() == [-0.5, 0.5]


# ----------------------------------------------------------------------------------------------- autocast
def test_reference_under_autocast_is_exact():
    """M = 8: M! phi reach 10^5; a bf16 matmul under torch.autocast would round them. The weights product runs with
    autocast off, so phi and the copies equal those of the plain call."""
    g = torch.Generator().manual_seed(3)
    f = torch.randint(0, 2, (255, 16, 2), generator=g).float()
    y = torch.zeros(16, dtype=torch.long)
    want = R.sample_valuation(f, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = R.sample_valuation(f, y)
    assert got["phi"].dtype == torch.float32
    assert torch.equal(got["phi"], want["phi"]) and torch.equal(got["copies"], want["copies"])


# ----------------------------------------------------------------------------------------------- exact floor(p N)
def literal_extra_rows(phi_draws, n, *, alpha=1.0, curve="linear", rate="authors"):
    """floor(p N) from the definition, in Fractions: phi_draws = per draw the M Shapley values (Fractions)."""
    m = len(phi_draws[0])
    gaps = [1 - sum(p[j] for p in phi_draws) / len(phi_draws) for j in range(m)]
    pairs = [abs(gaps[i] - gaps[j]) for i in range(m) for j in range(m) if i < j]
    if rate == "toolkit":
        return math.floor(Fraction(2, 3) * 2 * sum(pairs) / (m - 1) * n)
    x = Fraction(2, 3) * sum(pairs) / len(pairs)
    a = Fraction(alpha)
    if curve == "linear":
        return math.floor(x * a * n)
    q = x**3 * a**2 * n**2  # (p N)^2 for "square": the largest k with k^2 <= q
    k = int(math.sqrt(float(q)))
    while (k + 1) ** 2 <= q:
        k += 1
    while k**2 > q:
        k -= 1
    return k


def fp32_extra_rows(phi_draws, n, **kw):
    """The former count: fp32 gaps and rate, then floor(p N) in fp32."""
    phi = torch.tensor([[float(x) for x in p] for p in phi_draws]).t()
    p, _ = R.modality_rate(R.modality_gaps(phi), **kw)
    return int(torch.floor(p * n))


def exact_extra_rows(phi_draws, n, **kw):
    m = len(phi_draws[0])
    fact = math.factorial(m)
    scaled = torch.tensor([[int(x * fact) for x in p] for p in phi_draws]).t()
    gaps = R.modality_gaps_exact(scaled, torch.ones(len(phi_draws), dtype=torch.long), fact)
    return R.modality_extra_rows(gaps, n, **kw)[0]


def test_extra_rows_are_counted_exactly_on_a_grid():
    """M = 2, phi multiples of 1/2 (the authors' v): floor(p N) against Fractions on a grid of N and phi values. Where
    p N is an exact integer the former fp32 count was one row short in a share of the cases; the exact count never."""
    halves = [Fraction(h, 2) for h in range(-1, 4)]
    integer_cases = fp32_short = 0
    for n in range(1, 41):
        k = max(1, int(0.2 * n))  # the default fraction's number of draws
        for a in halves:
            for b in halves:
                draws = ([(a, b), (b, b), (a, a)] * k)[:k]
                want = literal_extra_rows(draws, n)
                assert exact_extra_rows(draws, n) == want, (n, a, b)
                gaps = [1 - sum(p[j] for p in draws) / len(draws) for j in range(2)]
                if (Fraction(2, 3) * abs(gaps[0] - gaps[1]) * n).denominator == 1 and want > 0:
                    integer_cases += 1
                    fp32_short += fp32_extra_rows(draws, n) != want
    assert integer_cases > 50 and fp32_short > 0, "the grid would prove nothing"


@pytest.mark.parametrize(
    "kw", [dict(alpha=0.75), dict(curve="square", alpha=1.5), dict(rate="toolkit"), dict(curve="square", alpha=0.3)]
)
@pytest.mark.parametrize("m", [2, 3])
def test_extra_rows_exact_other_rates(m, kw):
    g = torch.Generator().manual_seed(m)
    fact = math.factorial(m)
    for n in (3, 10, 27, 64):
        p = torch.randint(-fact, 2 * fact, (5, m), generator=g).tolist()
        draws = [tuple(Fraction(x, fact) for x in row) for row in p]
        assert exact_extra_rows(draws, n, **kw) == literal_extra_rows(draws, n, **kw), (n, draws)


def test_gaps_exact_leaves_out_unvalued_draws_and_averages_repeats():
    """A draw valued twice holds the sum of two M! phi (count 2): its phi is their mean; one with count 0 is left
    out."""
    scaled = torch.tensor([[2, 6, 5], [0, -2, 9]])  # M = 2, fact 2
    counts = torch.tensor([1, 2, 0])
    gaps = R.modality_gaps_exact(scaled, counts, 2)
    # phi of the valued draws: (1, 0) and (1.5, -0.5); mean (1.25, -0.25)
    assert gaps == [Fraction(-1, 4), Fraction(5, 4)]
    assert R.modality_gaps_exact(scaled, torch.zeros(3, dtype=torch.long), 2) == [1, 1]
    n, p, keep = R.modality_extra_rows(gaps, 9)
    assert (n, keep) == (math.floor(Fraction(2, 3) * Fraction(3, 2) * 9), 1) and p == pytest.approx(1.0)
