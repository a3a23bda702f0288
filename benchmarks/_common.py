"""Helpers shared by the bench_*.py files: synchronised pedantic timing, GB/s, the device-copy yardstick and the
per-call counters (host syncs, Triton launches). benchmarks/conftest.py puts this folder on sys.path, so a bench
file does `from _common import ...`."""

from __future__ import annotations

import warnings

import torch


def sync(device="cuda") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(benchmark, fn, *, rounds=30, iterations=5, warmup=3, warmup_rounds=2, device="cuda"):
    """benchmark.pedantic over fn() followed by a device sync, after `warmup` untimed calls (compiles, workspaces)."""
    for _ in range(warmup):
        fn()
    sync(device)

    def call():
        fn()
        sync(device)

    benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=warmup_rounds)


def nbytes(*tensors) -> int:
    """Bytes held by the tensors (each argument a tensor or a sequence of tensors)."""
    total = 0
    for t in tensors:
        for x in [t] if isinstance(t, torch.Tensor) else t:
            total += x.numel() * x.element_size()
    return total


def record_gbps(benchmark, moved_bytes: int) -> None:
    """extra_info["GB/s"]: bytes moved per call over the mean time (nan when nothing was timed)."""
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["GB/s"] = moved_bytes / mean / 1e9 if mean > 0 else float("nan")


def timed_gbps(benchmark, fn, moved_bytes: int, **timing) -> None:
    """`timed` (same keywords), then extra_info["GB/s"] for `moved_bytes` per call."""
    timed(benchmark, fn, **timing)
    record_gbps(benchmark, moved_bytes)


def bench_copy(benchmark, x: torch.Tensor, **timing) -> None:
    """The bandwidth yardstick: a device copy of x's bytes (read + write counted), timed like the op next to it."""
    out = torch.empty_like(x)
    timed_gbps(benchmark, lambda: out.copy_(x), 2 * nbytes(x), **timing)


def count_syncs(fn, *args, **kwargs) -> int:
    """Host syncs in one call, via torch.cuda's sync debug mode (each sync emits a warning)."""
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(*args, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def count_triton_launches(fn, *args, **kwargs) -> int:
    """Triton kernel launches in one call (JITFunction.run patched for the call)."""
    import triton.runtime.jit as jit

    calls = []
    original = jit.JITFunction.run

    def run(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    jit.JITFunction.run = run
    try:
        fn(*args, **kwargs)
    finally:
        jit.JITFunction.run = original
    return len(calls)
