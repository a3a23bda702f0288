"""Extension lane: the C++ CPU twin of the fused coefficient op (csrc/coefficients.cpp, csrc/coefficients_math.h)
against the reference pipeline: every method and option, fp32 / fp16 / bf16 / fp64 logits, odd shapes (B = 1, C = 1,
C = 1000, non-powers of two, M = 2..8), strided and list inputs, ignore_index rows, the flags and the AGM state."""

import pytest
import torch

from mmkernels import reference as R
from mmkernels.coefficients import balance_coefficients

pytestmark = [pytest.mark.ext, pytest.mark.backend("ext")]

HP = {  # non-default hyperparameters so a mix-up between names would show
    "ogm_ge": [{"alpha": 0.8}, {"alpha": 0.8, "tie": 1}],
    "ogm": [{"alpha": 0.6}, {"alpha": 0.9, "z": "sigmoid"}, {"alpha": 0.5, "ratio": "difference"}],
    "opm": [{"q_base": 0.4, "lam": 0.7}, {"q_base": 0.5, "lam": 0.5, "z": "sigmoid", "ratio": "difference"}],
    "agm": [{"alpha": 1.5}, {"alpha": 2.5, "clip": 0.05}],
    "mlb": [{"alpha": 0.8, "beta_max": 3.0}],
}
CASES = [  # (M, B, C)
    (2, 1, 1),
    (3, 7, 6),
    (5, 64, 31),
    (8, 100, 6),
    (2, 64, 309),
    (4, 33, 1000),
    (6, 5, 17),
    (7, 3, 1),
    (2, 130, 47),
]
AGM_COEF_RTOL = 1e-4  # kappa = exp(alpha (tau - r)): an fp32 rounding difference in tau - r, times alpha


def _close(got: dict, want: dict, *, rtol=2e-5, atol=1e-6, msg="", method=None):
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == torch.float32 and got[key].shape == want[key].shape, key
        r = AGM_COEF_RTOL if method == "agm" and key == "coefficients" else rtol
        torch.testing.assert_close(
            got[key], want[key], rtol=r, atol=atol, equal_nan=True, msg=lambda m: f"{msg} key={key}: {m}"
        )


def _logits(M, B, C, dtype=torch.float32, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    sharp = torch.linspace(0.5, 2.0, M).view(M, 1, 1)  # modality-dependent, so the ratios differ from 1
    x = torch.randn(M, B, C, generator=g) * scale * sharp
    y = torch.randint(0, C, (B,), generator=g)
    x[torch.arange(M).view(M, 1), torch.arange(B).view(1, B), y.view(1, B)] += 2.0 * sharp.view(M, 1)
    return x.to(dtype), y


def _run_all_methods(x, y, *, ignore_index=-100, msg="", rtol=2e-5):
    for method, hps in HP.items():
        for hp in hps:
            if "tie" in hp and (x.shape[0] if isinstance(x, torch.Tensor) else len(x)) != 2:
                continue
            m = x.shape[0] if isinstance(x, torch.Tensor) else len(x)
            st_k = R.new_agm_state(m) if method == "agm" else None
            st_r = R.new_agm_state(m) if method == "agm" else None
            for _ in range(2 if method == "agm" else 1):  # AGM: a second step uses the running means
                got = balance_coefficients(x, y, method, state=st_k, ignore_index=ignore_index, **hp)
                want = R.balance_coefficients_ref(x, y, method, state=st_r, ignore_index=ignore_index, **hp)
                _close(got, want, msg=f"{msg} {method} {hp}", method=method, rtol=rtol)
            if method == "agm":
                torch.testing.assert_close(st_k["s_hat"], st_r["s_hat"], rtol=2e-5, atol=1e-6)
                assert torch.equal(st_k["steps"], st_r["steps"])


def test_the_twin_runs_not_the_reference(monkeypatch):
    x, y = _logits(3, 7, 6)

    def boom(*a, **k):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(R, "balance_coefficients_ref", boom)
    out = balance_coefficients(x, y, "ogm")
    assert out["flag"].item() == 0


@pytest.mark.parametrize("M,B,C", CASES)
def test_parity_grid_fp32(M, B, C):
    x, y = _logits(M, B, C, seed=M * 100000 + B * 10 + C)
    if B > 2:
        y[1] = -100
    _run_all_methods(x, y, msg=f"M={M} B={B} C={C}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("M,B,C", [(3, 64, 31), (2, 50, 1000), (8, 7, 5)])
def test_parity_other_dtypes(M, B, C, dtype):
    x, y = _logits(M, B, C, dtype=dtype, seed=7)
    _run_all_methods(x, y, msg=f"{dtype} M={M} B={B} C={C}")


def test_strided_and_list_inputs():
    M, B, C = 3, 64, 31
    base, y = _logits(M, B, C, seed=3)
    transposed = base.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # a [B, M, C] buffer seen as [M, B, C]
    wide = torch.zeros(M, B, 2 * C)
    wide[..., ::2] = base
    strided_c = wide[..., ::2]  # class stride 2
    assert not transposed.is_contiguous() and not strided_c.is_contiguous()
    for x in (transposed, strided_c, list(base.unbind(0)), [u.clone() for u in base.unbind(0)]):
        _run_all_methods(x, y, msg="layout")
    want = balance_coefficients(base, y, "ogm", alpha=0.6)
    for x in (transposed, strided_c, list(base.unbind(0))):
        got = balance_coefficients(x, y, "ogm", alpha=0.6)
        for key in want:
            assert torch.equal(got[key], want[key]), key  # same rows, same order: the same bits
    mixed = [base[0], base[1].t().contiguous().t(), wide[2, :, ::2]]  # each modality its own strides
    _run_all_methods(mixed, y, msg="mixed strides")
    labels32 = y.to(torch.int32)
    _close(balance_coefficients(base, labels32, "mlb"), R.balance_coefficients_ref(base, y, "mlb"))


def test_ignore_index_rows_and_custom_ignore_index():
    M, B, C = 3, 64, 31
    x, y = _logits(M, B, C, seed=11)
    y[::3] = -100
    x[:, 0, :] = float("nan")  # an ignored row may hold anything
    assert balance_coefficients(x, y, "ogm", alpha=0.6)["flag"].item() == 0
    _run_all_methods(x, y, msg="ignored rows")
    y2 = y.clone()
    y2[y2 == -100] = 5  # ignore_index that is also a class value
    _run_all_methods(x[:, 1:], y2[1:], ignore_index=5, msg="ignore_index=5")
    keep = y != -100
    a = balance_coefficients(x, y, "mlb", alpha=0.8)
    b = balance_coefficients(x[:, keep], y[keep], "mlb", alpha=0.8)
    torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("B", [0, 7])
def test_no_valid_row_flag_2_neutral_and_state_untouched(B):
    M, C = 3, 6
    x, y = _logits(M, max(B, 1), C)
    x, y = x[:, :B], y[:B].fill_(-100)
    for method, neutral in (("ogm_ge", 1.0), ("ogm", 1.0), ("opm", 0.0), ("mlb", 1.0), ("agm", 1.0)):
        st = {"s_hat": torch.full((M,), 0.7), "steps": torch.tensor(3.0)}
        got = balance_coefficients(x, y, method, state=st if method == "agm" else None)
        assert got["flag"].item() == 2
        assert torch.equal(got["coefficients"], torch.full((M,), neutral))
        assert torch.equal(st["s_hat"], torch.full((M,), 0.7)) and st["steps"].item() == 3.0
        want = R.balance_coefficients_ref(x, y, method)
        assert want["flag"].item() == 2


def test_agm_state_parity_20_steps_and_first_step_tau_1():
    M, B, C = 3, 64, 31
    st_k, st_r = R.new_agm_state(M), R.new_agm_state(M)
    for step in range(20):
        x, y = _logits(M, B, C, seed=1000 + step, scale=1.0 + 0.1 * step)
        if step == 7:
            x[1, 4, 2] = float("nan")  # a bad step: flag 1, state untouched, later steps continue from it
        got = balance_coefficients(x, y, "agm", state=st_k, alpha=2.0, clip=3.0)
        want = R.balance_coefficients_ref(x, y, "agm", state=st_r, alpha=2.0, clip=3.0)
        _close(got, want, msg=f"step {step}", method="agm")
        if step == 0:  # no history: tau = 1, kappa = exp(alpha * min(1 - r, clip))
            r = got["ratios"]
            torch.testing.assert_close(got["coefficients"], torch.exp(2.0 * (1 - r).clamp(max=3.0)), rtol=1e-5, atol=0)
        assert (got["flag"].item() == 1) == (step == 7)
        torch.testing.assert_close(st_k["s_hat"], st_r["s_hat"], rtol=2e-5, atol=1e-6)
        assert torch.equal(st_k["steps"], st_r["steps"])
    assert st_k["steps"].item() == 19.0


@pytest.mark.parametrize("bad", ["nan", "+inf", "all_-inf"])
def test_non_finite_logits_give_flag_1_and_neutral(bad):
    M, B, C = 3, 7, 37
    x, y = _logits(M, B, C, seed=5)
    if bad == "nan":
        x[2, 3, 20] = float("nan")
    elif bad == "+inf":
        x[0, 0, 0] = float("inf")
    else:
        x[1, 2, :] = float("-inf")
    for method, neutral in (("ogm_ge", 1.0), ("ogm", 1.0), ("opm", 0.0), ("mlb", 1.0), ("agm", 1.0)):
        st = R.new_agm_state(M)
        got = balance_coefficients(x, y, method, state=st if method == "agm" else None)
        assert got["flag"].item() == 1, method
        assert torch.equal(got["coefficients"], torch.full((M,), neutral)), method
        assert st["steps"].item() == 0.0 and torch.equal(st["s_hat"], torch.zeros(M))
        assert R.balance_coefficients_ref(x, y, method)["flag"].item() == 1


def test_minus_inf_masked_classes_stay_finite():
    M, B, C = 2, 7, 2100
    x, y = _logits(M, B, C, seed=9)
    y[:] = C - 1
    x[:, :3, :1024] = float("-inf")
    x[0, 4, 5] = float("-inf")
    got = balance_coefficients(x, y, "agm")
    assert got["flag"].item() == 0
    _close(got, R.balance_coefficients_ref(x, y, "agm"))


@pytest.mark.parametrize("zeros", [(0, 1), (0,)])
def test_zero_prob_sums_flag_1_like_reference(zeros):
    x = torch.zeros(2, 4, 2)
    for m in zeros:
        x[m, :, 1] = -1000.0  # softmax[y] underflows to exactly 0
    y = torch.tensor([1, 1, 1, -100])
    for method, neutral in (("ogm_ge", 1.0), ("ogm", 1.0), ("opm", 0.0), ("mlb", 1.0)):
        got = balance_coefficients(x, y, method)
        _close(got, R.balance_coefficients_ref(x, y, method), msg=method)
        assert got["flag"].item() == 1 and torch.equal(got["coefficients"], torch.full((2,), neutral)), method
    _close(
        balance_coefficients(x, y, "ogm", ratio="difference"),
        R.balance_coefficients_ref(x, y, "ogm", ratio="difference"),
    )


def test_agm_kappa_overflow_flag_1_like_reference():
    x, y = _logits(1, 7, 6, seed=8)
    x = x.expand(2, 7, 6)
    st_k = {"s_hat": torch.tensor([0.0, 18.0]), "steps": torch.ones(())}
    st_r = {k: v.clone() for k, v in st_k.items()}
    got = balance_coefficients(x, y, "agm", state=st_k)
    _close(got, R.balance_coefficients_ref(x, y, "agm", state=st_r))
    assert got["flag"].item() == 1 and torch.equal(got["coefficients"], torch.ones(2))
    assert st_k["steps"].item() == 1.0 and torch.equal(st_k["s_hat"], torch.tensor([0.0, 18.0]))
    got = balance_coefficients(x, y, "agm", state=st_k, clip=10.0)
    _close(got, R.balance_coefficients_ref(x, y, "agm", state=st_r, clip=10.0))
    assert got["flag"].item() == 0 and st_k["steps"].item() == 2.0


@pytest.mark.parametrize("label", [6, -1, 2**40])
def test_label_out_of_range_flag_1(label):
    x, y = _logits(2, 7, 6)
    y[2] = label
    got = balance_coefficients(x, y, "ogm")
    assert got["flag"].item() == 1 and torch.equal(got["coefficients"], torch.ones(2))
    assert torch.isnan(got["scores"]).all()


@pytest.mark.parametrize("tie, suppressed", [(0, 0), (1, 1)])
def test_ogm_ge_exact_tie_suppresses_modality_tie(tie, suppressed):
    x, y = _logits(1, 9, 5, seed=4)
    x = x.expand(2, 9, 5)  # identical modalities: s_0 == s_1, rho = 1 exactly
    got = balance_coefficients(x, y, "ogm_ge", alpha=0.8, tie=tie)
    want = torch.ones(2)
    want[suppressed] = 1 - torch.tanh(torch.tensor(0.8))
    assert torch.equal(got["ratios"], torch.ones(2))
    torch.testing.assert_close(got["coefficients"], want, rtol=1e-6, atol=0)
    _close(got, R.balance_coefficients_ref(x, y, "ogm_ge", alpha=0.8, tie=tie))


def test_result_does_not_depend_on_the_thread_count():
    x, y = _logits(4, 513, 700, seed=12)
    prev = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(balance_coefficients(x, y, "agm", alpha=1.5))
    finally:
        torch.set_num_threads(prev)
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key


def test_outputs_are_views_of_one_fp32_buffer_and_never_require_grad():
    x, y = _logits(3, 16, 6)
    x.requires_grad_()
    out = balance_coefficients(x, y, "ogm")
    base = out["scores"].untyped_storage().data_ptr()
    assert all(v.untyped_storage().data_ptr() == base and not v.requires_grad for v in out.values())
    assert out["flag"].shape == ()
