"""torch.compile of the whole protocol forward (issue 18, item 4): bal(model, inputs, labels) compiled, for every
balancer, matches eager after two optimizer steps; fullgraph=True wherever the method allows it. MMPareto registers
its backward hook outside the graph (one graph break); OPM's CPU drop draws its uniforms through the extension (a
graph break on CPU; on CUDA the drop is a custom op); PMR's reference path on torch < 2.12 (a graph break: that
dynamo gave its autograd.Function a zero gradient)."""

from __future__ import annotations

import copy

import pytest
import torch

import mmkernels.api as api

from _api_models import C, TinyModel, batch

# torch < 2.12: PMR's reference path runs outside the graph (dynamo traced its Function with a zero gradient there)
OLD_DYNAMO = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 12)

MAKERS = {
    "ogm_ge": (lambda o, e: api.OGMGE(2, alpha=2.0, seed=3, optimizer=o), True),
    "ogm_params": (lambda o, e: api.OGM(2, alpha=2.0, params=e, optimizer=o), True),
    "opm": (lambda o, e: api.OPM(2, seed=3, optimizer=o), False),
    "agm": (lambda o, e: api.AGM(2, alpha=2.0, optimizer=o), True),
    "mlb": (lambda o, e: api.MLB(2, optimizer=o), True),
    "olm": (lambda o, e: api.OLM(2, optimizer=o), True),
    "pmr": (lambda o, e: api.PMR(2, num_classes=C, optimizer=o), not OLD_DYNAMO),
    "mmpareto": (lambda o, e: api.MMPareto(2, params=e, optimizer=o), False),
}


def _run(model, make, forward=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    bal = make(opt, [list(e.parameters()) for e in model.encoders])
    xs, y = batch(2)
    bal.epoch_start(model, 0, [(xs, y)])  # PMR: the first prototypes; the others: set_epoch
    fwd = forward(bal, model) if forward else (lambda a, b: bal(model, a, b).loss)
    for t in range(2):
        xs, y = batch(2, seed=t)
        opt.zero_grad()
        fwd(xs, y).backward()
        bal.before_optimizer_step()
        opt.step()
    return bal


@pytest.mark.parametrize("kind", list(MAKERS))
def test_compiled_protocol_forward_matches_eager(kind):
    make, fullgraph = MAKERS[kind]
    torch._dynamo.reset()
    eager, compiled = TinyModel(2), TinyModel(2)
    be = _run(eager, make)
    bc = _run(compiled, make, lambda bal, m: torch.compile(lambda a, b: bal(m, a, b).loss, fullgraph=fullgraph))
    assert bc.step_count == be.step_count == 2
    torch.testing.assert_close(bc.coefficients, be.coefficients, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_submodules_with_every_balancer():
    """torch.compile(encoder) / torch.compile(head): the usual torch.compile(model) use, the balancer eager."""
    for kind, (make, _) in MAKERS.items():
        model = TinyModel(2)
        ref = copy.deepcopy(model)
        model.encoders = torch.nn.ModuleList(torch.compile(e, dynamic=True) for e in model.encoders)
        model.head = torch.compile(model.head, dynamic=True)
        bal, bal_ref = _run(model, make), _run(ref, make)
        torch.testing.assert_close(bal.coefficients, bal_ref.coefficients, rtol=1e-5, atol=1e-6, msg=kind)
