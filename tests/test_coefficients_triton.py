"""Triton lane: the fused coefficient kernel against the reference pipeline (TRITON_INTERPRET=1 on CPU, or CUDA).

Shape grid: B in {1, 7, 64, 1000} x C in {1, 6, 31, 309, 1000, 4097} sampled (not the full product, the
interpreter is slow), M cycling over {2, 3, 5, 8}; every method (and the z / ratio / clip options) on each.
"""

import pytest
import torch

from mmkernels import reference as R
from mmkernels.coefficients import balance_coefficients

pytestmark = [
    pytest.mark.triton,
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]  # numpy, interpreter

HP = {  # non-default hyperparameters so a mix-up between names would show
    "ogm_ge": [{"alpha": 0.8}],
    "ogm": [{"alpha": 0.6}, {"alpha": 0.9, "z": "sigmoid"}, {"alpha": 0.5, "ratio": "difference"}],
    "opm": [{"q_base": 0.4, "lam": 0.7}, {"q_base": 0.5, "lam": 0.5, "z": "sigmoid", "ratio": "difference"}],
    "agm": [{"alpha": 1.5}, {"alpha": 2.5, "clip": 0.05}],
    "mlb": [{"alpha": 0.8, "beta_max": 3.0}],
}
CASES = [  # (M, B, C)
    (2, 1, 1),
    (3, 7, 6),
    (5, 64, 31),
    (8, 1000, 6),
    (2, 64, 309),
    (3, 1000, 31),
    (8, 7, 1000),
    (2, 7, 4097),
    (5, 1, 309),
    (3, 64, 1000),
    (2, 1000, 1),
    (8, 64, 6),
]


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MMKERNELS_BACKEND", "triton")


# AGM's kappa = exp(alpha (tau - r)) turns an absolute error e in tau - r (sums of O(1) ratios accumulated in another
# order: GPU atomics vs torch's reduction, fp32) into a relative error alpha * e: with alpha = 2.5 and e of a few
# 1e-6, kappa differs by up to ~1e-4 relative (seen on an H200: 2.9e-5 fp32, 9.1e-5 fp16 logits).
AGM_COEF_RTOL = 1e-4


def _close(got: dict, want: dict, *, rtol=2e-5, atol=1e-6, msg="", method=None):
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == torch.float32, key
        assert got[key].shape == want[key].shape, key
        r = AGM_COEF_RTOL if method == "agm" and key == "coefficients" else rtol
        torch.testing.assert_close(
            got[key].cpu(), want[key].cpu(), rtol=r, atol=atol, equal_nan=True, msg=lambda m: f"{msg} key={key}: {m}"
        )


def _logits(M, B, C, device, dtype=torch.float32, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    # modality-dependent sharpness so the ratios differ from 1 (a coefficient near a threshold could flip on rounding)
    sharp = torch.linspace(0.5, 2.0, M).view(M, 1, 1)
    x = torch.randn(M, B, C, generator=g) * scale * sharp
    y = torch.randint(0, C, (B,), generator=g)
    x[torch.arange(M).view(M, 1), torch.arange(B).view(1, B), y.view(1, B)] += 2.0 * sharp.view(M, 1)
    return x.to(dtype).to(device), y.to(device)


def _run_all_methods(x, y, device, *, ignore_index=-100, msg=""):
    for method, hps in HP.items():
        for hp in hps:
            m = x.shape[0] if isinstance(x, torch.Tensor) else len(x)
            st_k = R.new_agm_state(m, device) if method == "agm" else None
            st_r = R.new_agm_state(m, device) if method == "agm" else None
            for _ in range(2 if method == "agm" else 1):  # AGM: a second step uses the running means
                got = balance_coefficients(x, y, method, state=st_k, ignore_index=ignore_index, **hp)
                want = R.balance_coefficients_ref(x, y, method, state=st_r, ignore_index=ignore_index, **hp)
                _close(got, want, msg=f"{msg} {method} {hp}", method=method)
            if method == "agm":
                torch.testing.assert_close(st_k["s_hat"], st_r["s_hat"], rtol=2e-5, atol=1e-6)
                assert torch.equal(st_k["steps"], st_r["steps"])


@pytest.mark.parametrize("M,B,C", CASES)
def test_parity_grid_fp32(M, B, C, device):
    x, y = _logits(M, B, C, device, seed=M * 100000 + B * 10 + C)
    if B > 2:
        y[1] = -100
    _run_all_methods(x, y, device, msg=f"M={M} B={B} C={C}")


@pytest.mark.parametrize("M,B,C", [(3, 64, 31), (2, 1000, 309), (8, 7, 4097)])
def test_parity_fp16(M, B, C, device):
    x, y = _logits(M, B, C, device, dtype=torch.float16, seed=7)
    _run_all_methods(x, y, device, msg=f"fp16 M={M} B={B} C={C}")


def test_stacked_noncontiguous_and_list_inputs(device):
    M, B, C = 3, 64, 31
    base, y = _logits(M, B, C, device, seed=3)
    transposed = base.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # a [B, M, C] buffer seen as [M, B, C]
    assert not transposed.is_contiguous() and torch.equal(transposed, base)
    wide = torch.zeros(M, B, 2 * C, device=device)
    wide[..., ::2] = base
    strided_c = wide[..., ::2]  # class stride 2
    for x in (transposed, strided_c, list(base.unbind(0))):
        _run_all_methods(x, y, device, msg="layout")
    got = balance_coefficients(transposed, y, "ogm", alpha=0.6)
    want = balance_coefficients(base, y, "ogm", alpha=0.6)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0.0)


def test_ignore_index_rows_and_custom_ignore_index(device):
    M, B, C = 3, 64, 31
    x, y = _logits(M, B, C, device, seed=11)
    y[::3] = -100
    x[:, 0, :] = float("nan")  # an ignored row may hold anything
    got = balance_coefficients(x, y, "ogm", alpha=0.6)
    assert got["flag"].item() == 0
    _run_all_methods(x, y, device, msg="ignored rows")
    # ignore_index that is also a class value
    y2 = y.clone()
    y2[y2 == -100] = 5
    _run_all_methods(x[:, 1:], y2[1:], device, ignore_index=5, msg="ignore_index=5")
    # ignored rows change nothing: dropping them gives the same scores
    keep = y != -100
    a = balance_coefficients(x, y, "mlb", alpha=0.8)
    b = balance_coefficients(x[:, keep], y[keep], "mlb", alpha=0.8)
    torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-5, atol=1e-6)


def test_all_rows_ignored(device):
    M, B, C = 3, 7, 6
    x, y = _logits(M, B, C, device)
    y[:] = -100
    for method, neutral in (("ogm_ge", 1.0), ("ogm", 1.0), ("opm", 0.0), ("mlb", 1.0), ("agm", 1.0)):
        st = R.new_agm_state(M, device)
        st["s_hat"].fill_(0.7)
        st["steps"].fill_(3.0)
        got = balance_coefficients(x, y, method, state=st if method == "agm" else None)
        assert got["flag"].item() == 2
        assert torch.equal(got["coefficients"].cpu(), torch.full((M,), neutral))
        assert torch.equal(st["s_hat"].cpu(), torch.full((M,), 0.7)) and st["steps"].item() == 3.0
        want = R.balance_coefficients_ref(x, y, method, state=R.new_agm_state(M, device) if method == "agm" else None)
        _close(
            {k: v for k, v in got.items() if k in ("flag", "coefficients")},
            {k: v for k, v in want.items() if k in ("flag", "coefficients")},
        )


def test_agm_state_parity_20_steps(device):
    M, B, C = 3, 64, 31
    st_k, st_r = R.new_agm_state(M, device), R.new_agm_state(M, device)
    for step in range(20):
        x, y = _logits(M, B, C, device, seed=1000 + step, scale=1.0 + 0.1 * step)
        if step == 7:
            x[1, 4, 2] = float("nan")  # a bad step: flag 1, state untouched, later steps continue from it
        got = balance_coefficients(x, y, "agm", state=st_k, alpha=2.0, clip=3.0)
        want = R.balance_coefficients_ref(x, y, "agm", state=st_r, alpha=2.0, clip=3.0)
        _close(got, want, msg=f"step {step}", method="agm")
        torch.testing.assert_close(st_k["s_hat"], st_r["s_hat"], rtol=2e-5, atol=1e-6)
        assert torch.equal(st_k["steps"], st_r["steps"])
    assert st_k["steps"].item() == 19.0


@pytest.mark.parametrize("bad", ["nan", "+inf", "all_-inf"])
def test_non_finite_logits_give_flag_1_and_neutral(bad, device):
    M, B, C = 3, 7, 6
    x, y = _logits(M, B, C, device, seed=5)
    if bad == "nan":
        x[2, 3, 1] = float("nan")
    elif bad == "+inf":
        x[0, 0, 0] = float("inf")
    else:
        x[1, 2, :] = float("-inf")
    for method, neutral in (("ogm_ge", 1.0), ("ogm", 1.0), ("opm", 0.0), ("mlb", 1.0), ("agm", 1.0)):
        st = R.new_agm_state(M, device)
        got = balance_coefficients(x, y, method, state=st if method == "agm" else None)
        assert got["flag"].item() == 1, method
        assert torch.equal(got["coefficients"].cpu(), torch.full((M,), neutral)), method
        assert st["steps"].item() == 0.0 and torch.equal(st["s_hat"].cpu(), torch.zeros(M))
        want = R.balance_coefficients_ref(x, y, method)
        assert want["flag"].item() == 1
    # the workspace is clean afterwards: a finite batch gives the reference numbers again
    x2, y2 = _logits(M, B, C, device, seed=6)
    _close(balance_coefficients(x2, y2, "ogm"), R.balance_coefficients_ref(x2, y2, "ogm"))


def test_minus_inf_masked_classes_stay_finite(device):
    M, B, C = 2, 7, 2100  # -inf in the whole first C tile of some rows: the online softmax must not produce nan
    x, y = _logits(M, B, C, device, seed=9)
    y[:] = C - 1
    x[:, :3, :1024] = float("-inf")
    x[0, 4, 5] = float("-inf")
    got = balance_coefficients(x, y, "agm")
    want = R.balance_coefficients_ref(x, y, "agm")
    assert got["flag"].item() == 0
    _close(got, want)


def _underflow_batch(zero_modalities, device, M=2):
    """Finite logits, C=2, row 3 ignored: modalities in `zero_modalities` have every valid row [0, -1000] with
    label 1, so softmax[y] underflows to exactly 0 and their 'prob' sum is 0 (the others: [0, 0], sum 3/2)."""
    x = torch.zeros(M, 4, 2)
    for m in zero_modalities:
        x[m, :, 1] = -1000.0
    return x.to(device), torch.tensor([1, 1, 1, -100], device=device)


@pytest.mark.parametrize("zeros", [(0, 1), (0,)])
def test_zero_prob_sums_flag_1_like_reference(zeros, device):
    # both sums 0: NaN ratios (and NaN ogm_ge / mlb coefficients); one sum 0: an inf ratio, finite raw
    # coefficients. Finite scores either way; the flag rule covers ratios and coefficients too.
    x, y = _underflow_batch(zeros, device)
    for method, neutral in (("ogm_ge", 1.0), ("ogm", 1.0), ("opm", 0.0), ("mlb", 1.0)):
        got = balance_coefficients(x, y, method)
        want = R.balance_coefficients_ref(x, y, method)
        _close(got, want, msg=method)
        assert got["flag"].item() == 1, method
        assert torch.equal(got["coefficients"].cpu(), torch.full((2,), neutral)), method
        assert not torch.isfinite(got["ratios"]).all(), method
    # the difference-of-scores ratio is finite on the same batch: flag 0, same numbers as the reference
    _close(
        balance_coefficients(x, y, "ogm", ratio="difference"),
        R.balance_coefficients_ref(x, y, "ogm", ratio="difference"),
    )
    # the workspace is clean afterwards: a finite batch gives the reference numbers again
    x2, y2 = _logits(3, 7, 6, device, seed=6)
    _close(balance_coefficients(x2, y2, "mlb"), R.balance_coefficients_ref(x2, y2, "mlb"))


def test_agm_kappa_overflow_flag_1_like_reference(device):
    # equal logits -> equal finite 'ce' scores (r = 1); a history with s_hat_0 << s_hat_1 makes tau_0 huge and
    # kappa_0 = exp(tau_0 - r_0) = inf without clip: flag 1, kappa neutral, state untouched
    x, y = _logits(1, 7, 6, device, seed=8)
    x = x.expand(2, 7, 6)
    st_k = {"s_hat": torch.tensor([0.0, 18.0], device=device), "steps": torch.ones((), device=device)}
    st_r = {k: v.clone() for k, v in st_k.items()}
    got = balance_coefficients(x, y, "agm", state=st_k)
    want = R.balance_coefficients_ref(x, y, "agm", state=st_r)
    _close(got, want)
    assert got["flag"].item() == 1 and torch.equal(got["coefficients"].cpu(), torch.ones(2))
    assert st_k["steps"].item() == 1.0 and torch.equal(st_k["s_hat"].cpu(), torch.tensor([0.0, 18.0]))
    got = balance_coefficients(x, y, "agm", state=st_k, clip=10.0)  # clipped: finite, flag 0, state moves
    want = R.balance_coefficients_ref(x, y, "agm", state=st_r, clip=10.0)
    _close(got, want)
    assert got["flag"].item() == 0 and st_k["steps"].item() == 2.0
    torch.testing.assert_close(st_k["s_hat"], st_r["s_hat"], rtol=2e-5, atol=1e-6)


def test_label_out_of_range_flags(device):
    x, y = _logits(2, 7, 6, device)
    y[2] = 6
    got = balance_coefficients(x, y, "ogm")
    assert got["flag"].item() == 1 and torch.equal(got["coefficients"].cpu(), torch.ones(2))


def _count_triton_launches(monkeypatch):
    """Wrap the run method of Triton's kernel objects (interpreter and compiled) and count calls."""
    import triton.runtime.interpreter as interp
    import triton.runtime.jit as jit

    calls = []
    for cls in (interp.InterpretedFunction, jit.JITFunction):
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            calls.append(getattr(self, "__name__", None) or getattr(getattr(self, "fn", None), "__name__", "?"))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return calls


def test_exactly_one_triton_launch(monkeypatch, device):
    x, y = _logits(3, 1000, 31, device)
    balance_coefficients(x, y, "ogm")  # warm-up (workspace allocation, compilation)
    calls = _count_triton_launches(monkeypatch)
    for method in ("ogm_ge", "ogm", "opm", "agm", "mlb"):
        calls.clear()
        st = R.new_agm_state(3, device)
        balance_coefficients(x, y, method, state=st if method == "agm" else None)
        assert len(calls) == 1, (method, calls)


def test_sync_path_two_launches_single_process_group(monkeypatch, tmp_path, device):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        x, y = _logits(3, 64, 31, device, seed=21)
        calls = _count_triton_launches(monkeypatch)
        st_k, st_r = R.new_agm_state(3, device), R.new_agm_state(3, device)
        for method in ("ogm", "agm", "mlb"):
            calls.clear()
            got = balance_coefficients(x, y, method, state=st_k if method == "agm" else None, sync=True)
            assert len(calls) == 2, calls
            want = R.balance_coefficients_ref(x, y, method, state=st_r if method == "agm" else None)
            _close(got, want, msg=method, method=method)
        calls.clear()
        balance_coefficients(x, y, "ogm", sync=False)
        assert len(calls) == 1
    finally:
        dist.destroy_process_group()
