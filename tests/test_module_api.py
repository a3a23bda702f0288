"""Balancers are torch.nn.Modules (issue 18, item 1): a balancer held by the model follows .to()/.train()/.eval(), its
state is part of the model's state_dict (tensor entries + "_extra_state"), a resume is bit-identical, and the
version-1 dicts of the earlier releases still load (tests/data/balancer_state_v1.pt, saved by that release)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mmkernels.api as api

from _api_models import TinyModel, batch

V1 = Path(__file__).parent / "data" / "balancer_state_v1.pt"


def makers(model):
    return {
        "ogm_ge": lambda: api.OGMGE(3, alpha=2.0, seed=5),
        "ogm": lambda: api.OGM(3, alpha=2.0),
        "opm": lambda: api.OPM(3, seed=5),
        "agm": lambda: api.AGM(3),
        "mlb": lambda: api.MLB(3),
        "olm": lambda: api.OLM(3),
        "pmr": lambda: api.PMR(3, num_classes=4),
        "mmpareto": lambda: api.MMPareto(3, params=[list(e.parameters()) for e in model.encoders]),
        "sample_valuation": lambda: api.SampleValuation(3, 16),
        "modality_valuation": lambda: api.ModalityValuation(3, 16),
    }


def test_every_balancer_is_a_module_without_parameters():
    for make in makers(TinyModel(3)).values():
        bal = make()
        assert isinstance(bal, nn.Module) and list(bal.parameters()) == []


@pytest.mark.parametrize("kind", list(makers(TinyModel(3))))
def test_version_1_state_loads(kind):
    """A state_dict() of the release before (the plain dict with "tensors"): every tensor and counter arrives, and
    the state saved again (version 2) round-trips."""
    old = torch.load(V1, weights_only=False)[kind]
    make = makers(TinyModel(3))[kind]
    bal = make()
    bal.load_state_dict(old)
    sd = bal.state_dict()
    host = sd["_extra_state"]
    assert host["version"] == 2 and host["step"] == old["step"] == 3 and host["method"] == old["method"]
    assert host["hyperparameters"] == old["hyperparameters"]
    for name, t in old["tensors"].items():
        assert torch.equal(sd[name], t), name
    if kind == "pmr":
        assert torch.equal(sd["prototypes"], old["prototypes"]) and host["widths"] == old["widths"]
    again = make()
    again.load_state_dict(sd)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in sd.items() if k != "_extra_state")


class Model(TinyModel):
    def __init__(self):
        super().__init__(2)
        self.balancer = api.OGMGE(2, alpha=2.0, seed=3)


def _train_step(model, xs, y):
    feats = model.feats(xs)
    model.balancer.observe(api.concat_unimodal_logits(feats, model.head), y)
    F.cross_entropy(model.fuse(model.balancer.tap(feats)), y).backward()
    model.balancer.step()


def test_submodule_follows_train_eval_and_dtype_casts_keep_fp32():
    model = Model()
    model.eval()
    assert not model.balancer.training and not model.balancer.active
    model.train()
    assert model.balancer.training and model.balancer.active
    model.to(torch.float64)
    assert model.head.weight.dtype == torch.float64
    assert model.balancer.coefficients.dtype == torch.float32  # statistics stay fp32 under a dtype cast
    assert model.balancer.state_dict()["scores"].dtype == torch.float32


def test_model_state_dict_holds_the_balancer_and_a_resume_is_bit_identical():
    xs, y = batch(2)
    model = Model()
    for _ in range(2):
        _train_step(model, xs, y)
    sd = model.state_dict()
    assert {"balancer.coefficients", "balancer.scores", "balancer._extra_state"} <= set(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    resumed = Model()
    resumed.load_state_dict(torch.load(buf, weights_only=True))  # host state is plain Python: weights_only loads
    assert resumed.balancer.step_count == 2
    for m in (model, resumed):
        m.zero_grad()
        _train_step(m, xs, y)
    assert torch.equal(model.balancer.coefficients, resumed.balancer.coefficients)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p.grad, q.grad), name  # same noise stream: (seed, step) restored


def test_hyperparameters_that_differ_through_a_parent_are_reported():
    """Loaded through the model: strict raises naming the hyperparameter; strict=False keeps the current ones and
    returns the difference among the unexpected keys."""
    sd = Model().state_dict()
    other = Model()
    other.balancer = api.OGMGE(2, alpha=0.5, seed=3)
    with pytest.raises(RuntimeError, match="alpha"):
        other.load_state_dict(sd)
    result = other.load_state_dict(sd, strict=False)
    assert any("hyperparameters" in k and "alpha" in k for k in result.unexpected_keys)
    assert other.balancer.alpha == 0.5


def test_rejected_load_changes_nothing_and_names_the_problem():
    bal = api.OGM(2)
    bal._step = 5
    sd = api.OGM(2).state_dict()
    with pytest.raises(ValueError, match="num_modalities=2"):
        api.OGM(3).load_state_dict(sd)
    with pytest.raises(ValueError, match="coefficients"):
        bal.load_state_dict({**sd, "coefficients": torch.zeros(5)})
    assert bal.step_count == 5
    with pytest.raises(RuntimeError, match="Unexpected"):
        bal.load_state_dict({**sd, "surprise": torch.zeros(2)})
    assert bal.step_count == 5
    bal.load_state_dict({**sd, "surprise": torch.zeros(2)}, strict=False)
    assert bal.step_count == 0
