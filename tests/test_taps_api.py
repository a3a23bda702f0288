"""Reference lane: grad_tap and modality_drop validation, dispatch, CPU autograd, torch.compile."""

import pytest
import torch

from mmkernels import reference as R
from mmkernels.taps import drop_uniforms, grad_tap, modality_drop

pytestmark = pytest.mark.backend(None)


def test_grad_tap_cpu_view_and_backward():
    x = torch.randn(4, 3, requires_grad=True)
    for k in (torch.tensor(0.5), 0.5, torch.tensor([0.5], dtype=torch.float64)):
        out = grad_tap(x, k)
        assert out.data_ptr() == x.data_ptr() and torch.equal(out, x)
        g = torch.randn(4, 3)
        x.grad = None
        out.backward(g)
        assert torch.equal(x.grad, R.grad_tap_backward(g, 0.5))


def test_grad_tap_k_not_differentiated():
    x = torch.randn(4, 3, requires_grad=True)
    k = torch.tensor(0.3, requires_grad=True)
    grad_tap(x, k).sum().backward()
    assert k.grad is None and torch.allclose(x.grad, torch.full((4, 3), 0.3))


@pytest.mark.parametrize(
    "k, exc, match",
    [
        (torch.tensor([1.0, 2.0]), ValueError, "one value"),
        (torch.tensor(1), TypeError, "floating"),
        ("0.5", TypeError, "finite number"),
        (float("inf"), TypeError, "finite number"),
    ],
)
def test_grad_tap_validation(k, exc, match):
    with pytest.raises(exc, match=match):
        grad_tap(torch.randn(3, 2), k)


def test_grad_tap_rejects_bad_feature():
    with pytest.raises(TypeError, match="feature must be a floating"):
        grad_tap(torch.ones(3, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="batch dimension"):
        grad_tap(torch.tensor(1.0), 0.5)


def test_grad_tap_under_torch_compile():
    lin = torch.nn.Linear(5, 4)
    x = torch.randn(6, 5)
    k = torch.tensor(0.25)

    def step(inp, kk):
        return grad_tap(lin(inp), kk).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(x, k).backward()
    got = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad()
    lin(x).square().sum().backward()
    for a, p in zip(got, lin.parameters()):
        torch.testing.assert_close(a, 0.25 * p.grad)


def test_custom_ops_have_fake_impls():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        g = torch.empty(4, 3)
        assert torch.ops.mmkernels.grad_scale(g, torch.empty(()), 1.0).shape == (4, 3)
        x = torch.empty(1, 4, 3)
        out = torch.ops.mmkernels.modality_drop_apply(x, torch.empty(2), 0, 0, 0, [3, 3], 0, 1.0)
        assert out.shape == (1, 4, 3)


def _feats():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, generator=g), torch.randn(8, 2, 2, generator=g)]


def test_drop_reference_path_matches_its_uniforms_and_autograd():
    feats = [f.requires_grad_() for f in _feats()]
    q = torch.tensor([0.4, 0.7])
    out = modality_drop(feats, q, seed=3, offset=11, rescale="official", p_exe=1.0)
    u, u_gate = drop_uniforms(3, 11, 2, 8)
    want = R.modality_drop_ref([f.detach() for f in feats], q, u, rescale="official")
    for o, w in zip(out, want):
        assert torch.equal(o, w)
    sum((o * (i + 1)).sum() for i, o in enumerate(out)).backward()
    for i, (f, w) in enumerate(zip(feats, want)):
        mask_scale = torch.where(w != 0, w / f.detach(), torch.zeros_like(w))
        torch.testing.assert_close(f.grad, (i + 1) * mask_scale)


def test_drop_reference_path_reproducible_stacked_and_eval():
    x = torch.randn(3, 10, 4)
    q = torch.tensor([0.5, 0.5, 0.5])
    a = modality_drop(x, q, seed=1, offset=0)
    b = modality_drop(x, q, seed=1, offset=0)
    assert isinstance(a, torch.Tensor) and torch.equal(a, b) and not torch.equal(a, x)
    assert modality_drop(x, q, seed=1, offset=0, training=False) is x
    assert modality_drop(x, q, seed=1, offset=0, p_exe=0.0) is x
    kept = (a != 0).any(dim=-1)
    assert kept.any(dim=0).all()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(q=torch.tensor([0.5])), ValueError, "q must be a float tensor of 2"),
        (dict(q=[0.5, 1.5]), ValueError, "probabilities in"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(offset=1.5), ValueError, "offset"),
        (dict(rescale="global"), ValueError, "rescale must be one of"),
        (dict(p_exe=2.0), ValueError, "p_exe"),
    ],
)
def test_drop_validation(kwargs, exc, match):
    args = dict(q=torch.tensor([0.5, 0.5]), seed=0, offset=0)
    args.update(kwargs)
    q = args.pop("q")
    with pytest.raises(exc, match=match):
        modality_drop(_feats(), q, **args)


def test_drop_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="batch size"):
        modality_drop([torch.randn(4, 2), torch.randn(5, 2)], [0.5, 0.5], seed=0, offset=0)
    with pytest.raises(ValueError, match="number of modalities"):
        modality_drop([torch.randn(4, 2)], [0.5], seed=0, offset=0)
