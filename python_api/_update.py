"""modulate="update": scale each modality's parameter UPDATE by k_m instead of its gradient.

Why: an adaptive optimizer divides the gradient by a running estimate of its own scale (Adam: sqrt of the second
moment), so a coefficient that multiplies the gradient cancels (exactly for a constant k, mostly for a slowly
varying one). Scaling the update the optimizer computed keeps k's meaning for any optimizer:

    p_new = p_old + k_m * (p_opt - p_old)      for every listed tensor p of modality m,

where p_opt is what optimizer.step() produced from the unmodulated gradient. The optimizer's state (momentum,
Adam's moments, step counts) is exactly the state of the unmodulated step, because the gradient is not touched.

How: a step pre-hook snapshots the listed tensors (one foreach copy), a step post-hook rewrites them as
p <- snap + k_m (p - snap) (foreach sub, one foreach mul per modality with k_m a 0-d device tensor, foreach add):
no host sync. Extra memory: one snapshot of the listed tensors, allocated at the first modulated step.
A step that GradScaler skips never calls optimizer.step(), so neither hook runs and nothing changes; a fused
optimizer that skips internally (found_inf) leaves p == snap, and snap + k * 0 == snap.
In float32 the rewritten tensor carries one extra rounding of p (|error| <= ulp(p)/2 on top of k * delta).
Under FSDP2 (DTensor parameters) the snapshot and the rewrite act on each rank's local shard: elementwise, so
nothing is communicated and the result is the unsharded one, shard by shard.
"""

from __future__ import annotations

import torch

from . import _dtensor

# optimizers whose step is not a single update of the listed tensors from their gradients
_REFUSED = {
    "LBFGS": "its step() re-evaluates the closure and moves the parameters several times (line search)",
    "SparseAdam": "it works on sparse gradients only, and an update of its sparse rows cannot be rescaled densely",
}


def check_optimizer(optimizer, groups: list[list[torch.Tensor]], owner: str) -> None:
    """Every listed tensor must be optimised by `optimizer`, and the optimizer must be one we can support."""
    if optimizer is None:
        raise ValueError(
            f"{owner}(modulate='update') needs optimizer= (the torch.optim.Optimizer whose step is rescaled)"
        )
    name = type(optimizer).__name__
    if name in _REFUSED:
        raise ValueError(f"{owner}(modulate='update') does not support torch.optim.{name}: {_REFUSED[name]}")
    if getattr(optimizer, "defaults", {}).get("differentiable", False):
        raise ValueError(
            f"{owner}(modulate='update') does not support differentiable=True optimizers (the rewrite "
            f"of the parameters is not part of the autograd graph)"
        )
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for m, group in enumerate(groups):
        for i, p in enumerate(group):
            if id(p) not in optimised:
                raise ValueError(
                    f"params[{m}][{i}] (shape {list(p.shape)}) is not in optimizer.param_groups: with "
                    f"modulate='update' every listed tensor must be updated by the optimizer"
                )


class UpdateScaler:
    """The snapshot and the rewrite of the listed tensors around one optimizer.step()."""

    def __init__(self, groups: list[list[torch.Tensor]]):
        self.groups = groups
        self.flat = [p for g in groups for p in g]
        self.snapshots: list[torch.Tensor] | None = None
        self.pending: torch.Tensor | None = None  # [M] coefficients of the step in flight, or None

    def _locals(self) -> list[torch.Tensor]:
        """The listed tensors as plain tensors: the rank's shard of an FSDP2 DTensor, else the tensor itself."""
        return [_dtensor.local(p.detach()) for p in self.flat]

    def extra_bytes(self) -> int:
        """Memory the snapshot holds once allocated (bytes; the local shards' under FSDP2)."""
        return sum(p.numel() * p.element_size() for p in self._locals())

    def before_step(self, coef: torch.Tensor) -> None:
        with torch.no_grad():
            params = self._locals()
            if self.snapshots is None or any(
                s.shape != p.shape or s.dtype != p.dtype or s.device != p.device for s, p in zip(self.snapshots, params)
            ):
                self.snapshots = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
            torch._foreach_copy_(self.snapshots, params)
        self.pending = coef

    def after_step(self) -> None:
        coef, self.pending = self.pending, None
        if coef is None:
            return
        with torch.no_grad():
            params = self._locals()
            torch._foreach_sub_(params, self.snapshots)  # p <- delta computed by the optimizer
            i = 0
            for m, group in enumerate(self.groups):
                if group:
                    torch._foreach_mul_(params[i : i + len(group)], coef[m])  # delta <- k_m delta
                i += len(group)
            torch._foreach_add_(params, self.snapshots)  # p <- p_old + k_m delta
