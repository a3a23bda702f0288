"""Small multimodal models and reference helpers shared by the API tests (tests/test_*_api.py, tests/test_ddp.py)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmkernels import reference

IN_DIMS = (5, 3, 4)
FEAT = 6
C = 4


class TinyModel(nn.Module):
    """M MLP encoders -> concatenation head (a Linear on torch.cat(feats, 1))."""

    def __init__(self, m: int = 2, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(IN_DIMS[i], FEAT), nn.Tanh()) for i in range(m))
        self.head = nn.Linear(FEAT * m, C)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def feats(self, xs):
        return [enc(x) for enc, x in zip(self.encoders, xs)]

    def fuse(self, feats):
        return self.head(torch.cat(list(feats), 1))

    def forward(self, *xs):
        return self.fuse(self.feats(xs))


def batch(m: int = 2, b: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, IN_DIMS[i], generator=g) * (1.0 + 2 * i) for i in range(m)]
    y = torch.randint(0, C, (b,), generator=g)
    return xs, y


def grads(module: nn.Module) -> dict:
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in module.named_parameters()}


def plain_grads(model: nn.Module, xs, y) -> dict:
    """Gradients of CE(model(xs), y) without any balancer, on a copy of the model."""
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(*xs), y).backward()
    return grads(ref)


def ref_coefficients(model: nn.Module, xs, y, method: str, **hp) -> dict:
    """The reference pipeline on the concat-head unimodal logits (TPAMI Eq. 6, bias split 1/M)."""
    with torch.no_grad():
        feats = model.feats(xs)
        u = reference.concat_unimodal_logits(feats, model.head.weight, model.head.bias)
    return reference.balance_coefficients_ref(u, y, method, **hp)


def modality_of(name: str) -> int | None:
    """encoders.<m>.* -> m; head -> None."""
    return int(name.split(".")[1]) if name.startswith("encoders.") else None
