"""Noise streams of consecutive steps must be disjoint, not shifted copies of each other."""

import torch
import torch.nn as nn

from mmkernels.api import OGMGE


def _ge_noise_of_step(bal, w: nn.Parameter, step: int) -> torch.Tensor:
    bal._step = step
    w.grad = torch.zeros_like(w)  # k * 0 + (std(0) + 1e-8) * n: the noise itself, scaled by 1e-8
    bal._apply_param_mode(torch.ones(2))
    return w.grad.clone() / 1e-8


def test_isotropic_ge_streams_of_consecutive_steps_do_not_overlap():
    w_a, w_b = nn.Parameter(torch.zeros(64)), nn.Parameter(torch.zeros(64))
    bal = OGMGE(2, official=True, params=[[w_a], [w_b]], seed=3)
    n0, n1 = _ge_noise_of_step(bal, w_a, 0), _ge_noise_of_step(bal, w_a, 1)
    assert n0.std() > 0.5 and n1.std() > 0.5
    # one Philox counter feeds 4 elements: a stream offset by one step's counter would reproduce n0 shifted by 4
    for shift in (0, 4, 8):
        assert not torch.allclose(n1[: 64 - shift], n0[shift:])
