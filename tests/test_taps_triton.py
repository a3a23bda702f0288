"""Triton lane: grad_tap's scale kernel and the modality-drop kernel against the reference and autograd."""

import math

import pytest
import torch

from mmkernels import reference as R
from mmkernels.taps import drop_uniforms, grad_tap, modality_drop

pytestmark = [
    pytest.mark.triton,
    pytest.mark.backend("triton"),
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]


# ------------------------------------------------------------------------------------------------ grad_tap
def _layouts(device, dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, 4, 3, generator=g).to(dtype).to(device)
    return {
        "vector": torch.randn(37, generator=g).to(dtype).to(device),
        "contiguous": base,
        "permuted": base.permute(0, 3, 1, 2),  # dense, not contiguous: processed in place order
        "sliced": base[:, ::2, 1:],  # gaps: made contiguous
        "large": torch.randn(3, 5000, generator=g).to(dtype).to(device),  # several programs
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k_kind", ["tensor", "float"])
def test_grad_tap_backward_matches_reference(dtype, k_kind, device):
    k_val = 0.3712
    k = torch.tensor(k_val, device=device) if k_kind == "tensor" else k_val
    for name, feat in _layouts(device, dtype).items():
        leaf = feat.detach().clone().requires_grad_()
        out = grad_tap(leaf, k)
        assert out.data_ptr() == leaf.data_ptr() and out.shape == leaf.shape and out.stride() == leaf.stride()
        assert torch.equal(out, leaf)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
        if name == "permuted":
            g = g.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # a non-contiguous incoming gradient
        if name == "sliced":
            g = torch.zeros(*g.shape[:-1], 2 * g.shape[-1], dtype=dtype, device=device)[..., ::2].copy_(g)
        out.backward(g)
        want = R.grad_tap_backward(g, torch.tensor(k_val))
        assert torch.equal(leaf.grad, want), name


def test_grad_tap_through_a_graph(device):
    torch.manual_seed(0)
    enc = torch.nn.Linear(8, 6).to(device)
    x = torch.randn(16, 8, device=device)
    k = torch.tensor(0.25, device=device)
    feats = enc(x)
    (grad_tap(feats, k).square().sum()).backward()
    tapped = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()
    enc(x).square().sum().backward()
    for a, b in zip(tapped, enc.parameters()):
        torch.testing.assert_close(a, 0.25 * b.grad, rtol=1e-6, atol=1e-7)


def test_grad_tap_fp64_keeps_precision(device):
    x = torch.randn(300, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.tensor(1.0 / 3.0, dtype=torch.float64, device=device)
    g = torch.randn(300, dtype=torch.float64, device=device)
    grad_tap(x, k).backward(g)
    assert torch.equal(x.grad, g * k)


# ------------------------------------------------------------------------------------------- modality_drop
def _features(device, dtype=torch.float32, B=9):
    g = torch.Generator().manual_seed(2)
    shapes = [(B, 5), (B, 2, 3), (B, 1)]
    return [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]


@pytest.mark.parametrize("rescale", ["official", "per_modality", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_drop_matches_reference_forward_and_backward(rescale, dtype, device):
    q = torch.tensor([0.3, 0.6, 0.5], device=device)
    for p_exe in (1.0, 0.5):
        for offset in (0, 5, 2**33 + 17):
            feats = [f.requires_grad_() for f in _features(device, dtype)]
            feats_r = [f.detach().clone().requires_grad_() for f in feats]
            out = modality_drop(feats, q, seed=11, offset=offset, rescale=rescale, p_exe=p_exe)
            u, u_gate = drop_uniforms(11, offset, 3, 9, device)
            want = R.modality_drop_ref(feats_r, q, u, rescale=rescale, execute=bool(u_gate < p_exe))
            grads = [torch.randn_like(o) for o in out]
            torch.autograd.backward(out, grads)
            live = [(w, g) for w, g in zip(want, grads) if w.requires_grad]
            if live:
                torch.autograd.backward([w for w, _ in live], [g for _, g in live])
            tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else dict(rtol=1e-6, atol=1e-7)
            for o, w in zip(out, want):
                assert o.dtype == dtype and o.shape == w.shape
                torch.testing.assert_close(o, w, **tol)
            for f, fr, g in zip(feats, feats_r, grads):
                expected = fr.grad if fr.grad is not None else g  # the reference returns the inputs when not executed
                torch.testing.assert_close(f.grad, expected, **tol)


def test_drop_stacked_noncontiguous_input(device):
    base = torch.randn(4, 3, 16, device=device)  # [B, M, D] buffer
    x = base.permute(1, 0, 2).requires_grad_()  # [M, B, D] view, not contiguous
    q = torch.tensor([0.2, 0.5, 0.7], device=device)
    out = modality_drop(x, q, seed=3, offset=100, rescale="per_modality")
    assert isinstance(out, torch.Tensor) and out.shape == x.shape
    u, _ = drop_uniforms(3, 100, 3, 4, device)
    want = torch.stack(R.modality_drop_ref(x.detach(), q, u, rescale="per_modality"))
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(x.grad, torch.stack(R.modality_drop_ref(g, q, u, rescale="per_modality")))


def test_drop_q_is_detached_and_eval_is_identity(device):
    feats = _features(device)
    q = torch.tensor([0.4, 0.4, 0.4], device=device, requires_grad=True)
    out = modality_drop([f.requires_grad_() for f in feats], q, seed=1, offset=0)
    sum(o.sum() for o in out).backward()
    assert q.grad is None
    same = modality_drop(feats, q, seed=1, offset=0, training=False)
    assert all(a is b for a, b in zip(same, feats))


def test_drop_reproducible_and_offset_sensitive(device):
    feats = _features(device, B=64)
    q = torch.tensor([0.5, 0.5, 0.5], device=device)
    a = modality_drop(feats, q, seed=7, offset=1000)
    b = modality_drop(feats, q, seed=7, offset=1000)
    c = modality_drop(feats, q, seed=7, offset=1000 + 3 * 64 + 1)
    d = modality_drop(feats, q, seed=8, offset=1000)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not all(torch.equal(x, y) for x, y in zip(a, d))


def _binomial_ok(count, n, p, z=5.0):
    sd = math.sqrt(n * p * (1 - p))
    return abs(count - n * p) <= z * sd + 1


def test_drop_statistics_and_never_all_dropped(device):
    B = 4000
    q_list = [0.3, 0.6, 0.8]
    q = torch.tensor(q_list, device=device)
    feats = [torch.ones(B, 1, device=device) for _ in q_list]
    p_all = math.prod(q_list)
    for seed in (0, 1):
        out = modality_drop(feats, q, seed=seed, offset=0, rescale="none")
        kept = torch.stack([o[:, 0] != 0 for o in out])  # [M, B]
        assert kept.any(dim=0).all()  # a sample never loses every modality
        fallback = kept.all(dim=0)
        for m, qm in enumerate(q_list):
            # P(m dropped) = q_m - P(all drawn dropped), since the all-dropped rows keep everything
            assert _binomial_ok(int((~kept[m]).sum()), B, qm - p_all), (seed, m)
        # P(all kept) = P(all drawn kept) + P(all drawn dropped)
        p_keep_all = math.prod(1 - v for v in q_list) + p_all
        assert _binomial_ok(int(fallback.sum()), B, p_keep_all), seed


def test_drop_p_exe_gate_frequency(device):
    feats = [torch.ones(4, 1, device=device), torch.ones(4, 1, device=device)]
    q = torch.tensor([0.5, 0.5], device=device)
    n, executed = 120, 0
    for call in range(n):
        out = modality_drop(feats, q, seed=5, offset=call * 9, rescale="per_modality", p_exe=0.6)
        executed += int(not all(torch.equal(o, f) for o, f in zip(out, feats)))  # executed -> rows become 0 or 2
    assert _binomial_ok(executed, n, 0.6), executed
