"""Hypothesis properties of the PMR balancer (docs/methods/pmr.md): a rejected call of any public method leaves
state_dict() unchanged (a rejected refresh() inside a pass adds nothing to it); non-finite features never reach a
gradient (the encoders' parameters stay finite) and always set the flag; a refresh with non-finite rows leaves the
prototypes finite and counts the skipped rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mmkernels.api.pmr import PMR

from _api_models import C, TinyModel, batch

SETTINGS = settings(max_examples=25, deadline=None)


def host(state: dict, **changes) -> dict:
    """The "_extra_state" entry of a state_dict with `changes` applied."""
    return {"_extra_state": {**state["_extra_state"], **changes}}


def state_equal(a: dict, b: dict) -> bool:
    """Two PMR state_dicts with the same entries and bit-identical tensors."""
    if set(a) != set(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def ready(m: int, seed: int):
    """A PMR balancer after one refresh and one step, its model and a batch."""
    model = TinyModel(m, seed=seed % 7)
    bal = PMR(m, num_classes=C)
    xs, y = batch(m, b=10, seed=seed)
    with torch.no_grad():
        bal.update_prototypes(model.feats(xs), y)
    bal.loss(model.feats(xs), y).backward()
    bal.step()
    return bal, model, xs, y


def bad_calls(bal, model, xs, y):
    """Calls that must be rejected, with the exception type each raises."""
    feats = [f.detach() for f in model.feats(xs)]
    m = len(feats)
    good = bal.state_dict()
    return [
        (ValueError, lambda: bal.loss(feats, torch.full_like(y, C))),  # label out of range
        ((ValueError, TypeError), lambda: bal.loss(feats, y.float())),  # float labels
        (ValueError, lambda: bal.loss(feats[:1] if m > 2 else feats + feats, y)),  # wrong modality count
        (ValueError, lambda: bal.loss([f[:, :-1] for f in feats], y)),  # other widths
        (ValueError, lambda: bal.loss(feats, y[:-1])),  # wrong batch
        (RuntimeError, lambda: bal.refresh(feats, y)),  # outside a pass
        (RuntimeError, lambda: bal.end_refresh()),
        (ValueError, lambda: bal.update_prototypes(feats, torch.full_like(y, -3))),
        (ValueError, lambda: bal.update_prototypes(feats[:1] if m > 2 else feats + feats, y)),
        ((ValueError, TypeError), lambda: bal.update_prototypes([f.long() for f in feats], y)),
        ((ValueError, TypeError), lambda: bal.update_prototypes(feats, y.to(torch.int16))),
        (
            ValueError,
            lambda: bal.load_state_dict(
                {**good, "prototypes": torch.empty(good["prototypes"].shape, device="meta"), **host(good, step=99)}
            ),
        ),
        (
            ValueError,
            lambda: bal.load_state_dict({**good, "prototypes": good["prototypes"][:, :1], **host(good, step=99)}),
        ),
        (
            ValueError,
            lambda: bal.load_state_dict({**good, "prototypes": good["prototypes"].double(), **host(good, step=99)}),
        ),
        (ValueError, lambda: bal.load_state_dict({**good, **host(good, method="ogm", step=99)})),
        (
            ValueError,
            lambda: bal.load_state_dict(
                {
                    **good,
                    **host(good, hyperparameters={**good["_extra_state"]["hyperparameters"], "alpha": 9.0}, step=99),
                }
            ),
        ),
    ]


@SETTINGS
@given(st.integers(2, 3), st.integers(0, 10_000), st.data())
def test_a_rejected_call_changes_nothing(m, seed, data):
    bal, model, xs, y = ready(m, seed)
    calls = bad_calls(bal, model, xs, y)
    exc, call = calls[data.draw(st.integers(0, len(calls) - 1))]
    before = bal.state_dict()
    with pytest.raises(exc):
        call()
    assert state_equal(bal.state_dict(), before)


@SETTINGS
@given(st.integers(2, 3), st.integers(0, 10_000), st.integers(1, 4), st.sampled_from(["nan", "inf", "-inf"]))
def test_nonfinite_features_set_the_flag_and_never_reach_a_parameter(m, seed, count, kind):
    bal, model, xs, y = ready(m, seed)
    g = torch.Generator().manual_seed(seed)
    feats = model.feats(xs)
    poisoned = []
    for i, f in enumerate(feats):
        mask = torch.zeros_like(f, dtype=torch.bool)
        if i == 0 or bool(torch.randint(0, 2, (1,), generator=g)):
            for _ in range(count):
                mask[
                    int(torch.randint(0, f.shape[0], (1,), generator=g)),
                    int(torch.randint(0, f.shape[1], (1,), generator=g)),
                ] = True
        poisoned.append(torch.where(mask, torch.tensor(float(kind)), f))
    model.zero_grad()
    (F.cross_entropy(model.fuse([f.detach() for f in feats]), y) + bal.loss(poisoned, y)).backward()
    assert bal.flag.item() == 1.0
    assert bal.coefficients.abs().sum().item() == 0.0
    for p in model.encoders.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


@SETTINGS
@given(st.integers(2, 3), st.integers(0, 10_000), st.integers(1, 5))
def test_a_refresh_with_nonfinite_rows_keeps_the_prototypes_finite(m, seed, rows):
    bal, model, xs, y = ready(m, seed)
    g = torch.Generator().manual_seed(seed + 1)
    feats = [f.detach().clone() for f in model.feats(xs)]
    picked = torch.randperm(y.shape[0], generator=g)[:rows]
    feats[0][picked, 0] = float("nan")
    bal.begin_refresh()
    bal.refresh(feats, y)
    bal.end_refresh()
    assert bal.refresh_skipped[0].item() == rows and bal.refresh_skipped[1:].abs().sum().item() == 0
    assert all(torch.isfinite(p).all() for p in bal.prototypes)


@SETTINGS
@given(st.integers(2, 3), st.integers(0, 10_000), st.data())
def test_a_rejected_refresh_inside_a_pass_adds_nothing(m, seed, data):
    """refresh() calls rejected inside a pass (labels out of range, wrong dtypes, modality count, widths) leave the
    pass as it was: end_refresh() gives the prototypes of the pass without them."""
    bal, model, xs, y = ready(m, seed)
    twin = PMR(m, num_classes=C)
    twin.load_state_dict(bal.state_dict())
    feats = [f.detach() for f in model.feats(xs)]
    bad = [
        lambda: bal.refresh(feats, torch.full_like(y, C)),
        lambda: bal.refresh(feats, y.float()),
        lambda: bal.refresh([f.long() for f in feats], y),
        lambda: bal.refresh(feats[:1] if m > 2 else feats + feats, y),
        lambda: bal.refresh([f[:, :-1] for f in feats], y),
    ]
    for b in (bal, twin):
        b.begin_refresh()
        b.refresh(feats, y)
    for i in data.draw(st.lists(st.integers(0, len(bad) - 1), min_size=1, max_size=3)):
        with pytest.raises((ValueError, TypeError)):
            bad[i]()
    for b in (bal, twin):
        b.end_refresh()
    assert state_equal(bal.state_dict(), twin.state_dict())
