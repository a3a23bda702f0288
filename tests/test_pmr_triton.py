"""Triton lane: the PMR kernels (mmkernels/triton_ops/pmr.py) against the reference (mmkernels/reference/pmr.py), run
with TRITON_INTERPRET=1 on CPU or on CUDA. Forward statistics and loss, the backward, the prototype refresh (one
launch, and accumulate + finalize); odd shapes (B = 1, C = 1, non-power-of-two C and D, several C and D tiles),
non-contiguous features, ignored rows, M from 2 to 8, fp32, fp16 and fp64 (fp32 accumulation), int32 labels."""

import contextlib

import pytest
import torch

from _pmr_cases import check_refresh_skips_nonfinite_rows
from mmkernels import reference as R
from mmkernels.pmr import new_refresh_buffers, pmr_class_sums_, pmr_loss, pmr_refresh_, pmr_update_prototypes_

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")]

CASES = [  # (M, B, C, D): the interpreter's tiles are C 64, D 64 (compiled: 16, 16)
    (2, 1, 1, 1),
    (2, 2, 3, 2),
    (3, 7, 5, 9),
    (5, 33, 70, 20),
    (8, 6, 4, 3),
    (2, 70, 3, 130),
    (4, 17, 31, 17),
]


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MMKERNELS_BACKEND", "triton")


def _inputs(M, B, C, D, device, dtype=torch.float32, seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    sharp = torch.linspace(0.5, 2.0, M).view(M, 1, 1)  # scores differ between modalities (no near-tie flips)
    z = torch.randn(M, B, D, generator=g) * sharp
    P = torch.randn(M, C, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    if layout == "bdm":  # z[m] = storage[:, m, :]: rows strided by M * D
        z = z.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    elif layout == "dmajor":  # unit stride along B
        z = z.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    return z.to(device=device, dtype=dtype), P.to(device), y.to(device)


def _check(z, P, y, *, alpha=0.8, ignore_index=-100, rtol=2e-5, atol=1e-6, grad_tol=None):
    want = R.pmr_forward_ref(z, P, y, alpha=alpha, ignore_index=ignore_index)
    x = z.detach().clone().requires_grad_() if z.is_contiguous() else z.detach().requires_grad_()
    got = pmr_loss(x, P, y, alpha=alpha, ignore_index=ignore_index)
    for key in ("scores", "pce", "ratios", "coefficients", "flag"):
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(
            got[key].cpu(), want[key].cpu(), rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{key}: {m}"
        )
    torch.testing.assert_close(got["loss"].cpu(), want["loss"].float().cpu(), rtol=rtol, atol=atol)
    got["loss"].backward()
    dz = R.pmr_backward_ref(1.0, z, P, y, want["coefficients"], want["count"], ignore_index=ignore_index)
    assert x.grad.dtype == z.dtype
    tol = grad_tol or dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x.grad.cpu(), dz.cpu(), **tol)
    return got


@pytest.mark.parametrize("M,B,C,D", CASES)
def test_forward_backward_parity_fp32(M, B, C, D, device):
    z, P, y = _inputs(M, B, C, D, device, seed=M + B)
    got = _check(z, P, y)
    assert got["coefficients"].ne(0).any() or C == 1  # the rule fired (C = 1: p = 1, every score ties)


@pytest.mark.parametrize("M,B,C,D", [(3, 7, 5, 9), (2, 70, 3, 130)])
def test_parity_fp16(M, B, C, D, device):
    z, P, y = _inputs(M, B, C, D, device, dtype=torch.float16, seed=3)
    _check(z, P, y, rtol=1e-4, atol=1e-5, grad_tol=dict(rtol=2e-3, atol=2e-4))


@pytest.mark.parametrize("layout", ["bdm", "dmajor"])
def test_non_contiguous_features(layout, device):
    z, P, y = _inputs(3, 9, 6, 5, device, layout=layout)
    assert not z.is_contiguous()
    _check(z, P.transpose(1, 2).contiguous().transpose(1, 2), y)  # prototypes with unit stride along C too


def test_ignored_rows_and_custom_ignore_index(device):
    z, P, y = _inputs(3, 20, 7, 6, device, seed=4)
    y[::3] = -1
    got = _check(z, P, y, ignore_index=-1)
    assert got["flag"].item() == 0


def test_worked_example(device):
    P = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [-3.0, -4.0]], [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], device=device)
    z = torch.tensor([[[0.0, 0.0], [3.0, 0.0]], [[0.5, 0.5], [1.0, 0.0]]], device=device, requires_grad=True)
    out = pmr_loss(z, P, torch.tensor([0, 1], device=device), alpha=0.6)
    assert out["loss"].item() == pytest.approx(0.47264, abs=5e-6)
    assert out["coefficients"].tolist() == pytest.approx([0.0, 0.6])
    out["loss"].backward()
    torch.testing.assert_close(z.grad[1, 0].cpu(), torch.tensor([0.6 * 0.23570] * 2), atol=5e-6, rtol=0)
    assert torch.isfinite(z.grad).all()  # d = 0 at z_a,1 and z_v,2: the term is 0, not NaN


def test_flags_and_nonfinite(device):
    z, P, y = _inputs(2, 5, 3, 4, device)
    out = pmr_loss(z, P, torch.full_like(y, -100))
    assert out["flag"].item() == 2 and out["loss"].item() == 0
    bad = z.clone()
    bad[1, 2, 0] = float("inf")
    bad.requires_grad_()
    out = pmr_loss(bad, P, y)
    assert out["flag"].item() == 1 and out["loss"].item() == 0 and out["coefficients"].abs().sum().item() == 0
    out["loss"].backward()
    assert bad.grad.abs().max().item() == 0
    y2 = y.clone()
    y2[0] = 3  # outside [0, C): NaN statistics, flag 1 (as the reference)
    _check(z, P, y2)


def test_empty_batch(device):
    z = torch.zeros(2, 0, 3, device=device, requires_grad=True)
    out = pmr_loss(z, torch.randn(2, 4, 3, device=device), torch.zeros(0, dtype=torch.long, device=device))
    assert out["flag"].item() == 2 and out["loss"].item() == 0
    out["loss"].backward()
    assert z.grad.shape == z.shape


def test_workspace_is_clean_between_calls(device):
    """The last program resets the workspace: a second call on other inputs gives its own numbers."""
    z1, P1, y1 = _inputs(3, 7, 5, 9, device, seed=1)
    z2, P2, y2 = _inputs(2, 4, 3, 2, device, seed=2)
    pmr_loss(z1, P1, y1)
    _check(z2, P2, y2)


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("M,B,C,D", [(2, 1, 1, 1), (3, 40, 6, 9), (8, 9, 4, 130)])
def test_refresh_parity(M, B, C, D, first, device):
    z, P, y = _inputs(M, B, C, D, device, seed=5)
    if B > 2:
        y[y == C - 1] = 0  # class C - 1 absent: keeps its old prototype
        y[1] = -100
    want = R.pmr_prototypes_ref(z, y, P, mu=0.3, first=first)
    one = P.clone()
    pmr_update_prototypes_(one, z, y, mu=0.3, first=first)  # one launch (last program refreshes)
    torch.testing.assert_close(one, want, rtol=1e-5, atol=1e-6)
    two = P.clone()  # accumulate over two batches (a list of modalities), then the refresh kernel
    sums, counts = new_refresh_buffers(M, C, D, device)
    half = B // 2
    pmr_class_sums_(z[:, :half], y[:half], sums, counts)
    pmr_class_sums_(list(z[:, half:]), y[half:], sums, counts)
    pmr_refresh_(two, sums, counts, mu=0.3, first=first)
    torch.testing.assert_close(two, want, rtol=1e-5, atol=1e-6)


def test_refresh_fp16_features_and_padding(device):
    g = torch.Generator().manual_seed(8)
    za = torch.randn(10, 3, generator=g).half().to(device)
    zv = torch.randn(10, 5, generator=g).half().to(device)
    y = torch.randint(0, 3, (10,), generator=g).to(device)
    P = torch.zeros(2, 3, 5, device=device)
    pmr_update_prototypes_(P, [za, zv], y, mu=0.0, first=True)
    want = R.pmr_prototypes_ref(R.pmr_pad([za, zv]), y, torch.zeros(2, 3, 5, device=device), mu=0.0, first=True)
    torch.testing.assert_close(P, want, rtol=1e-5, atol=1e-6)
    assert P[0, :, 3:].abs().max().item() == 0  # the padding stays zero


@pytest.mark.parametrize("first", [True, False])
def test_refresh_skips_nonfinite_rows_per_modality(first, device):
    """A row holding a NaN/Inf feature is skipped for its modality only (the other modality keeps it), counted in
    counts[m, C]; a non-finite old prototype entry becomes the class mean (tests/_pmr_cases.py)."""
    check_refresh_skips_nonfinite_rows(first, device)


def test_float64_features_run_with_fp32_accumulation(device):
    """fp64 features on the Triton kernels: forward, backward and refresh run (accumulation in fp32, the gradient in
    fp64) and agree with the fp64 reference to fp32 precision (docs/methods/pmr.md)."""
    z, P, y = _inputs(3, 7, 5, 9, device, dtype=torch.float64)
    _check(z, P, y, rtol=1e-5, atol=1e-6, grad_tol=dict(rtol=1e-4, atol=1e-6))
    got = torch.zeros(3, 5, 9, device=device)
    pmr_update_prototypes_(got, z, y, mu=0.2, first=True)
    want = R.pmr_prototypes_ref(z, y, torch.zeros(3, 5, 9, device=device), mu=0.2, first=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_int32_labels_give_the_int64_result(device):
    z, P, y = _inputs(3, 7, 5, 9, device)
    out = []
    for labels in (y, y.int()):
        x = z.clone().requires_grad_()
        res = pmr_loss(x, P, labels, alpha=0.8)
        res["loss"].backward()
        protos = P.clone()
        pmr_update_prototypes_(protos, z, labels, mu=0.3, first=False)
        out.append((res["loss"].detach(), res["scores"], x.grad, protos))
    for a, b in zip(*out):
        assert torch.equal(a, b)


# ---------------------------------------- gpu-compile plan
# gpu-compile plan of the PMR kernels (mmkernels/triton_ops/pmr.py): one call per launcher specialization of
# tests/test_pmr_triton.py and tests/test_pmr_api.py (loaded by tests/gpu_compile.py, PLAN_MODULES).
#
# The launchers run on CPU torch.empty tensors shaped, strided and typed like the tests' (compiled block sizes follow
# from the shapes; Triton specializes on dtypes, 16-byte alignment and integer arguments == 1 / % 16 == 0).
PLAN_F32, PLAN_F16 = torch.float32, torch.float16

# tests/test_pmr_triton.py CASES, plus the other shapes of that file and of tests/test_pmr_api.py (TinyModel: B 12,
# FEAT 6, C 4; M 2 and 3)
PLAN_LOSS_CASES = [
    (2, 1, 1, 1),
    (2, 2, 3, 2),
    (3, 7, 5, 9),
    (5, 33, 70, 20),
    (8, 6, 4, 3),
    (2, 70, 3, 130),
    (4, 17, 31, 17),
    (3, 20, 7, 6),
    (2, 5, 3, 4),
    (2, 4, 3, 2),
    (2, 12, 4, 6),
    (3, 12, 4, 6),
    (2, 8, 4, 5),
    (2, 0, 4, 3),
]


def _plan_z(m, b, d, dtype=PLAN_F32, layout="contiguous"):
    if layout == "bdm":
        return torch.empty(b, m, d, dtype=dtype).permute(1, 0, 2)
    if layout == "dmajor":
        return torch.empty(m, d, b, dtype=dtype).permute(0, 2, 1)
    return torch.empty(m, b, d, dtype=dtype)


def _plan_protos(m, c, d, layout="contiguous"):
    if layout == "cmajor":
        return torch.empty(m, d, c).transpose(1, 2)
    return torch.empty(m, c, d)


def _plan_loss_call(
    m, b, c, d, *, dtype=PLAN_F32, layout="contiguous", p_layout="contiguous", sync=False, labels=torch.int64
):
    from mmkernels.triton_ops.pmr import pmr_backward_launch, pmr_forward_launch

    z, P, y = _plan_z(m, b, d, dtype, layout), _plan_protos(m, c, d, p_layout), torch.empty(b, dtype=labels)
    ctx = contextlib.nullcontext()
    if sync:
        from gpu_compile import fake_process_group

        ctx = fake_process_group()
    with ctx:
        out, lse, _ = pmr_forward_launch(z, P, y, alpha=0.8, ignore_index=-100, sync=sync)
    if b > 0:
        pmr_backward_launch(torch.empty(()), z, P, y, out, lse, ignore_index=-100)


def _plan_refresh_call(m, b, c, d, *, first, one_launch, dtype=PLAN_F32, rows=None, labels=torch.int64):
    """rows: the tests' z[:, :half] views (row stride of the full batch `rows`)."""
    from mmkernels.triton_ops.pmr import pmr_accumulate_launch, pmr_refresh_launch

    z = torch.empty(m, rows, d, dtype=dtype)[:, :b] if rows else torch.empty(m, b, d, dtype=dtype)
    y = torch.empty(b, dtype=labels)
    P = torch.empty(m, c, d)
    sums, counts = torch.empty(m, c, d), torch.empty(m + 1, c + 1)
    pmr_accumulate_launch(
        z, y, sums, counts, P if one_launch else sums, ignore_index=-100, finalize=one_launch, mu=0.3, first=first
    )
    if not one_launch:
        pmr_refresh_launch(sums, counts, P, mu=0.3, first=first)


def gpu_compile_plan() -> list:
    out = []

    def add(label, fn, *args, **kw):
        out.append((f"pmr {label} {args}{kw if kw else ''}", lambda: fn(*args, **kw)))

    for case in PLAN_LOSS_CASES:
        add("loss fp32", _plan_loss_call, *case)
    for case in [(3, 7, 5, 9), (2, 70, 3, 130)]:
        add("loss fp16", _plan_loss_call, *case, dtype=PLAN_F16)
    for layout in ("bdm", "dmajor"):
        add("loss layout", _plan_loss_call, 3, 9, 6, 5, layout=layout, p_layout="cmajor")
    add("loss sync PHASE 1 + 2", _plan_loss_call, 3, 12, 4, 6, sync=True)
    for first in (True, False):
        for m, b, c, d in [(2, 1, 1, 1), (3, 40, 6, 9), (8, 9, 4, 130)]:
            add("refresh one launch", _plan_refresh_call, m, b, c, d, first=first, one_launch=True)
            half = b // 2
            if half:
                add("refresh accumulate view", _plan_refresh_call, m, half, c, d, first=first, one_launch=False, rows=b)
            add("refresh accumulate list", _plan_refresh_call, m, b - half, c, d, first=first, one_launch=False)
        for m in (2, 3):  # tests/test_pmr_api.py: refresh passes of 12 rows, update_prototypes of 12 / 8 rows
            add("refresh api", _plan_refresh_call, m, 12, 4, 6, first=first, one_launch=False)
            add("refresh api one launch", _plan_refresh_call, m, 12, 4, 6, first=first, one_launch=True)
    add("refresh fp16", _plan_refresh_call, 2, 10, 3, 5, first=True, one_launch=True, dtype=PLAN_F16)
    add("refresh widths", _plan_refresh_call, 2, 8, 4, 5, first=True, one_launch=True)
    add("loss fp64", _plan_loss_call, 3, 7, 5, 9, dtype=torch.float64)
    add("refresh fp64", _plan_refresh_call, 3, 7, 5, 9, first=True, one_launch=True, dtype=torch.float64)
    add("loss int32 labels", _plan_loss_call, 3, 7, 5, 9, labels=torch.int32)
    add("refresh int32 labels", _plan_refresh_call, 3, 7, 5, 9, first=False, one_launch=True, labels=torch.int32)
    return out
