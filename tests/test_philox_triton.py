"""Triton lane: the reference's transcription of tl.rand (mmkernels.reference.philox_uniforms_triton) gives the Triton
kernel's uniforms bit for bit, so modality_drop on MMKERNELS_BACKEND=reference equals the Triton backend's drop."""

import pytest
import torch

from mmkernels import reference as R
from mmkernels.taps import drop_uniforms, modality_drop
from test_philox_reference import STREAMS

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")]


@pytest.mark.backend("triton")
@pytest.mark.parametrize("seed,offset", STREAMS[:4] + [(2**31 + 5, 2**31 - 10)])
def test_reference_uniforms_equal_tritons(seed, offset, device):
    m, b = 3, 700  # 2101 positions: several kernel programs; (2^40 + 7, 2^32 - 3) crosses the counter carry
    u, u_gate = drop_uniforms(seed, offset, m, b, device)
    ref = R.philox_uniforms_triton(seed, offset, m * b + 1, device)
    assert ref.device == u.device and ref.dtype == u.dtype == torch.float32
    assert torch.equal(u.flatten(), ref[:-1]) and torch.equal(u_gate, ref[-1])


def _drop(monkeypatch, backend, feats, q, **kw):
    monkeypatch.setenv("MMKERNELS_BACKEND", backend)
    leaves = [f.detach().clone().requires_grad_() for f in feats]
    out = modality_drop(leaves, q, **kw)
    torch.autograd.backward(out, [torch.full_like(o, float(j + 1)) for j, o in enumerate(out)])
    return out, [f.grad for f in leaves]


@pytest.mark.parametrize("rescale", ["official", "per_modality", "none"])
@pytest.mark.parametrize("p_exe", [1.0, 0.5])
def test_reference_drop_equals_triton_drop(monkeypatch, rescale, p_exe, device):
    """The same mask and gate from the same uniforms; the values bit-equal under the interpreter (on CUDA the
    kernel's fp32 division of the rescale may differ from IEEE division in the last bit)."""
    g = torch.Generator().manual_seed(4)
    feats = [torch.randn(s, generator=g).to(device) for s in [(16, 5), (16, 2, 3), (16, 1)]]
    q = torch.tensor([0.3, 0.6, 0.5], device=device)
    kw = dict(seed=11, offset=2**32 - 20, rescale=rescale, p_exe=p_exe)
    out_t, grad_t = _drop(monkeypatch, "triton", feats, q, **kw)
    out_r, grad_r = _drop(monkeypatch, "reference", feats, q, **kw)
    if p_exe == 1.0:
        dropped = torch.stack([(o == 0).flatten(1).all(dim=1) for o in out_t])  # [M, B]
        assert dropped.any() and not dropped.all()  # the case exercises the mask
    for a, b in zip(out_r + grad_r, out_t + grad_t):
        assert torch.equal(a == 0, b == 0)
        if device == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
