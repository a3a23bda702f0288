"""Property-based checks of the public ops (issue 10): for drawn shapes, dtypes, strides, labels (with ignore_index and
out-of-range values), non-finite inputs and hyperparameters at and beyond their ranges, every op either raises a
ValueError / TypeError naming the argument, or returns finite statistics that agree with the reference.

Each property runs on the backend of its lane: reference (unmarked), Triton (`-m triton`, TRITON_INTERPRET=1),
the extension's CPU twins (`-m ext`). Sizes are small and example counts capped so a lane spends well under a minute.
"""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from mmkernels import _validate, reference as R  # noqa: E402
from mmkernels.coefficients import METHOD_DEFAULTS, balance_coefficients  # noqa: E402
from mmkernels.noise import ge_isotropic_  # noqa: E402
from mmkernels.taps import drop_uniforms, grad_tap, modality_drop  # noqa: E402

SETTINGS = dict(
    deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
LANES = [
    pytest.param("reference", marks=pytest.mark.backend("reference"), id="reference"),
    pytest.param(
        "triton",
        marks=[
            pytest.mark.triton,
            pytest.mark.backend("triton"),
            pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
        ],
        id="triton",
    ),
]
SPECIALS = [float("nan"), float("inf"), float("-inf"), 1e4, -1e4]


@st.composite
def logits_and_labels(draw, *, dtypes=(torch.float32, torch.float64, torch.float16)):
    m = draw(st.integers(2, 4))
    b = draw(st.integers(0, 9))
    c = draw(st.integers(1, 7))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 4.0]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if layout == "transposed":  # [M, B, C] with C the slowest dim
        x = (torch.randn(m, c, b, generator=g) * scale).to(dtype).transpose(1, 2)
    elif layout == "strided":  # every other row of a larger tensor
        x = (torch.randn(m, 2 * b, c, generator=g) * scale).to(dtype)[:, ::2]
    else:
        x = (torch.randn(m, b, c, generator=g) * scale).to(dtype)
    if b > 0 and draw(st.booleans()):
        x = x.clone() if layout != "contiguous" else x
        for _ in range(draw(st.integers(1, 3))):
            x[draw(st.integers(0, m - 1)), draw(st.integers(0, b - 1)), draw(st.integers(0, c - 1))] = draw(
                st.sampled_from(SPECIALS)
            )
    ignore_index = draw(st.sampled_from([-100, -1, c - 1 if c > 1 else -100]))
    pool = list(range(c)) + [ignore_index] * 2 + ([c, -7] if draw(st.booleans()) else [])
    labels = torch.tensor([draw(st.sampled_from(pool)) for _ in range(b)], dtype=torch.int64)
    if draw(st.booleans()):
        labels = labels.to(torch.int32)
    return x, labels, ignore_index


def _in_range(name, value) -> bool:
    low, high, lo_open, hi_open, allow_none = _validate.HYPERPARAMETER_RANGES[name]
    if value is None:
        return allow_none
    if not math.isfinite(value):
        return False
    ok = value > low if lo_open else value >= low
    if high is not None:
        ok = ok and (value < high if hi_open else value <= high)
    return ok


HP_VALUES = {
    "alpha": [0.0, 0.5, 2.0, -0.5, float("nan")],
    "q_base": [0.1, 0.9, 0.0, 1.0, 1.2],
    "lam": [0.0, 0.5, -1.0],
    "beta_max": [1.0, 3.0, 0.5],
    "clip": [None, 0.5, 10.0, 0.0, -2.0],
    "z": ["tanh", "sigmoid"],
    "ratio": ["ratio", "difference"],
    "tie": [0, 1],
}


@st.composite
def method_and_hp(draw):
    method = draw(st.sampled_from(sorted(METHOD_DEFAULTS)))
    hp = {k: draw(st.sampled_from(HP_VALUES[k])) for k in METHOD_DEFAULTS[method] if draw(st.booleans())}
    return method, hp


def _neutral(method):
    return 0.0 if method == "opm" else 1.0


@pytest.mark.parametrize("lane", LANES)
def test_balance_coefficients_properties(lane, device):
    @settings(max_examples=60 if lane == "reference" else 30, **SETTINGS)
    @given(data=logits_and_labels(), mh=method_and_hp())
    def check(data, mh):
        x, labels, ignore_index = data
        x, labels = x.to(device), labels.to(device)
        method, hp = mh
        bad = [k for k, v in hp.items() if k in _validate.HYPERPARAMETER_RANGES and not _in_range(k, v)]
        if bad:
            with pytest.raises(ValueError, match="|".join(bad)):
                balance_coefficients(x, labels, method, ignore_index=ignore_index, **hp)
            return
        state = R.new_agm_state(x.shape[0], device=device) if method == "agm" else None
        out = balance_coefficients(x, labels, method, ignore_index=ignore_index, state=state, **hp)
        assert set(out) == {"scores", "ratios", "coefficients", "flag"}
        assert all(v.dtype == torch.float32 and not v.requires_grad for v in out.values())
        coef, flag = out["coefficients"], float(out["flag"])
        assert torch.isfinite(coef).all(), (method, hp, coef)
        valid = labels.long() != ignore_index
        assert (flag == 2.0) == (not bool(valid.any()))
        if flag != 0.0:
            assert torch.equal(coef, torch.full_like(coef, _neutral(method)))
        if method in ("ogm", "ogm_ge"):
            assert ((coef >= 0) & (coef <= 1)).all()
        if method == "opm":
            assert ((coef >= 0) & (coef <= 1)).all()
        ref_state = R.new_agm_state(x.shape[0], device=device) if method == "agm" else None
        want = R.balance_coefficients_ref(x, labels, method, ignore_index=ignore_index, state=ref_state, **hp)
        assert float(want["flag"]) == flag, (method, hp, want, out)
        rtol = 1e-2 if x.dtype == torch.float16 else 1e-4
        torch.testing.assert_close(out["scores"], want["scores"], rtol=rtol, atol=1e-4, equal_nan=True)
        torch.testing.assert_close(out["ratios"], want["ratios"], rtol=rtol, atol=1e-4, equal_nan=True)
        near_jump = bool(((want["ratios"] - 1.0).abs() < 1e-4).any())  # rho = 1 is a jump of the OGM-GE rule
        if not near_jump:
            torch.testing.assert_close(coef, want["coefficients"], rtol=rtol, atol=1e-4)

    check()


@pytest.mark.parametrize("lane", LANES)
def test_balance_coefficients_argument_errors_name_the_argument(lane, device):
    @settings(max_examples=25, **SETTINGS)
    @given(
        which=st.sampled_from(
            ["ignore_index", "labels_dtype", "labels_shape", "method", "unknown", "classes", "modalities", "tie"]
        ),
        big=st.sampled_from([2**63, -(2**63) - 1, 2**70]),
    )
    def check(which, big):
        x = torch.randn(2, 4, 3, device=device)
        y = torch.tensor([0, 1, 2, 0], device=device)
        call = {
            "ignore_index": (lambda: balance_coefficients(x, y, "ogm", ignore_index=big), ValueError, "ignore_index"),
            "labels_dtype": (lambda: balance_coefficients(x, y.float(), "ogm"), TypeError, "labels"),
            "labels_shape": (lambda: balance_coefficients(x, y[:3], "ogm"), ValueError, "labels"),
            "method": (lambda: balance_coefficients(x, y, "ogmge"), ValueError, "method"),
            "unknown": (lambda: balance_coefficients(x, y, "mlb", q_base=0.5), TypeError, "hyperparameter"),
            "classes": (lambda: balance_coefficients(x[:, :, :0], y, "ogm"), ValueError, "class"),
            "modalities": (lambda: balance_coefficients(x[:1], y, "ogm"), ValueError, "modalities"),
            "tie": (lambda: balance_coefficients(x, y, "ogm_ge", tie=big), ValueError, "tie"),
        }[which]
        with pytest.raises(call[1], match=call[2]):
            call[0]()

    check()


@pytest.mark.parametrize("lane", LANES)
def test_modality_drop_properties(lane, device):
    @settings(max_examples=30 if lane == "reference" else 15, **SETTINGS)
    @given(
        m=st.integers(2, 3),
        b=st.integers(0, 6),
        widths=st.lists(st.integers(1, 5), min_size=3, max_size=3),
        q=st.lists(st.sampled_from([0.0, 0.3, 0.99, 1.0, 1.5, -0.1, float("nan")]), min_size=3, max_size=3),
        rescale=st.sampled_from(["official", "per_modality", "none"]),
        p_exe=st.sampled_from([1.0, 0.5, 0.0, 1.5]),
        seed=st.integers(0, 2**20),
        dtype=st.sampled_from([torch.float32, torch.float16]),
    )
    def check(m, b, widths, q, rescale, p_exe, seed, dtype):
        g = torch.Generator().manual_seed(seed)
        xs = [torch.randn(b, widths[j], generator=g).to(dtype).to(device) for j in range(m)]
        q = q[:m]
        if not all(0.0 <= v <= 1.0 for v in q):
            with pytest.raises(ValueError, match="q must"):
                modality_drop(xs, q, seed=seed, offset=3, rescale=rescale, p_exe=min(p_exe, 1.0))
            return
        if not 0.0 <= p_exe <= 1.0:
            with pytest.raises(ValueError, match="p_exe"):
                modality_drop(xs, q, seed=seed, offset=3, rescale=rescale, p_exe=p_exe)
            return
        out = modality_drop(xs, q, seed=seed, offset=3, rescale=rescale, p_exe=p_exe)
        assert [tuple(o.shape) for o in out] == [tuple(x.shape) for x in xs]
        assert all(torch.isfinite(o).all() for o in out)
        u, gate = drop_uniforms(seed, 3, m, b, device=device)
        want = R.modality_drop_ref(xs, torch.tensor(q, device=device), u, rescale=rescale, execute=bool(gate < p_exe))
        for o, w in zip(out, want):
            torch.testing.assert_close(o, w, rtol=1e-3, atol=1e-3)

    check()


@pytest.mark.parametrize("lane", LANES)
def test_grad_tap_properties(lane, device):
    @settings(max_examples=30 if lane == "reference" else 15, **SETTINGS)
    @given(
        shape=st.lists(st.integers(0, 4), min_size=1, max_size=3),
        k=st.sampled_from([0.0, 0.5, 2.0, -1.0, float("nan"), float("inf"), True]),
        as_tensor=st.booleans(),
        dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
    )
    def check(shape, k, as_tensor, dtype):
        x = torch.randn(shape).to(dtype).to(device).requires_grad_(True)
        kk = torch.tensor(float(k), device=device) if as_tensor and not isinstance(k, bool) else k
        if not isinstance(kk, torch.Tensor) and (isinstance(k, bool) or not math.isfinite(k)):
            with pytest.raises(TypeError, match="k must"):
                grad_tap(x, kk)
            return
        y = grad_tap(x, kk)
        g = torch.randn(shape).to(dtype).to(device)
        (gx,) = torch.autograd.grad(y, x, g)
        torch.testing.assert_close(gx, (g.double() * float(k)).to(dtype), equal_nan=True, rtol=1e-3, atol=1e-3)

    check()


@pytest.mark.parametrize(
    "lane",
    [
        pytest.param("reference", marks=pytest.mark.backend("reference"), id="reference"),
        pytest.param("ext", marks=[pytest.mark.ext, pytest.mark.backend("ext")], id="ext"),
    ],
)
def test_ge_isotropic_properties(lane):
    @settings(max_examples=40, **SETTINGS)
    @given(
        numels=st.lists(st.integers(0, 9), min_size=1, max_size=4),
        seed=st.integers(0, 2**40),
        offset=st.integers(0, 2**40),
        dtype=st.sampled_from([torch.float32, torch.float64]),
        k=st.sampled_from([0.0, 0.7, 1.0]),
    )
    def check(numels, seed, offset, dtype, k):
        g = torch.Generator().manual_seed(seed % 1000)
        grads = [torch.randn(n, generator=g).to(dtype) for n in numels]
        before = [t.clone() for t in grads]
        ge_isotropic_(grads, [k] * len(grads), seed=seed, offset=offset)
        assert all(torch.isfinite(t).all() for t in grads)
        normals = [n.view(t.shape) for n, t in zip(R.philox_ge_normals(numels, seed, offset), before)]
        want = R.ge_isotropic(before, torch.full((len(grads),), k), normals)
        for got, w in zip(grads, want):
            torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-5)

    check()
