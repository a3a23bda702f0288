"""PMR reference (mmkernels/reference/pmr.py) and the public ops on the reference backend: the hand-computed worked
example of docs/methods/pmr.md, the literal loop transcription on random inputs, gradcheck of the analytic
backward in float64, and properties."""

import math

import pytest
import torch

from _pmr_cases import check_refresh_skips_nonfinite_rows
from mmkernels import reference as R
from mmkernels.pmr import new_refresh_buffers, pmr_class_sums_, pmr_loss, pmr_refresh_, pmr_update_prototypes_


def _example():
    """docs/methods/pmr.md: D = 2, C = 3, B = 2, y = (0, 1); modality 0 = a (audio), 1 = v (visual)."""
    P = torch.tensor(
        [[[0.0, 0.0], [3.0, 4.0], [-3.0, -4.0]], [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64
    )
    z = torch.tensor([[[0.0, 0.0], [3.0, 0.0]], [[0.5, 0.5], [1.0, 0.0]]], dtype=torch.float64)
    return z, P, torch.tensor([0, 1])


# ----------------------------------------------------------------------------------------------- worked example
def test_worked_example_statistics():
    z, P, y = _example()
    logp, _ = R.pmr_row_log_probs(z, P, y)
    torch.testing.assert_close(
        logp.exp(), torch.tensor([[0.98670, 0.26606], [0.33333, 0.62073]], dtype=torch.float64), atol=5e-6, rtol=0
    )
    out = R.pmr_forward_ref(z, P, y, alpha=1.0)
    torch.testing.assert_close(out["scores"], torch.tensor([1.25276, 0.95407]), atol=5e-6, rtol=0)
    torch.testing.assert_close(out["ratios"][0], torch.tensor(1.31307), atol=5e-6, rtol=0)  # rho = s_a / s_v
    torch.testing.assert_close(out["pce"], torch.tensor([0.66872, 0.78773]), atol=5e-6, rtol=0)
    assert out["coefficients"].tolist() == [0.0, 1.0]  # rho > 1: (c_a, c_v) = (0, alpha)
    assert out["flag"].item() == 0
    assert out["loss"].item() == pytest.approx(0.78773, abs=5e-6)
    assert R.pmr_forward_ref(z, P, y, alpha=0.6)["loss"].item() == pytest.approx(0.47264, abs=5e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_worked_example_gradient(alpha):
    z, P, y = _example()
    out = R.pmr_forward_ref(z, P, y, alpha=alpha)
    dz = R.pmr_backward_ref(1.0, z, P, y, out["coefficients"], out["count"])
    torch.testing.assert_close(
        dz[1, 0], alpha * torch.tensor([0.23570, 0.23570], dtype=torch.float64), atol=5e-6, rtol=0
    )
    assert dz[0].abs().max().item() == 0.0  # c_a = 0: no gradient reaches the audio encoder
    # the public op (reference backend) through autograd, features as a list
    zs = [z[0].clone().requires_grad_(), z[1].clone().requires_grad_()]
    res = pmr_loss(zs, P, y, alpha=alpha)
    res["loss"].backward()
    torch.testing.assert_close(
        zs[1].grad[0], alpha * torch.tensor([0.23570, 0.23570], dtype=torch.float64), atol=5e-6, rtol=0
    )
    assert zs[0].grad.abs().max().item() == 0.0
    assert not res["coefficients"].requires_grad and res["scores"].dtype == torch.float32


def test_worked_example_finite_difference():
    """The quoted gradient by central differences of the loss (coefficients fixed by the rule)."""
    z, P, y = _example()
    h = 1e-6
    for j in range(2):
        e = torch.zeros_like(z)
        e[1, 0, j] = h
        fd = (R.pmr_forward_ref(z + e, P, y)["loss"] - R.pmr_forward_ref(z - e, P, y)["loss"]) / (2 * h)
        assert fd.item() == pytest.approx(0.23570, abs=5e-6)


# ----------------------------------------------------------------------------------------------- literal vs vectorised
def _random(M, B, C, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(M, B, D, generator=g, dtype=dtype) * torch.linspace(0.5, 2.0, M, dtype=dtype).view(M, 1, 1)
    P = torch.randn(M, C, D, generator=g, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g)
    return z, P, y


@pytest.mark.parametrize(
    "M,B,C,D,seed", [(2, 5, 3, 4, 0), (3, 9, 6, 2, 1), (5, 4, 2, 7, 2), (8, 6, 4, 3, 3), (2, 1, 1, 1, 4)]
)
def test_literal_matches_vectorised(M, B, C, D, seed):
    z, P, y = _random(M, B, C, D, seed)
    if B > 2:
        y[1] = -100
    lit = R.pmr_literal(z.tolist(), P.tolist(), y.tolist(), alpha=0.8)
    out = R.pmr_forward_ref(z, P, y, alpha=0.8)
    torch.testing.assert_close(out["scores"], torch.tensor(lit["scores"], dtype=torch.float32))
    torch.testing.assert_close(out["pce"], torch.tensor(lit["pce"], dtype=torch.float32))
    assert out["coefficients"].tolist() == pytest.approx(lit["coefficients"])
    assert out["loss"].item() == pytest.approx(lit["loss"], rel=1e-12, abs=1e-12)
    dz = R.pmr_backward_ref(1.0, z, P, y, torch.tensor(lit["coefficients"], dtype=torch.float64), out["count"])
    want = R.pmr_literal_grad(z.tolist(), P.tolist(), y.tolist(), lit["coefficients"])
    torch.testing.assert_close(dz, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("first", [True, False])
def test_literal_prototypes(first):
    z, P, y = _random(3, 11, 5, 4, 7)
    y[y == 4] = 3  # class 4 absent: keeps its old prototype
    y[0] = -100
    want = R.pmr_literal_prototypes(z.tolist(), y.tolist(), P.tolist(), mu=0.3, first=first)
    got = R.pmr_prototypes_ref(z, y, P, mu=0.3, first=first)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert torch.equal(got[:, 4], P[:, 4])


# ----------------------------------------------------------------------------------------------- gradcheck
class _RefLoss(torch.autograd.Function):
    """The reference forward with the analytic reference backward (what the kernels implement)."""

    @staticmethod
    def forward(ctx, z, P, y, alpha):
        out = R.pmr_forward_ref(z, P, y, alpha=alpha)
        ctx.save_for_backward(z, P, y, out["coefficients"], out["count"])
        return out["loss"]

    @staticmethod
    def backward(ctx, g):
        z, P, y, coef, count = ctx.saved_tensors
        return R.pmr_backward_ref(g, z, P, y, coef, count), None, None, None


@pytest.mark.parametrize("M,B,C,D,seed", [(2, 4, 3, 5, 0), (3, 6, 5, 2, 1), (4, 3, 2, 3, 2)])
def test_gradcheck_analytic_backward(M, B, C, D, seed):
    z, P, y = _random(M, B, C, D, seed)
    y[0] = -100
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _RefLoss.apply(t, P, y, 0.7), (z,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda t: pmr_loss(t, P, y, alpha=0.7)["loss"], (z,), eps=1e-6, atol=1e-7)


def test_gradient_where_a_row_equals_a_prototype_is_finite():
    """d_ik = 0: the term is 0 (the authors' sqrt gives NaN through autograd)."""
    z, P, y = _example()  # z_a,0 = P_a[0] and z_v,1 = P_v[1]
    out = R.pmr_forward_ref(z, P, y, alpha=1.0)
    naive = z.clone().requires_grad_()
    R.pmr_forward_ref(naive, P, y, alpha=1.0)["loss"].backward()
    assert torch.isnan(naive.grad[1, 1]).all()  # what plain autograd through the distance gives
    dz = R.pmr_backward_ref(1.0, z, P, y, torch.ones(2), out["count"])
    assert torch.isfinite(dz).all()
    want = R.pmr_literal_grad(z.tolist(), P.tolist(), y.tolist(), [1.0, 1.0])  # skips the d = 0 terms
    torch.testing.assert_close(dz, torch.tensor(want, dtype=torch.float64))
    # by hand, z_v,2 = (1, 0) = P_v[1]: p = softmax(-(1, 0, sqrt 2)); (p_0 (P_0 - z) + p_2 (P_2 - z) / sqrt 2) / 2
    e = [math.exp(-1.0), 1.0, math.exp(-math.sqrt(2))]
    p0, p2 = e[0] / sum(e), e[2] / sum(e)
    hand = [(-p0 - p2 / math.sqrt(2)) / 2, (p2 / math.sqrt(2)) / 2]
    torch.testing.assert_close(dz[1, 1], torch.tensor(hand, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------- properties
def test_m2_rule_is_the_authors_switch():
    for s, want in (
        ([1.0, 2.0], [0.5, 0.0]),
        ([3.0, 2.0], [0.0, 0.5]),
        ([2.0, 2.0], [0.0, 0.0]),
        ([0.0, 0.0], [0.0, 0.0]),
        ([0.0, 1.0], [0.5, 0.0]),
    ):
        got = R.pmr_coefficients(torch.tensor(s), alpha=0.5).tolist()
        assert got == want
        lit_rho = s[0] / s[1] if s[1] else (float("inf") if s[0] else float("nan"))
        authors = [0.5, 0.0] if lit_rho < 1 else ([0.0, 0.5] if lit_rho > 1 else [0.0, 0.0])
        assert got == authors


def test_m_gt2_rule_spares_only_the_strongest():
    s = torch.tensor([0.3, 0.9, 0.5, 0.9])
    assert R.pmr_coefficients(s, alpha=2.0).tolist() == [2.0, 0.0, 2.0, 0.0]  # tied maxima both spared
    r = R.pmr_ratios(s)
    torch.testing.assert_close(r, torch.tensor([0.3 / 0.9, 1.0, 0.5 / 0.9, 1.0]))
    assert ((r < 1) == (R.pmr_coefficients(s) > 0)).all()


def test_ignored_rows_count_nowhere():
    z, P, y = _random(3, 6, 4, 5, 11)
    extra = torch.randn(3, 4, 5, dtype=torch.float64) * 100
    zz = torch.cat([z, extra], 1)
    yy = torch.cat([y, torch.full((4,), -7)])
    a = R.pmr_forward_ref(z, P, y, alpha=1.0)
    b = R.pmr_forward_ref(zz, P, yy, alpha=1.0, ignore_index=-7)
    for k in ("scores", "pce", "coefficients", "loss", "count"):
        torch.testing.assert_close(a[k], b[k])
    g = R.pmr_backward_ref(1.0, zz, P, yy, b["coefficients"], b["count"], ignore_index=-7)
    assert g[:, 6:].abs().max().item() == 0
    torch.testing.assert_close(g[:, :6], R.pmr_backward_ref(1.0, z, P, y, a["coefficients"], a["count"]))


def test_flags():
    z, P, y = _random(2, 4, 3, 2, 3, dtype=torch.float32)
    out = pmr_loss(z, P, torch.full((4,), -100))
    assert out["flag"].item() == 2 and out["loss"].item() == 0 and out["coefficients"].tolist() == [0.0, 0.0]
    bad = z.clone()
    bad[0, 1, 0] = float("nan")
    bad.requires_grad_()
    out = pmr_loss(bad, P, y)
    assert out["flag"].item() == 1 and out["loss"].item() == 0
    out["loss"].backward()
    assert bad.grad.abs().max().item() == 0  # NaN never reaches a parameter
    y2 = y.clone()
    y2[0] = 3  # outside [0, C)
    out = pmr_loss(z, P, y2)
    assert out["flag"].item() == 1 and torch.isnan(out["scores"]).all()


def test_padding_widths_is_exact():
    g = torch.Generator().manual_seed(5)
    za, zv = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    pa, pv = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    out = pmr_loss([za, zv], [pa, pv], y, alpha=1.0)
    for m, (zm, pm) in enumerate(((za, pa), (zv, pv))):
        logp, _ = R.pmr_row_log_probs(zm[None], pm[None], y)
        assert out["scores"][m].item() == pytest.approx(logp.exp().sum().item(), rel=1e-6)


def test_refresh_in_batches_equals_one_shot():
    z, P, y = _random(2, 12, 3, 4, 9, dtype=torch.float32)
    P0 = P.clone()
    sums, counts = new_refresh_buffers(2, 3, 4)
    pmr_class_sums_(z[:, :5], y[:5], sums, counts)
    pmr_class_sums_([z[0, 5:], z[1, 5:]], y[5:], sums, counts)
    pmr_refresh_(P, sums, counts, mu=0.2, first=False)
    torch.testing.assert_close(P, R.pmr_prototypes_ref(z, y, P0, mu=0.2, first=False))
    Q = P0.clone()
    pmr_update_prototypes_(Q, z, y, mu=0.2, first=False)
    torch.testing.assert_close(Q, P)
    Q = P0.clone()
    pmr_update_prototypes_(Q, z, y, mu=0.2, first=True)  # epoch 0: the class means
    means = torch.stack([z[:, y == k].mean(1) for k in range(3)], 1)
    torch.testing.assert_close(Q, means)


def test_prototype_ema_weights():
    z = torch.tensor([[[2.0], [4.0]], [[1.0], [1.0]]])
    y = torch.tensor([0, 0])
    old = torch.tensor([[[10.0], [7.0]], [[0.0], [5.0]]])
    new = R.pmr_prototypes_ref(z, y, old, mu=0.25, first=False)
    assert new[0, 0].item() == pytest.approx(0.75 * 3.0 + 0.25 * 10.0)
    assert new[0, 1].item() == 7.0 and new[1, 1].item() == 5.0  # class 1 absent: old kept (authors: NaN)


def test_toolkit_factors():
    s = torch.tensor([2.0, 4.0, 3.0])
    k = R.pmr_toolkit_factors(s)
    assert k[0].item() == 1.0
    assert k[1].item() == pytest.approx(1 - math.tanh(0.02))
    assert k[2].item() == pytest.approx(1 - math.tanh(0.015))


def test_validation_errors():
    z, P, y = _random(2, 4, 3, 2, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="prototypes\\[1\\]"):
        pmr_loss([z[0], z[1]], [P[0], P[1, :, :1]], y)
    with pytest.raises(ValueError, match="labels"):
        pmr_loss(z, P, y[:3])
    with pytest.raises(ValueError, match="alpha"):
        pmr_loss(z, P, y, alpha=-1.0)
    with pytest.raises(ValueError, match="mu"):
        pmr_update_prototypes_(P, z, y, mu=1.5, first=False)
    with pytest.raises(ValueError, match="counts"):
        pmr_refresh_(P, torch.zeros(2, 3, 2), torch.zeros(3), mu=0.1, first=False)


@pytest.mark.parametrize("first", [True, False])
def test_refresh_skips_nonfinite_rows_per_modality(first, device):
    """A row holding a NaN/Inf feature is skipped for its modality only (the other modality keeps it), counted in
    counts[m, C]; a non-finite old prototype entry becomes the class mean (tests/_pmr_cases.py)."""
    check_refresh_skips_nonfinite_rows(first, device)


def test_backward_is_stable_near_a_large_norm_prototype():
    """|P| / d = 1e5: a feature close to a far-from-origin prototype. The gradient formed from the differences
    P_k - z (not w @ P - z sum_k w, which cancels) stays within 1e-5 of a float64 oracle in fp32."""
    g = torch.Generator().manual_seed(5)
    far = 1e5 * torch.randn(2, 1, 4, generator=g, dtype=torch.float64)
    P64 = far + torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    z64 = far + torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    coef, count = torch.tensor([1.0, 1.0]), torch.tensor(6.0)
    want = R.pmr_backward_ref(torch.tensor(1.0, dtype=torch.float64), z64, P64, y, coef.double(), count.double())
    got = R.pmr_backward_ref(torch.tensor(1.0), z64.float(), P64.float(), y, coef, count)
    # the fp32 inputs are the float64 ones rounded: compare against the oracle on those same rounded inputs
    want32 = R.pmr_backward_ref(
        torch.tensor(1.0, dtype=torch.float64),
        z64.float().double(),
        P64.float().double(),
        y,
        coef.double(),
        count.double(),
    )
    assert want.abs().max() > 0
    assert ((got.double() - want32).norm() / want32.norm()).item() <= 1e-5


def test_float64_features_end_to_end():
    """fp64 features (with the balancer's fp32 prototypes, or fp64 ones) run forward, backward and refresh on the
    reference; the analytic backward passes gradcheck in float64."""
    g = torch.Generator().manual_seed(6)
    z = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1, 0])
    P32 = torch.randn(2, 3, 3, generator=g)
    out = pmr_loss(z, P32, y, alpha=1.0)
    out["loss"].backward()
    assert z.grad.dtype == torch.float64 and torch.isfinite(z.grad).all()
    P64 = P32.double()
    torch.autograd.gradcheck(lambda t: pmr_loss(t, P64, y, alpha=0.7)["loss"], (z.detach().requires_grad_(),))
    P = torch.zeros(2, 3, 3, dtype=torch.float64)
    pmr_update_prototypes_(P, z.detach(), y, mu=0.2, first=True)
    torch.testing.assert_close(P, R.pmr_prototypes_ref(z.detach(), y, torch.zeros_like(P), mu=0.2, first=True))
