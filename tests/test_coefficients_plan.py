"""CoefficientPlan (mmkernels/coefficients.py): balance_coefficients with the batch-independent checks done once and
each input layout's launch prepared once. The same numbers as balance_coefficients on every backend, fresh outputs
per call, the same errors, and a rejected call keeps nothing."""

from __future__ import annotations

import pytest
import torch

from mmkernels import reference as R
from mmkernels.coefficients import CoefficientPlan, balance_coefficients

METHODS = ["ogm_ge", "ogm", "opm", "agm", "mlb"]
BACKENDS = [
    pytest.param("reference", marks=pytest.mark.backend("reference"), id="reference"),
    pytest.param("ext", marks=[pytest.mark.ext, pytest.mark.backend("ext")], id="ext"),
    pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.backend("triton")], id="triton"),
]
HP = {
    "ogm_ge": {"alpha": 0.8},
    "ogm": {"alpha": 0.5, "z": "sigmoid"},
    "opm": {"q_base": 0.3, "lam": 2.0},
    "agm": {"alpha": 1.0, "clip": 2.0},
    "mlb": {"alpha": 1.0, "beta_max": 1.5},
}


def inputs(m, b, c, device, seed=0, ignore=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, b, c, generator=g) * torch.arange(1.0, m + 1).view(m, 1, 1)).to(device)
    y = torch.randint(0, c, (b,), generator=g)
    y[:ignore] = -100
    return x, y.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_plan_matches_balance_coefficients(method, backend, device):
    """Three steps over two layouts (B = 7, then B = 1, then B = 7 again, a non-contiguous view) with ignored rows:
    every output equal to balance_coefficients', AGM's state advanced identically."""
    plan = CoefficientPlan(method, **HP[method])
    state_p, state_r = (
        (R.new_agm_state(3, device=device), R.new_agm_state(3, device=device)) if method == "agm" else (None, None)
    )
    for step, (b, ignore) in enumerate([(7, 2), (1, 0), (7, 0)]):
        x, y = inputs(3, b, 5, device, seed=step, ignore=ignore)
        if step == 2:
            x = torch.randn(5, b, 3, device=device).transpose(0, 2)  # [3, b, 5], not contiguous
        got = plan(x, y, state_p)
        want = balance_coefficients(x, y, method, state=state_r, **HP[method])
        for k in ("scores", "ratios", "coefficients", "flag"):
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, equal_nan=True, msg=f"{k} step {step}")
        if method == "agm":
            for k in ("s_hat", "steps"):
                torch.testing.assert_close(state_p[k], state_r[k], rtol=0, atol=0)
    assert len(plan._layouts) == 3  # B = 7, B = 1, and B = 7 with other strides


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_outputs_are_fresh_every_call(backend, device):
    """A step's statistics are never overwritten by the next call (a user may keep them without cloning)."""
    plan = CoefficientPlan("ogm")
    first = plan(*inputs(2, 6, 4, device, seed=0))
    kept = {k: v.clone() for k, v in first.items()}
    plan(*inputs(2, 6, 4, device, seed=1))
    for k, v in first.items():
        assert torch.equal(v, kept[k])


def test_plan_checks_its_arguments_once_at_construction():
    with pytest.raises(ValueError, match="method"):
        CoefficientPlan("ogmx")
    with pytest.raises(ValueError, match="alpha"):
        CoefficientPlan("ogm", alpha=-1.0)
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        CoefficientPlan("ogm", beta_max=2.0)
    with pytest.raises(TypeError, match="ignore_index"):
        CoefficientPlan("ogm", ignore_index=1.5)


def test_plan_rejects_a_bad_layout_and_keeps_nothing():
    plan = CoefficientPlan("ogm")
    x, y = inputs(2, 6, 4, "cpu")
    with pytest.raises(ValueError, match="labels must have shape \\[6\\]"):
        plan(x, y[:5])
    with pytest.raises(TypeError, match="labels must be an integer"):
        plan(x, y.float())
    with pytest.raises(ValueError, match="modalities"):
        plan(x[:1], y)
    assert plan._layouts == {}
    plan(x, y)
    assert len(plan._layouts) == 1


def test_plan_checks_agm_state_on_every_call():
    """The state may be replaced between calls (load_state_dict): it is checked each time, not once per layout."""
    plan = CoefficientPlan("agm")
    x, y = inputs(2, 6, 4, "cpu")
    plan(x, y, R.new_agm_state(2))
    with pytest.raises(ValueError, match="s_hat"):
        plan(x, y, {"s_hat": torch.zeros(3), "steps": torch.zeros(())})


def test_plan_takes_lists_through_balance_coefficients():
    plan = CoefficientPlan("mlb")
    x, y = inputs(2, 6, 4, "cpu")
    got = plan(list(x.unbind(0)), y)
    want = balance_coefficients(x, y, "mlb")
    for k in want:
        assert torch.equal(got[k], want[k])
    assert plan._layouts == {}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["ogm", "agm"])
def test_plan_raw_is_the_packed_output(method, backend, device):
    plan = CoefficientPlan(method)
    x, y = inputs(2, 6, 4, device, ignore=1)
    out = plan.raw(x, y)
    want = balance_coefficients(x, y, method)
    assert out.shape == (7,) and out.dtype == torch.float32
    torch.testing.assert_close(
        out,
        torch.cat([want["scores"], want["ratios"], want["coefficients"], want["flag"].view(1)]),
        rtol=0,
        atol=0,
        equal_nan=True,
    )
    with pytest.raises(TypeError, match="one tensor"):
        plan.raw(list(x.unbind(0)), y)
