"""torch.compile and AMP (issue 5, item 4): a training step with each balancer under torch.compile matches eager;
a bf16 autocast step works. Compiles are few and small (the first costs ~10 s on this CPU)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import mmkernels.api as api

from _api_models import TinyModel, batch, grads


def _step(kind, model, bal, xs, y, feats_fn, fuse_fn):
    """One training step (forward, balancer, backward) of `kind`; feats_fn / fuse_fn may be compiled."""
    if kind == "agm":
        out = bal.shapley_forward(
            xs, y, model=lambda *a: fuse_fn(feats_fn(*a))
        )  # TinyModel has no BatchNorm: train == eval
        loss = F.cross_entropy(out, y)
    elif kind == "opm":
        feats = feats_fn(*xs)
        dropped = bal.drop(feats)
        bal.observe(api.concat_unimodal_logits(feats, model.head), y)
        loss = F.cross_entropy(fuse_fn(dropped), y)
    elif kind == "mlb":
        feats = bal.tap(feats_fn(*xs))
        loss = bal.loss(fuse_fn(feats), api.concat_unimodal_logits(feats, model.head, detach=False), y)
    elif kind == "olm":
        feats = feats_fn(*xs)
        u = api.concat_unimodal_logits(feats, model.head, detach=False)
        loss = F.cross_entropy(bal.combine(u), y)
    else:
        feats = feats_fn(*xs)
        bal.observe(api.concat_unimodal_logits(feats, model.head), y)
        loss = F.cross_entropy(fuse_fn(bal.tap(feats)), y)
    loss.backward()
    bal.step()


MAKERS = {
    "ogmge": lambda: api.OGMGE(2, alpha=2.0, seed=3),
    "ogm": lambda: api.OGM(2, alpha=2.0),
    "opm": lambda: api.OPM(2, seed=3),
    "agm": lambda: api.AGM(2, alpha=2.0),
    "mlb": lambda: api.MLB(2),
    "olm": lambda: api.OLM(2),
}


def test_compiled_model_matches_eager_with_each_balancer():
    """The model's forward compiled (the usual torch.compile(model) use), each balancer around it, 2 steps."""
    xs, y = batch(2)
    base = TinyModel(2)
    for kind, make in MAKERS.items():
        eager_model, comp_model = copy.deepcopy(base), copy.deepcopy(base)
        feats_c = torch.compile(lambda *a, m=comp_model: m.feats(a), dynamic=True)
        fuse_c = torch.compile(lambda f, m=comp_model: m.fuse(f), dynamic=True)
        be, bc = make(), make()
        if kind == "olm":
            be.report([1.0, 1.0], [1.0, 1.0]), bc.report([1.0, 1.0], [1.0, 1.0])
        for _ in range(2):
            _step(kind, eager_model, be, xs, y, lambda *a: eager_model.feats(a), eager_model.fuse)
            _step(kind, comp_model, bc, xs, y, feats_c, fuse_c)
        torch.testing.assert_close(bc.coefficients, be.coefficients, atol=1e-5, rtol=1e-5)
        ge, gc = grads(eager_model), grads(comp_model)
        for name in ge:
            torch.testing.assert_close(gc[name], ge[name], atol=1e-5, rtol=1e-4, msg=lambda s: f"{kind} {name}: {s}")


def test_compiled_whole_step_with_balancer_inside():
    """observe() + tap() + head + loss traced by torch.compile (observe before tap: the compile-friendly order)."""
    xs, y = batch(2)

    def step(model, bal):
        feats = model.feats(xs)
        bal.observe(api.concat_unimodal_logits(feats, model.head), y)
        return F.cross_entropy(model.fuse(bal.tap(feats)), y)

    m1, m2 = TinyModel(2), TinyModel(2)
    b1, b2 = api.OGMGE(2, alpha=2.0, seed=1), api.OGMGE(2, alpha=2.0, seed=1)
    cstep = torch.compile(step)
    for _ in range(2):
        step(m1, b1).backward()
        b1.step()
        cstep(m2, b2).backward()
        b2.step()
    torch.testing.assert_close(b2.coefficients, b1.coefficients)
    g1, g2 = grads(m1), grads(m2)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["ogmge", "agm"])
def test_bf16_autocast_step(kind):
    xs, y = batch(2)
    model = TinyModel(2)
    bal = MAKERS[kind]()
    ref = MAKERS[kind]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _step(kind, model, bal, xs, y, lambda *a: model.feats(a), model.fuse)
    twin = copy.deepcopy(model)
    _step(kind, twin, ref, xs, y, lambda *a: twin.feats(a), twin.fuse)
    assert bal.coefficients.dtype == torch.float32
    torch.testing.assert_close(bal.coefficients, ref.coefficients, atol=0.05, rtol=0.05)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_compiled_head_gives_the_plain_heads_numbers():
    """torch.compile(head) (an OptimizedModule) is read through its _orig_mod by concat_unimodal_logits; compiled
    heads and fusions work in summation_unimodal_logits and zero_out_unimodal_logits; a step with it equals eager."""
    xs, y = batch(2)
    base = TinyModel(2)
    feats = base.feats(xs)
    head = torch.compile(base.head)
    for detach in (True, False):
        got = api.concat_unimodal_logits(feats, head, detach=detach)
        assert torch.equal(got, api.concat_unimodal_logits(feats, base.head, detach=detach))
        assert got.requires_grad == (not detach)
    with pytest.raises(TypeError, match=r"nn.Linear .*got OptimizedModule \(torch.compile of Sequential\)"):
        api.concat_unimodal_logits(feats, torch.compile(torch.nn.Sequential(base.head)))
    heads = [torch.nn.Linear(f.shape[1], 3) for f in feats]
    torch.testing.assert_close(
        api.summation_unimodal_logits(feats, [torch.compile(h) for h in heads]),
        api.summation_unimodal_logits(feats, heads),
    )
    torch.testing.assert_close(
        api.zero_out_unimodal_logits(torch.compile(base.fuse), feats), api.zero_out_unimodal_logits(base.fuse, feats)
    )
    for kind in ("ogmge", "mlb"):
        eager, comp = copy.deepcopy(base), copy.deepcopy(base)
        chead = torch.compile(comp.head)
        be, bc = MAKERS[kind](), MAKERS[kind]()
        _step(kind, eager, be, xs, y, lambda *a: eager.feats(a), eager.fuse)
        _step(kind, SimpleNamespace(head=chead), bc, xs, y, lambda *a: comp.feats(a), lambda f: chead(torch.cat(f, 1)))
        torch.testing.assert_close(bc.coefficients, be.coefficients)
        ge, gc = grads(eager), grads(comp)
        for name in ge:
            torch.testing.assert_close(gc[name], ge[name], atol=1e-6, rtol=1e-5, msg=lambda s: f"{kind} {name}: {s}")
