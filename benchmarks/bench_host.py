"""Host time per call (docs/architecture.md): microseconds until each public op or balancer call returns, and the aten
ops it dispatches, beside the few lines of plain torch a user would write instead. On a GPU a small model's step is
often host-bound, so this is paid there too; on CPU it is most of the cost at small shapes.

No device sync inside the timed call (host time is what is measured); extra_info["aten_ops"] counts the aten ops one
call dispatches (a TorchDispatchMode counter), so the suite shows launch-relevant op counts on every backend.
Runs on CPU and CUDA (`bench_device`); shapes are the small ones where host time dominates: M = 2, B = 64, C = 6, D =
512.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmkernels
from mmkernels import reference as R

M, B, C, D = 2, 64, 6, 512


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def aten_ops(fn) -> int:
    with _CountOps() as mode:
        fn()
    return mode.count


def _host(benchmark, fn, group: str):
    for _ in range(20):  # warm-up: compiles, workspaces, caches
        fn()
    benchmark.group = group
    benchmark.extra_info["aten_ops"] = aten_ops(fn)
    benchmark.pedantic(fn, rounds=200, iterations=5, warmup_rounds=5)


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, B, C, generator=g).to(device)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    feats = [torch.randn(B, D, generator=g).to(device).requires_grad_() for _ in range(M)]
    return x, y, feats


def plain_torch_ogm(x, y):
    """The five lines a user would write for OGM's coefficients (TPAMI Eq. 11 with tanh, alpha = 1)."""
    s = torch.softmax(x.float(), dim=-1).gather(2, y.view(1, -1, 1).expand(x.shape[0], -1, 1)).sum(dim=(1, 2))
    rho = s / s.flip(0)
    return torch.where(rho > 1, (1 - torch.tanh(rho - 1)).clamp_min(0), torch.ones_like(rho))


@pytest.mark.parametrize("impl", ["mmkernels", "reference", "plain_torch"])
def test_host_balance_coefficients(benchmark, impl, bench_device):
    x, y, _ = _inputs(bench_device)
    fn = {
        "mmkernels": lambda: mmkernels.balance_coefficients(x, y, "ogm"),
        "reference": lambda: R.balance_coefficients_ref(x, y, "ogm"),
        "plain_torch": lambda: plain_torch_ogm(x, y),
    }[impl]
    _host(benchmark, fn, f"host balance_coefficients ogm M={M} B={B} C={C} {bench_device}")


@pytest.mark.parametrize("impl", ["plan", "plan_triton_launch_stubbed"])
def test_host_coefficient_plan(benchmark, impl, bench_device, monkeypatch):
    """The coefficient op as a training loop calls it: mmkernels.CoefficientPlan.raw (the packed [3M + 1] output, no
    views). plan_triton_launch_stubbed: the
    Triton path with the kernel launch replaced by a no-op, on any device: the Python host overhead per call that
    remains (target <= 8 us), whatever the launch itself costs."""
    x, y, _ = _inputs(bench_device)
    if impl == "plan_triton_launch_stubbed":
        import mmkernels.coefficients as coefficients
        from mmkernels.triton_ops import coefficients as triton_coefficients

        monkeypatch.setattr(coefficients, "backend_for", lambda *a, **k: "triton")
        monkeypatch.setattr(triton_coefficients, "launch_kernel", lambda grid, args, meta: None)
    plan = mmkernels.CoefficientPlan("ogm")
    _host(benchmark, lambda: plan.raw(x, y), f"host balance_coefficients ogm M={M} B={B} C={C} {bench_device}")


@pytest.mark.parametrize("impl", ["mmkernels", "plain_torch"])
def test_host_grad_tap(benchmark, impl, bench_device):
    _, _, feats = _inputs(bench_device)
    k = torch.tensor(0.5, device=bench_device)
    fn = {"mmkernels": lambda: mmkernels.grad_tap(feats[0], k), "plain_torch": lambda: feats[0] * k}[
        impl
    ]  # what a tap replaces: a scaled forward (no backward hook)
    _host(benchmark, fn, f"host grad_tap B={B} D={D} {bench_device}")


BALANCERS = {
    "ogm_ge": lambda: mmkernels.OGMGE(M),
    "ogm": lambda: mmkernels.OGM(M),
    "opm": lambda: mmkernels.OPM(M),
    "mlb": lambda: mmkernels.MLB(M),
}


@pytest.mark.parametrize("call", ["observe", "tap", "drop"])
@pytest.mark.parametrize("method", sorted(BALANCERS))
def test_host_balancer_call(benchmark, method, call, bench_device):
    if call == "drop" and method != "opm":
        pytest.skip("drop() is OPM's")
    if call == "tap" and method == "opm":
        pytest.skip("OPM acts through drop()")
    x, y, feats = _inputs(bench_device)
    bal = BALANCERS[method]().to(bench_device)
    bal.observe(x, y)  # coefficients exist; each timed call below stays inside one step

    def one():
        if call == "observe":
            bal.step()
            bal.observe(x, y)
        elif call == "tap":
            bal.tap(feats)
        else:
            bal.drop(feats)

    _host(benchmark, one, f"host {method}.{call}() M={M} B={B} {bench_device}")


@pytest.mark.parametrize("impl", ["mmkernels", "plain_torch"])
def test_host_cov_noise_tap_fwd_bwd(benchmark, impl, bench_device):
    """The covariance tap's forward + backward (B = 64, D = 512) beside the same math in plain torch."""
    _, _, feats = _inputs(bench_device)
    k = torch.tensor(0.5, device=bench_device)
    grad = torch.ones_like(feats[0])

    def ours():
        mmkernels.cov_noise_tap(feats[0], k, sigma=1.0, seed=0, offset=0).backward(grad)

    def plain():
        z = torch.randn(B, 1, device=bench_device)
        (feats[0] * (k + (z - z.mean()))).backward(grad)

    _host(
        benchmark,
        {"mmkernels": ours, "plain_torch": plain}[impl],
        f"host cov_noise_tap fwd+bwd B={B} D={D} {bench_device}",
    )


@pytest.mark.parametrize("impl", ["mmkernels", "authors_loop"])
def test_host_ge_isotropic(benchmark, impl, bench_device):
    """ge_isotropic_ over 6 small gradient tensors (host-bound) beside the authors' per-tensor loop."""
    g = torch.Generator().manual_seed(3)
    grads = [
        torch.randn(s, generator=g).to(bench_device) * 1e-3
        for s in [(16, 3, 3, 3), (16,), (32, 16, 3, 3), (32,), (D,), (4, D)]
    ]
    k = torch.zeros(len(grads), device=bench_device)  # k = 0: g <- (std + 1e-8) n keeps the scale over 1000+ calls

    def ours():
        mmkernels.ge_isotropic_(grads, k, seed=0, offset=0)

    def authors():
        for t in grads:
            std = t.std().item() + 1e-8  # sync-ok: the authors' loop, benchmarked
            t.mul_(0.0).add_(torch.zeros_like(t).normal_(0, std))

    _host(benchmark, {"mmkernels": ours, "authors_loop": authors}[impl], f"host ge_isotropic_ 6 tensors {bench_device}")
