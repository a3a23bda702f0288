"""The vectorised reference against a literal, loop-by-loop transcription of the papers (tests/_literal.py)."""

import itertools

import pytest
import torch

import _literal as L
from mmkernels import reference as R

TOL = dict(rtol=1e-5, atol=1e-6)


def close(actual, expected, **tol):
    exp = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), exp, **(tol or TOL), equal_nan=True)


def make_batch(M, B, C, seed, scale=2.0, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(M, B, C, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, C, (B,), generator=g)
    drop = torch.rand(B, generator=g) < ignore_frac
    labels = torch.where(drop, torch.full_like(labels, -100), labels)
    labels[0] = 0  # at least one valid row
    return logits, labels


@pytest.mark.parametrize("M,seed", [(2, 0), (3, 1), (4, 2), (5, 3), (8, 4)])
@pytest.mark.parametrize("kind", ["prob", "ce"])
def test_scores_literal(M, seed, kind):
    logits, labels = make_batch(M, 13, 5, seed, scale=6.0)
    expected = L.scores(L.to_list(logits), labels.tolist(), kind)
    close(R.scores(logits, labels, kind=kind), expected)
    sums, count = R.score_sums(logits, labels, kind=kind)
    assert count.dtype == torch.float32 and float(count) == sum(1 for y in labels.tolist() if y != -100)


@pytest.mark.parametrize("M,seed", [(2, 10), (3, 11), (5, 12), (8, 13)])
def test_ratios_and_coefficients_literal(M, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(5):
        s = torch.rand(M, generator=g, dtype=torch.float64) * 3 + 0.05
        sl = s.tolist()
        for variant in ("ratio", "difference"):
            close(R.ratio_tpami(s, variant=variant), L.ratio_tpami(sl, variant))
        close(R.ratio_mlb(s), L.ratio_mlb(sl))
        for alpha in (0.1, 0.8, 2.5):
            rho_l, k_l = L.ogm_ge(sl, alpha)
            rho, k = R.ogm_ge_coefficients(s, alpha=alpha)
            close(rho, rho_l)
            close(k, k_l)
            rho_t = L.ratio_tpami(sl)
            for z in ("tanh", "sigmoid"):
                close(R.ogm_coefficients(torch.tensor(rho_t), alpha=alpha, z=z), L.ogm(rho_t, alpha, z))
            close(R.mlb_coefficients(R.ratio_mlb(s), alpha=alpha, beta_max=3.0), L.mlb(L.ratio_mlb(sl), alpha, 3.0))
        for q_base, lam in ((0.5, 0.5), (0.3, 2.0), (0.9, 1.0)):
            rho_t = L.ratio_tpami(sl)
            for z in ("tanh", "sigmoid"):
                close(
                    R.opm_drop_probability(torch.tensor(rho_t), q_base=q_base, lam=lam, z=z),
                    L.opm(rho_t, q_base, lam, z),
                )


@pytest.mark.parametrize("M,seed", [(2, 20), (3, 21), (6, 22)])
@pytest.mark.parametrize("clip", [None, 0.3])
def test_agm_kappa_literal(M, seed, clip):
    g = torch.Generator().manual_seed(seed)
    history = [(torch.rand(M, generator=g, dtype=torch.float64) * 2).tolist() for _ in range(4)]
    s = (torch.rand(M, generator=g, dtype=torch.float64) * 2).tolist()
    s_hat = [sum(h[m] for h in history) / len(history) for m in range(M)]
    r, tau, kappa = R.agm_kappa(torch.tensor(s), torch.tensor(s_hat), alpha=1.7, clip=clip, steps=torch.tensor(4.0))
    r_l, tau_l, kappa_l = L.agm(s, history, 1.7, clip)
    close(r, r_l)
    close(tau, tau_l)
    close(kappa, kappa_l)


@pytest.mark.parametrize("method", ["ogm_ge", "ogm", "opm", "agm", "mlb"])
@pytest.mark.parametrize("M", [2, 3, 8])
def test_pipeline_literal(method, M):
    """balance_coefficients_ref against the literal scores -> ratio -> coefficient chain, AGM over 4 steps."""
    state = R.new_agm_state(M)
    history = []
    for step in range(4):
        logits, labels = make_batch(M, 11, 4, 100 * M + step, scale=2.5)
        ll, yl = L.to_list(logits), labels.tolist()
        hp = {
            "ogm": dict(alpha=0.7, z="sigmoid"),
            "opm": dict(q_base=0.4, lam=1.0),
            "mlb": dict(alpha=0.9, beta_max=2.5),
            "agm": dict(alpha=1.3),
            "ogm_ge": dict(alpha=0.6),
        }[method]
        out = R.balance_coefficients_ref(logits, labels, method, state=state, **hp)
        assert float(out["flag"]) == 0.0
        if method == "agm":
            s = L.scores(ll, yl, "ce")
            r, _, kappa = L.agm(s, history, 1.3)
            history.append(s)
            exp_ratio, exp_coef = r, kappa
            torch.testing.assert_close(
                state["s_hat"].double(),
                torch.tensor([sum(h[m] for h in history) / len(history) for m in range(M)], dtype=torch.float64),
                **TOL,
            )
            assert float(state["steps"]) == step + 1
        else:
            s = L.scores(ll, yl, "prob")
            if method == "ogm_ge":
                exp_ratio, exp_coef = L.ogm_ge(s, 0.6)
            elif method == "ogm":
                exp_ratio = L.ratio_tpami(s)
                exp_coef = L.ogm(exp_ratio, 0.7, "sigmoid")
            elif method == "opm":
                exp_ratio = L.ratio_tpami(s)
                exp_coef = L.opm(exp_ratio, 0.4, 1.0)
            else:
                exp_ratio = L.ratio_mlb(s)
                exp_coef = L.mlb(exp_ratio, 0.9, 2.5)
        close(out["scores"], s)
        close(out["ratios"], exp_ratio)
        close(out["coefficients"], exp_coef)


def test_pipeline_difference_variant_literal():
    logits, labels = make_batch(3, 9, 4, 7)
    s = L.scores(L.to_list(logits), labels.tolist(), "prob")
    n = sum(1 for y in labels.tolist() if y != -100)
    rho = L.ratio_tpami([v / n for v in s], "difference")
    out = R.balance_coefficients_ref(logits, labels, "ogm", ratio="difference", alpha=0.5)
    close(out["ratios"], rho)
    close(out["coefficients"], L.ogm(rho, 0.5))


@pytest.mark.parametrize("M", [2, 3, 4, 5])
def test_shapley_combine_matches_textbook_shapley(M):
    g = torch.Generator().manual_seed(M)
    B = 3
    outs = torch.randn(2**M - 1, B, generator=g, dtype=torch.float64)
    phi = R.shapley_combine(outs)
    for i in range(B):
        v = {}
        for S in range(1, 2**M):
            v[frozenset(j for j in range(M) if S >> j & 1)] = outs[S - 1, i].item()
        expected = L.shapley_phi(v, M)
        torch.testing.assert_close(phi[:, i], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            torch.tensor(L.shapley_phi_subsets(v, M), dtype=torch.float64), phi[:, i], rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("M", [2, 3, 4, 6])
def test_shapley_weights_match_subset_formula(M):
    W = R.shapley_weights(M, dtype=torch.float64)
    # W[S-1, m] = d phi_m / d v(S): read it off the literal formula with v = indicator of S
    subsets = [frozenset(j for j in range(M) if S >> j & 1) for S in range(1, 2**M)]
    for idx, S in enumerate(subsets):
        v = {T: (1.0 if T == S else 0.0) for T in subsets}
        torch.testing.assert_close(
            W[idx], torch.tensor(L.shapley_phi_subsets(v, M), dtype=torch.float64), rtol=0, atol=1e-15
        )


@pytest.mark.parametrize("M", [2, 3, 5])
@pytest.mark.parametrize("target", ["budget", "paper"])
def test_olm_literal(M, target):
    g = torch.Generator().manual_seed(40 + M)
    tr0, dv0, tr, dv = (torch.rand(M, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    G, C = R.olm_rates(tr0, dv0, tr, dv)
    G_l, C_l = L.olm_rates(tr0.tolist(), dv0.tolist(), tr.tolist(), dv.tolist())
    close(G, G_l)
    close(C, C_l)
    lam = R.olm_rebalance_factors(G, C)
    lam_l = L.olm_lambda(G_l, C_l)
    close(lam, lam_l)
    logits = torch.randn(M, 7, 5, generator=g, dtype=torch.float64) * torch.arange(1, M + 1, dtype=torch.float64).view(
        M, 1, 1
    )
    n = R.logit_norms(logits)
    n_l = L.logit_norms(L.to_list(logits))
    close(n, n_l)
    w0 = torch.rand(M, generator=g, dtype=torch.float64) + 0.5
    clamped = False
    for steps in (1, 3, 10, 200):  # 200 steps of "paper" drive w to 0: the clamp is exercised
        w = R.olm_update(
            w0,
            torch.tensor(n_l, dtype=torch.float64),
            torch.tensor(lam_l, dtype=torch.float64),
            lr=0.01,
            steps=steps,
            target=target,
        )
        w_l = L.olm_update(w0.tolist(), n_l, lam_l, 0.01, steps, target)
        close(w, w_l, rtol=1e-5, atol=1e-5)
        clamped |= min(w_l) == 0.0
    assert clamped == (target == "paper")


@pytest.mark.parametrize("target", ["budget", "paper"])
def test_olm_update_matches_autograd_with_detached_target(target):
    """Each SGD step equals torch autograd on Eq. 9 with the target detached, then the clamp at 0."""
    g = torch.Generator().manual_seed(5)
    n = torch.rand(4, generator=g, dtype=torch.float64) * 3 + 0.5
    lam = torch.softmax(torch.randn(4, generator=g, dtype=torch.float64), 0)
    scale = 4 if target == "budget" else 1  # budget: M * lam_m * s_bar
    w = torch.ones(4, dtype=torch.float64)
    for _ in range(40):
        w_ = w.clone().requires_grad_(True)
        s_bar = (w_ * n).abs().mean()  # mean_k ||w_k s_k||
        (w_ * n - (scale * lam * s_bar).detach()).abs().sum().backward()
        w = (w_ - 0.05 * w_.grad).detach().clamp(min=0.0)
    got = R.olm_update(torch.ones(4, dtype=torch.float64), n, lam, lr=0.05, steps=40, target=target).double()
    torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("M", [2, 3])
def test_masked_inputs_literal(M):
    g = torch.Generator().manual_seed(M)
    B = 2
    xs = [torch.randn(B, 2 + j, generator=g) for j in range(M)]
    out = R.shapley_masked_inputs(xs)
    for j in range(M):
        assert out[j].shape == ((2**M - 2) * B, 2 + j)
        for S, i in itertools.product(range(1, 2**M - 1), range(B)):
            row = out[j][(S - 1) * B + i]
            expected = xs[j][i] if S >> j & 1 else torch.zeros_like(xs[j][i])
            assert torch.equal(row, expected)
