"""torch.library op over mmkernels._C for OGM-GE's isotropic noise (csrc/ge_isotropic.cpp, csrc/ge_isotropic_cuda.cu).

mmkernels::ge_isotropic_(grads, k, group_index, seed, offset): in place, for every tensor t,
    grads[t] = k[g(t)] * grads[t] + (std_t + 1e-8) * n_t,  std_t = unbiased std of the unmodulated grads[t],
    g(t) = group_index[t] (or t when group_index is empty), n_t Philox normals (layout in csrc/ge_isotropic.cpp).
Two multi-tensor passes (statistics, update) over all tensors; k is read on the device.
"""

from __future__ import annotations

from typing import List

import torch

from ._ext import ext


@torch.library.custom_op("mmkernels::ge_isotropic_", mutates_args={"grads"})
def ge_isotropic_(grads: List[torch.Tensor], k: torch.Tensor, group_index: List[int], seed: int, offset: int) -> None:
    ext().ge_isotropic_(grads, k, group_index, seed, offset)


@ge_isotropic_.register_fake
def _ge_isotropic_fake(grads, k, group_index, seed, offset):
    return None


def ge_tensor_std(grads) -> torch.Tensor:
    """[T] fp32: each tensor's unbiased std exactly as the statistics pass of ge_isotropic_ computes it."""
    return ext().ge_tensor_std(list(grads))


def noise_counters(numels) -> int:
    """Philox counters one ge_isotropic_ call consumes: sum over tensors of ceil(numel / 4)."""
    return sum((int(n) + 3) // 4 for n in numels)
