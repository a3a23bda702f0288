"""The protocol under DistributedDataParallel (issue 18, items 2-3): 2 gloo ranks, each half of every batch, the
generic train_step with 2 micro-batches per optimizer step; the replicas' parameters and coefficients equal one
process on the whole batch (parameter-mode OGM, MLB(modulate="update"), MMPareto's accumulated combination)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mmkernels.api as api  # noqa: E402

from _api_models import TinyModel, batch  # noqa: E402

KINDS = ("ogm_params", "mlb_update", "mmpareto")
STEPS, B = 3, 16


class Model(TinyModel):
    """The protocol's model; forward runs the balancer, so DDP runs it (and syncs the gradients)."""

    def forward(self, inputs, labels):
        return self.balancer(self, inputs, labels)


def make(kind: str, model, opt):
    enc = [list(e.parameters()) for e in model.encoders]
    return {
        "ogm_params": lambda: api.OGM(2, alpha=2.0, params=enc, optimizer=opt),
        "mlb_update": lambda: api.MLB(2, alpha=2.0, params=enc, modulate="update", optimizer=opt),
        "mmpareto": lambda: api.MMPareto(2, params=enc, optimizer=opt),
    }[kind]()


def train(kind: str, rank: int, world: int):
    model = Model(2, seed=0)
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    model.balancer = make(kind, model, opt)
    share = B // world
    for step in range(STEPS):
        xs, y = batch(2, b=B, seed=step)
        rows = slice(rank * share, (rank + 1) * share)
        xs, y = [x[rows] for x in xs], y[rows]
        half = share // 2
        micro = [([x[:half] for x in xs], y[:half]), ([x[half:] for x in xs], y[half:])]
        api.train_step(wrapped, model.balancer, opt, micro)
    return {"coefs": model.balancer.coefficients.clone(), "params": [p.detach().clone() for p in model.parameters()]}


def _worker(rank: int, world: int, init: str, outdir: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save({kind: train(kind, rank, world) for kind in KINDS}, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_protocol_under_ddp_equals_one_process(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for kind in KINDS:
        single = train(kind, 0, 1)
        assert torch.equal(r0[kind]["coefs"], r1[kind]["coefs"]), kind
        torch.testing.assert_close(r0[kind]["coefs"], single["coefs"], rtol=1e-5, atol=1e-6, msg=kind)
        for p0, p1, q in zip(r0[kind]["params"], r1[kind]["params"], single["params"]):
            assert torch.equal(p0, p1), f"{kind}: replicas diverged"
            torch.testing.assert_close(p0, q, rtol=1e-5, atol=1e-5, msg=kind)
