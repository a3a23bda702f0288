"""FSDP2 (torch.distributed.fsdp.fully_shard) support: parameters and gradients are DTensors, each rank holding a
shard of dim 0 (1-D mesh: Shard(0); 2-D HSDP mesh: (Replicate(), Shard(0))).

The balancers never gather a parameter or a gradient: they work on the local shard (`local`), take per-tensor
statistics there, and reduce those over the shard group (`all_reduce_stats`, one small collective per step, every
rank joins). Element j of the local shard is element `global_offset(t) + j` of the full tensor (dim-0 sharding of a
contiguous tensor), which addresses noise so that a sharded run draws the numbers an unsharded one draws.
"""

from __future__ import annotations

import torch

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch built without distributed: nothing is ever a DTensor
    DTensor = None
try:  # private, stable since torch 2.4 (global_shape, mesh, placements); a fallback below otherwise
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:
    compute_local_shape_and_global_offset = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's shard of a DTensor (the same storage: in-place writes land in the DTensor), else t itself."""
    return t.to_local() if is_dtensor(t) else t


def check_sharding(t: torch.Tensor, name: str) -> None:
    """Accept the layouts FSDP2 makes: every mesh dim Replicate, or Shard(0) on exactly one dim (the shard dim)."""
    if not is_dtensor(t):
        return
    shards = [p for p in t.placements if isinstance(p, Shard)]
    others = [p for p in t.placements if not isinstance(p, (Shard, Replicate))]
    if others or len(shards) > 1 or any(p.dim != 0 for p in shards):
        raise NotImplementedError(
            f"{name} is a DTensor with placements {tuple(t.placements)}: only FSDP2 / HSDP layouts are supported "
            f"(Shard(0) on one mesh dim, Replicate() on the others)"
        )


def shard_group(t: torch.Tensor):
    """The process group over which t's dim 0 is sharded (None: not a DTensor, or not sharded)."""
    if not is_dtensor(t):
        return None
    for d, p in enumerate(t.placements):
        if isinstance(p, Shard):
            return t.device_mesh.get_group(d)
    return None


def common_shard_group(groups: list) -> object:
    """The one shard group of the tensors groups[m][i] (None when none is sharded). Validates the layouts: either none
    or all are sharded, over one group (a plain tensor's statistic would be counted once per rank by the all-reduce)."""
    named = [(f"params[{m}][{i}]", t) for m, ts in enumerate(groups) for i, t in enumerate(ts)]
    for name, t in named:
        check_sharding(t, name)
    found = [(name, shard_group(t)) for name, t in named]
    sharded = [(name, g) for name, g in found if g is not None]
    if not sharded:
        return None
    first, group = sharded[0]
    for name, g in found:
        if g is None:
            raise NotImplementedError(
                f"{name} is not sharded but {first} is (FSDP2): list only tensors of fully_shard-ed modules, all "
                f"sharded over one mesh"
            )
        if g is not group:
            raise NotImplementedError(
                f"{name} and {first} are sharded over different process groups: the balancer reduces its "
                f"statistics over one shard group (fully_shard every module on one mesh)"
            )
    return group


def global_offset(t: torch.Tensor) -> int:
    """Flat index in the full tensor of the local shard's first element (0 for a plain tensor)."""
    if not is_dtensor(t) or shard_group(t) is None:
        return 0
    if compute_local_shape_and_global_offset is not None:
        row = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)[1][0]
    else:
        row = chunk_row_offset(t)
    return int(row) * (t.numel() // t.shape[0] if t.shape[0] else 0)


def chunk_row_offset(t: torch.Tensor) -> int:
    """First global row of the local Shard(0) shard: FSDP2 cuts like torch.chunk, ceil(rows / size) rows per rank,
    the last ranks may hold fewer (or none)."""
    d = next(i for i, p in enumerate(t.placements) if isinstance(p, Shard))
    size, coord = t.device_mesh.size(d), t.device_mesh.get_coordinate()[d]
    return min(coord * -(-t.shape[0] // size), t.shape[0])


def all_reduce_stats(stats: torch.Tensor, group) -> torch.Tensor:
    """Sum `stats` (a small tensor of shard-local statistics) over the shard group, in place; no-op without one.
    Every rank of the group must call it in the same order, whatever its batch."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    return stats
