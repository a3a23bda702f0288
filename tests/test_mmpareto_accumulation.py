"""MMPareto with gradient accumulation (issue 19): backward(), bal.step(), backward() without zeroing leaves in .grad
the SUM of the per-micro-batch combinations (each micro-batch combines its own g_m and g_u), on the two-backward path
and on the summed (DDP) path; whatever .grad held before (None, zeroed views, other tensors)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mmkernels.api.mmpareto import MMPareto
from test_mmpareto_api import Net, data, expected_grads


@pytest.fixture
def fake_world_of_one(monkeypatch):
    """The summed path (sync=True) in one process: all_reduce is the identity for a world of one rank."""
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: None)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 1)


@pytest.mark.parametrize("before", ["none", "zeroed views", "other tensors"])
@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("rescale", ["per_tensor", "global"])
def test_accumulated_gradient_is_the_sum_of_per_micro_batch_combinations(rescale, sync, before, request):
    if sync:
        request.getfixturevalue("fake_world_of_one")
    net = Net(2)
    bal = MMPareto(2, params=[e.parameters() for e in net.encoders], rescale=rescale, sync=sync)
    if before != "none":  # a first full step, then zero in place (the views stay) or replace by other tensors
        bal.backward(*net.losses(*data(2, seed=7)))
        bal.step()
        for p in net.parameters():
            if before == "zeroed views":
                p.grad.zero_()
            else:
                p.grad = torch.zeros_like(p)
    micro = [data(2, seed=s) for s in (5, 12, 3)]  # conflicts in 5 and 12, none in 3
    want = {id(p): torch.zeros_like(p) for p in net.parameters()}
    conflicts = set()
    for xs, y in micro:
        w, stats = expected_grads(net, xs, y, rescale=rescale)
        conflicts |= set(stats["conflict"].tolist())
        for p in net.parameters():
            want[id(p)] += w[id(p)]
    assert True in conflicts  # the Pareto branch acts in some micro-batch
    for xs, y in micro:
        bal.backward(*net.losses(xs, y))
        bal.step()
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, want[id(p)], rtol=1e-5, atol=1e-6, msg=name)


def test_a_zeroed_start_gives_the_single_step_result():
    """Accumulating onto zeros changes nothing (the views are reused, the statistics are the last micro-batch's)."""
    net = Net(2)
    bal = MMPareto(2, params=[e.parameters() for e in net.encoders])
    xs, y = data(2, seed=4)
    want, stats = expected_grads(net, xs, y)
    for _ in range(2):
        for p in net.parameters():
            if p.grad is not None:
                p.grad.zero_()
        bal.backward(*net.losses(xs, y))
        bal.step()
        for name, p in net.named_parameters():
            torch.testing.assert_close(p.grad, want[id(p)], msg=name)
    torch.testing.assert_close(bal.cos, stats["cos"])
