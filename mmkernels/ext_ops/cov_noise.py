"""torch.library ops over mmkernels._C for the batch-covariance noise (csrc/cov_noise.cpp, csrc/cov_noise_cuda.cu).

mmkernels::cov_noise_tap_backward(grad, k, sigma, seed, offset): grad [B, ...] * (k + sigma * (z_i - mean z)) per
    row, z_i the Philox normal of counter offset + i (csrc/philox.h). Differentiable again (it is linear in grad).
mmkernels::sample_cov_noise(per_sample_grads, seed, offset): (z - mean z)^T G / B, [P] fp32 (fp64 for fp64).
Both have fake implementations, so they trace under torch.compile as opaque calls.
"""

from __future__ import annotations

import torch

from ._ext import ext


@torch.library.custom_op("mmkernels::cov_noise_tap_backward", mutates_args=())
def cov_noise_tap_backward(grad: torch.Tensor, k: torch.Tensor, sigma: float, seed: int, offset: int) -> torch.Tensor:
    return ext().cov_noise_tap_backward(grad.contiguous(), k, sigma, seed, offset)


@cov_noise_tap_backward.register_fake
def _cov_noise_tap_backward_fake(grad, k, sigma, seed, offset):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _tap_setup(ctx, inputs, output):
    ctx.k = inputs[1]
    ctx.rest = inputs[2:]


def _tap_backward(ctx, grad_out):
    # linear in grad with the same row factors: its own backward is itself (k, sigma, seed, offset not differentiated)
    return cov_noise_tap_backward(grad_out, ctx.k, *ctx.rest), None, None, None, None


cov_noise_tap_backward.register_autograd(_tap_backward, setup_context=_tap_setup)


@torch.library.custom_op("mmkernels::sample_cov_noise", mutates_args=())
def sample_cov_noise(per_sample_grads: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    return ext().sample_cov_noise(per_sample_grads.contiguous(), seed, offset)


@sample_cov_noise.register_fake
def _sample_cov_noise_fake(per_sample_grads, seed, offset):
    dtype = torch.float64 if per_sample_grads.dtype == torch.float64 else torch.float32
    return per_sample_grads.new_empty((per_sample_grads.shape[1],), dtype=dtype)


def philox_normals(seed: int, offset: int, n: int, device) -> torch.Tensor:
    """[n, 4] fp32: the four Box-Muller normals of Philox counters offset .. offset + n - 1 (csrc/philox.h)."""
    return ext().philox_normals(seed, offset, n, torch.device(device))
