"""torch.library ops over mmkernels._C for AGM's Shapley forwards (csrc/shapley.cpp, csrc/shapley_cuda.cu).

Subsets are bitmasks S = 1 .. 2^M - 1 (bit m = modality m present), at index S - 1.
mmkernels::shapley_masked_batch(inputs, num_blocks, fill=None): M tensors [B, ...] -> M tensors [num_blocks * B, ...],
    block S - 1 keeping modality m iff bit m of S is set (zeros otherwise, or fill[m] - one row [1, ...] or [...] -
    in every row). Differentiable: the gradient of input m is the sum of the gradients of the blocks that keep it;
    that of fill[m] is the sum of the gradients of all rows of the blocks that mute m.
mmkernels::shapley_responses(subset_outputs, kappa): [2^M - 1, B, ...] -> phi [M, B, ...] (AGM Eq. 1-3, v(empty) = 0).
    Backward (mmkernels::shapley_responses_backward): grad_v[S - 1] = sum_m kappa_m w_m(S) grad_phi[m], i.e. the
    gradient reaching phi_m is scaled by kappa_m (AGM's modulation; kappa None = the exact gradient).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ._ext import ext


# infer_schema does not take Optional[List[Tensor]]: the schema is spelled out
@torch.library.custom_op(
    "mmkernels::shapley_masked_batch",
    mutates_args=(),
    schema="(Tensor[] inputs, SymInt num_blocks, Tensor[]? fill=None) -> Tensor[]",
)
def shapley_masked_batch(
    inputs: List[torch.Tensor], num_blocks: int, fill: Optional[List[torch.Tensor]] = None
) -> List[torch.Tensor]:
    fill = None if fill is None else [f.contiguous() for f in fill]
    return ext().shapley_masked_batch([x.contiguous() for x in inputs], num_blocks, fill)


@shapley_masked_batch.register_fake
def _shapley_masked_batch_fake(inputs, num_blocks, fill=None):
    return [x.new_empty((num_blocks * x.shape[0],) + tuple(x.shape[1:])) for x in inputs]


def _masked_setup(ctx, inputs, output):
    xs, num_blocks, fill = inputs
    ctx.num_blocks = num_blocks
    ctx.shapes = [tuple(x.shape) for x in xs]
    ctx.fill_shapes = None if fill is None else [tuple(f.shape) for f in fill]


def _masked_backward(ctx, grads):
    # input m's gradient: sum of the gradients of the blocks S - 1 whose subset S keeps m, as a 0/1-weighted sum
    # over blocks (built on the device from arange: no host data, no sync, traceable); fill[m]'s gradient: the
    # sum over the blocks that mute m and over their B rows
    n = ctx.num_blocks
    out, out_fill = [], []
    for m, (g, shape) in enumerate(zip(grads, ctx.shapes)):
        if g is None:
            out.append(None)
            out_fill.append(None)
            continue
        subsets = torch.arange(1, n + 1, device=g.device)
        keep = ((subsets >> m) & 1).to(g.dtype)
        blocks = g.reshape(n, -1)
        out.append((keep @ blocks).reshape(shape))
        if ctx.fill_shapes is not None:
            muted = (1 - keep) @ blocks  # [B * row]
            out_fill.append(muted.reshape(shape[0], -1).sum(0).reshape(ctx.fill_shapes[m]))
    grads_in = (out, None, out_fill if ctx.fill_shapes is not None else None)
    # One gradient per input the dispatcher actually passed: it drops `fill` when it equals its default (None),
    # and torch 2.11 insists on that count (later versions also accept one per schema argument).
    return grads_in[: len(ctx.needs_input_grad)]


shapley_masked_batch.register_autograd(_masked_backward, setup_context=_masked_setup)


@torch.library.custom_op("mmkernels::shapley_responses", mutates_args=())
def shapley_responses(subset_outputs: torch.Tensor, kappa: Optional[torch.Tensor]) -> torch.Tensor:
    return ext().shapley_responses(subset_outputs.contiguous())


@shapley_responses.register_fake
def _shapley_responses_fake(subset_outputs, kappa):
    m = (subset_outputs.shape[0] + 1).bit_length() - 1
    return subset_outputs.new_empty((m,) + tuple(subset_outputs.shape[1:]))


@torch.library.custom_op("mmkernels::shapley_responses_backward", mutates_args=())
def shapley_responses_backward(
    grad_phi: torch.Tensor, kappa: Optional[torch.Tensor], out_dtype: torch.dtype
) -> torch.Tensor:
    return ext().shapley_responses_backward(grad_phi.contiguous(), kappa, out_dtype)


@shapley_responses_backward.register_fake
def _shapley_responses_backward_fake(grad_phi, kappa, out_dtype):
    return grad_phi.new_empty((2 ** grad_phi.shape[0] - 1,) + tuple(grad_phi.shape[1:]), dtype=out_dtype)


def _responses_setup(ctx, inputs, output):
    ctx.kappa = inputs[1]
    ctx.dtype = inputs[0].dtype


def _responses_backward(ctx, grad_phi):
    return shapley_responses_backward(grad_phi, ctx.kappa, ctx.dtype), None


shapley_responses.register_autograd(_responses_backward, setup_context=_responses_setup)


def shapley_weights(num_modalities: int) -> torch.Tensor:
    """[2^M - 1, M] fp32 from the header math (csrc/shapley_math.h), for tests."""
    return ext().shapley_weights(num_modalities)
