"""Distributed (issue 5, item 3): 2 CPU processes, gloo, DistributedDataParallel, 5 steps of OGM-GE (covariance taps
and the authors' isotropic parameter mode), OPM and AGM. Each rank sees different data; afterwards the coefficients
of every step are identical on both ranks (scores from the global batch) and so are the replicas' parameters."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mmkernels.api as api  # noqa: E402

from _api_models import TinyModel, batch  # noqa: E402

KINDS = ("ogmge_cov", "ogmge_iso", "opm", "agm", "ogmge_update")
STEPS = 5


class Wrapped(nn.Module):
    """The balancer calls live in the model's forward, so DDP wraps them (one DDP forward per step)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.net = TinyModel(2, seed=0)
        enc = self.net.encoders
        self.bal = {
            "ogmge_cov": lambda: api.OGMGE(2, alpha=2.0, seed=4),
            "ogmge_iso": lambda: api.OGMGE(
                2, alpha=2.0, official=True, seed=4, params=[enc[0].parameters(), enc[1].parameters()]
            ),
            "opm": lambda: api.OPM(2, seed=4, q_base=0.6),
            "agm": lambda: api.AGM(2, alpha=2.0),
            "ogmge_update": lambda: None,  # made in _worker: modulate="update" needs the optimizer
        }[kind]()

    def forward(self, xa, xv, y):
        net, bal = self.net, self.bal
        if self.kind == "agm":
            return bal.shapley_forward([xa, xv], y, encoders=list(net.encoders), head=net.fuse)
        feats = net.feats([xa, xv])
        u = api.concat_unimodal_logits(feats, net.head)
        if self.kind == "opm":
            dropped = bal.drop(feats)
            bal.observe(u, y)
            return net.fuse(dropped)
        bal.observe(u, y)
        return net.fuse(feats if self.kind in ("ogmge_iso", "ogmge_update") else bal.tap(feats))


def _worker(rank: int, world: int, init: str, outdir: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(100 + rank)
    try:
        result = {}
        for kind in KINDS:
            model = Wrapped(kind)
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.3, momentum=0.9)
            if kind == "ogmge_update":  # Adam, the update scaled by k (issue 13), GE noise on the gradient
                opt = torch.optim.Adam(ddp.parameters(), lr=0.05)
                enc = model.net.encoders
                model.bal = api.OGMGE(
                    2,
                    alpha=2.0,
                    official=True,
                    seed=4,
                    modulate="update",
                    optimizer=opt,
                    params=[list(enc[0].parameters()), list(enc[1].parameters())],
                )
            coefs = []
            for step in range(STEPS):
                xs, y = batch(2, b=8, seed=1000 * rank + step)  # different data on each rank
                opt.zero_grad()
                F.cross_entropy(ddp(xs[0], xs[1], y), y).backward()
                if kind in ("ogmge_iso", "ogmge_update"):
                    model.bal.modulate_grads()  # after backward: grads are synced
                opt.step()
                if kind != "ogmge_update":  # optimizer= steps it
                    model.bal.step()
                coefs.append(model.bal.coefficients.clone())
            result[kind] = {"coefs": torch.stack(coefs), "params": [p.detach().clone() for p in model.parameters()]}
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_two_ranks_identical_coefficients_and_replicas(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for kind in KINDS:
        c0, c1 = r0[kind]["coefs"], r1[kind]["coefs"]
        assert torch.equal(c0, c1), f"{kind}: coefficients differ between ranks\n{c0}\n{c1}"
        neutral = 0.0 if kind == "opm" else 1.0
        assert (c0 != neutral).any(), f"{kind}: never modulated, the test would prove nothing"
        for p0, p1 in zip(r0[kind]["params"], r1[kind]["params"]):
            assert torch.equal(p0, p1), f"{kind}: replicas diverged"
