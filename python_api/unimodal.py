"""Unimodal-logit helpers: the per-modality logits every balancer scores (docs/architecture.md)."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Sequence

import torch

from mmkernels import _validate, reference

from . import _dtensor


def _check_feats(feats, name: str = "feats") -> list:
    if isinstance(feats, torch.Tensor) or not isinstance(feats, (list, tuple)):
        raise TypeError(f"{name} must be a list of M feature tensors [B, D_m], got {type(feats).__name__}")
    _validate.check_num_modalities(len(feats), f"len({name}) (number of modalities)")
    _validate.check_same(list(feats), name, same_shape=False)
    return list(feats)


def concat_unimodal_logits(feats, linear, gamma=None, *, detach: bool = True) -> torch.Tensor:
    """u_m = feat_m W_m^T + gamma_m b for a concatenation head W = [W_1 ... W_M] (TPAMI Eq. 6; bias split Sec. 4.5.2).

    feats: M tensors [B, D_m] in the order they are concatenated; linear: the nn.Linear applied to torch.cat(feats, 1)
    (or a (weight, bias) pair; a torch.compile-d nn.Linear, fully_shard-ed or not, is read through its _orig_mod);
    gamma: M bias shares (default 1/M each; the authors' OGM-GE code uses 1/2 for M=2).
    detach (default True): scores only, no autograd graph. Returns [M, B, C].
    A fully_shard-ed head (FSDP2, sharded weight) is read through the module, before or after its own forward
    (_sharded_head_logits): no raw read of a shard.
    """
    xs = _check_feats(feats)
    given, linear = linear, _uncompiled(linear)
    if isinstance(linear, torch.nn.Linear):
        weight, bias = linear.weight, linear.bias
    elif isinstance(linear, (tuple, list)) and len(linear) == 2:
        weight, bias = linear
    else:
        raise TypeError(
            f"linear must be an nn.Linear (or torch.compile of one) or a (weight, bias) pair, got {_type_name(given)}"
        )
    if _dtensor.is_dtensor(weight):
        return _sharded_head_logits(xs, linear, gamma, detach)
    widths = [x.shape[-1] for x in xs]
    if weight.dim() != 2 or weight.shape[1] != sum(widths):
        raise ValueError(
            f"linear has in_features={weight.shape[-1]} but the features' widths {widths} sum to "
            f"{sum(widths)}; feats must be the tensors the head's input concatenates"
        )
    if weight.device != xs[0].device:
        raise ValueError(f"linear is on {weight.device} but feats are on {xs[0].device}")
    if gamma is not None:
        g = torch.as_tensor(gamma, dtype=torch.float32)
        if g.numel() != len(xs):
            raise ValueError(f"gamma must hold {len(xs)} bias shares (one per modality), got {g.numel()}")
    with torch.no_grad() if detach else contextlib.nullcontext():
        return reference.concat_unimodal_logits(xs, weight, bias, gamma=gamma)


def _compiled_type():
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # imported by any torch.compile call
    return getattr(eval_frame, "OptimizedModule", None)


def _uncompiled(module):
    """The module a torch.compile wrapper (OptimizedModule, nested or not) holds, else module itself."""
    compiled = _compiled_type()
    while compiled is not None and isinstance(module, compiled):
        module = module._orig_mod
    return module


def _type_name(obj) -> str:
    inner = _uncompiled(obj)
    return type(obj).__name__ if inner is obj else f"{type(obj).__name__} (torch.compile of {type(inner).__name__})"


def _sharded_head_logits(xs: list, linear, gamma, detach: bool) -> torch.Tensor:
    """concat_unimodal_logits for a head whose weight is sharded by FSDP2 (fully_shard(head)), read through the module:

    detach=True: head.unshard() (the all-gather its own forward does), the logits from the unsharded weight, then
    head.reshard() if it was sharded before: the numbers of the unsharded head, before or after the head's forward.
    detach=False: one call of the head's forward on M*B + 1 rows, row block m = feat_m zero-padded to the head's
    input (= feat_m W_m^T + b) and a zero row (= b): u_m = head(x_m) - (1 - gamma_m) b, differentiable through
    FSDP2's own hooks.
    """
    if not hasattr(linear, "unshard") or not hasattr(linear, "reshard"):
        raise NotImplementedError(
            "linear's weight is a DTensor sharded by FSDP2 but linear is not itself fully_shard-ed: call "
            "fully_shard(head) on the head so concat_unimodal_logits can read it through the module"
        )
    widths = [x.shape[-1] for x in xs]
    if linear.in_features != sum(widths):
        raise ValueError(
            f"linear has in_features={linear.in_features} but the features' widths {widths} sum to "
            f"{sum(widths)}; feats must be the tensors the head's input concatenates"
        )
    m = len(xs)
    g = torch.full((m,), 1.0 / m) if gamma is None else torch.as_tensor(gamma, dtype=torch.float32).reshape(-1)
    if g.numel() != m:
        raise ValueError(f"gamma must hold {m} bias shares (one per modality), got {g.numel()}")
    if detach:
        with torch.no_grad():
            linear.unshard()
            try:
                return reference.concat_unimodal_logits(xs, linear.weight, linear.bias, gamma=gamma)
            finally:
                linear.reshard()
    b = xs[0].shape[0]
    rows = [torch.cat([x if j == i else x.new_zeros(b, w) for j, w in enumerate(widths)], 1) for i, x in enumerate(xs)]
    out = linear(torch.cat([*rows, xs[0].new_zeros(1, sum(widths))]))
    u, bias_row = out[:-1].view(m, b, -1), out[-1:].view(1, 1, -1)
    return (u - (1 - g.to(u)).view(m, 1, 1) * bias_row).to(xs[0].dtype)


def summation_unimodal_logits(feats, heads: Sequence[Callable]) -> torch.Tensor:
    """Summation fusion f = sum_m head_m(feat_m): u_m = head_m(feat_m), each with its full bias. Returns [M, B, C]."""
    xs = _check_feats(feats)
    if len(heads) != len(xs):
        raise ValueError(f"len(heads) must equal len(feats)={len(xs)}, got {len(heads)}")
    return reference.summation_unimodal_logits(xs, heads)


def zero_out_unimodal_logits(head: Callable, feats) -> torch.Tensor:
    """Multi-layer head (TPAMI Sec. 4.3.7): u_m = head(feats with every j != m zeroed), the M zeroed copies batched
    into ONE head call of M*B rows. head: callable on a list of M tensors [N, D_j] -> [N, C]. Returns [M, B, C].
    Run it under torch.no_grad() (or detach) when the logits only feed a balancer."""
    if not callable(head) or isinstance(head, (list, tuple, torch.Tensor)):
        raise TypeError(
            f"head must be a callable taking a list of M tensors [N, D_j] (arguments: head, feats), "
            f"got {type(head).__name__}"
        )
    xs = _check_feats(feats)
    try:
        out = reference.zero_out_unimodal_logits(head, xs)
    except TypeError as exc:  # e.g. an nn.Linear, which takes one tensor, not the list of M features
        raise TypeError(
            f"head must take a list of M feature tensors [N, D_j] and return logits [N, C] (a fusion "
            f"head such as lambda fs: linear(torch.cat(fs, 1))); calling it raised: {exc}"
        ) from exc
    return out
