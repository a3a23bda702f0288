"""FSDP2 (issue 20): every module fully_shard-ed on 2 CPU gloo ranks, a 1-D mesh and 2-D HSDP meshes
(replicate, shard) = (1, 2) and (2, 1); each rank trains on its half of the batch for 3 steps. The parameters and
coefficients must match one process trained on the full batch: parameters within fp32 tolerance (atol 1e-5,
rtol 1e-4: FSDP2 averages the two halves' gradients, a different rounding order than the full-batch mean),
coefficients within 1e-6 (the score sums are all-reduced, again a different summation order).
The encoders are 7 features wide, so dim-0 shards are uneven (4 + 3 rows): the GE noise must be addressed by the
element's global index and its std reduced over the shard group.
The covariance taps are compared with sigma=0 (the tap path): their noise, like OPM's drops, is drawn per row and
seeded per rank (as under DDP), so those runs are checked for rank agreement of the coefficients only.
The gloo run happens once per session (a module fixture); the cases compare its saved results."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mmkernels.api as api  # noqa: E402
from mmkernels.noise import ge_isotropic_, ge_isotropic_shards_  # noqa: E402
from mmkernels.api import _dtensor  # noqa: E402

STEPS, B, FEAT, C, IN = 3, 16, 7, 4, (5, 3)
KINDS = ("ogmge_cov", "ogmge_iso", "ogm_plain", "ogmge_update", "mlb", "agm", "mmpareto")
PER_RANK_RANDOM = ("ogmge_cov_noise", "opm")  # per-row draws seeded per rank (as under DDP): rank agreement only
# mesh name -> (mesh shape, reshard_after_forward, bf16 params with fp32 gradient reduction)
MESHES = {
    "1d": ((2,), True, False),
    "1d_keep": ((2,), False, False),
    "hsdp_1x2": ((1, 2), True, False),
    "hsdp_2x1": ((2, 1), True, False),
    "1d_bf16": ((2,), True, True),
    "4_1d": ((4,), True, False),
    "4_hsdp_2x2": ((2, 2), True, False),
}
CASES = (
    [(k, "1d") for k in KINDS]
    + [(k, m) for m in ("hsdp_1x2", "hsdp_2x1") for k in ("ogmge_iso", "ogmge_update", "mmpareto")]
    + [(k, "1d_keep") for k in ("ogmge_iso", "mlb", "mmpareto")]
)
CASES_4 = [(k, m) for m in ("4_1d", "4_hsdp_2x2") for k in ("ogmge_iso", "ogmge_update", "mmpareto")]
BF16 = [(k, "1d_bf16") for k in ("ogmge_iso", "mmpareto", "mlb")]  # rank agreement and closeness (BF16_TOL)
BF16_TOL = 5e-2
RUNS = CASES + BF16 + [(k, "1d") for k in PER_RANK_RANDOM]
ATOL, RTOL, COEF_ATOL = 1e-5, 1e-4, 1e-6


class Net(nn.Module):
    def __init__(self, kind: str = ""):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(d, FEAT), nn.Tanh()) for d in IN)
        self.head = nn.Linear(FEAT * 2, C)
        self.uni = nn.ModuleList(nn.Linear(FEAT, C) for _ in IN) if kind == "mmpareto" else nn.ModuleList()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    xs = [torch.randn(B, d, generator=g) * (1 + 2 * i) for i, d in enumerate(IN)]
    return xs, torch.randint(0, C, (B,), generator=g)


def _balancer(kind: str, net: Net, opt):
    params = [list(net.encoders[0].parameters()), list(net.encoders[1].parameters())]
    return {
        "ogmge_cov": lambda: api.OGMGE(2, alpha=2.0, sigma=0.0, seed=4),
        "ogmge_cov_noise": lambda: api.OGMGE(2, alpha=2.0, seed=4),
        "ogmge_iso": lambda: api.OGMGE(2, alpha=2.0, official=True, seed=4, params=params),
        "ogm_plain": lambda: api.OGM(2, alpha=2.0, params=params),
        "ogmge_update": lambda: api.OGMGE(
            2, alpha=2.0, official=True, seed=4, modulate="update", optimizer=opt, params=params
        ),
        "mlb": lambda: api.MLB(2, alpha=2.0, params=params),
        "opm": lambda: api.OPM(2, seed=4, q_base=0.6),
        "agm": lambda: api.AGM(2, alpha=2.0),
        "mmpareto": lambda: api.MMPareto(2, params=params),
    }[kind]()


def _step(kind: str, net: Net, bal, xs, y) -> torch.Tensor:
    """One step's loss; the unimodal logits are read BEFORE the head's forward (the order the README allows)."""
    enc, head = net.encoders, net.head
    if kind == "agm":
        return F.cross_entropy(
            bal.shapley_forward(xs, y, encoders=list(enc), head=lambda fs: head(torch.cat(fs, 1))), y
        )
    feats = [e(x) for e, x in zip(enc, xs)]
    if kind == "mlb":
        u = api.concat_unimodal_logits(feats, head, detach=False)  # through the head's forward (differentiable)
        return bal.loss(head(torch.cat(feats, 1)), list(u), y)
    u = api.concat_unimodal_logits(feats, head)
    if kind == "opm":
        dropped = bal.drop(feats)
        bal.observe(u, y)
        return F.cross_entropy(head(torch.cat(dropped, 1)), y)
    bal.observe(u, y)
    fused = feats if kind in ("ogmge_iso", "ogm_plain", "ogmge_update") else bal.tap(feats)
    return F.cross_entropy(head(torch.cat(fused, 1)), y)


def _train(kind: str, net: Net, rows: slice):
    make_opt = (
        (lambda ps: torch.optim.Adam(ps, lr=0.05))
        if kind == "ogmge_update"
        else (lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9))
    )
    opt = make_opt(net.parameters())
    bal = _balancer(kind, net, opt)
    coefs = []
    for step in range(STEPS):
        xs, y = _data(step)
        xs, y = [x[rows] for x in xs], y[rows]
        opt.zero_grad()
        if kind == "mmpareto":
            feats = [e(x) for e, x in zip(net.encoders, xs)]
            uni = [F.cross_entropy(h(f), y) for h, f in zip(net.uni, feats)]
            bal.backward(F.cross_entropy(net.head(torch.cat(feats, 1)), y), uni)
        else:
            _step(kind, net, bal, xs, y).backward()
        if kind in ("ogmge_iso", "ogm_plain", "ogmge_update", "mlb"):
            bal.modulate_grads()
        opt.step()
        if kind != "ogmge_update":  # optimizer= steps it
            bal.step()
        coefs.append(bal.coefficients.clone())
    return torch.stack(coefs)


def _full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def _worker(rank: int, world: int, init: str, outdir: str, runs: list) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = {}
        for kind, mesh_name in runs:
            shape, reshard, bf16 = MESHES[mesh_name]
            names = None if len(shape) == 1 else ("replicate", "shard")
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            kw = {"mesh": mesh, "reshard_after_forward": reshard, **({"mp_policy": policy} if bf16 else {})}
            net = Net(kind)
            for module in (*net.encoders, net.head, *net.uni):
                fully_shard(module, **kw)
            fully_shard(net, **kw)
            for p in net.parameters():  # the torch.chunk fallback agrees with torch's own offsets
                assert _dtensor.global_offset(p) == _dtensor.chunk_row_offset(p) * (p.numel() // p.shape[0])
            half = B // world
            coefs = _train(kind, net, slice(rank * half, (rank + 1) * half))
            result[(kind, mesh_name)] = {"coefs": coefs, "params": [_full(p) for p in net.parameters()]}
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(out, world: int, runs: list) -> list:
    mp.spawn(_worker, args=(world, f"file://{out / 'rendezvous'}", str(out), runs), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("fsdp"), 2, RUNS)


@pytest.fixture(scope="module")
def sharded_runs_4(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("fsdp4"), 4, CASES_4)


def _compare(runs, kind: str, mesh: str, atol=ATOL, rtol=RTOL, coef_atol=COEF_ATOL) -> None:
    net = Net(kind)
    coefs = _train(kind, net, slice(0, B))
    neutral = {"mmpareto": 0.5}.get(kind, 1.0)
    assert (coefs != neutral).any(), f"{kind}: never modulated, the test would prove nothing"
    for r, run in enumerate(runs):
        got = run[(kind, mesh)]
        torch.testing.assert_close(got["coefs"], coefs, atol=coef_atol, rtol=0, msg=f"rank {r}: coefficients")
        for (name, p), q in zip(net.named_parameters(), got["params"]):
            torch.testing.assert_close(q, p.detach(), atol=atol, rtol=rtol, msg=f"rank {r}: {name}")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("kind,mesh", CASES)
def test_fsdp_matches_one_process(sharded_runs, kind, mesh):
    _compare(sharded_runs, kind, mesh)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("kind,mesh", CASES_4)
def test_fsdp_four_ranks_match_one_process(sharded_runs_4, kind, mesh):
    _compare(sharded_runs_4, kind, mesh)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("kind,mesh", BF16)
def test_fsdp_bf16_params_ranks_agree(sharded_runs, kind, mesh):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): ranks agree exactly; close to the fp32 run."""
    c0 = sharded_runs[0][(kind, mesh)]["coefs"]
    assert all(torch.equal(run[(kind, mesh)]["coefs"], c0) for run in sharded_runs)
    _compare(sharded_runs, kind, mesh, atol=BF16_TOL, rtol=BF16_TOL, coef_atol=BF16_TOL)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("kind", PER_RANK_RANDOM)
def test_fsdp_per_rank_noise_ranks_agree(sharded_runs, kind):
    c0, c1 = (run[(kind, "1d")]["coefs"] for run in sharded_runs)
    assert torch.equal(c0, c1), f"{kind}: coefficients differ between ranks\n{c0}\n{c1}"
    assert (c0 != (0.0 if kind == "opm" else 1.0)).any(), f"{kind}: never modulated"
    assert all(torch.isfinite(p).all() for p in sharded_runs[0][(kind, "1d")]["params"])


@settings(max_examples=20, deadline=None)
@given(
    rows=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    cols=st.integers(1, 5),
    parts=st.integers(2, 3),
    seed=st.integers(0, 2**31),
)
def test_ge_isotropic_shards_equal_the_full_tensors(rows, cols, parts, seed):
    """Uneven dim-0 shards (torch.chunk, as FSDP2 cuts them; a shard may be empty) of T gradients: the sharded rule
    with the (sum, sum of squares) of the full tensors gives each shard the full tensors' result (noise addressed
    by the global index)."""
    g = torch.Generator().manual_seed(seed)
    full = [torch.randn(r, cols, generator=g) * (1 + t) for t, r in enumerate(rows)]
    k = torch.rand(2, generator=g)
    group_index = [t % 2 for t in range(len(full))]
    want = ge_isotropic_([f.clone() for f in full], k, seed=seed, offset=7 << 32, group_index=group_index)
    totals = torch.stack([torch.stack([f.double().sum(), f.double().square().sum()]) for f in full])
    for rank in range(parts):
        chunks = [list(f.chunk(parts)) for f in full]
        shards, starts = [], []
        for f, cs in zip(full, chunks):
            before = sum(c.shape[0] for c in cs[:rank])
            shard = cs[rank].clone() if rank < len(cs) else f[:0].clone()
            shards.append(shard)
            starts.append(before * cols)
        ge_isotropic_shards_(
            shards,
            k,
            seed=seed,
            offset=7 << 32,
            numels=[f.numel() for f in full],
            starts=starts,
            all_reduce=lambda stats: stats.copy_(totals),
            group_index=group_index,
        )
        for w, s, start in zip(want, shards, starts):
            torch.testing.assert_close(s.reshape(-1), w.reshape(-1)[start : start + s.numel()], atol=1e-6, rtol=1e-5)
