"""Which implementation runs an op: the reference, a Triton kernel, or the C++/CUDA extension.

docs/architecture.md. Nothing here touches the GPU at import time; availability is probed lazily,
once, and the reason for a missing piece is kept for `env_report()`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("reference", "triton", "ext")
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def triton_available() -> tuple[bool, str]:
    """(available, reason). Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton cannot be imported: {exc!r}"
    return True, f"triton {triton.__version__}" + (" (interpreter: TRITON_INTERPRET=1)" if interpreting() else "")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_guard(device: torch.device):
    """Context making `device` the current CUDA device around a Triton launch (a no-op for CPU tensors and when it
    already is). Triton launches on the CURRENT device's current stream, not on the device of its arguments: without
    this, tensors on cuda:1 with cuda:0 current would run on the wrong GPU (illegal address)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


@functools.lru_cache(maxsize=None)
def _load_ext():
    try:
        return importlib.import_module("mmkernels._C"), "built"
    except Exception as exc:
        return None, f"mmkernels._C cannot be imported ({exc!r}); build it with `pip install --no-build-isolation -e .`"


def load_ext():
    """The extension module mmkernels._C, or None (the reason is in `ext_available()`)."""
    return _load_ext()[0]


def ext_available() -> tuple[bool, str]:
    mod, why = _load_ext()
    if mod is None:
        return False, why
    cuda = bool(getattr(mod, "with_cuda", lambda: False)())
    return True, "built with CPU twins" + (" and CUDA kernels" if cuda else " only (no CUDA kernels compiled)")


def ext_has_cuda() -> bool:
    mod = load_ext()
    return bool(mod is not None and getattr(mod, "with_cuda", lambda: False)())


def forced_backend() -> str | None:
    name = os.environ.get("MMKERNELS_BACKEND")
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"MMKERNELS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def backend_for(*tensors: torch.Tensor, op: str, available: tuple[str, ...] = BACKENDS) -> str:
    """Pick the backend for `op` on these tensors.

    `available` lists the backends that implement `op`. MMKERNELS_BACKEND forces one (an op that
    lacks the forced backend raises, rather than silently computing something else). Otherwise CUDA
    tensors go to Triton, then the extension; CPU tensors to the extension's C++ twins; the rest to
    the reference. A missing piece warns once and falls back to the reference (same numbers).
    """
    return _select(any(t.is_cuda for t in tensors), op, tuple(available))


@torch.compiler.assume_constant_result
def _select(on_cuda: bool, op: str, available: tuple[str, ...]) -> str:
    # Under torch.compile this runs once while tracing and its answer is baked into the graph (Dynamo
    # need not trace the lazy imports behind it); in eager mode it runs every call.
    forced = forced_backend()
    if forced is not None:
        if forced not in available:
            raise RuntimeError(f"MMKERNELS_BACKEND={forced} but {op} has no {forced} implementation (has {available})")
        if forced == "triton" and not triton_available()[0]:
            raise RuntimeError(f"MMKERNELS_BACKEND=triton but {triton_available()[1]}")
        if forced == "ext" and load_ext() is None:
            raise RuntimeError(f"MMKERNELS_BACKEND=ext but {ext_available()[1]}")
        if forced == "triton" and not on_cuda and not interpreting():
            raise RuntimeError(
                f"MMKERNELS_BACKEND=triton but {op} got CPU tensors: Triton kernels run on CUDA tensors "
                "(or on CPU tensors under TRITON_INTERPRET=1)"
            )
        return forced
    if on_cuda:
        if "triton" in available:
            ok, why = triton_available()
            if ok:
                return "triton"
            _warn_once("triton", f"mmkernels: Triton unavailable ({why}); using a slower path")
        if "ext" in available:
            if ext_has_cuda():
                return "ext"
            _warn_once("ext-cuda", f"mmkernels: CUDA extension unavailable ({ext_available()[1]}); using the reference")
        return "reference"
    if "ext" in available and load_ext() is not None:
        return "ext"
    return "reference"
