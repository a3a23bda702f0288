"""Hand-computed cases, properties and edge cases for mmkernels/reference/ (the oracle of every kernel).

Expected numbers are written out from the formulas by hand; the arithmetic is in the comments.
"""

import ast
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

from mmkernels import reference as R

TOL = dict(rtol=1e-6, atol=1e-6)
LN3 = math.log(3.0)


def t32(*v):
    return torch.tensor(v, dtype=torch.float32)


def eq(actual, expected, **tol):
    assert actual.dtype == torch.float32, actual.dtype
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), **(tol or TOL))


# ------------------------------------------------------------------------------------------- hand-computed scores
def small_batch():
    """M=2, B=3 (row 2 ignored, NaN logits), C=2.
    modality 0: rows [0,0], [0,0]       -> p(y) = 1/2, 1/2
    modality 1: rows [ln3,0] y=0, [0,ln3] y=1 -> p(y) = 3/4, 3/4"""
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [math.nan, 1.0]], [[LN3, 0.0], [0.0, LN3], [1.0, math.nan]]])
    labels = torch.tensor([0, 1, -100])
    return logits, labels


def test_score_sums_hand():
    logits, labels = small_batch()
    sums, count = R.score_sums(logits, labels, kind="prob")
    eq(sums, [1.0, 1.5])  # 1/2 + 1/2 ; 3/4 + 3/4
    eq(count, 2.0)
    sums, count = R.score_sums(logits, labels, kind="ce")
    eq(sums, [2 * 0.6931471805599453, 2 * 0.2876820724517809])  # 2 ln 2 ; -2 ln(3/4)
    eq(R.scores(logits, labels, kind="prob"), [1.0, 1.5])  # prob: SUM
    eq(R.scores(logits, labels, kind="ce"), [0.6931471805599453, 0.2876820724517809])  # ce: MEAN


def test_ce_clamps_probability_at_1e8():
    # p(y=1) = e^-100 / (1 + e^-100) < 1e-8 -> -ln(1e-8) = 18.420680743952367 ; modality 1: uniform -> ln 2
    logits = torch.tensor([[[0.0, -100.0]], [[0.0, 0.0]]])
    eq(R.scores(logits, torch.tensor([1]), kind="ce"), [18.420680743952367, 0.6931471805599453])
    # with fp64 logits and p = e^-10 (> 1e-8) there is no clamp: -log p = 10 + log(1 + e^-10)
    logits = torch.tensor([[[0.0, -10.0]], [[0.0, 0.0]]], dtype=torch.float64)
    eq(R.scores(logits, torch.tensor([1]), kind="ce")[0], 10 + math.log1p(math.exp(-10)))


def test_custom_ignore_index():
    logits, labels = small_batch()
    labels = torch.tensor([0, 1, 7])
    eq(R.scores(logits, labels, kind="prob", ignore_index=7), [1.0, 1.5])


# ------------------------------------------------------------------------------------------- ratios
def test_ratio_tpami_hand():
    s = t32(1.0, 2.0, 4.0)
    # rho_0 = (1/2 + 1/4)/2 = 0.375 ; rho_1 = (2/1 + 2/4)/2 = 1.25 ; rho_2 = (4/1 + 4/2)/2 = 3
    eq(R.ratio_tpami(s), [0.375, 1.25, 3.0])
    # difference: d_0 = ((1-2)+(1-4))/2 = -2, d_1 = ((2-1)+(2-4))/2 = -0.5, d_2 = ((4-1)+(4-2))/2 = 2.5 ; returned 1 + d
    eq(R.ratio_tpami(s, variant="difference"), [-1.0, 0.5, 3.5])
    eq(R.ratio_tpami(t32(2.0, 3.0)), [2 / 3, 1.5])  # M = 2: s_0/s_1, s_1/s_0


def test_ratio_mlb_hand():
    # r_0 = ((2+4)/2)/1 = 3 ; r_1 = ((1+4)/2)/2 = 1.25 ; r_2 = ((1+2)/2)/4 = 0.375
    eq(R.ratio_mlb(t32(1.0, 2.0, 4.0)), [3.0, 1.25, 0.375])


# ------------------------------------------------------------------------------------------- coefficients
def test_ogm_ge_hand_two_modalities():
    # s = [1, 2], alpha 0.5: rho_1 = 2 > 1 -> k_1 = 1 - tanh(1) = 0.23840584404423515, k_0 = 1
    rho, k = R.ogm_ge_coefficients(t32(1.0, 2.0), alpha=0.5)
    eq(rho, [0.5, 2.0])
    eq(k, [1.0, 0.23840584404423515])
    # s = [3, 1]: rho_1 = 1/3 -> else branch: k_0 = 1 - tanh(0.5 * 3) = 0.0948517463551336
    rho, k = R.ogm_ge_coefficients(t32(3.0, 1.0), alpha=0.5)
    eq(rho, [3.0, 1 / 3])
    eq(k, [0.0948517463551336, 1.0])
    # exact tie: modality 0 is suppressed, k_0 = 1 - tanh(0.5) = 0.5378828427399902 (the jump at rho = 1)
    _, k = R.ogm_ge_coefficients(t32(2.0, 2.0), alpha=0.5)
    eq(k, [0.5378828427399902, 1.0])


def test_ogm_ge_hand_three_modalities():
    # TPAMI ratio [0.375, 1.25, 3]; k = [1, 1 - tanh(0.625), 1 - tanh(1.5)]
    rho, k = R.ogm_ge_coefficients(t32(1.0, 2.0, 4.0), alpha=0.5)
    eq(rho, [0.375, 1.25, 3.0])
    eq(k, [1.0, 0.44540027765061774, 0.0948517463551336])


def test_ogm_coefficients_hand():
    rho = t32(0.375, 1.25, 3.0)
    # tanh: 1 - 0.5 tanh(0.25) = 0.8775406687981454 ; 1 - 0.5 tanh(2) = 0.5179862099620915
    eq(R.ogm_coefficients(rho, alpha=0.5), [1.0, 0.8775406687981454, 0.5179862099620915])
    # sigmoid: 1 - 0.5 sigmoid(1.25) = 0.6113500694126545 ; 1 - 0.5 sigmoid(3) = 0.5237129365887834
    eq(R.ogm_coefficients(rho, alpha=0.5, z="sigmoid"), [1.0, 0.6113500694126545, 0.5237129365887834])
    # alpha 2: 1 - 2 tanh(2) < 0 -> clamped at 0
    eq(R.ogm_coefficients(rho, alpha=2.0)[2], 0.0)
    eq(R.ogm_coefficients(t32(1.0), alpha=0.5), [1.0])  # rho = 1 is not > 1


def test_opm_drop_probability_hand():
    rho = t32(0.375, 1.25, 3.0)
    # 0.5 (1 + 0.5 tanh(0.25)) = 0.5612296656009272 ; 0.5 (1 + 0.5 tanh(2)) = 0.7410068950189542
    eq(R.opm_drop_probability(rho), [0.0, 0.5612296656009272, 0.7410068950189542])
    # q_base 0.8, lam 1: 0.8 (1 + tanh(2)) = 1.571 -> clipped to 1
    eq(R.opm_drop_probability(rho, q_base=0.8, lam=1.0)[2], 1.0)
    # sigmoid: 0.5 (1 + 0.5 sigmoid(3)) = 0.5 + 0.25 * 0.9525741268224334
    eq(R.opm_drop_probability(rho, z="sigmoid")[2], 0.5 + 0.25 * 0.9525741268224334)


def test_agm_kappa_hand():
    s = t32(1.0, 2.0)  # ce: modality 0 is stronger
    s_hat = t32(1.5, 1.5)
    r, tau, kappa = R.agm_kappa(s, s_hat, alpha=1.0)
    # r_m = exp(2 (mean - s_m)) = [exp(1), exp(-1)] ; tau = [1, 1]
    eq(r, [2.718281828459045, 0.36787944117144233])
    eq(tau, [1.0, 1.0])
    # kappa = exp(tau - r) = [exp(1 - e), exp(1 - 1/e)] = [0.1793740787340172, 1.8815963875316455]
    eq(kappa, [0.1793740787340172, 1.8815963875316455])
    _, _, kappa = R.agm_kappa(s, s_hat, alpha=1.0, clip=0.5)
    eq(kappa, [0.1793740787340172, 1.6487212707001282])  # exponent 0.632 clipped to 0.5
    _, tau, kappa = R.agm_kappa(s, s_hat, alpha=1.0, steps=torch.tensor(0.0))
    eq(tau, [1.0, 1.0])  # no history: s_hat = 0 (Alg. 1), tau = 1
    eq(kappa, [0.1793740787340172, 1.8815963875316455])  # exp(1 - r)


def test_agm_update_running_hand():
    # t = 4: [2 + (6-2)/4, 4 + (0-4)/4] = [3, 3]
    s_hat, steps = R.agm_update_running(t32(2.0, 4.0), torch.tensor(3.0), t32(6.0, 0.0))
    eq(s_hat, [3.0, 3.0])
    eq(steps, 4.0)
    s_hat, steps = R.agm_update_running(t32(math.nan, 7.0), torch.tensor(0.0), t32(6.0, 0.0))
    eq(s_hat, [6.0, 0.0])  # first step: exactly s, whatever s_hat held
    eq(steps, 1.0)


def test_mlb_coefficients_hand():
    r = t32(3.0, 1.25, 0.375)
    # beta_max 3: 1 + 2 tanh(2) = 2.928055160151634 ; 1 + 2 tanh(0.25) = 1.4898373248074184 ;
    # r < 1 -> beta 2: 1 + tanh(-0.625) = 0.44540027765061774
    eq(R.mlb_coefficients(r, alpha=1.0, beta_max=3.0), [2.928055160151634, 1.4898373248074184, 0.44540027765061774])
    eq(R.mlb_coefficients(t32(1.0)), [1.0])


# ------------------------------------------------------------------------------------------- OLM
def test_olm_hand():
    G, C = R.olm_rates(t32(2.0, 2.0), t32(2.5, 3.0), t32(1.0, 0.5), t32(2.0, 2.5))
    # G = |dev0 - dev| = [0.5, 0.5] ; C = ||dev - train| - |dev0 - train0|| = [|1 - 0.5|, |2 - 1|] = [0.5, 1]
    eq(G, [0.5, 0.5])
    eq(C, [0.5, 1.0])
    # softmax([1, 0.5]) = [sigmoid(0.5), 1 - sigmoid(0.5)]
    eq(R.olm_rebalance_factors(G, C), [0.6224593312018546, 0.3775406687981454])
    # C = 0 guarded: G/C finite, no NaN
    lam = R.olm_rebalance_factors(t32(0.0, 1.0), t32(0.0, 0.0))
    assert torch.isfinite(lam).all()
    eq(lam, [0.0, 1.0])


def test_olm_update_hand_paper():
    """Eq. 9 as printed: target lam_m * mean_k(w_k n_k)."""
    w, n, lam = t32(1.0, 1.0), t32(2.0, 4.0), t32(0.75, 0.25)
    # step 1: mean(w n) = 3, target [2.25, 0.75], w n - t = [-0.25, 3.25] -> grad [-2, 4] -> w = [1.2, 0.6]
    eq(R.olm_update(w, n, lam, lr=0.1, steps=1, target="paper"), [1.2, 0.6])
    # step 2: w n = [2.4, 2.4], mean 2.4, target [1.8, 0.6], diffs > 0 -> grad [2, 4] -> w = [1.0, 0.2]
    eq(R.olm_update(w, n, lam, lr=0.1, steps=2, target="paper"), [1.0, 0.2])
    # step 3: w n = [2.0, 0.8], mean 1.4, target [1.05, 0.35], diffs > 0 -> w = [0.8, 0.2 - 0.4 = -0.2 -> clamped 0]
    eq(R.olm_update(w, n, lam, lr=0.1, steps=3, target="paper"), [0.8, 0.0])
    eq(R.olm_update(w, n, lam, lr=0.1, steps=0, target="paper"), [1.0, 1.0])
    # equal norms n = [2, 2], lr 0.25 (w steps of 0.5): step 1: mean 2, target [1.5, 0.5], diffs [0.5, 1.5] > 0 ->
    # w = [0.5, 0.5]; step 2: mean 1, target [0.75, 0.25], diffs > 0 -> w = [0, 0]; then target 0, diffs 0: stays 0
    n2 = t32(2.0, 2.0)
    eq(R.olm_update(w, n2, lam, lr=0.25, steps=1, target="paper"), [0.5, 0.5])
    eq(R.olm_update(w, n2, lam, lr=0.25, steps=2, target="paper"), [0.0, 0.0])
    eq(R.olm_update(w, n2, lam, lr=0.25, steps=5, target="paper"), [0.0, 0.0])


def test_olm_update_hand_budget():
    """Our reading (the default): target M * lam_m * mean_k(w_k n_k) = lam_m * sum_k(w_k n_k)."""
    w, lam = t32(1.0, 1.0), t32(0.75, 0.25)
    # n = [2, 2], lr 0.25: sum(w n) = 4, target [3, 1], diffs [-1, 1] -> w = [1.5, 0.5]: w n = [3, 1] = target, the
    # total 4 is kept; next steps: diffs 0, w stays (a fixed point with w != 0)
    n2 = t32(2.0, 2.0)
    eq(R.olm_update(w, n2, lam, lr=0.25, steps=1), [1.5, 0.5])
    eq(R.olm_update(w, n2, lam, lr=0.25, steps=5, target="budget"), [1.5, 0.5])
    # n = [2, 4], lr 0.1: sum 6, target [4.5, 1.5], diffs [-2.5, 2.5] -> w = [1.2, 0.6] (w n = [2.4, 2.4], total 4.8:
    # unequal norms move w_m n_m by unequal steps lr n_m^2 = [0.4, 1.6]); step 2: target [3.6, 1.2], diffs [-1.2, 1.2]
    # -> w = [1.4, 0.2]
    n = t32(2.0, 4.0)
    eq(R.olm_update(w, n, lam, lr=0.1, steps=1), [1.2, 0.6])
    eq(R.olm_update(w, n, lam, lr=0.1, steps=2), [1.4, 0.2])
    # clamp: w = [1, 0.2], n = [1, 1], lam = [0.9, 0.1], lr 0.5: sum 1.2, target [1.08, 0.12], diffs [-0.08, 0.08]
    # -> w = [1.5, 0.2 - 0.5 = -0.3 -> clamped 0]
    eq(R.olm_update(t32(1.0, 0.2), t32(1.0, 1.0), t32(0.9, 0.1), lr=0.5, steps=1), [1.5, 0.0])
    with pytest.raises(ValueError, match="target"):
        R.olm_update(w, n, lam, lr=0.1, steps=1, target="mean")


def test_olm_targets_sum():
    """budget: the targets sum to the total sum_k w_k n_k; paper: to 1/M of it (so only w = 0 is a fixed point)."""
    g = torch.Generator().manual_seed(3)
    for M in (2, 3, 5):
        w, n = torch.rand(M, generator=g) * 2, torch.rand(M, generator=g) * 4 + 0.1
        lam = torch.softmax(torch.randn(M, generator=g), 0)
        total = (w * n).sum()
        torch.testing.assert_close(R.olm_targets(w, n, lam).sum(), total)
        torch.testing.assert_close(R.olm_targets(w, n, lam, target="paper").sum(), total / M)
        torch.testing.assert_close(R.olm_targets(w, n, lam, target="paper") * M, R.olm_targets(w, n, lam))


def _olm_totals(w, n, lam, lr, checkpoints, target):
    return [float((R.olm_update(w, n, lam, lr=lr, steps=k, target=target).double() * n).sum()) for k in checkpoints]


@pytest.mark.parametrize("M,seed", [(2, 0), (3, 1), (4, 2), (5, 3)])
def test_olm_budget_keeps_total_paper_shrinks_it(M, seed):
    """Start within one SGD step of the budget fixed point w_m n_m = lam_m S0. "budget": sum_m w_m n_m stays within a
    few steps' granularity (lr * sum n^2) of S0 and w >= 0 throughout; "paper": the total falls to the granularity
    (w -> 0)."""
    g = torch.Generator().manual_seed(seed)
    n = torch.rand(M, generator=g, dtype=torch.float64) * 5 + 0.2
    lam = torch.softmax(torch.randn(M, generator=g, dtype=torch.float64), 0)
    lr, s0 = 0.01, 20.0
    w0 = lam * s0 / n + (torch.rand(M, generator=g, dtype=torch.float64) - 0.5) * 2 * lr * n
    grain = lr * float((n * n).sum())
    start = float((w0 * n).sum())
    checkpoints = (1, 10, 50, 200, 600)
    for k, total in zip(checkpoints, _olm_totals(w0, n, lam, lr, checkpoints, "budget")):
        assert abs(total - start) <= 6 * grain, (k, total, start, grain)
    for k in checkpoints:
        assert (R.olm_update(w0, n, lam, lr=lr, steps=k) >= 0).all()
    paper = _olm_totals(w0, n, lam, lr, (3000,), "paper")[0]  # slow for small n_m: w_m moves lr * n_m per step
    assert paper <= 2 * grain < 0.1 * start, (paper, grain, start)
    assert (R.olm_update(w0, n, lam, lr=lr, steps=3000, target="paper") >= 0).all()


def test_olm_budget_equal_norms_two_modalities_exact():
    """M = 2 with equal norms: the two diffs are opposite and the steps equal, so each step keeps the total exactly
    (before any clamp), from any start."""
    n, lam, w = t32(3.0, 3.0), t32(0.3, 0.7), t32(1.0, 1.0)
    for k in (1, 2, 7, 20):
        torch.testing.assert_close((R.olm_update(w, n, lam, lr=0.01, steps=k) * n).sum(), torch.tensor(6.0))


def test_logit_norms_hand():
    logits = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 2.0]]])
    eq(R.logit_norms(logits), [2.5, 1.5])  # (5 + 0)/2 ; (1 + 2)/2


# ------------------------------------------------------------------------------------------- pipeline
def test_pipeline_hand():
    logits, labels = small_batch()  # prob sums [1, 1.5]; ce means [ln 2, -ln 0.75]
    out = R.balance_coefficients_ref(logits, labels, "ogm_ge", alpha=1.0)  # alpha 1: round numbers
    eq(out["scores"], [1.0, 1.5])
    eq(out["ratios"], [2 / 3, 1.5])
    eq(out["coefficients"], [1.0, 0.0948517463551336])  # 1 - tanh(1.5)
    eq(out["flag"], 0.0)
    out = R.balance_coefficients_ref(logits, labels, "ogm", alpha=1.0)
    eq(out["coefficients"], [1.0, 0.5378828427399902])  # 1 - tanh(1.5 - 1)
    out = R.balance_coefficients_ref(logits, labels, "opm")
    eq(out["coefficients"], [0.0, 0.6155292893150024])  # 0.5 (1 + 0.5 tanh(0.5))
    out = R.balance_coefficients_ref(logits, labels, "mlb", alpha=1.0)
    eq(out["ratios"], [1.5, 2 / 3])
    eq(out["coefficients"], [1.4621171572600098, 0.6784872624683657])  # 1 + tanh(0.5) ; 1 + tanh(-1/3)
    # difference variant on batch means [0.5, 0.75]: rho = 1 + [-0.25, 0.25] -> k_1 = 1 - tanh(0.25) (alpha 1)
    out = R.balance_coefficients_ref(logits, labels, "ogm", ratio="difference", alpha=1.0)
    eq(out["ratios"], [0.75, 1.25])
    eq(out["coefficients"], [1.0, 1 - math.tanh(0.25)])
    state = R.new_agm_state(2)
    out = R.balance_coefficients_ref(logits, labels, "agm", state=state, alpha=2.0)
    # M = 2: r_0 = exp(2 (mean s - s_0)) = exp(s_1 - s_0) = exp(-ln 0.75 - ln 2) = 1 / (0.75 * 2) = 2/3 ; r_1 = 3/2
    eq(out["ratios"], [2 / 3, 1.5])
    eq(out["coefficients"], [math.exp(2 / 3), math.exp(-1.0)])  # step 0: tau = 1 (Alg. 1), kappa = exp(2 (1 - r))
    eq(state["s_hat"], [0.6931471805599453, 0.2876820724517809])
    eq(state["steps"], 1.0)


def test_pipeline_rejects_unknown_method_and_hyperparameter():
    logits, labels = small_batch()
    with pytest.raises(ValueError):
        R.balance_coefficients_ref(logits, labels, "nope")
    with pytest.raises(TypeError):
        R.balance_coefficients_ref(logits, labels, "ogm", q_base=0.3)


# ------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("M", [2, 3, 4, 5, 6])
def test_shapley_efficiency(M):
    g = torch.Generator().manual_seed(M)
    outs = torch.randn(2**M - 1, 4, 3, generator=g, dtype=torch.float64)
    phi = R.shapley_combine(outs)
    assert phi.shape == (M, 4, 3) and phi.dtype == torch.float64
    torch.testing.assert_close(phi.sum(0), outs[-1], rtol=1e-12, atol=1e-12)
    W = R.shapley_weights(M, dtype=torch.float64)
    torch.testing.assert_close(W.sum(1), torch.cat([torch.zeros(2**M - 2), torch.ones(1)]).double(), rtol=0, atol=1e-14)


def test_shapley_hand():
    W = R.shapley_weights(2)
    # S={0}: [0!1!/2!, -1!0!/2!] ; S={1}: [-1/2, 1/2] ; S={0,1}: [1/2, 1/2]  (AGM Eq. 3)
    eq(W, [[0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])
    W3 = R.shapley_weights(3)
    # |S|=1: in 0!2!/3! = 1/3, out -1!1!/3! = -1/6 ; |S|=2: in 1/6, out -1/3 ; |S|=3: 1/3
    eq(W3[0], [1 / 3, -1 / 6, -1 / 6])
    eq(W3[2], [1 / 6, 1 / 6, -1 / 3])
    eq(W3[6], [1 / 3, 1 / 3, 1 / 3])
    # v({0}) = 1, v({1}) = 2, v({0,1}) = 5: phi_0 = (1 - 2 + 5)/2 = 2, phi_1 = (-1 + 2 + 5)/2 = 3
    phi = R.shapley_combine(t32(1.0, 2.0, 5.0).view(3, 1))
    eq(phi, [[2.0], [3.0]])
    # c(S) = sum_m kappa_m W[S-1, m], kappa = [2, 1]: [1 - 0.5, -1 + 0.5, 1 + 0.5]
    eq(R.shapley_subset_grad_scale(t32(2.0, 1.0)), [0.5, -0.5, 1.5])


def test_shapley_masked_inputs_hand():
    x0, x1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]])
    out0, out1 = R.shapley_masked_inputs([x0, x1])
    assert torch.equal(out0, torch.tensor([[1.0, 2.0], [0.0, 0.0]]))  # S=1 keeps modality 0, S=2 drops it
    assert torch.equal(out1, torch.tensor([[0.0], [3.0]]))


def test_shapley_masked_inputs_fill_hand():
    """Muted rows hold fill[m] (one row, [1, ...] or [...]); fill[m]'s gradient is the sum over its muted rows."""
    x0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64, requires_grad=True)  # B = 2
    x1 = torch.tensor([[5.0], [6.0]], dtype=torch.float64, requires_grad=True)
    f0 = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)  # [1, 2]
    f1 = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)  # [1] = one row's shape
    out0, out1 = R.shapley_masked_inputs([x0, x1], [f0, f1])
    # block S=1 (rows 0-1) keeps modality 0 only, block S=2 (rows 2-3) keeps modality 1 only
    assert torch.equal(out0, torch.tensor([[1.0, 2.0], [3.0, 4.0], [-1.0, -2.0], [-1.0, -2.0]], dtype=torch.float64))
    assert torch.equal(out1, torch.tensor([[-3.0], [-3.0], [5.0], [6.0]], dtype=torch.float64))
    g0 = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], dtype=torch.float64)
    g1 = torch.tensor([[10.0], [20.0], [30.0], [40.0]], dtype=torch.float64)
    torch.autograd.backward([out0, out1], [g0, g1])
    assert torch.equal(x0.grad, g0[:2]) and torch.equal(x1.grad, g1[2:])
    assert torch.equal(f0.grad, torch.tensor([[12.0, 14.0]], dtype=torch.float64))  # rows 2 + 3
    assert torch.equal(f1.grad, torch.tensor([30.0], dtype=torch.float64))  # rows 0 + 1
    # fill None is zeros; fill of zeros equals it
    z = R.shapley_masked_inputs([x0, x1], [torch.zeros(2, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)])
    for a, b in zip(z, R.shapley_masked_inputs([x0, x1])):
        assert torch.equal(a, b)


def test_shapley_subset_grad_scale_is_chain_rule():
    """d/d f(S) of sum_m kappa_m <phi_m, g> is c(S) g."""
    M, B = 3, 2
    outs = torch.randn(2**M - 1, B, requires_grad=True, dtype=torch.float64)
    kappa = torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64)
    # the gradient reaching phi_m is kappa_m * g (the same upstream g for every m, as when the loss is on sum_m phi_m)
    g_same = torch.randn(1, B, dtype=torch.float64).expand(M, B)
    (R.shapley_combine(outs) * kappa.view(M, 1) * g_same).sum().backward()
    torch.testing.assert_close(
        outs.grad, R.shapley_subset_grad_scale(kappa).double().view(-1, 1) * g_same[0], rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("z", ["tanh", "sigmoid"])
@pytest.mark.parametrize("variant", ["ratio", "difference"])
def test_ogm_properties(z, variant):
    g = torch.Generator().manual_seed(1)
    for M in range(2, 9):
        for _ in range(10):
            s = torch.rand(M, generator=g) * 5 + 0.01
            rho = R.ratio_tpami(s, variant=variant)
            alpha = float(torch.rand((), generator=g) * 3)
            k = R.ogm_coefficients(rho, alpha=alpha, z=z)
            assert ((k >= 0) & (k <= 1)).all()
            assert k[torch.argmin(s)] == 1.0  # the weakest modality is never slowed
            assert (k[rho <= 1] == 1).all()
            _, k_ge = R.ogm_ge_coefficients(s, alpha=alpha)
            assert ((k_ge >= 0) & (k_ge <= 1)).all()


@pytest.mark.parametrize("z", ["tanh", "sigmoid"])
def test_opm_properties(z):
    g = torch.Generator().manual_seed(2)
    for M in range(2, 9):
        for _ in range(10):
            rho = torch.rand(M, generator=g) * 4
            q_base, lam = float(torch.rand((), generator=g)), float(torch.rand((), generator=g) * 3)
            q = R.opm_drop_probability(rho, q_base=q_base, lam=lam, z=z)
            assert (q[rho <= 1] == 0).all()
            assert (q <= 1).all() and (q >= 0).all()
            assert (q[rho > 1] >= q_base - 1e-7).all()


def test_mlb_properties():
    g = torch.Generator().manual_seed(3)
    for M in range(2, 9):
        for _ in range(10):
            s = torch.rand(M, generator=g) * 5 + 0.01
            r = R.ratio_mlb(s)
            k = R.mlb_coefficients(r, alpha=float(torch.rand((), generator=g)) * 2 + 0.05, beta_max=3.0)
            assert (k[r > 1] > 1).all()  # lagging modality accelerated
            assert (k[r < 1] < 1).all()  # leading modality decelerated
            assert k[torch.argmin(s)] > 1 and k[torch.argmax(s)] < 1


# ------------------------------------------------------------------------------------------- batch-covariance identity
def test_batch_covariance_identity():
    """docs/methods/ogm_ge.md: scaling row i of the feature gradient by k + sigma (z_i - z_bar) yields
    k * mean-gradient + sigma/B sum_i (z_i - z_bar) g_i for every encoder parameter (per-sample g_i from torch.func)."""
    torch.manual_seed(0)
    B, D_in, H, D, C = 6, 5, 7, 4, 3
    enc = torch.nn.Sequential(torch.nn.Linear(D_in, H), torch.nn.Tanh(), torch.nn.Linear(H, D)).double()
    head = torch.nn.Linear(D, C).double()
    x = torch.randn(B, D_in, dtype=torch.float64)
    y = torch.randint(0, C, (B,))
    z = torch.randn(B, dtype=torch.float64)
    k, sigma = 0.3, 0.7

    feat = enc(x)
    feat.register_hook(lambda gr: R.cov_noise_tap_backward(gr, k, z, sigma=sigma))
    F.cross_entropy(head(feat), y).backward()
    tapped = {n: p.grad.clone() for n, p in enc.named_parameters()}

    params = {n: p.detach() for n, p in enc.named_parameters()}
    hparams = {n: p.detach() for n, p in head.named_parameters()}

    def loss_one(p, xi, yi):
        f = torch.func.functional_call(enc, p, (xi.unsqueeze(0),))
        return F.cross_entropy(torch.func.functional_call(head, hparams, (f,)), yi.unsqueeze(0))

    per_sample = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    zc = z - z.mean()
    for n in params:
        g_i = per_sample[n]  # [B, ...]
        expected = k * g_i.mean(0) + sigma * (zc.view(-1, *[1] * (g_i.dim() - 1)) * g_i).sum(0) / B
        torch.testing.assert_close(tapped[n], expected, rtol=1e-12, atol=1e-13)
        # the same noise from explicit per-sample gradients (docs/methods/ogm_ge.md)
        h = R.cov_noise_from_per_sample(g_i.reshape(B, -1), z) * sigma
        torch.testing.assert_close(k * g_i.mean(0) + h.view_as(g_i[0]), expected, rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------------ noise / drop / taps, by hand
def test_cov_noise_hand():
    z = t32(1.0, 2.0, 3.0)
    # k + sigma (z - 2) with k 0.5, sigma 2: [-1.5, 0.5, 2.5]
    eq(R.cov_noise_row_factor(0.5, z, sigma=2.0), [-1.5, 0.5, 2.5])
    eq(R.cov_noise_row_factor(torch.tensor(0.5), z, sigma=2.0), [-1.5, 0.5, 2.5])
    g = torch.ones(3, 2, 2, dtype=torch.bfloat16)
    out = R.cov_noise_tap_backward(g, 0.5, z, sigma=2.0)
    assert out.dtype == torch.bfloat16 and out.shape == g.shape
    torch.testing.assert_close(out.float(), t32(-1.5, 0.5, 2.5).view(3, 1, 1).expand(3, 2, 2))
    # (z - 2)^T G / 3 = (-[1, 0] + [1, 1]) / 3 = [0, 1/3]
    G = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    eq(R.cov_noise_from_per_sample(G, z), [0.0, 1 / 3])


def test_ge_isotropic_hand():
    g = t32(1.0, 2.0, 3.0, 4.0)
    n = t32(1.0, 0.0, -1.0, 0.0)
    # unbiased std of [1,2,3,4] = sqrt(5/3) = 1.2909944487358056 ; + 1e-8
    sd = 1.2909944487358056 + 1e-8
    (out,) = R.ge_isotropic([g], [0.5], [n])
    eq(out, [0.5 + sd, 1.0, 1.5 - sd, 2.0])
    outs = R.ge_isotropic([g, g.half().view(2, 2)], torch.tensor([1.0, 0.0]), [n, torch.zeros(2, 2, dtype=torch.half)])
    eq(outs[0], [1 + sd, 2.0, 3 - sd, 4.0])
    assert outs[1].dtype == torch.half and torch.equal(outs[1], torch.zeros(2, 2, dtype=torch.half))


def test_modality_drop_hand():
    x0, x1 = torch.ones(3, 2), torch.full((3, 1), 2.0)
    q = t32(0.5, 0.25)
    u = torch.tensor([[0.6, 0.1, 0.1], [0.1, 0.3, 0.1]])
    # keep0 = [T, F, F], keep1 = [F, T, F]; row 2 drops all -> keeps all
    # official: d = [2, 1], theta = (2*0.5 + 1*0.25)/3 = 5/12 -> scale 12/7
    o0, o1 = R.modality_drop_ref([x0, x1], q, u, rescale="official")
    torch.testing.assert_close(o0, torch.tensor([12 / 7, 0.0, 12 / 7]).view(3, 1).expand(3, 2))
    torch.testing.assert_close(o1, torch.tensor([[0.0], [24 / 7], [24 / 7]]))
    # per_modality: scales 1/(1-0.5) = 2 and 1/(1-0.25) = 4/3
    o0, o1 = R.modality_drop_ref([x0, x1], q, u, rescale="per_modality")
    torch.testing.assert_close(o0, torch.tensor([2.0, 0.0, 2.0]).view(3, 1).expand(3, 2))
    torch.testing.assert_close(o1, torch.tensor([[0.0], [8 / 3], [8 / 3]]))
    o0, o1 = R.modality_drop_ref([x0, x1], q, u, rescale="none")
    torch.testing.assert_close(o1, torch.tensor([[0.0], [2.0], [2.0]]))
    # q = 1 everywhere: every row is a fallback row, scale 1 (no inf)
    for mode in ("official", "per_modality"):
        o0, o1 = R.modality_drop_ref([x0, x1], t32(1.0, 1.0), u, rescale=mode)
        assert torch.equal(o0, x0) and torch.equal(o1, x1)
    o0, o1 = R.modality_drop_ref([x0, x1], q, u, execute=False)
    assert o0 is x0 and o1 is x1


def test_modality_drop_statistics():
    """P(keep) = 1 - q and the per-modality rescale makes the kept mean unbiased (q small enough that fallback is
    rare)."""
    g = torch.Generator().manual_seed(0)
    B = 20000
    x = [torch.ones(B, 3), torch.ones(B, 5)]
    q = t32(0.3, 0.1)
    u = torch.rand(2, B, generator=g)
    o0, o1 = R.modality_drop_ref(x, q, u, rescale="per_modality")
    keep0 = (o0[:, 0] != 0).float().mean()
    assert abs(float(keep0) - (0.7 + 0.3 * 0.1)) < 0.02  # kept, or fallback (both drawn to drop)
    assert o0.dtype == torch.float32 and o1.shape == (B, 5)


def test_grad_tap_backward():
    g = torch.arange(6, dtype=torch.float16).view(2, 3)
    out = R.grad_tap_backward(g, torch.tensor(0.5))
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, g * 0.5)


# ------------------------------------------------------------------------------------------- unimodal logits
def test_concat_unimodal_logits_hand():
    x0, x1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]])
    W = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 2.0]])
    b = t32(2.0, 4.0)
    # u_0 = [1, 2] + b/2 = [2, 4] ; u_1 = [3, 6] + b/2 = [4, 8]
    eq(R.concat_unimodal_logits([x0, x1], W, b), [[[2.0, 4.0]], [[4.0, 8.0]]])
    eq(R.concat_unimodal_logits([x0, x1], W, b, gamma=[0.0, 1.0]), [[[1.0, 2.0]], [[5.0, 10.0]]])
    eq(R.concat_unimodal_logits([x0, x1], W, None), [[[1.0, 2.0]], [[3.0, 6.0]]])


def test_concat_unimodal_logits_sum_to_fused_logits():
    torch.manual_seed(0)
    feats = [torch.randn(5, d) for d in (3, 4, 2)]
    lin = torch.nn.Linear(9, 6)
    u = R.concat_unimodal_logits(feats, lin.weight, lin.bias)
    torch.testing.assert_close(u.sum(0), lin(torch.cat(feats, 1)), rtol=1e-5, atol=1e-5)
    u.sum().backward()  # differentiable
    assert lin.weight.grad is not None


def test_summation_and_zero_out_logits():
    torch.manual_seed(1)
    feats = [torch.randn(4, d) for d in (3, 5)]
    heads = [torch.nn.Linear(3, 2), torch.nn.Linear(5, 2)]
    u = R.summation_unimodal_logits(feats, heads)
    torch.testing.assert_close(u[1], heads[1](feats[1]))
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    calls = []

    def head(fs):
        calls.append(fs[0].shape[0])
        return mlp(torch.cat(fs, 1))

    u = R.zero_out_unimodal_logits(head, feats)
    assert calls == [8]  # one batched call on M*B rows
    assert u.shape == (2, 4, 2)
    torch.testing.assert_close(u[0], mlp(torch.cat([feats[0], torch.zeros(4, 5)], 1)))
    torch.testing.assert_close(u[1], mlp(torch.cat([torch.zeros(4, 3), feats[1]], 1)))


# ------------------------------------------------------------------------------------------- edge cases
METHODS = ["ogm_ge", "ogm", "opm", "agm", "mlb"]
NEUTRAL = {"ogm_ge": 1.0, "ogm": 1.0, "opm": 0.0, "agm": 1.0, "mlb": 1.0}


def primed_agm_state(M):
    return {"s_hat": torch.arange(1, M + 1, dtype=torch.float32) * 0.5, "steps": torch.tensor(3.0)}


@pytest.mark.parametrize("method", METHODS)
def test_all_rows_ignored(method):
    logits = torch.randn(3, 5, 4)
    labels = torch.full((5,), -100)
    state = primed_agm_state(3)
    out = R.balance_coefficients_ref(logits, labels, method, state=state)
    eq(out["flag"], 2.0)
    eq(out["coefficients"], [NEUTRAL[method]] * 3)
    eq(state["s_hat"], [0.5, 1.0, 1.5])
    eq(state["steps"], 3.0)
    _, count = R.score_sums(logits, labels)
    eq(count, 0.0)
    eq(R.scores(logits, labels, kind="prob"), [0.0, 0.0, 0.0])
    assert torch.isnan(R.scores(logits, labels, kind="ce")).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logits(method, bad):
    logits = torch.randn(3, 5, 4)
    labels = torch.tensor([0, 1, 2, 3, 0])
    logits[1, 2, 1] = bad
    state = primed_agm_state(3)
    out = R.balance_coefficients_ref(logits, labels, method, state=state)
    eq(out["flag"], 1.0)
    eq(out["coefficients"], [NEUTRAL[method]] * 3)
    eq(state["s_hat"], [0.5, 1.0, 1.5])
    eq(state["steps"], 3.0)
    # the same bad value in an ignored row is harmless
    labels[2] = -100
    out = R.balance_coefficients_ref(logits, labels, method, state=state)
    eq(out["flag"], 0.0)
    assert torch.isfinite(out["coefficients"]).all()


def underflow_batch(zero_modalities, M=2):
    """M modalities, B=4 (row 3 ignored), C=2, finite logits. Each modality in `zero_modalities` has every
    valid row [0, -1000] with label 1: softmax[y] = exp(-1000) underflows to exactly 0 in fp32, so its 'prob'
    sum is 0. The others have [0, 0] rows: p(y) = 1/2, sum 3/2."""
    logits = torch.zeros(M, 4, 2)
    for m in zero_modalities:
        logits[m, :, 1] = -1000.0
    return logits, torch.tensor([1, 1, 1, -100])


def test_underflow_batch_really_underflows():
    logits, labels = underflow_batch([0])
    eq(R.score_sums(logits, labels)[0], [0.0, 1.5])
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["ogm_ge", "ogm", "opm", "mlb"])
def test_two_zero_prob_sums_flag_1(method):
    # both sums 0 -> every ratio is 0/0 = NaN (ogm_ge and mlb coefficients NaN too) though every score is finite
    logits, labels = underflow_batch([0, 1])
    out = R.balance_coefficients_ref(logits, labels, method)
    eq(out["scores"], [0.0, 0.0])
    assert torch.isnan(out["ratios"]).all()  # returned as computed: the cause stays visible
    eq(out["flag"], 1.0)
    eq(out["coefficients"], [NEUTRAL[method]] * 2)


def test_one_zero_prob_sum_flag_1_from_the_ratio():
    # s = [0, 3/2]: the ratios hold an inf, the raw coefficients are finite; the rule flags the inf ratio
    logits, labels = underflow_batch([0])
    inf = math.inf
    raw = {  # what the math gives (alpha = 1, defaults), before the fallback
        "ogm_ge": ([0.0, inf], [1.0, 0.0]),  # rho_1 > 1: k_1 = 1 - tanh(inf)
        "ogm": ([0.0, inf], [1.0, 0.0]),  # max(0, 1 - tanh(inf - 1))
        "opm": ([0.0, inf], [0.0, 0.75]),  # min(1, 0.5 * (1 + 0.5 * tanh(inf)))
        "mlb": ([inf, 0.0], [2.0, 1.0 - math.tanh(1.0)]),  # r = [1.5/0, 0/1.5], beta = [2, 2]
    }
    for method, (ratios, coeff) in raw.items():
        out = R.balance_coefficients_ref(logits, labels, method, **({} if method == "opm" else {"alpha": 1.0}))
        eq(out["ratios"], ratios)
        eq(out["flag"], 1.0)
        eq(out["coefficients"], [NEUTRAL[method]] * 2)
    eq(R.ogm_ge_coefficients(t32(0.0, 1.5), alpha=1.0)[1], raw["ogm_ge"][1])
    eq(R.ogm_coefficients(t32(0.0, inf), alpha=1.0), raw["ogm"][1])
    eq(R.opm_drop_probability(t32(0.0, inf)), raw["opm"][1])
    eq(R.mlb_coefficients(t32(inf, 0.0), alpha=1.0), raw["mlb"][1])
    # the difference-of-scores ratio stays finite on the same batch: no flag, the usual coefficients
    out = R.balance_coefficients_ref(logits, labels, "ogm", ratio="difference", alpha=1.0)
    eq(out["ratios"], [0.5, 1.5])  # 1 + (0 - 1/2), 1 + (1/2 - 0) on batch means
    eq(out["flag"], 0.0)
    eq(out["coefficients"], [1.0, 1.0 - math.tanh(0.5)])


def test_agm_kappa_overflow_flag_1_state_untouched():
    # 'ce' scores are finite, but tau - r = exp(18) - 1 overflows kappa_0 = exp(tau_0 - r_0) to inf without clip
    state = {"s_hat": t32(0.0, 18.0), "steps": torch.tensor(1.0)}
    sums, count = t32(18.0, 18.0), torch.tensor(2.0)  # s = [9, 9]: r = [1, 1]
    out = R.balance_from_sums_ref(sums, count, "agm", state=state)
    eq(out["flag"], 1.0)
    eq(out["coefficients"], [1.0, 1.0])
    eq(state["s_hat"], [0.0, 18.0])
    eq(state["steps"], 1.0)
    out = R.balance_from_sums_ref(sums, count, "agm", state=state, clip=10.0)
    eq(out["flag"], 0.0)
    eq(
        out["coefficients"], [math.exp(10.0), math.exp(math.exp(-18.0) - 1.0)], rtol=1e-5, atol=0.0
    )  # clip, tau_1 = e^-18
    eq(state["s_hat"], [4.5, 13.5])


def test_ignored_rows_count_nowhere():
    torch.manual_seed(2)
    logits = torch.randn(2, 8, 5)
    labels = torch.randint(0, 5, (8,))
    labels[[1, 4, 6]] = -100
    keep = labels != -100
    for method in METHODS:
        a = R.balance_coefficients_ref(logits, labels, method, state=R.new_agm_state(2))
        b = R.balance_coefficients_ref(logits[:, keep], labels[keep], method, state=R.new_agm_state(2))
        for key in a:
            torch.testing.assert_close(a[key], b[key])


def test_agm_running_mean_over_steps():
    torch.manual_seed(3)
    M = 3
    state = R.new_agm_state(M)
    past = []
    for step in range(6):
        logits = torch.randn(M, 10, 4) * (1 + torch.arange(M).view(M, 1, 1))
        labels = torch.randint(0, 4, (10,))
        out = R.balance_coefficients_ref(logits, labels, "agm", state=state, alpha=1.5, clip=10.0)
        s = R.scores(logits, labels, kind="ce")
        torch.testing.assert_close(out["scores"], s)
        if step == 0:  # Alg. 1: s_hat starts at 0, tau = 1
            _, _, kappa = R.agm_kappa(s, torch.zeros(M), alpha=1.5, clip=10.0)
            torch.testing.assert_close(out["coefficients"], kappa, rtol=1e-5, atol=1e-6)
        else:
            s_hat = torch.stack(past).mean(0)  # tau from the mean BEFORE this step
            _, _, kappa = R.agm_kappa(s, s_hat, alpha=1.5, clip=10.0)
            torch.testing.assert_close(out["coefficients"], kappa, rtol=1e-5, atol=1e-6)
        past.append(s)
        torch.testing.assert_close(state["s_hat"], torch.stack(past).mean(0), rtol=1e-6, atol=1e-6)
        eq(state["steps"], float(step + 1))
    # a flagged step in between changes nothing
    before = {k: v.clone() for k, v in state.items()}
    R.balance_coefficients_ref(torch.full((M, 2, 4), math.nan), torch.tensor([0, 1]), "agm", state=state)
    assert all(torch.equal(before[k], state[k]) for k in state)


def test_agm_without_state_starts_from_zero_means():
    logits, labels = small_batch()
    out = R.balance_coefficients_ref(logits, labels, "agm")
    # no history: s_hat = 0 (AGM Alg. 1, the authors' code), tau = 1, kappa = exp(alpha (1 - r)), alpha = 1
    torch.testing.assert_close(out["coefficients"], torch.exp(1.0 - out["ratios"]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(dtype):
    torch.manual_seed(4)
    B = 4096
    logits = (torch.randn(2, B, 3) * 0.1).to(dtype)  # p ~ 1/3 each: sums ~ 1365, beyond fp16/bf16 exact range
    labels = torch.randint(0, 3, (B,))
    exact = R.scores(logits.double(), labels, kind="prob")
    got = R.scores(logits, labels, kind="prob")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-3)
    # what summing in the input dtype would give is visibly off, so the test can tell
    naive = (
        torch.softmax(logits, -1)
        .gather(-1, labels.view(1, B, 1).expand(2, B, 1))
        .squeeze(-1)
        .sum(1, dtype=dtype)
        .float()
    )
    assert (naive - exact).abs().max() > 1e-2
    for method in METHODS:
        out = R.balance_coefficients_ref(logits, labels, method, state=R.new_agm_state(2))
        ref = R.balance_coefficients_ref(logits.float(), labels, method, state=R.new_agm_state(2))
        for key in out:
            assert out[key].dtype == torch.float32
            torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5)


def test_stacked_and_list_inputs_agree():
    torch.manual_seed(5)
    logits = torch.randn(4, 6, 3)
    labels = torch.randint(0, 3, (6,))
    for method in METHODS:
        a = R.balance_coefficients_ref(logits, labels, method, state=R.new_agm_state(4))
        b = R.balance_coefficients_ref(list(logits.unbind(0)), labels, method, state=R.new_agm_state(4))
        for key in a:
            assert torch.equal(a[key], b[key])
    assert torch.equal(R.logit_norms(logits), R.logit_norms(list(logits)))
    assert torch.equal(R.score_sums(logits, labels)[0], R.score_sums(list(logits), labels)[0])


def test_eight_modalities():
    torch.manual_seed(6)
    M = 8
    logits = torch.randn(M, 16, 5) * torch.linspace(0.5, 3, M).view(M, 1, 1)
    labels = torch.randint(0, 5, (16,))
    for method in METHODS:
        out = R.balance_coefficients_ref(logits, labels, method, state=R.new_agm_state(M))
        assert all(v.shape == (M,) for k, v in out.items() if k != "flag")
        assert torch.isfinite(out["coefficients"]).all() and float(out["flag"]) == 0.0
    W = R.shapley_weights(M)
    assert W.shape == (255, M)
    outs = torch.randn(255, 2, dtype=torch.float64)
    torch.testing.assert_close(R.shapley_combine(outs).sum(0), outs[-1], rtol=1e-10, atol=1e-10)
    masked = R.shapley_masked_inputs([torch.randn(2, 3) for _ in range(M)])
    assert len(masked) == M and masked[0].shape == (254 * 2, 3)
    eq(R.shapley_subset_grad_scale(torch.ones(M))[-1], 1.0)  # kappa = 1 -> c(S) = row sums: 0 ... 0, 1
    assert R.shapley_subset_grad_scale(torch.ones(M))[:-1].abs().max() < 1e-6


def test_outputs_are_fp32_on_input_device():
    logits, labels = small_batch()
    logits = logits.double()
    out = R.balance_coefficients_ref(logits, labels, "ogm")
    assert all(v.dtype == torch.float32 and v.device == logits.device for v in out.values())
    for fn in (R.ratio_mlb, R.ratio_tpami):
        assert fn(torch.tensor([1.0, 2.0], dtype=torch.float64)).dtype == torch.float32


def test_no_host_sync_calls_in_reference():
    """Nothing in the reference may read a device value on the host (docs/architecture.md): no
    .item()/.cpu()/.tolist()/.numpy() calls."""
    host_side = {"modality_gaps_exact"}  # exact rational counting on the host, once per epoch (documented there)
    files = sorted(pathlib.Path(R.__file__).parent.glob("*.py"))
    assert len(files) >= 10  # the package's modules, not only __init__
    bad = []
    for f in files:
        tree = ast.parse(f.read_text())
        skipped = {
            id(n)
            for fn in ast.walk(tree)
            if isinstance(fn, ast.FunctionDef) and fn.name in host_side
            for n in ast.walk(fn)
        }
        bad += [
            (f.name, n.lineno)
            for n in ast.walk(tree)
            if id(n) not in skipped
            and isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and n.func.attr in ("item", "cpu", "tolist", "numpy")
        ]
    assert bad == []
    assert all(hasattr(R, name) for name in host_side)
