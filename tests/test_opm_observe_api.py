"""OPM.observe() on the output of this step's drop() (issue 19): OPM scores the undropped features (TPAMI Alg. 1),
so logits that are, or were computed with autograd from, the features drop() returned are rejected with a ValueError
naming the argument, and the rejected call changes no state. The undropped path and the next step stay accepted."""

from __future__ import annotations

import pytest
import torch

from mmkernels.api import OPM


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(4, 3, generator=g, requires_grad=True) for _ in range(2)]
    x = [torch.randn(8, 4, generator=g) for _ in range(2)]
    y = torch.randint(0, 3, (8,), generator=g)
    return w, x, y


@pytest.mark.parametrize(
    "how",
    [
        "the dropped tensors as logits",
        "heads on the dropped features (with grad)",
        "one stacked tensor from the dropped features",
    ],
)
def test_observe_on_dropped_features_raises_and_changes_nothing(how):
    w, x, y = setup()
    bal = OPM(2, q_base=0.5, timing="next")
    feats = [xi @ wi for xi, wi in zip(x, w)]  # [8, 3] each: usable as logits by shape
    bal.observe([f.detach() for f in feats], y)  # step 0: q for step 1
    bal.step()
    dropped = bal.drop(feats)
    if how == "the dropped tensors as logits":
        bad = dropped
    elif how == "heads on the dropped features (with grad)":
        bad = [d * 2.0 + 1.0 for d in dropped]
    else:
        bad = torch.stack([d.tanh() for d in dropped])
    state = {k: v.clone() for k, v in bal._stats.items()}
    with pytest.raises(ValueError, match=r"unimodal_logits.*drop\(\)"):
        bal.observe(bad, y)
    for k, v in state.items():
        assert torch.equal(bal._stats[k], v), k
    bal.observe([f.detach() for f in feats], y)  # the undropped features: accepted
    bal.step()
    bal.observe([d.detach() * 1.0 + 0.0 for d in dropped], y)  # a new step: nothing recorded for it


def test_observe_without_a_drop_in_this_step_is_accepted():
    w, x, y = setup(1)
    bal = OPM(2, q_base=0.5, timing="same")
    feats = [xi @ wi for xi, wi in zip(x, w)]
    bal.observe(feats, y)  # timing="same": observe first, then drop
    bal.drop(feats)
