"""MMPareto under DistributedDataParallel (2 CPU processes, gloo): each rank sees different data; after each step
the encoder gradients equal the reference combination of the rank-averaged g_m and g_u, the weights are identical on
both ranks, and so are the replicas after 3 SGD steps."""

from __future__ import annotations

import contextlib
import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mmkernels.api.mmpareto import MMPareto  # noqa: E402

from test_mmpareto_api import Net, data  # noqa: E402

STEPS = 3


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = Net(2)

    def forward(self, xs, y):
        loss_mm, losses = self.net.losses(xs, y)
        return loss_mm, torch.stack(losses)


def _local_grads(net, xs, y):
    """This rank's g_m and g_u of the encoder tensors and its plain gradient of every parameter (not averaged)."""
    net = copy.deepcopy(net)
    loss_mm, losses = net.losses(xs, y)
    enc = [p for e in net.encoders for p in e.parameters()]
    g_m = torch.autograd.grad(loss_mm, enc, retain_graph=True)
    g_u = torch.autograd.grad(sum(losses), enc, retain_graph=True)
    total = torch.autograd.grad(loss_mm + sum(losses), list(net.parameters()))
    return {"g_m": [g.clone() for g in g_m], "g_u": [g.clone() for g in g_u], "total": [g.clone() for g in total]}


@contextlib.contextmanager
def _rank(rank: int, world: int, init: str):
    """One gloo rank: the DDP-wrapped model and an MMPareto balancer on its encoders; the group is torn down after."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = Wrapped()
        yield (
            model,
            nn.parallel.DistributedDataParallel(model),
            MMPareto(2, params=[e.parameters() for e in model.net.encoders]),
        )
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, init: str, outdir: str) -> None:
    with _rank(rank, world, init) as (model, ddp, bal):
        opt = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.9)
        steps = []
        for step in range(STEPS):
            xs, y = data(2, seed=100 * rank + step)
            local = _local_grads(model.net, xs, y)
            opt.zero_grad()
            loss_mm, losses = ddp(xs, y)
            bal.backward(loss_mm, list(losses.unbind()))
            steps.append(
                {
                    **local,
                    "grads": [p.grad.clone() for p in model.net.parameters()],
                    "cos": bal.cos.clone(),
                    "weights": bal.weights.clone(),
                }
            )
            opt.step()
            bal.step()
        torch.save(
            {"steps": steps, "params": [p.detach().clone() for p in model.net.parameters()]},
            os.path.join(outdir, f"rank{rank}.pt"),
        )


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_two_ranks_combine_the_averaged_gradients(tmp_path):
    from mmkernels import reference as R

    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    names = [n for n, _ in Net(2).named_parameters()]
    n_enc = sum(1 for n in names if n.startswith("encoders."))
    conflicts = set()
    for step in range(STEPS):
        s0, s1 = r[0]["steps"][step], r[1]["steps"][step]
        assert torch.equal(s0["cos"], s1["cos"]) and torch.equal(s0["weights"], s1["weights"])
        avg = lambda key: [(a + b) / 2 for a, b in zip(s0[key], s1[key])]  # noqa: E731
        g_m, g_u = avg("g_m"), avg("g_u")
        half = n_enc // 2
        want, stats = R.mmpareto_combine([g_m[:half], g_m[half:]], [g_u[:half], g_u[half:]])
        conflicts |= set(stats["conflict"].tolist())
        want = sum(want, []) + avg("total")[n_enc:]
        for name, got0, got1, w in zip(names, s0["grads"], s1["grads"], want):
            torch.testing.assert_close(got0, w, rtol=1e-5, atol=1e-6, msg=name)
            assert torch.equal(got0, got1), name
        torch.testing.assert_close(s0["cos"], stats["cos"], rtol=1e-5, atol=1e-6)
    assert True in conflicts, "no conflict in any step: the test would not prove the Pareto branch"
    for p0, p1 in zip(r[0]["params"], r[1]["params"]):
        assert torch.equal(p0, p1)


def _accumulating_worker(rank: int, world: int, init: str, outdir: str) -> None:
    """Two micro-batches per optimizer step (backward, bal.step(), backward), no zero_grad between them."""
    with _rank(rank, world, init) as (model, ddp, bal):
        micro = []
        for j in range(2):
            xs, y = data(2, seed=200 * rank + 5 + 7 * j)
            micro.append(_local_grads(model.net, xs, y))
            loss_mm, losses = ddp(xs, y)
            bal.backward(loss_mm, list(losses.unbind()))
            bal.step()
        torch.save(
            {"micro": micro, "grads": [p.grad.clone() for p in model.net.parameters()]},
            os.path.join(outdir, f"acc{rank}.pt"),
        )


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_gradient_accumulation_sums_the_per_micro_batch_combinations(tmp_path):
    """Accumulated .grad = sum over micro-batches of the combination of that micro-batch's rank-averaged g_m, g_u."""
    from mmkernels import reference as R

    mp.spawn(_accumulating_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"acc{i}.pt") for i in range(2)]
    names = [n for n, _ in Net(2).named_parameters()]
    n_enc = sum(1 for n in names if n.startswith("encoders."))
    half = n_enc // 2
    want = None
    for j in range(2):
        avg = lambda key: [(a + b) / 2 for a, b in zip(r[0]["micro"][j][key], r[1]["micro"][j][key])]  # noqa: E731
        g_m, g_u = avg("g_m"), avg("g_u")
        comb, _ = R.mmpareto_combine([g_m[:half], g_m[half:]], [g_u[:half], g_u[half:]])
        step = sum(comb, []) + avg("total")[n_enc:]
        want = step if want is None else [a + b for a, b in zip(want, step)]
    for name, got0, got1, w in zip(names, r[0]["grads"], r[1]["grads"], want):
        torch.testing.assert_close(got0, w, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(got0, got1), name
