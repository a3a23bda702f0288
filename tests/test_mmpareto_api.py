"""mmkernels.api.MMPareto on a tiny model (reference lane, CPU): the gradients of bal.backward() against the reference
built from separate autograd.grad calls, a training loop against a hand-written one, window / eval / disabled,
state_dict resume, errors that change nothing, and no host reads in a step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmkernels import reference as R
from mmkernels.api.mmpareto import MMPareto  # the lead also exports it as mmkernels.api.MMPareto

IN = (5, 3, 4, 2)
C = 4


class Net(nn.Module):
    """M encoders, a concatenation fusion head and one unimodal head per encoder."""

    def __init__(self, m=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(IN[i], 6), nn.Tanh()) for i in range(m))
        self.fusion = nn.Linear(6 * m, C)
        self.heads = nn.ModuleList(nn.Linear(6, C) for _ in range(m))

    def losses(self, xs, y):
        feats = [enc(x) for enc, x in zip(self.encoders, xs)]
        loss_mm = F.cross_entropy(self.fusion(torch.cat(feats, 1)), y)
        return loss_mm, [F.cross_entropy(h(f), y) for h, f in zip(self.heads, feats)]


def data(m=2, b=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (b,), generator=g)
    xs = [torch.randn(b, IN[i], generator=g) for i in range(m)]
    xs[0][:, :C] += 2.0 * F.one_hot(y, C)
    return xs, y


def expected_grads(net, xs, y, *, gamma=1.5, rescale="per_tensor", combine=True):
    """Reference: g_m and g_u of each encoder by autograd.grad, combined by reference.mmpareto_combine; the other
    parameters get the plain gradient of L_mm + sum_k L_k."""
    loss_mm, losses = net.losses(xs, y)
    enc = [list(e.parameters()) for e in net.encoders]
    flat = [p for group in enc for p in group]
    g_mm = torch.autograd.grad(loss_mm, flat, retain_graph=True)
    g_u = torch.autograd.grad(sum(losses), flat, retain_graph=True)
    total = torch.autograd.grad(loss_mm + sum(losses), list(net.parameters()))
    want = {id(p): g for p, g in zip(net.parameters(), total)}
    if combine:
        split = lambda g: [list(g[sum(map(len, enc[:k])) : sum(map(len, enc[: k + 1]))]) for k in range(len(enc))]  # noqa
        out, stats = R.mmpareto_combine(split(g_mm), split(g_u), gamma=gamma, rescale=rescale)
        for p, g in zip(flat, sum(out, [])):
            want[id(p)] = g
        return want, stats
    return want, None


def make(m=2, **kw):
    net = Net(m)
    bal = MMPareto(m, params=[e.parameters() for e in net.encoders], **kw)
    return net, bal


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("rescale", ["per_tensor", "global"])
def test_backward_gives_the_reference_gradients(m, rescale):
    net, bal = make(m, gamma=1.3, rescale=rescale)
    xs, y = data(m)
    want, stats = expected_grads(net, xs, y, gamma=1.3, rescale=rescale)
    loss_mm, losses = net.losses(xs, y)
    bal.backward(loss_mm, losses)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, want[id(p)], msg=name)
    torch.testing.assert_close(bal.cos, stats["cos"])
    torch.testing.assert_close(bal.weights, stats["weights"])
    torch.testing.assert_close(bal.coefficients, stats["weights"][:, 0])
    assert bal.scores.tolist() == stats["conflict"].float().tolist()
    assert bal.cos.dtype == torch.float32 and bal.flag.item() == 0.0


def test_the_test_model_has_a_conflict_and_an_agreement():
    """The data above make both branches of the weight rule happen, so the parity test proves both."""
    seen = set()
    for m in (2, 3, 4):
        net = Net(m)
        _, stats = expected_grads(net, *data(m), combine=True)
        seen |= set(stats["conflict"].tolist())
    assert seen == {True, False}


@pytest.mark.parametrize("set_to_none", [True, False])
def test_training_loop_matches_a_hand_written_one(set_to_none):
    net, bal = make(2)
    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for step in range(5):
        xs, y = data(2, seed=step)
        want, _ = expected_grads(ref, xs, y)
        ref_opt.zero_grad()
        for p in ref.parameters():
            p.grad = want[id(p)].clone()
        ref_opt.step()
        opt.zero_grad(set_to_none=set_to_none)
        bal.backward(*net.losses(xs, y))
        opt.step()
        bal.step()
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=name, rtol=1e-5, atol=1e-6)
    assert bal.step_count == 5


@pytest.mark.parametrize("how", ["outside the window", "eval", "disabled", "after the window end"])
def test_plain_backward_when_not_active(how):
    kw = {"outside the window": {"start": 3}, "after the window end": {"end": 1}}.get(how, {})
    net, bal = make(2, **kw)
    if how == "eval":
        bal.eval()
    if how == "disabled":
        bal.enabled = False
    if how == "after the window end":
        bal.step()  # t = 1 = end: outside
    xs, y = data(2)
    want, _ = expected_grads(net, xs, y, combine=False)
    bal.backward(*net.losses(xs, y))
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, want[id(p)], msg=name)


def test_state_dict_resume_is_bit_identical():
    net, bal = make(3, rescale="global")
    xs, y = data(3)
    bal.backward(*net.losses(xs, y))
    bal.step()
    state = bal.state_dict()
    net2 = copy.deepcopy(net)
    bal2 = MMPareto(3, params=[e.parameters() for e in net2.encoders], rescale="global")
    bal2.load_state_dict(state)
    for name in ("cos", "weights", "coefficients", "scores", "flag"):
        assert torch.equal(getattr(bal2, name), getattr(bal, name)), name
    assert bal2.step_count == 1
    for b, n in ((bal, net), (bal2, net2)):
        for p in n.parameters():
            p.grad = None
        b.backward(*n.losses(*data(3, seed=5)))
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p.grad, q.grad)
    with pytest.raises(ValueError, match="hyperparameters"):
        MMPareto(3, params=[e.parameters() for e in net2.encoders]).load_state_dict(state)


def test_statistics_are_read_only_views_of_device_state():
    net, bal = make(2)
    bal.backward(*net.losses(*data(2)))
    with pytest.raises(AttributeError):
        bal.cos = torch.zeros(2)
    with pytest.raises(AttributeError):
        bal.weights = torch.zeros(2, 2)


def test_construction_errors():
    net = Net(2)
    a, v = list(net.encoders[0].parameters()), list(net.encoders[1].parameters())
    with pytest.raises(ValueError, match="one encoder only"):
        MMPareto(2, params=[a, v + a[:1]])
    with pytest.raises(ValueError, match="num_modalities=2"):
        MMPareto(2, params=[a])
    with pytest.raises(ValueError, match="empty"):
        MMPareto(2, params=[a, []])
    with pytest.raises(TypeError, match="params\\[1\\]\\[0\\]"):
        MMPareto(2, params=[a, ["w"]])
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match="does not require grad"):
        MMPareto(2, params=[a, [frozen]])
    with pytest.raises(ValueError, match="gamma"):
        MMPareto(2, params=[a, v], gamma=0)
    with pytest.raises(ValueError, match="rescale"):
        MMPareto(2, params=[a, v], rescale="encoder")
    with pytest.raises(TypeError):
        MMPareto(2, params=[a, v], alpha=1.0)


def test_backward_errors_change_nothing():
    net, bal = make(2)
    xs, y = data(2)
    loss_mm, losses = net.losses(xs, y)
    for bad, err in [
        ((loss_mm, losses[:1]), ValueError),
        ((loss_mm, torch.stack(losses)), TypeError),
        ((loss_mm.detach(), losses), ValueError),
        ((loss_mm.expand(2), losses), ValueError),
        ((loss_mm, [losses[0], "x"]), TypeError),
    ]:
        with pytest.raises(err):
            bal.backward(*bad)
        assert all(p.grad is None for p in net.parameters())
    bal.backward(loss_mm, losses)
    with pytest.raises(RuntimeError, match="twice"):
        bal.backward(*net.losses(xs, y))


def test_a_parameter_no_loss_reaches_raises():
    net, _ = make(2)
    unused = nn.Parameter(torch.ones(3))
    bal = MMPareto(2, params=[list(net.encoders[0].parameters()) + [unused], net.encoders[1].parameters()])
    with pytest.raises(RuntimeError, match=r"params\[0\]\[2\] received no gradient"):
        bal.backward(*net.losses(*data(2)))


def test_a_parameter_only_the_unimodal_loss_reaches_gets_the_combined_gradient():
    """An encoder tensor the multimodal loss does not reach has g_m = 0 (not None)."""
    net = Net(2)
    extra = nn.Linear(6, 6)
    bal = MMPareto(
        2, params=[list(net.encoders[0].parameters()) + list(extra.parameters()), net.encoders[1].parameters()]
    )
    xs, y = data(2)
    feats = [enc(x) for enc, x in zip(net.encoders, xs)]
    loss_mm = F.cross_entropy(net.fusion(torch.cat(feats, 1)), y)
    losses = [F.cross_entropy(net.heads[0](extra(feats[0])), y), F.cross_entropy(net.heads[1](feats[1]), y)]
    bal.backward(loss_mm, losses)
    assert all(torch.isfinite(p.grad).all() for p in extra.parameters())


def test_no_host_reads_in_a_step():
    from test_sync_free import run_guarded

    net, bal = make(3)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    xs, y = data(3)

    def step():
        opt.zero_grad()
        bal.backward(*net.losses(xs, y))
        opt.step()
        bal.step()

    run_guarded(step)
