"""mmkernels.noise at the public boundary (reference lane): argument validation (backend-independent, before any
dispatch) and the reference backend (MMKERNELS_BACKEND=reference: the reference's Philox transcription and math)."""

import math

import pytest
import torch

from mmkernels import reference
from mmkernels.noise import cov_noise_normals, cov_noise_tap, ge_isotropic_, sample_cov_noise


@pytest.fixture
def ref_backend(monkeypatch):
    monkeypatch.setenv("MMKERNELS_BACKEND", "reference")


def test_reference_tap_uses_the_reference_math(ref_backend):
    x = torch.randn(8, 3, requires_grad=True)
    k = torch.tensor(0.6)
    y = cov_noise_tap(x, k, sigma=0.5, seed=3, offset=4)
    assert torch.equal(y, x) and y.data_ptr() == x.data_ptr()
    g = torch.randn(8, 3)
    y.backward(g)
    z = cov_noise_normals(8, seed=3, offset=4)
    torch.testing.assert_close(x.grad, reference.cov_noise_tap_backward(g, k, z, sigma=0.5))
    x.grad = None
    cov_noise_tap(x, k, sigma=0.5, seed=3, offset=4).backward(g)  # reproducible
    torch.testing.assert_close(x.grad, reference.cov_noise_tap_backward(g, k, z, sigma=0.5), rtol=0, atol=0)


def test_reference_tap_with_number_k_and_zero_sigma(ref_backend):
    x = torch.randn(5, 2, requires_grad=True)
    cov_noise_tap(x, 0.25, sigma=0.0, seed=0, offset=0).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.25))


def test_reference_sample_cov_noise(ref_backend):
    G = torch.randn(6, 10)
    h = sample_cov_noise(G, seed=1, offset=2)
    z = cov_noise_normals(6, seed=1, offset=2)
    assert h.dtype == torch.float32 and h.shape == (10,)
    torch.testing.assert_close(h, reference.cov_noise_from_per_sample(G, z))
    assert abs(h.sum().item() - ((z - z.mean()) @ G).sum().item() / 6) < 1e-4


def test_reference_ge_isotropic(ref_backend):
    grads = [torch.randn(4, 5), torch.randn(7)]
    orig = [g.clone() for g in grads]
    out = ge_isotropic_(grads, torch.tensor([0.5, 2.0]), seed=9, offset=0)
    assert out[0] is grads[0]
    again = [g.clone() for g in orig]
    ge_isotropic_(again, torch.tensor([0.5, 2.0]), seed=9, offset=0)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))
    # group_index: k [G] picked per tensor
    grouped = [g.clone() for g in orig]
    ge_isotropic_(grouped, torch.tensor([2.0, 0.5]), seed=9, offset=0, group_index=[1, 0])
    assert all(torch.equal(a, b) for a, b in zip(grads, grouped))
    # k = 0: what remains is (std + 1e-8) * n with n ~ N(0, 1)
    big = [torch.randn(40_000) * 3]
    ge_isotropic_(big, [0.0], seed=1, offset=0)
    n = big[0] / 3
    assert abs(n.mean().item()) < 5 / math.sqrt(40_000) * 1.1 and abs(n.std().item() - 1) < 0.05


# --------------------------------------------------------------------------------------------- validation
def test_tap_validation():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="feature must be a floating tensor"):
        cov_noise_tap(torch.ones(4, 3, dtype=torch.long), 1.0, seed=0, offset=0)
    with pytest.raises(ValueError, match=r"feature must have shape \[B, ...\] with B > 0, got shape \(0, 3\)"):
        cov_noise_tap(torch.randn(0, 3), 1.0, seed=0, offset=0)
    with pytest.raises(ValueError, match="k must hold one value"):
        cov_noise_tap(x, torch.ones(2), seed=0, offset=0)
    with pytest.raises(TypeError, match="k must be a floating tensor or a number"):
        cov_noise_tap(x, torch.ones((), dtype=torch.long), seed=0, offset=0)
    with pytest.raises(TypeError, match="k must be a finite number"):
        cov_noise_tap(x, float("nan"), seed=0, offset=0)
    with pytest.raises(ValueError, match="sigma must be a non-negative number, got -1"):
        cov_noise_tap(x, 1.0, sigma=-1.0, seed=0, offset=0)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\), got -1"):
        cov_noise_tap(x, 1.0, seed=-1, offset=0)
    with pytest.raises(ValueError, match=r"offset must be an int in \[0, 2\*\*63\), got 1.5"):
        cov_noise_tap(x, 1.0, seed=0, offset=1.5)
    with pytest.raises(TypeError):
        cov_noise_tap(x, 1.0)  # seed and offset are required keywords


def test_sample_cov_noise_validation():
    with pytest.raises(ValueError, match=r"per_sample_grads must have shape \[B, P\] with B > 0, got shape \(3,\)"):
        sample_cov_noise(torch.randn(3), seed=0, offset=0)
    with pytest.raises(ValueError, match=r"got shape \(0, 4\)"):
        sample_cov_noise(torch.randn(0, 4), seed=0, offset=0)
    with pytest.raises(TypeError, match="per_sample_grads must be a floating tensor"):
        sample_cov_noise(torch.ones(3, 4, dtype=torch.int32), seed=0, offset=0)


def test_ge_validation():
    g = [torch.randn(3), torch.randn(4)]
    with pytest.raises(TypeError, match="grads must be a list of gradient tensors"):
        ge_isotropic_(torch.randn(3), torch.ones(1), seed=0, offset=0)
    with pytest.raises(TypeError, match=r"grads\[1\] is None"):
        ge_isotropic_([torch.randn(3), None], torch.ones(2), seed=0, offset=0)
    with pytest.raises(TypeError, match=r"grads\[0\] must be a floating tensor"):
        ge_isotropic_([torch.ones(3, dtype=torch.long)], torch.ones(1), seed=0, offset=0)
    with pytest.raises(ValueError, match=r"grads\[1\] must be contiguous \(it is updated in place\)"):
        ge_isotropic_([torch.randn(3), torch.randn(4, 5).t()], torch.ones(2), seed=0, offset=0)
    with pytest.raises(
        ValueError, match=r"k must hold one value per tensor \(2\) when group_index is not given, got 3"
    ):
        ge_isotropic_(g, torch.ones(3), seed=0, offset=0)
    with pytest.raises(ValueError, match=r"group_index must have one entry per tensor \(2\), got 1"):
        ge_isotropic_(g, torch.ones(2), seed=0, offset=0, group_index=[0])
    with pytest.raises(ValueError, match=r"group_index entries must be in \[0, 2\) \(k has 2 values\), got 5"):
        ge_isotropic_(g, torch.ones(2), seed=0, offset=0, group_index=[0, 5])
    with pytest.raises(TypeError, match="k must be a floating tensor, got dtype torch.int64"):
        ge_isotropic_(g, torch.ones(2, dtype=torch.long), seed=0, offset=0)
    with pytest.raises(ValueError, match="seed must be an int"):
        ge_isotropic_(g, torch.ones(2), seed=2**63, offset=0)
    assert ge_isotropic_([], torch.ones(0), seed=0, offset=0) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a cross-device argument")
def test_cross_device_arguments():
    with pytest.raises(ValueError, match="k is on cpu but feature is on cuda"):
        cov_noise_tap(torch.randn(3, 2, device="cuda"), torch.tensor(1.0), seed=0, offset=0)
    with pytest.raises(ValueError, match=r"grads\[1\] is on cpu but grads\[0\] is on cuda:0"):
        ge_isotropic_([torch.randn(3, device="cuda"), torch.randn(3)], torch.ones(2, device="cuda"), seed=0, offset=0)
