"""Hypothesis properties of MMPareto (reference lane): a rejected call changes nothing; non-finite gradients never
reach a parameter and set the flag; the combined gradient's per-tensor norm is gamma max(||g_m,T + g_u,T||, ||h_T||)
on conflict (the authors' per-tensor restore) and gamma ||g_m,T + g_u,T|| otherwise."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mmkernels.api.mmpareto import MMPareto
from mmkernels.mmpareto import mmpareto_combine_
from test_mmpareto_api import Net, data

SETTINGS = settings(max_examples=40, deadline=None)


def _grads(seed, k, dtype=torch.float32, conflict=True):
    g = torch.Generator().manual_seed(seed)
    gm, gu = [], []
    for e in range(k):
        shapes = [
            (int(torch.randint(3, 9, (1,), generator=g)),) for _ in range(int(torch.randint(1, 4, (1,), generator=g)))
        ]
        m = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        lam = float(torch.empty(()).uniform_(0.3, 2.0, generator=g)) * (-1 if conflict and e % 2 == 0 else 1)
        gm.append([x.to(dtype) for x in m])
        gu.append([(torch.randn(s, generator=g, dtype=torch.float64) + lam * x).to(dtype) for s, x in zip(shapes, m)])
    return gm, gu


def _snapshot(net, bal):
    grads = [(p.grad, None if p.grad is None else p.grad.clone()) for p in net.parameters()]
    stats = {n: getattr(bal, n).clone() for n in ("cos", "weights", "coefficients", "scores", "flag")}
    return grads, stats, bal.step_count


BAD = {
    "one unimodal loss short": lambda mm, uni: (mm, uni[:1]),
    "stacked unimodal losses": lambda mm, uni: (mm, torch.stack(uni)),
    "detached multimodal loss": lambda mm, uni: (mm.detach(), uni),
    "non-scalar multimodal loss": lambda mm, uni: (mm.expand(3), uni),
    "non-tensor unimodal loss": lambda mm, uni: (mm, [uni[0], 1.0]),
    "integer unimodal loss": lambda mm, uni: (mm, [uni[0], torch.tensor(1)]),
    "non-scalar unimodal loss": lambda mm, uni: (mm, [uni[0], uni[1].expand(2)]),
}


@SETTINGS
@given(st.sampled_from(sorted(BAD)), st.integers(0, 3), st.sampled_from(["none", "zeroed", "accumulated"]))
def test_a_rejected_backward_changes_nothing(bad, steps, grads_before):
    net = Net(2)
    bal = MMPareto(2, params=[e.parameters() for e in net.encoders])
    for s in range(steps):
        bal.backward(*net.losses(*data(2, seed=s)))
        bal.step()
    for p in net.parameters():
        if grads_before == "none":
            p.grad = None
        elif grads_before == "zeroed" and p.grad is not None:
            p.grad.zero_()
    before = _snapshot(net, bal)
    with pytest.raises((ValueError, TypeError)):
        bal.backward(*BAD[bad](*net.losses(*data(2, seed=9))))
    after = _snapshot(net, bal)
    for (g0, v0), (g1, v1) in zip(before[0], after[0]):
        assert g0 is g1 and (v0 is None or torch.equal(v0, v1))
    for n in before[1]:
        assert torch.equal(before[1][n], after[1][n]), n
    assert before[2] == after[2]


@SETTINGS
@given(st.integers(0, 10_000), st.sampled_from(["shape", "dtype", "device list", "encoders"]))
def test_a_rejected_op_call_changes_nothing(seed, bad):
    gm, gu = _grads(seed, 3)
    before = [t.clone() for t in sum(gu, [])]
    if bad == "shape":
        gm[1][0] = gm[1][0][:-1]
    elif bad == "dtype":
        gm[2][-1] = gm[2][-1].double()
    elif bad == "device list":
        gu = gu + [[torch.ones(2)]]
    else:
        gm, gu = gm[:1], gu[:1]
    with pytest.raises((ValueError, TypeError)):
        mmpareto_combine_(gm, gu)
    for a, b in zip(before, sum(gu, [])):
        assert torch.equal(a, b)


@SETTINGS
@given(
    st.integers(0, 10_000),
    st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    st.booleans(),
    st.sampled_from(["per_tensor", "global"]),
)
def test_nonfinite_gradients_never_reach_the_output_and_set_the_flag(seed, value, in_mm, rescale):
    gm, gu = _grads(seed, 3)
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(0, 3, (1,), generator=g))
    t = int(torch.randint(0, len(gm[k]), (1,), generator=g))
    (gm if in_mm else gu)[k][t][0] = value
    stats = mmpareto_combine_(gm, gu, rescale=rescale)
    assert all(bool(torch.isfinite(x).all()) for x in sum(gu, []))
    assert all(bool((x == 0).all()) for x in gu[k])
    assert stats["flag"].item() == 1.0


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 1), st.sampled_from([float("nan"), float("inf")]))
def test_nonfinite_unimodal_loss_never_reaches_a_parameter(k, value):
    """A non-finite unimodal loss of encoder k: after the step its encoder is unchanged (gradient 0), flag 1."""
    net = Net(2)
    bal = MMPareto(2, params=[e.parameters() for e in net.encoders])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    enc_before = [p.detach().clone() for p in net.encoders[k].parameters()]
    loss_mm, losses = net.losses(*data(2, seed=3))
    losses[k] = losses[k] * value
    bal.backward(loss_mm, losses)
    opt.step()
    bal.step()
    for p in net.encoders.parameters():
        assert torch.isfinite(p).all()
    for p, q in zip(net.encoders[k].parameters(), enc_before):
        assert torch.equal(p.detach(), q)
    assert bal.flag.item() == 1.0


def _norm(ts):
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in ts))


@SETTINGS
@given(st.integers(0, 10_000), st.floats(0.2, 3.0), st.sampled_from([torch.float32, torch.float64]))
def test_per_tensor_norm_is_the_authors_restore(seed, gamma, dtype):
    gm, gu = _grads(seed, 4, dtype=dtype)
    out = [[t.clone() for t in grp] for grp in gu]
    stats = mmpareto_combine_(gm, out, gamma=gamma)
    assume(stats["flag"].item() == 0.0)
    for k in range(4):
        x = [t.double() for t in gm[k]]
        y = [t.double() for t in gu[k]]
        a = sum(float(t @ t) for t in x)
        b = sum(float(s @ t) for s, t in zip(x, y))
        c = sum(float(t @ t) for t in y)
        wm = 0.999 if b >= a else 0.001 if b >= c else (c - b) / (a + c - 2 * b)
        for o, s, t in zip(out[k], x, y):
            total = _norm([s + t])
            if stats["conflict"][k]:
                want = gamma * max(total, _norm([2 * (wm * s + (1 - wm) * t)]))
                assert _norm([o]) >= gamma * total * (1 - 1e-6)
            else:
                want = gamma * total
            assert abs(_norm([o]) - want) <= 1e-6 * want + 1e-30
