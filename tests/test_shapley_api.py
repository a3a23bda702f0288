"""mmkernels.shapley at the public boundary (reference lane): argument validation (before any dispatch) and the
reference backend (MMKERNELS_BACKEND=reference), including its kappa-modulated backward."""

import pytest
import torch

from mmkernels import reference
from mmkernels.shapley import shapley_masked_batch, shapley_responses


@pytest.fixture
def ref_backend(monkeypatch):
    monkeypatch.setenv("MMKERNELS_BACKEND", "reference")


def test_reference_masked_batch(ref_backend):
    xs = [torch.randn(2, 3), torch.randn(2, 1, 4), torch.randn(2, 2)]
    out = shapley_masked_batch(xs)
    assert [o.shape[0] for o in out] == [12, 12, 12]
    for o, w in zip(out, reference.shapley_masked_inputs(xs)):
        assert torch.equal(o, w)
    full = shapley_masked_batch(xs, include_full=True)
    assert all(torch.equal(f[-2:], x) for f, x in zip(full, xs))


def test_reference_responses_and_modulated_backward(ref_backend):
    M, B, C = 3, 4, 2
    v = torch.randn(2**M - 1, B, C, requires_grad=True)
    kappa = torch.tensor([0.5, 1.0, 2.0])
    phi = shapley_responses(v, kappa)
    torch.testing.assert_close(phi, reference.shapley_combine(v.detach()))
    g = torch.randn(B, C)
    phi.sum(0).backward(g)
    c = reference.shapley_subset_grad_scale(kappa)
    torch.testing.assert_close(v.grad, c.view(-1, 1, 1) * g)
    # kappa None: the exact gradient of the combine
    v.grad = None
    shapley_responses(v).sum(0).backward(g)
    want = torch.zeros_like(v)
    want[-1] = g  # sum_m phi_m = f(all)
    torch.testing.assert_close(v.grad, want, rtol=1e-5, atol=1e-6)


def test_responses_accepts_a_list():
    vs = [torch.randn(2, 3) for _ in range(3)]
    torch.testing.assert_close(shapley_responses(vs), reference.shapley_combine(torch.stack(vs)), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- validation
def test_masked_batch_validation():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"len\(inputs\) \(number of modalities\) must be between 2 and 8, got 1"):
        shapley_masked_batch([x])
    with pytest.raises(ValueError, match=r"len\(inputs\) \(number of modalities\) must be between 2 and 8, got 9"):
        shapley_masked_batch([x] * 9)
    with pytest.raises(ValueError, match=r"inputs\[1\] has batch size 3 but inputs\[0\] has 2; batch sizes must match"):
        shapley_masked_batch([x, torch.randn(3, 3)])
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a floating tensor"):
        shapley_masked_batch([x, torch.ones(2, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"inputs must have a non-empty batch \(B > 0\), got B = 0"):
        shapley_masked_batch([torch.randn(0, 3), torch.randn(0, 2)])
    with pytest.raises(TypeError, match="inputs must be a list of M tensors"):
        shapley_masked_batch("ab")
    with pytest.raises(ValueError, match=r"inputs.shape\[0\] \(number of modalities\) must be between 2 and 8, got 1"):
        shapley_masked_batch(torch.randn(1, 2, 3))


def test_reference_masked_batch_fill(ref_backend):
    xs = [torch.randn(2, 3), torch.randn(2, 1, 4)]
    fill = [torch.randn(1, 3), torch.randn(1, 4)]  # [1, ...] and [...] (one row of each input)
    out = shapley_masked_batch(xs, fill=fill, include_full=True)  # blocks S = 1, 2, 3
    assert torch.equal(out[0][2:4], fill[0].expand(2, 3)) and torch.equal(out[1][:2], fill[1].expand(2, 1, 4))
    assert torch.equal(out[0][:2], xs[0]) and torch.equal(out[1][2:], torch.cat([xs[1], xs[1]]))
    stacked = shapley_masked_batch(torch.stack([xs[0], xs[0]]), fill=[fill[0], fill[0][0]])
    assert torch.equal(stacked[1][:2], fill[0].expand(2, 3)) and torch.equal(stacked[0][2:], fill[0].expand(2, 3))


def test_masked_batch_fill_validation():
    xs = [torch.randn(2, 3), torch.randn(2, 4)]
    with pytest.raises(TypeError, match="fill must be None or a list of 2 tensors"):
        shapley_masked_batch(xs, fill=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"fill must hold one tensor per modality \(2\), got 1"):
        shapley_masked_batch(xs, fill=[torch.zeros(3)])
    with pytest.raises(TypeError, match=r"fill\[1\] must be a tensor, got float"):
        shapley_masked_batch(xs, fill=[torch.zeros(3), 0.0])
    with pytest.raises(ValueError, match=r"fill\[1\] must have shape \(1, 4\) or \(4,\) .*got \(2, 4\)"):
        shapley_masked_batch(xs, fill=[torch.zeros(3), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match=r"fill\[0\] must have shape .*got \(1, 2\)"):
        shapley_masked_batch(xs, fill=[torch.zeros(1, 2), torch.zeros(4)])
    with pytest.raises(
        TypeError, match=r"fill\[0\] must have the dtype of inputs\[0\] \(torch.float32\), got torch.float64"
    ):
        shapley_masked_batch(xs, fill=[torch.zeros(3, dtype=torch.float64), torch.zeros(4)])
    with pytest.raises(ValueError, match=r"fill\[1\] is on meta but inputs\[1\] is on cpu"):
        shapley_masked_batch(xs, fill=[torch.zeros(3), torch.zeros(4, device="meta")])


def test_masked_batch_noncontiguous_is_copied():
    a = torch.randn(3, 2).t()  # [2, 3] non-contiguous
    out = shapley_masked_batch([a, torch.randn(2, 4)])
    assert torch.equal(out[0][:2], a) and torch.equal(out[0][2:], torch.zeros(2, 3))


def test_responses_validation():
    with pytest.raises(ValueError, match=r"subset_outputs.shape\[0\] must be 2\^M - 1 for M in 2..8 .*got 1"):
        shapley_responses(torch.randn(1, 2, 3))  # M = 1
    with pytest.raises(ValueError, match=r"got 511"):
        shapley_responses(torch.randn(511, 1, 1))  # M = 9
    with pytest.raises(ValueError, match=r"got 4"):
        shapley_responses(torch.randn(4, 2, 3))
    with pytest.raises(ValueError, match=r"subset_outputs must have a non-empty batch \(B > 0\)"):
        shapley_responses(torch.randn(3, 0, 2))
    with pytest.raises(TypeError, match="subset_outputs must be a floating tensor"):
        shapley_responses(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"kappa must hold one value per modality \(2\), got shape \(3,\)"):
        shapley_responses(torch.randn(3, 2), torch.ones(3))
    with pytest.raises(TypeError, match="kappa must be a floating tensor"):
        shapley_responses(torch.randn(3, 2), torch.ones(2, dtype=torch.long))
    with pytest.raises(TypeError, match="kappa must be None or a float tensor"):
        shapley_responses(torch.randn(3, 2), [1.0, 1.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a cross-device argument")
def test_cross_device_arguments():
    with pytest.raises(ValueError, match=r"inputs\[1\] is on cpu but inputs\[0\] is on cuda:0"):
        shapley_masked_batch([torch.randn(2, 3, device="cuda"), torch.randn(2, 3)])
    with pytest.raises(ValueError, match="kappa is on cpu but subset_outputs is on cuda"):
        shapley_responses(torch.randn(3, 2, device="cuda"), torch.ones(2))
