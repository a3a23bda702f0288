"""AGM Shapley forwards on the extension (C++ CPU twins, CUDA in the cuda lane) against mmkernels.reference:
weights, the batched zero-masked inputs, phi and its kappa-modulated backward, M = 2..6 (and 8 for the weights)."""

import pytest
import torch

from mmkernels import reference
from mmkernels._backend import load_ext as _C  # the extension module mmkernels._C
from mmkernels.shapley import shapley_masked_batch, shapley_responses, subset_masks

pytestmark = [pytest.mark.ext, pytest.mark.backend("ext")]


@pytest.mark.parametrize("M", range(2, 9))
def test_weights_match_reference(M):
    w = _C().shapley_weights(M)
    torch.testing.assert_close(w, reference.shapley_weights(M), rtol=0, atol=0)
    assert torch.allclose(w.double().sum(1)[:-1], torch.zeros(2**M - 2, dtype=torch.float64), atol=1e-6)  # efficiency
    assert abs(w[-1].double().sum().item() - 1) < 1e-6


def test_subset_order_is_bitmask_order():
    assert subset_masks(2) == [[True, False], [False, True], [True, True]]
    assert subset_masks(3)[4] == [True, False, True]  # S = 5 = 0b101


@pytest.mark.parametrize("M", [2, 3, 4, 5, 6])
def test_masked_batch_matches_reference(device, M):
    torch.manual_seed(M)
    B = 3
    shapes = [(B, 2 + m) if m % 2 else (B, 1, 3, m + 1) for m in range(M)]
    xs = [torch.randn(s, device=device) for s in shapes]
    got = shapley_masked_batch(xs)
    want = reference.shapley_masked_inputs(xs)
    assert len(got) == M
    for g, w in zip(got, want):
        assert g.shape == ((2**M - 2) * B,) + g.shape[1:]
        assert torch.equal(g, w)
    full = shapley_masked_batch(xs, include_full=True)
    for g, w, x in zip(full, want, xs):
        assert torch.equal(g, torch.cat([w, x]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_masked_batch_dtypes_odd_sizes_and_stacked(device, dtype):
    xs = [torch.randn(5, 3, device=device).to(dtype), torch.randn(5, 1, device=device).to(dtype)]  # 2-byte rows
    for g, w in zip(shapley_masked_batch(xs), reference.shapley_masked_inputs(xs)):
        assert g.dtype == dtype and torch.equal(g, w)
    stacked = torch.randn(3, 4, 2, device=device).to(dtype)
    out = shapley_masked_batch(stacked)
    assert out.shape == (3, 6 * 4, 2)
    assert torch.equal(out, torch.stack(reference.shapley_masked_inputs(list(stacked.unbind(0)))))


def test_masked_batch_noncontiguous_and_gradient(device):
    a = torch.randn(6, 4, device=device).t().requires_grad_()  # [4, 6], non-contiguous
    b = torch.randn(4, 2, device=device, requires_grad=True)
    outs = shapley_masked_batch([a, b], include_full=True)  # blocks S = 1, 2, 3
    assert torch.equal(outs[0][:4], a) and torch.equal(outs[0][4:8], torch.zeros_like(a))
    ga, gb = torch.randn_like(outs[0]), torch.randn_like(outs[1])
    torch.autograd.backward(outs, [ga, gb])
    torch.testing.assert_close(a.grad, ga[:4] + ga[8:])  # blocks S = 1 and 3 keep modality 0
    torch.testing.assert_close(b.grad, gb[4:8] + gb[8:])  # blocks S = 2 and 3 keep modality 1


@pytest.mark.parametrize("M", [2, 3, 5])
def test_masked_batch_fill_matches_reference(device, M):
    """fill: muted rows of modality m hold fill[m] ([1, ...] or [...]), bit-equal to the reference, with gradients."""
    torch.manual_seed(20 + M)
    B = 3
    shapes = [(B, 2 + m) if m % 2 else (B, 1, 3, m + 1) for m in range(M)]
    xs = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
    fill = [
        torch.randn((1,) + s[1:] if m % 2 else s[1:], device=device, requires_grad=True) for m, s in enumerate(shapes)
    ]
    got = shapley_masked_batch(xs, fill=fill)
    xr = [x.detach().clone().requires_grad_() for x in xs]
    fr = [f.detach().clone().requires_grad_() for f in fill]
    want = reference.shapley_masked_inputs(xr, fr)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    gs = [torch.randn_like(g) for g in got]
    torch.autograd.backward(got, gs)
    torch.autograd.backward(want, gs)
    for a, b in zip(xs + fill, xr + fr):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    full = shapley_masked_batch([x.detach() for x in xs], fill=[f.detach() for f in fill], include_full=True)
    for g, w, x in zip(full, want, xs):
        assert torch.equal(g, torch.cat([w.detach(), x.detach()]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_masked_batch_fill_dtypes_odd_sizes(device, dtype):
    xs = [torch.randn(5, 3, device=device).to(dtype), torch.randn(5, 1, device=device).to(dtype)]  # 2-byte rows
    fill = [torch.randn(1, 3, device=device).to(dtype), torch.randn(1, device=device).to(dtype)]
    for g, w in zip(shapley_masked_batch(xs, fill=fill), reference.shapley_masked_inputs(xs, fill)):
        assert g.dtype == dtype and torch.equal(g, w)
    big = [
        torch.randn(7, 3000, device=device).to(dtype),
        torch.randn(7, 5, device=device).to(dtype),
    ]  # > one copy chunk
    big_fill = [torch.randn(3000, device=device).to(dtype), torch.randn(1, 5, device=device).to(dtype)]
    for g, w in zip(
        shapley_masked_batch(big, fill=big_fill, include_full=True), reference.shapley_masked_inputs(big, big_fill)
    ):
        assert torch.equal(g[: w.shape[0]], w)


def test_masked_batch_fill_gradcheck(device):
    """fp64 gradcheck of the ext op in inputs AND fill (fill[m]'s gradient: the sum over its muted rows)."""
    kw = dict(device=device, dtype=torch.float64, requires_grad=True)
    a, b, c = torch.randn(2, 3, **kw), torch.randn(2, 1, 2, **kw), torch.randn(2, 2, **kw)
    fa, fb, fc = torch.randn(1, 3, **kw), torch.randn(1, 2, **kw), torch.randn(1, 2, **kw)

    def op(a, b, c, fa, fb, fc):
        return tuple(shapley_masked_batch([a, b, c], fill=[fa, fb, fc]))

    assert torch.autograd.gradcheck(op, (a, b, c, fa, fb, fc))
    assert torch.autograd.gradcheck(
        lambda a, b, fa, fb: tuple(shapley_masked_batch([a, b], fill=[fa, fb], include_full=True)), (a, c, fa, fc)
    )


@pytest.mark.parametrize("M", [2, 3, 4, 5, 6])
def test_responses_and_gradient_match_reference(device, M):
    torch.manual_seed(10 + M)
    S, B, C = 2**M - 1, 4, 5
    v = torch.randn(S, B, C, device=device, requires_grad=True)
    phi = shapley_responses(v)
    v_ref = v.detach().clone().requires_grad_()
    phi_ref = reference.shapley_combine(v_ref)
    torch.testing.assert_close(phi, phi_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(phi.sum(0), v[-1], rtol=1e-5, atol=1e-5)  # efficiency: sum_m phi_m = f(all)
    g = torch.randn_like(phi)
    phi.backward(g)
    phi_ref.backward(g)
    torch.testing.assert_close(v.grad, v_ref.grad, rtol=1e-5, atol=1e-6)  # kappa None: the exact gradient

    # kappa: the loss on sum_m phi_m = f(all); subset S receives c(S) g
    kappa = torch.rand(M, device=device) + 0.5
    v2 = v.detach().clone().requires_grad_()
    g2 = torch.randn(B, C, device=device)
    shapley_responses(v2, kappa).sum(0).backward(g2)
    c = reference.shapley_subset_grad_scale(kappa)
    torch.testing.assert_close(v2.grad, c.view(S, 1, 1) * g2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_responses_dtypes(device, dtype):
    v = torch.randn(7, 3, 2, 2, device=device).to(dtype).requires_grad_()
    phi = shapley_responses(v)
    assert phi.dtype == dtype and phi.shape == (3, 3, 2, 2)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-12)
    torch.testing.assert_close(phi, reference.shapley_combine(v.detach()), rtol=tol, atol=tol)
    phi.backward(torch.ones_like(phi))
    assert v.grad.dtype == dtype
    # all-ones grad_phi: subset S gets sum_m w_m(S) = 1 for the full set, 0 otherwise
    want = torch.zeros_like(v.grad)
    want[-1] = 1
    torch.testing.assert_close(v.grad, want, rtol=tol, atol=tol)


def test_responses_gradcheck(device):
    v = torch.randn(7, 2, 3, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: shapley_responses(t), (v,))


def test_custom_ops_opcheck(device):
    v = torch.randn(7, 2, 3, device=device, requires_grad=True)
    torch.library.opcheck(
        torch.ops.mmkernels.shapley_responses.default,
        (v, None),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    xs = [torch.randn(2, 3, device=device, requires_grad=True), torch.randn(2, 5, device=device, requires_grad=True)]
    torch.library.opcheck(
        torch.ops.mmkernels.shapley_masked_batch.default,
        (xs, 2),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    fill = [torch.randn(1, 3, device=device, requires_grad=True), torch.randn(5, device=device, requires_grad=True)]
    torch.library.opcheck(
        torch.ops.mmkernels.shapley_masked_batch.default,
        (xs, 3, fill),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    assert str(torch.ops.mmkernels.shapley_masked_batch.default._schema) == (
        "mmkernels::shapley_masked_batch(Tensor[] inputs, SymInt num_blocks, Tensor[]? fill=None) -> Tensor[]"
    )


def test_raw_ops_reject_bad_input(device):
    C = _C()
    x = torch.randn(2, 3, device=device)
    with pytest.raises(RuntimeError, match=r"inputs\[1\] must have batch size 2"):
        C.shapley_masked_batch([x, torch.randn(3, 3, device=device)], 2)
    with pytest.raises(RuntimeError, match="inputs must hold between 2 and 8 modalities, got 1"):
        C.shapley_masked_batch([x], 0)
    with pytest.raises(RuntimeError, match="inputs must hold between 2 and 8 modalities, got 9"):
        C.shapley_masked_batch([x] * 9, 510)
    with pytest.raises(RuntimeError, match=r"inputs\[1\] must be contiguous"):
        C.shapley_masked_batch([x, torch.randn(3, 2, device=device).t()], 2)
    with pytest.raises(RuntimeError, match="num_blocks must be"):
        C.shapley_masked_batch([x, x], 5)
    f = torch.zeros(3, device=device)
    with pytest.raises(RuntimeError, match=r"fill must hold one tensor per modality \(2\), got 1"):
        C.shapley_masked_batch([x, x], 2, [f])
    with pytest.raises(RuntimeError, match=r"fill\[1\] must have shape \[1, ...\] or \[...\]"):
        C.shapley_masked_batch([x, x], 2, [f, torch.zeros(2, 3, device=device)])
    with pytest.raises(RuntimeError, match=r"fill\[0\] must have the dtype of inputs\[0\]"):
        C.shapley_masked_batch([x, x], 2, [f.double(), f])
    with pytest.raises(RuntimeError, match=r"fill\[1\] must be contiguous"):
        C.shapley_masked_batch([x, x], 2, [f, torch.zeros(3, 2, device=device)[:, 0].unsqueeze(0)])
    with pytest.raises(RuntimeError, match=r"subset_outputs.shape\[0\] must be 2\^M - 1"):
        C.shapley_responses(torch.randn(4, 2, 3, device=device))
    with pytest.raises(RuntimeError, match=r"subset_outputs.shape\[0\] must be 2\^M - 1"):
        C.shapley_responses(torch.randn(1, 2, 3, device=device))  # M = 1
    with pytest.raises(RuntimeError, match="subset_outputs must have a non-empty batch"):
        C.shapley_responses(torch.randn(3, 0, 3, device=device))
    with pytest.raises(TypeError, match="subset_outputs must be float32/float16/bfloat16/float64"):
        C.shapley_responses(torch.ones(3, 2, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="subset_outputs must be contiguous"):
        C.shapley_responses(torch.randn(2, 3, device=device).t())
    with pytest.raises(RuntimeError, match="kappa must hold one value per modality"):
        C.shapley_responses_backward(torch.randn(2, 3, device=device), torch.ones(3, device=device), torch.float32)
    if device == "cuda":
        with pytest.raises(RuntimeError, match=r"inputs\[1\] must be on cuda:0"):
            C.shapley_masked_batch([x, torch.randn(2, 3)], 2)
        with pytest.raises(RuntimeError, match=r"fill\[1\] must be on cuda:0"):
            C.shapley_masked_batch([x, x], 2, [torch.zeros(3, device=device), torch.zeros(3)])


def test_batched_muted_forward_equals_sequential_muted_forwards(device):
    """One forward on shapley_masked_batch + shapley_responses (kappa in the backward) gives the loss and the
    parameter gradients of the authors' way: 2^M - 2 separate muted forwards, phi by the Shapley formula, kappa by
    gradient hooks on phi_m."""
    from itertools import combinations
    from math import factorial

    torch.manual_seed(3)
    M, B, C = 3, 5, 4
    encs = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(d, 6), torch.nn.Tanh()) for d in (3, 4, 2)]).to(
        device
    )
    head = torch.nn.Linear(18, C).to(device)
    params = list(encs.parameters()) + list(head.parameters())

    def model(xs):
        return head(torch.cat([e(x) for e, x in zip(encs, xs)], dim=1))

    xs = [torch.randn(B, d, device=device) for d in (3, 4, 2)]
    y = torch.randint(0, C, (B,), device=device)
    kappa = torch.tensor([0.5, 1.0, 2.0], device=device)

    values = torch.cat([model(shapley_masked_batch(xs)), model(xs)]).view(2**M - 1, B, C)
    loss = torch.nn.functional.cross_entropy(shapley_responses(values, kappa).sum(0), y)
    ours = torch.autograd.grad(loss, params)

    vals = {frozenset(range(M)): model(xs)}
    for size in range(1, M):
        for sub in combinations(range(M), size):
            vals[frozenset(sub)] = model([x if m in sub else torch.zeros_like(x) for m, x in enumerate(xs)])
    phis = []
    for m in range(M):
        others = [j for j in range(M) if j != m]
        phi = 0
        for size in range(M):
            w = factorial(size) * factorial(M - size - 1) / factorial(M)
            for rest in combinations(others, size):
                phi = phi + w * (vals[frozenset(rest) | {m}] - (vals[frozenset(rest)] if rest else 0))
        phi.register_hook(lambda g, k=kappa[m]: g * k)
        phis.append(phi)
    loss_ref = torch.nn.functional.cross_entropy(sum(phis), y)
    theirs = torch.autograd.grad(loss_ref, params)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
