"""The compiled module mmkernels._C, loaded on first use (import torch first; the loader in _backend does)."""

from __future__ import annotations

from .._backend import ext_available, load_ext


def ext():
    """mmkernels._C, or a RuntimeError saying why it is missing."""
    mod = load_ext()
    if mod is None:
        raise RuntimeError(f"mmkernels._C is not available: {ext_available()[1]}")
    return mod
