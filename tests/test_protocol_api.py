"""The one protocol (issue 18, item 2): one generic loop (mmkernels.api.fit) runs every balancer, changing only the
constructor; the protocol's step equals the building blocks' step; no balancer exposes a call that cannot work."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import mmkernels.api as api
from mmkernels.api import ValuationDataset

from _api_models import C, IN_DIMS, TinyModel

M, N, B = 3, 48, 12


def dataset(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (N,), generator=g)
    xs = [torch.randn(N, IN_DIMS[m], generator=g) + (2.0 - m) * F.one_hot(y, C)[:, :1].float() for m in range(M)]
    return xs, y


def batches(xs, y, b: int = B):
    return [([x[i : i + b] for x in xs], y[i : i + b]) for i in range(0, N, b)]


def constructors(model, opt):
    encoders = [list(e.parameters()) for e in model.encoders]
    return {
        "ogm_ge": lambda: api.OGMGE(M, seed=1, optimizer=opt),
        "ogm_ge_official": lambda: api.OGMGE(M, official=True, params=encoders, seed=1, optimizer=opt),
        "ogm": lambda: api.OGM(M, optimizer=opt),
        "opm": lambda: api.OPM(M, seed=1, optimizer=opt),
        "agm": lambda: api.AGM(M, optimizer=opt),
        "mlb": lambda: api.MLB(M, optimizer=opt),
        "mlb_update": lambda: api.MLB(M, params=encoders, modulate="update", optimizer=opt),
        "olm": lambda: api.OLM(M, optimizer=opt),
        "pmr": lambda: api.PMR(M, num_classes=C, optimizer=opt),
        "mmpareto": lambda: api.MMPareto(M, params=encoders, optimizer=opt),
    }


KINDS = list(constructors(TinyModel(M), torch.optim.SGD(TinyModel(M).parameters(), lr=0.1)))


@pytest.mark.parametrize("kind", KINDS)
def test_generic_loop_runs_every_balancer(kind):
    xs, y = dataset()
    model = TinyModel(M)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bal = constructors(model, opt)[kind]()
    train = batches(xs, y)
    history = api.fit(model, bal, opt, train, epochs=2, val_batches=train[:1])
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history)))
    assert bal.step_count == 2 * len(train) and bal.skipped_steps == 0
    assert torch.isfinite(bal.coefficients).all() and bal.coefficients.dtype == torch.float32


@pytest.mark.parametrize("cls", ["SampleValuation", "ModalityValuation"])
def test_generic_loop_runs_the_valuation_balancers(cls):
    """The rows change per epoch: the DataLoader over ValuationDataset, its collate, the balancer bound by rows=."""
    xs, y = dataset()
    base = torch.utils.data.TensorDataset(*xs, y)
    rows = ValuationDataset(base, M)
    loader = torch.utils.data.DataLoader(rows, batch_size=B, shuffle=True, collate_fn=ValuationDataset.collate)
    model = TinyModel(M)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bal = getattr(api, cls)(M, N, start=1, rows=rows, optimizer=opt)
    api.fit(model, bal, opt, loader, epochs=3)
    assert bal.epoch == 2 and len(rows) >= N  # copies were added after epoch 0's valuation
    assert len(rows) > N or cls == "ModalityValuation"


def _building_block_step(kind, model, bal, xs, y):
    feats = model.feats(xs)
    u = api.zero_out_unimodal_logits(model.fuse, feats).detach()
    if kind == "ogm_ge":
        bal.observe(u, y)
        loss = F.cross_entropy(model.fuse(bal.tap(feats)), y)
    elif kind == "agm":
        loss = F.cross_entropy(bal.shapley_forward(xs, y, encoders=list(model.encoders), head=model.fuse), y)
    elif kind == "olm":
        loss = F.cross_entropy(bal.combine(api.zero_out_unimodal_logits(model.fuse, feats)), y)
    loss.backward()


@pytest.mark.parametrize("kind", ["ogm_ge", "agm", "olm"])
def test_protocol_step_equals_the_building_blocks(kind):
    xs, y = batches(*dataset())[0]
    model = TinyModel(M)
    twin = copy.deepcopy(model)
    make = {
        "ogm_ge": lambda: api.OGMGE(M, alpha=2.0, seed=4),
        "agm": lambda: api.AGM(M, alpha=2.0),
        "olm": lambda: api.OLM(M),
    }[kind]
    bal, bal_twin = make(), make()
    out = bal(model, xs, y)
    out.loss.backward()
    bal.before_optimizer_step()
    _building_block_step(kind, twin, bal_twin, xs, y)
    torch.testing.assert_close(bal.coefficients, bal_twin.coefficients, rtol=0, atol=0)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_no_balancer_exposes_a_call_that_cannot_work():
    """tap()/observe() exist only where they act (the base class has neither)."""
    model = TinyModel(M)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    made = {k: f() for k, f in constructors(model, opt).items()}
    made["sample_valuation"] = api.SampleValuation(M, N)
    for kind, bal in made.items():
        assert hasattr(bal, "tap") == (kind in ("ogm_ge", "ogm_ge_official", "ogm", "mlb", "mlb_update")), kind
        assert hasattr(bal, "observe") == (kind in ("ogm_ge", "ogm_ge_official", "ogm", "mlb", "mlb_update", "opm"))


def test_model_without_the_contract_is_refused_by_name():
    bal = api.OGM(M)
    xs, y = batches(*dataset())[0]
    with pytest.raises(TypeError, match="encoders"):
        bal(torch.nn.Linear(2, 2), xs, y)
    with pytest.raises(ValueError, match="len\\(inputs\\)"):
        bal(TinyModel(M), xs[:2], y)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch_is_flag_2_for_every_balancer(kind):
    """B = 0 through the protocol: no error, flag 2 (no valid row) where the method scores logits, neutral
    coefficients, the step counted; AGM included (it raised before)."""
    xs, y = batches(*dataset())[0]
    model = TinyModel(M)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bal = constructors(model, opt)[kind]()
    bal.epoch_start(model, 0, [(xs, y)])
    api.train_step(model, bal, opt, [([x[:0] for x in xs], y[:0])])
    assert bal.step_count == 1 and torch.isfinite(bal.coefficients).all()
    if kind not in ("olm", "mmpareto"):  # OLM scores at epoch end; MMPareto's statistics are of gradients
        assert float(bal.flag) == 2.0
        torch.testing.assert_close(bal.coefficients, torch.full((M,), float(bal.neutral)))
