"""No host syncs in a CUDA training step: the steps of tests/test_sync_free.py on CUDA tensors under
torch.cuda.set_sync_debug_mode("error") (cuda lane only). Unlike the CPU guard this also sees syncs inside C++/CUDA
code: D2H reads (.item(), nonzero, ...), stream synchronisation and blocking H2D copies of pageable host memory
(torch.tensor(data, device="cuda") is one, pytorch/pytorch#120996).

Each test runs one warm-up step with the mode off (first-call allocations, cuBLAS handles, Triton compiles may sync),
then one full step (forward through the balancer, loss, backward, optimizer.step(), bal.step()) with the mode on.
The mode is global (it covers the autograd engine's device thread too) and is restored afterwards.
The real CPU label check stays in place: it returns at once for CUDA labels.
"""

from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels import reference
from mmkernels._backend import ext_has_cuda

from test_sync_free import BALANCER_STEPS, M, make_ops_step

pytestmark = pytest.mark.cuda

# steps that go through the extension's ops (covariance noise, isotropic noise, Shapley batches): without its CUDA
# kernels they fall back to the reference on CUDA, which is not the sync-free path
NEEDS_EXT = {
    "ogmge-covariance-observe-first",
    "ogmge-covariance-tap-first",
    "ogmge-official-isotropic",
    "agm-model",
    "agm-encoders-head-eval",
    "agm-encoders-head-reuse",
}


def _params():
    out = []
    for name in BALANCER_STEPS:
        out.append(pytest.param(name, id=name))
    return out


def _needs_ext():
    if not ext_has_cuda():
        pytest.skip("mmkernels._C was built without CUDA kernels (build it for this GPU: pip install -e .)")


def run_without_syncs(step) -> None:
    step()  # warm-up, mode off
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


def test_sync_debug_mode_catches_a_read():
    """The mode is live in this process: an .item() on a CUDA tensor raises."""
    x = torch.ones(3, device="cuda")
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            x.sum().item()
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize("name", _params())
def test_balancer_step_has_no_syncs(name):
    if name in NEEDS_EXT:
        _needs_ext()
    step, bal = BALANCER_STEPS[name]("cuda")
    run_without_syncs(step)
    assert bal.step_count == 2
    assert bal.coefficients.is_cuda and bal.flag.is_cuda
    assert bal.flag.item() == 0


@pytest.mark.parametrize("method", list(mmkernels.METHOD_DEFAULTS))
def test_balance_coefficients_has_no_syncs(method):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(M, 64, 10, generator=g) * torch.tensor([2.0, 0.5]).view(M, 1, 1)).cuda()
    labels = torch.randint(0, 10, (64,), generator=g).cuda()
    state = reference.new_agm_state(M, "cuda") if method == "agm" else None
    out = {}

    def step():
        out.update(mmkernels.balance_coefficients(logits, labels, method, state=state))

    run_without_syncs(step)
    want = reference.balance_coefficients_ref(
        logits, labels, method, state=reference.new_agm_state(M, "cuda") if method == "agm" else None
    )
    assert out["flag"].item() == 0
    if method != "agm":  # AGM's state advanced twice here, once in `want`
        torch.testing.assert_close(out["coefficients"], want["coefficients"], rtol=2e-5, atol=1e-6)


def test_public_ops_step_has_no_syncs():
    _needs_ext()
    run_without_syncs(make_ops_step("cuda"))
