"""mmkernels.metrics: unimodal accuracy, the imbalance spread, AGM's competition strength (Eq. 11-13)."""

import pytest
import torch

import mmkernels
from mmkernels.metrics import competition_strength, competition_strengths, imbalance, unimodal_accuracy


def test_exported():
    assert mmkernels.metrics.competition_strength is competition_strength


def test_unimodal_accuracy_counts_argmax_hits():
    y = torch.tensor([0, 1, 2, 1])
    u0 = torch.nn.functional.one_hot(y, 3).float()  # all right
    u1 = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 0]), 3).float()  # right once
    acc = unimodal_accuracy(torch.stack([u0, u1]), y)
    assert acc.tolist() == [1.0, 0.25]
    assert torch.equal(unimodal_accuracy([u0, u1], y), acc)  # a list of M [B, C] works too
    with pytest.raises(ValueError, match=r"\[M, B, C\]"):
        unimodal_accuracy(u0, y)


def test_imbalance_is_the_spread():
    assert imbalance([0.9, 0.5, 0.7]).item() == pytest.approx(0.4)
    # relative to what each modality reaches alone: 0.45/0.5 = 0.9 and 0.9/0.9 = 1.0
    assert imbalance([0.45, 0.9], reference=[0.5, 0.9]).item() == pytest.approx(0.1)
    assert imbalance(torch.tensor([0.3, 0.3])).item() == 0.0
    with pytest.raises(ValueError, match="one number per modality"):
        imbalance([0.5])


def _features(n, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.linspace(0.1, 10.0, d), g


def test_linear_concept_has_no_competition():
    z, g = _features(600)
    w, b = torch.randn(12, 5, generator=g), torch.randn(5, generator=g)
    c = z @ w + b
    d = competition_strength(z[:300], c[:300], z[300:], c[300:], ridge=1e-8)
    assert d.item() < 1e-6 and d.dtype == torch.float32 and d.dim() == 0


def test_unrelated_concept_has_full_competition():
    z, g = _features(4000)
    c = torch.randn(4000, 5, generator=g)
    d = competition_strength(z[:2000], c[:2000], z[2000:], c[2000:])
    assert 0.98 < d.item() < 1.02


def test_noise_fraction_is_recovered():
    """C = z W + e with Var(e) = 1/3 of Var(C): d is the unexplained fraction, 1/3."""
    z, g = _features(20000, d=4)
    z = (z - z.mean(0)) / z.std(0)
    w = torch.randn(4, 3, generator=g)
    signal = z @ w
    noise = torch.randn(20000, 3, generator=g) * signal.std(0) / 2**0.5
    c = signal + noise
    d = competition_strength(z[:10000], c[:10000], z[10000:], c[10000:], ridge=1e-6)
    assert d.item() == pytest.approx(1 / 3, abs=0.02)


def test_matches_eq12_solved_by_gradient_descent():
    """The closed form equals minimising Eq. 12 (squared-norm ridge on W of standardised z) numerically."""
    z, g = _features(200, d=6)
    c = torch.tanh(z[:, :3] / 5) + 0.3 * torch.randn(200, 3, generator=g)
    zf, cf, ze, ce = z[:120].double(), c[:120].double(), z[120:].double(), c[120:].double()
    ridge = 0.05
    mu, sd = zf.mean(0), zf.std(0)
    w = torch.zeros(6, 3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = (((zf - mu) / sd) @ w + b - cf).pow(2).sum(1).mean() + ridge * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = ((ze - mu) / sd) @ w + b
        expect = (ce - pred).pow(2).sum() / (ce - ce.mean(0)).pow(2).sum()
    got = competition_strength(z[:120], c[:120], z[120:], c[120:], ridge=ridge)
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)


def test_scale_free_and_constant_features():
    """Standardising z makes d independent of each feature's scale; a constant (dead) feature is ignored."""
    z, g = _features(400, d=5)
    c = torch.sin(z[:, :2]) + 0.1 * torch.randn(400, 2, generator=g)
    d = competition_strength(z[:200], c[:200], z[200:], c[200:])
    scaled = z * torch.tensor([1e3, 1e-3, 1.0, 7.0, 0.5])
    d_scaled = competition_strength(scaled[:200], c[:200], scaled[200:], c[200:])
    assert d_scaled.item() == pytest.approx(d.item(), rel=1e-5)
    dead = torch.cat([z, torch.zeros(400, 1)], 1)
    assert competition_strength(dead[:200], c[:200], dead[200:], c[200:]).item() == pytest.approx(d.item(), rel=1e-4)


def test_competition_strengths_per_modality_and_errors():
    z, g = _features(300)
    linear = z @ torch.randn(12, 4, generator=g)
    unrelated = torch.randn(300, 4, generator=g)
    d = competition_strengths(z[:150], [linear[:150], unrelated[:150]], z[150:], [linear[150:], unrelated[150:]])
    assert d.shape == (2,) and d[0] < 0.05 < 0.8 < d[1]
    with pytest.raises(ValueError, match="same number of rows"):
        competition_strength(z[:150], linear[:100], z[150:], linear[150:])
    with pytest.raises(ValueError, match="2-D"):
        competition_strength(z[:150, 0], linear[:150], z[150:], linear[150:])
    with pytest.raises(ValueError, match="fit concepts"):
        competition_strengths(z[:150], [linear[:150]], z[150:], [])
