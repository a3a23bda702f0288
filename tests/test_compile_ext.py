"""The extension's ops under torch.compile (their fake implementations trace; the kernels run as opaque calls)."""

import pytest
import torch

from mmkernels.noise import cov_noise_tap, ge_isotropic_
from mmkernels.shapley import shapley_masked_batch, shapley_responses

pytestmark = [pytest.mark.ext, pytest.mark.backend("ext")]


def _step(x_a, x_b, w, kappa, k):
    feats = [cov_noise_tap(x_a, k, sigma=1.0, seed=1, offset=0), x_b]
    masked = shapley_masked_batch(feats, include_full=True)  # all 3 subsets in one batch
    out = torch.cat(masked, dim=1) @ w  # [3 * B, C]
    phi = shapley_responses(out.view(3, x_a.shape[0], -1), kappa)
    return phi.sum(0).square().mean()


def test_step_compiles_and_matches_eager(device):
    torch.manual_seed(0)
    x_a = torch.randn(4, 3, device=device, requires_grad=True)
    x_b = torch.randn(4, 2, device=device, requires_grad=True)
    w = torch.randn(5, 6, device=device)
    kappa = torch.tensor([0.5, 2.0], device=device)
    k = torch.tensor(0.8, device=device)
    eager = _step(x_a, x_b, w, kappa, k)
    ga, gb = torch.autograd.grad(eager, (x_a, x_b))
    compiled = torch.compile(_step, backend="aot_eager", fullgraph=True)
    loss = compiled(x_a, x_b, w, kappa, k)
    ca, cb = torch.autograd.grad(loss, (x_a, x_b))
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(ca, ga)
    torch.testing.assert_close(cb, gb)

    grads = [torch.randn(3, 3, device=device), torch.randn(5, device=device)]
    expect = [g.clone() for g in grads]
    ge_isotropic_(expect, torch.ones(2, device=device), seed=2, offset=0)
    torch.compile(lambda gs, kk: ge_isotropic_(gs, kk, seed=2, offset=0), backend="aot_eager", fullgraph=True)(
        grads, torch.ones(2, device=device)
    )
    assert all(torch.equal(a, b) for a, b in zip(grads, expect))
