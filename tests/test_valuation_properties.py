"""Hypothesis properties of sample- and modality-level valuation (docs/methods/sample_valuation.md,
docs/methods/modality_valuation.md): Shapley efficiency per sample on the reference and on the kernel, a rejected call
of any public method leaves the balancer's state_dict() unchanged, and non-finite logits always set the flag and never
give a non-finite phi."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmkernels import reference as R
from mmkernels.api.valuation import ModalityValuation, SampleValuation
from mmkernels.valuation import sample_valuation

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KERNEL_SETTINGS = settings(SETTINGS, max_examples=12)  # the interpreter is slower
KERNEL_CASES = [
    (2, 2, 3),
    (2, 70, 5),
    (3, 33, 4),
    (4, 9, 300),
    (5, 17, 2),
    (8, 5, 3),
]  # the gpu-compile plan of tests/test_valuation_triton.py


def random_logits(m, b, c, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2**m - 1, b, c, generator=g), torch.randint(0, c, (b,), generator=g)


def v_all(x, y, value):
    """v(all) from the full set's output alone: |S| = M (authors) or 1 (toolkit) where its argmax is the label."""
    m = (x.shape[0] + 1).bit_length() - 1
    return (x[-1].argmax(1) == y).float() * (m if value == "authors" else 1)


def assert_efficient(phi, x, y, value):
    """sum_m phi_m = v(all) - v(empty), v(empty) = 0; checked exactly on M! phi (integers)."""
    fact = math.factorial(phi.shape[0])
    scaled = torch.round(phi.double().cpu() * fact)
    assert torch.equal(scaled.sum(0), v_all(x, y, value).double() * fact)


def poison(x, seed, count):
    """count (>= 1) logits set to NaN, +inf or -inf, at random places (a whole row sometimes)."""
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    values = [float("nan"), float("inf"), float("-inf")]
    for k in range(count):
        s, i = (int(torch.randint(0, n, (1,), generator=g)) for n in x.shape[:2])
        val = values[int(torch.randint(0, 3, (1,), generator=g))]
        if k % 3 == 2:
            x[s, i] = val
        else:
            x[s, i, int(torch.randint(0, x.shape[2], (1,), generator=g))] = val
    return x


# ----------------------------------------------------------------------------------------------- efficiency
@SETTINGS
@given(
    st.integers(2, 6),
    st.integers(1, 9),
    st.integers(1, 5),
    st.sampled_from(["authors", "toolkit"]),
    st.integers(0, 10_000),
)
def test_efficiency_reference(m, b, c, value, seed):
    x, y = random_logits(m, b, c, seed)
    res = R.sample_valuation(x, y, value=value)
    assert_efficient(res["phi"], x, y, value)
    assert res["flag"].item() == 0.0


@pytest.mark.triton
@KERNEL_SETTINGS
@given(st.sampled_from(KERNEL_CASES), st.sampled_from(["authors", "toolkit"]), st.integers(0, 10_000))
def test_efficiency_kernel(device, monkeypatch, case, value, seed):
    monkeypatch.setenv("MMKERNELS_BACKEND", "triton")
    x, y = random_logits(*case, seed)
    res = sample_valuation(x.to(device), y.to(device), value=value)
    assert_efficient(res["phi"], x, y, value)
    assert res["flag"].item() == 0.0


# ----------------------------------------------------------------------------------------------- non-finite
@SETTINGS
@given(st.integers(2, 5), st.integers(1, 9), st.integers(1, 5), st.integers(1, 6), st.integers(0, 10_000))
def test_nonfinite_sets_the_flag_reference(m, b, c, count, seed):
    x, y = random_logits(m, b, c, seed)
    x = poison(x, seed, count)
    res = R.sample_valuation(x, y)
    assert res["flag"].item() == 1.0 and torch.isfinite(res["phi"]).all()
    bad_rows = ~torch.isfinite(x).all(2)
    assert (res["values"][bad_rows] == 0).all()  # never correct


@pytest.mark.triton
@KERNEL_SETTINGS
@given(st.sampled_from(KERNEL_CASES), st.integers(1, 6), st.integers(0, 10_000))
def test_nonfinite_sets_the_flag_kernel(device, monkeypatch, case, count, seed):
    monkeypatch.setenv("MMKERNELS_BACKEND", "triton")
    x, y = random_logits(*case, seed)
    x = poison(x, seed, count)
    res = sample_valuation(x.to(device), y.to(device))
    assert res["flag"].item() == 1.0 and torch.isfinite(res["phi"]).all()
    assert torch.equal(res["copies"].cpu(), R.sample_valuation(x, y)["copies"])


@SETTINGS
@given(st.sampled_from([SampleValuation, ModalityValuation]), st.integers(1, 6), st.integers(0, 10_000))
def test_nonfinite_sets_the_balancer_flag(cls, count, seed):
    x, y = random_logits(2, 8, 3, seed)
    bal = cls(2, 8, start=0)
    bal.value(poison(x, seed, count), y, torch.arange(8))
    assert torch.isfinite(bal.phi).all()
    bal.rows(1)
    assert bal.flag.item() == 1.0 and torch.isfinite(bal.scores).all() and torch.isfinite(bal.coefficients).all()


# ----------------------------------------------------------------------------------------------- rejected calls
N = 8


def rejected_calls(bal, x, y):
    """(description, call) pairs each of which must raise: every public method with a bad argument."""
    i = torch.arange(N)
    wrong_m = torch.zeros(7, N, 3)
    other = SampleValuation(2, N, start=0).state_dict()
    state = bal.state_dict()
    host = state["_extra_state"]
    calls = [
        ("value: labels out of range", lambda: bal.value(x, torch.full((N,), 3), i)),
        ("value: labels float", lambda: bal.value(x, y.float(), i)),
        ("value: labels shape", lambda: bal.value(x, y[:3], i)),
        ("value: index out of range", lambda: bal.value(x, y, torch.arange(1, N + 1))),
        ("value: index negative", lambda: bal.value(x, y, i - 1)),
        ("value: index float", lambda: bal.value(x, y, i.float())),
        ("value: 3 modalities", lambda: bal.value(wrong_m, y, i)),
        ("value: integer logits", lambda: bal.value(x.long(), y, i)),
        ("rows: negative epoch", lambda: bal.rows(-1)),
        ("rows: not an int", lambda: bal.rows("1")),
        ("values_after: below -1", lambda: bal.values_after(-2)),
        ("set_epoch: negative", lambda: bal.set_epoch(-1)),
        ("set_epoch: not an int", lambda: bal.set_epoch("1")),
        ("subset_logits: head rows", lambda: bal.subset_logits([torch.zeros(N, 2)] * 2, lambda f: torch.zeros(N, 3))),
        (
            "load_state_dict: other method",
            lambda: (
                bal.load_state_dict(other)
                if isinstance(bal, ModalityValuation)
                else bal.load_state_dict({**other, "_extra_state": {**other["_extra_state"], "method": "pmr"}})
            ),
        ),
        (
            "load_state_dict: tensor shape",
            lambda: bal.load_state_dict({**state, "count": torch.zeros(N + 1)}),
        ),
        (
            "load_state_dict: old phi_sum",
            lambda: bal.load_state_dict({k: v for k, v in state.items() if k != "scaled_phi_sum"}),
        ),
        (
            "load_state_dict: hyperparameters",
            lambda: bal.load_state_dict(
                {**state, "_extra_state": {**host, "hyperparameters": {**host["hyperparameters"], "start": 3}}}
            ),
        ),
    ]
    if isinstance(bal, ModalityValuation):
        calls.append(("valuation_indices: negative", lambda: bal.valuation_indices(-1)))
    return calls


def same_state(a, b):
    ta, tb = ({k: v for k, v in s.items() if k != "_extra_state"} for s in (a, b))
    return (
        a["_extra_state"] == b["_extra_state"] and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    )


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([SampleValuation, ModalityValuation]), st.integers(0, 3), st.integers(0, 10_000))
def test_a_rejected_call_leaves_the_state_unchanged(cls, passes, seed):
    x, y = random_logits(2, N, 3, seed)
    bal = cls(2, N, start=0)
    for p in range(passes):  # some valued state, some rows built
        bal.value(x, y, torch.arange(N))
        if p % 2:
            bal.rows(p)
    before = bal.state_dict()
    for name, call in rejected_calls(bal, x, y):
        with pytest.raises((ValueError, TypeError, RuntimeError)):
            call()
        assert same_state(bal.state_dict(), before), name
