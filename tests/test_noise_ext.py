"""Covariance-noise tap, sample_cov_noise and ge_isotropic_ on the extension (C++ CPU twins, CUDA in the cuda lane):
parity with mmkernels.reference given the same normals, determinism, noise statistics, the authors' GE loop."""

import math

import pytest
import torch

from mmkernels import reference
from mmkernels._backend import load_ext as _C  # the extension module mmkernels._C
from mmkernels.noise import cov_noise_normals, cov_noise_tap, ge_isotropic_, sample_cov_noise

pytestmark = [pytest.mark.ext, pytest.mark.backend("ext")]


def z_for(batch, seed, offset, device):
    return _C().philox_normals(seed, offset, batch, torch.device(device))[:, 0]


def ge_normals(numels, seed, offset, device):
    """The documented GE layout: element j of tensor t is slot (base_t + j) % 4 of counter offset + (base_t + j) //
    4."""
    out, base = [], 0
    for n in numels:
        count = (n + 3) // 4
        z = _C().philox_normals(seed, offset + base // 4, count, torch.device(device)).flatten()[:n]
        out.append(z)
        base += 4 * count
    return out


# ------------------------------------------------------------------------------------------------ covariance tap
@pytest.mark.parametrize("shape", [(1, 3), (5, 7), (16, 3, 2, 2), (33, 1), (8, 4097)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_tap_backward_matches_reference(device, shape, dtype):
    torch.manual_seed(0)
    g = torch.randn(shape, device=device).to(dtype)
    k = torch.tensor(0.7, device=device)
    got = torch.ops.mmkernels.cov_noise_tap_backward(g, k, 0.5, 42, 1000)
    z = z_for(shape[0], 42, 1000, device)
    want = reference.cov_noise_tap_backward(g, k, z, sigma=0.5)
    assert got.dtype == dtype and got.shape == g.shape
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dtype, 1e-6)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_tap_is_identity_forward_and_scales_rows(device):
    x = torch.randn(6, 5, device=device, requires_grad=True)
    y = cov_noise_tap(x, torch.tensor(2.0, device=device), sigma=0.3, seed=1, offset=7)
    assert y.data_ptr() == x.data_ptr() and torch.equal(y, x)  # a view, nothing copied
    g = torch.randn(6, 5, device=device)
    y.backward(g)
    z = z_for(6, 1, 7, device)
    factor = 2.0 + 0.3 * (z - z.mean())
    torch.testing.assert_close(x.grad, g * factor[:, None], rtol=1e-6, atol=1e-6)
    assert torch.allclose((x.grad / g).std(dim=1), torch.zeros(6, device=device), atol=1e-5)  # one factor per row


def test_tap_determinism_and_offsets(device):
    g = torch.randn(64, 9, device=device)
    k = torch.tensor(1.0, device=device)
    op = torch.ops.mmkernels.cov_noise_tap_backward
    a, b = op(g, k, 1.0, 5, 0), op(g, k, 1.0, 5, 0)
    assert torch.equal(a, b)  # same seed and offset: same bits
    c = op(g, k, 1.0, 5, 64)
    d = op(g, k, 1.0, 6, 0)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    fa, fc = (a / g)[:, 0], (c / g)[:, 0]
    assert abs(torch.corrcoef(torch.stack([fa, fc]))[0, 1].item()) < 0.5  # non-overlapping counters: unrelated


def test_tap_bits_same_on_cpu_and_device(device):
    g = torch.randn(50, 31)
    k = torch.tensor(0.9)
    cpu = torch.ops.mmkernels.cov_noise_tap_backward(g, k, 1.0, 3, 9)
    dev = torch.ops.mmkernels.cov_noise_tap_backward(g.to(device), k.to(device), 1.0, 3, 9).cpu()
    torch.testing.assert_close(cpu, dev, rtol=1e-6, atol=1e-7)


def test_tap_noncontiguous_grad_and_k_dtype(device):
    g = torch.randn(7, 10, device=device).t()  # [10, 7] non-contiguous
    out = torch.ops.mmkernels.cov_noise_tap_backward(
        g, torch.tensor(1.5, dtype=torch.float64, device=device), 1.0, 0, 0
    )
    z = z_for(10, 0, 0, device)
    torch.testing.assert_close(out, g * (1.5 + (z - z.mean()))[:, None], rtol=1e-6, atol=1e-6)


def test_tap_double_backward(device):
    x = torch.randn(4, 3, device=device, dtype=torch.float64, requires_grad=True)
    k = torch.tensor(0.5, device=device)
    (gx,) = torch.autograd.grad(cov_noise_tap(x, k, seed=0, offset=0).pow(2).sum(), x, create_graph=True)
    (gxx,) = torch.autograd.grad(gx.sum(), x)
    z = z_for(4, 0, 0, device).double()
    f = (0.5 + (z - z.mean()))[:, None]
    # gx = f * 2 tap(x); differentiating again passes through the tap's backward (f) and the backward op (f)
    torch.testing.assert_close(gxx, 2 * f * f * torch.ones_like(x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- covariance of the noise
class _Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.out = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)))


def _per_sample_grads(model, x, y):
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in params], dim=1)  # [B, P]


def test_tap_noise_is_batch_covariance_noise(device):
    """Tap gradient = k * mean gradient + (z - z_bar)^T G / B (docs/methods/ogm_ge.md), with G the per-sample gradients
    of the
    encoder (torch.func); and that noise h has mean 0 and covariance U_hat / B (TPAMI Eq. 16)."""
    torch.manual_seed(0)
    B = 16
    model = _Encoder().to(device).double()
    x = torch.randn(B, 3, device=device, dtype=torch.float64)
    y = torch.randint(0, 2, (B,), device=device)
    G = _per_sample_grads(model, x, y)  # [B, P]
    k = torch.tensor(0.8, device=device)
    for offset in (0, B):
        model.zero_grad()
        feat = torch.tanh(model.lin(x))
        out = model.out(cov_noise_tap(feat, k, seed=11, offset=offset))
        torch.nn.functional.cross_entropy(out, y).backward()
        # only the parameters upstream of the tap see the noise: lin.weight, lin.bias (first 16 columns of G)
        tap = torch.cat([model.lin.weight.grad.flatten(), model.lin.bias.grad])
        h = tap - 0.8 * G[:, :16].mean(0)
        # equal up to the fp32 rounding of the row factor k + sigma (z_i - z_bar)
        torch.testing.assert_close(
            h, sample_cov_noise(G[:, :16], seed=11, offset=offset), rtol=0, atol=1e-6 * G.abs().max().item()
        )

    # statistics of h over many draws against U_hat / B, U_hat the (1/B) batch covariance of the per-sample grads
    Gu = G[:, :16]
    N = 3000
    H = torch.stack([sample_cov_noise(Gu, seed=3, offset=j * B) for j in range(N)])  # [N, P]
    Gc = Gu - Gu.mean(0)
    sigma = Gc.t() @ Gc / B / B
    mean_bound = 5 * torch.sqrt(sigma.diagonal() / N)
    assert (H.mean(0).abs() <= mean_bound + 1e-15).all()
    Hc = H - H.mean(0)
    emp = Hc.t() @ Hc / (N - 1)
    sd = torch.sqrt((sigma.diagonal()[:, None] * sigma.diagonal()[None, :] + sigma**2) / N)  # Gaussian entry sd
    assert ((emp - sigma).abs() <= 5 * sd + 1e-15).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_sample_cov_noise_matches_reference(device, dtype):
    G = torch.randn(12, 300, device=device).to(dtype)
    got = sample_cov_noise(G, seed=9, offset=4)
    want = reference.cov_noise_from_per_sample(G, z_for(12, 9, 4, device))
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-6)


def test_cov_noise_normals_are_the_tap_normals(device):
    z = cov_noise_normals(8, seed=4, offset=2, device=device)
    torch.testing.assert_close(z, z_for(8, 4, 2, device), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ ge_isotropic_
def _authors_loop(grads, ks, normals):
    """The authors' OGM-GE loop (docs/methods/ogm_ge.md, "The authors' code"): per tensor, std read back to the host,
    then
    grad * k + N(0, (std + 1e-8)^2); here with our normals in place of torch's draw."""
    out = []
    for g, k, n in zip(grads, ks, normals):
        std = g.float().std().item() + 1e-8  # sync-ok: the loop under test
        out.append((g.float() * k + std * n).to(g.dtype))
    return out


def test_ge_matches_authors_loop(device):
    torch.manual_seed(1)
    shapes = [(64, 3, 3, 3), (7,), (70001,), (2, 2), (5, 1, 3)]
    grads = [torch.randn(s, device=device) * (i + 1) + 0.1 * i for i, s in enumerate(shapes)]
    k = torch.tensor([0.5, 1.0, 0.25, 2.0, 0.0], device=device)
    orig = [g.clone() for g in grads]
    # the statistics pass alone: the unbiased std of each tensor (torch.std in double as the yardstick)
    std = _C().ge_tensor_std(orig)
    torch.testing.assert_close(std, torch.stack([g.double().std().float() for g in orig]), rtol=2e-7, atol=0)
    ge_isotropic_(grads, k, seed=77, offset=123)
    normals = ge_normals([g.numel() for g in orig], 77, 123, device)
    # deterministic part: k * g + (std + 1e-8) * n with the extension's own std: the same bits
    scale = [float(s) + 1e-8 for s in std.tolist()]
    for g, o, kk, s, n in zip(grads, orig, k.tolist(), scale, normals):
        expect = o * torch.tensor(kk, device=device) + torch.tensor(s, dtype=torch.float32, device=device) * n.view_as(
            o
        )
        if device == "cpu":
            assert torch.equal(g, expect)
        else:
            torch.testing.assert_close(g, expect, rtol=1e-6, atol=1e-7)
    # and the authors' loop with the same normals, std from torch: the same up to the std's last bit
    for g, a in zip(grads, _authors_loop(orig, k.tolist(), [n.view_as(o) for n, o in zip(normals, orig)])):
        torch.testing.assert_close(g, a, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings(r"ignore:std\(\):UserWarning")
def test_ge_groups_dtypes_and_edge_sizes(device):
    torch.manual_seed(2)
    grads = [
        torch.randn(10, device=device),
        torch.randn(9, device=device).half(),
        torch.randn(0, device=device),
        torch.randn(5, 5, device=device).bfloat16(),
        torch.randn(1, device=device),
        torch.randn(6, device=device).double(),
    ]
    orig = [g.clone() for g in grads]
    kappa = torch.tensor([0.5, 3.0], device=device)
    groups = [0, 1, 0, 1, 0, 1]
    ge_isotropic_(grads, kappa, seed=5, offset=0, group_index=groups)
    normals = ge_normals([g.numel() for g in orig], 5, 0, device)
    ks = [kappa[i].item() for i in groups]
    want = reference.ge_isotropic(orig, torch.tensor(ks, device=device), [n.view_as(o) for n, o in zip(normals, orig)])
    for t, (g, w) in enumerate(zip(grads, want)):
        assert g.dtype == orig[t].dtype
        # one element: std := 0 (issue 10; torch.std and the authors' loop give NaN), the same as the reference
        tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(g.dtype, 1e-5)
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def test_ge_many_tensors_keep_list_order(device):
    """More tensors than one CUDA launch takes (96), mixed dtypes: the noise layout follows the list order."""
    grads = [
        torch.randn(3 + t % 5, device=device).to(torch.float16 if t % 3 == 0 else torch.float32) for t in range(130)
    ]
    orig = [g.clone() for g in grads]
    k = torch.zeros(130, device=device)  # k = 0: only the noise (std + 1e-8) * n remains
    ge_isotropic_(grads, k, seed=8, offset=3)
    std = _C().ge_tensor_std(orig)
    for g, s, n in zip(grads, std.tolist(), ge_normals([g.numel() for g in orig], 8, 3, device)):
        tol = 2e-3 if g.dtype == torch.float16 else 1e-6
        torch.testing.assert_close(g.float(), ((s + 1e-8) * n).to(g.dtype).float(), rtol=tol, atol=tol)


def test_ge_noise_statistics_and_determinism(device):
    g0 = torch.randn(200_000, device=device) * 3
    a, b, c = g0.clone(), g0.clone(), g0.clone()
    zero = torch.zeros(1, device=device)
    ge_isotropic_([a], zero, seed=1, offset=0)
    ge_isotropic_([b], zero, seed=1, offset=0)
    ge_isotropic_([c], zero, seed=1, offset=50_000)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    n = (a / (g0.std() + 1e-8)).double()
    N = n.numel()
    assert abs(n.mean().item()) < 5 / math.sqrt(N)
    assert abs(n.std().item() - 1) < 5 / math.sqrt(2 * N)
    assert abs(torch.corrcoef(torch.stack([a, c]).double())[0, 1].item()) < 5 / math.sqrt(N)


def test_ge_is_a_custom_op_with_fake(device):
    grads = [torch.randn(4, 3, device=device), torch.randn(5, device=device)]
    k = torch.ones(2, device=device)
    torch.library.opcheck(
        torch.ops.mmkernels.ge_isotropic_.default, (grads, k, [], 0, 0), test_utils=("test_schema", "test_faketensor")
    )


def test_tap_custom_op_opcheck(device):
    g = torch.randn(6, 4, device=device, requires_grad=True)
    torch.library.opcheck(
        torch.ops.mmkernels.cov_noise_tap_backward.default,
        (g, torch.tensor(1.0, device=device), 1.0, 0, 0),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    G = torch.randn(6, 4, device=device)
    torch.library.opcheck(
        torch.ops.mmkernels.sample_cov_noise.default, (G, 0, 0), test_utils=("test_schema", "test_faketensor")
    )


# ---------------------------------------------------------------------------------------------- bad raw input
def test_raw_ops_reject_bad_input(device):
    C = _C()
    k = torch.tensor(1.0, device=device)
    with pytest.raises(RuntimeError, match="grad must be contiguous"):
        C.cov_noise_tap_backward(torch.randn(4, 6, device=device).t(), k, 1.0, 0, 0)
    with pytest.raises(TypeError, match="grad must be float32/float16/bfloat16/float64, got Long"):
        C.cov_noise_tap_backward(torch.ones(4, 3, dtype=torch.long, device=device), k, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match=r"grad must have shape \[B, ...\] with B > 0"):
        C.cov_noise_tap_backward(torch.randn(0, 3, device=device), k, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="k must hold one value"):
        C.cov_noise_tap_backward(torch.randn(4, 3, device=device), torch.ones(2, device=device), 1.0, 0, 0)
    with pytest.raises(RuntimeError, match=r"per_sample_grads must have shape \[B, P\]"):
        C.sample_cov_noise(torch.randn(3, device=device), 0, 0)
    with pytest.raises(RuntimeError, match=r"grads\[1\] must be contiguous"):
        C.ge_isotropic_(
            [torch.randn(3, device=device), torch.randn(3, 4, device=device).t()],
            torch.ones(2, device=device),
            [],
            0,
            0,
        )
    with pytest.raises(RuntimeError, match="k must hold one value per tensor"):
        C.ge_isotropic_([torch.randn(3, device=device)], torch.ones(2, device=device), [], 0, 0)
    with pytest.raises(RuntimeError, match=r"group_index\[0\] must be in \[0, 2\)"):
        C.ge_isotropic_([torch.randn(3, device=device)], torch.ones(2, device=device), [2], 0, 0)
    if device == "cuda":
        with pytest.raises(RuntimeError, match=r"k must be on cuda:0 \(the device of grad\), got cpu"):
            C.cov_noise_tap_backward(torch.randn(4, 3, device=device), torch.tensor(1.0), 1.0, 0, 0)
        with pytest.raises(RuntimeError, match=r"grads\[1\] must be on cuda:0"):
            C.ge_isotropic_([torch.randn(3, device=device), torch.randn(3)], torch.ones(2, device=device), [], 0, 0)


def test_ge_std_of_fewer_than_two_elements_is_zero(device):
    # the header math itself (csrc/noise_math.h), shared by the CPU twin and the CUDA kernel: std := 0, never NaN
    std = _C().ge_tensor_std([torch.randn(1, device=device), torch.randn(3, device=device)])
    assert std[0].item() == 0.0 and torch.isfinite(std).all()
    p = torch.full((1,), 0.25, device=device)
    ge_isotropic_([p], torch.ones(1, device=device), seed=0, offset=0)
    assert torch.isfinite(p).all() and abs(p.item() - 0.25) < 1e-6
