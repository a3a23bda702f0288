"""SampleValuation under torch.distributed (2 CPU processes, gloo): each rank values its own half of the samples; the
per-sample values are summed over ranks in rows(), so both ranks build the same rows, equal to one process valuing
all samples; a non-finite batch on one rank sets the flag on both."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mmkernels.api.valuation import SampleValuation  # noqa: E402

from test_valuation_api import M, N, fuse, setup  # noqa: E402


def _value(bal, index):
    encs, head, xs, y = setup(4)
    with torch.no_grad():
        feats = [e(x[index]) for e, x in zip(encs, xs)]
        bal.value(bal.subset_logits(feats, fuse(head)), y[index], index)


def _worker(rank: int, world: int, init: str, outdir: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        bal = SampleValuation(M, N, start=1)
        _value(bal, torch.arange(rank, N, world))  # this rank's shard (as DistributedSampler)
        idx, keep = bal.rows(1)
        bal_scores = bal.scores.clone()
        f = torch.zeros(3, 2, 3)
        f[:, :, 0] = float("nan") if rank == 1 else 1.0  # a non-finite batch on rank 1 only
        bal.value(f, torch.zeros(2, dtype=torch.long), torch.arange(2))
        bal.rows(2)
        torch.save(
            {"idx": idx, "keep": keep, "scores": bal_scores, "flag": bal.flag}, os.path.join(outdir, f"rank{rank}.pt")
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_two_ranks_build_the_same_rows(tmp_path):
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    single = SampleValuation(M, N, start=1, sync=False)
    _value(single, torch.arange(N))
    idx, keep = single.rows(1)
    assert idx.shape[0] > N, "no copies: the test would prove nothing"
    for r in (r0, r1):
        assert torch.equal(r["idx"], idx) and torch.equal(r["keep"], keep)
        torch.testing.assert_close(r["scores"], single.scores)
        assert r["flag"].item() == 1.0  # the flag is a max over ranks
