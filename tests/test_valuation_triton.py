"""Triton lane: the fused sample-valuation kernel (argmax per subset -> v(S) -> phi -> copies, one launch) against the
reference (TRITON_INTERPRET=1 on CPU, or CUDA). Ties (small integer logits, also across C tiles), M = 2..8, layouts,
half precision, both value rules. Every case has its launcher specialization in the gpu-compile plan at the end of this
file."""

import pytest
import torch

from mmkernels import reference as R
from mmkernels.valuation import sample_valuation

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")]


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MMKERNELS_BACKEND", "triton")


CASES = [(2, 2, 3), (2, 70, 5), (3, 33, 4), (4, 9, 300), (5, 17, 2), (8, 5, 3)]  # (M, B, C)


def logits(m, b, c, seed, dtype=torch.float32, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (2**m - 1, b, c), generator=g).to(dtype)  # many ties: first maximum must win
    if layout == "bmc":  # a [B, 2^M - 1, C] buffer seen as [2^M - 1, B, C]
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    y = torch.randint(0, c, (b,), generator=g)
    return x, y


@pytest.mark.parametrize("value", ["authors", "toolkit"])
@pytest.mark.parametrize("m,b,c", CASES)
def test_parity(m, b, c, value, device):
    x, y = logits(m, b, c, seed=m * 1000 + b)
    want = R.sample_valuation(x, y, value=value)
    got = sample_valuation(x.to(device), y.to(device), value=value)
    torch.testing.assert_close(got["phi"].cpu(), want["phi"], atol=1e-6, rtol=0)
    assert torch.equal(got["copies"].cpu(), want["copies"])
    assert got["phi"].dtype == torch.float32 and got["copies"].dtype == torch.int64
    assert got["flag"].item() == want["flag"].item() == 0.0


def test_tie_across_class_tiles(device):
    """The maximum appears in two C tiles (BLOCK_C = 256): the first one wins."""
    x = torch.zeros(3, 2, 600)
    x[:, :, 10] = 5.0
    x[:, :, 400] = 5.0
    y = torch.tensor([10, 400])
    got = sample_valuation(x.to(device), y.to(device))
    want = R.sample_valuation(x, y)
    torch.testing.assert_close(got["phi"].cpu(), want["phi"])
    assert want["phi"][:, 0].tolist() == [1.0, 1.0] and want["phi"][:, 1].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_strides(dtype, device):
    x, y = logits(3, 33, 4, seed=7, dtype=dtype, layout="bmc")
    want = R.sample_valuation(x, y)
    got = sample_valuation(x.to(device), y.to(device))
    torch.testing.assert_close(got["phi"].cpu(), want["phi"], atol=1e-6, rtol=0)


def test_worked_example(device):
    f = torch.tensor([[[0, 3, 1], [1, 2, 0]], [[1, 0, 0], [0, 0, 2]], [[2, 1, 0], [3, 0, 1]]], dtype=torch.float32)
    got = sample_valuation(f.to(device), torch.tensor([0, 2], device=device))
    torch.testing.assert_close(got["phi"].cpu(), torch.tensor([[0.5, -0.5], [1.5, 0.5]]))
    assert got["copies"].cpu().tolist() == [[1, 3], [0, 1]]


def test_int32_labels(device):
    x, y = logits(2, 9, 3, seed=1)
    got = sample_valuation(x.to(device), y.int().to(device))
    assert torch.equal(got["copies"].cpu(), R.sample_valuation(x, y)["copies"])


@pytest.mark.parametrize(
    "m,correct,modality",
    [
        (4, (0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1), 3),  # phi = 1 exactly
        (5, (0,) * 28 + (1, 1, 1), 0),  # phi = 0.4 exactly
    ],
)
def test_thresholds_hit_exactly(m, correct, modality, device):
    """As tests/test_valuation_reference.py: the kernel sums M! phi exactly, so a value on a threshold gives 0."""
    f = torch.zeros(2**m - 1, 1, 2)
    f[:, 0, 0] = torch.tensor(correct, dtype=torch.float32)
    f[:, 0, 1] = 0.5
    got = sample_valuation(f.to(device), torch.tensor([0], device=device))
    assert got["copies"][modality, 0].item() == 0
    torch.testing.assert_close(got["phi"].cpu(), R.sample_valuation(f, torch.tensor([0]))["phi"], atol=0, rtol=0)


def poison(x, seed):
    """Non-finite logits in some rows: a NaN (also at the label), +inf, -inf, a whole row of NaN."""
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    ns, b, c = x.shape
    for k, val in enumerate([float("nan"), float("inf"), float("-inf"), float("nan")]):
        s, i = int(torch.randint(0, ns, (1,), generator=g)), (3 * k + seed) % b
        if k == 3:
            x[s, i] = val  # all-NaN row
        else:
            x[s, i, int(torch.randint(0, c, (1,), generator=g))] = val
    return x


@pytest.mark.parametrize("value", ["authors", "toolkit"])
@pytest.mark.parametrize("m,b,c", [(3, 33, 4), (4, 9, 300), (2, 70, 5)])
def test_nonfinite_rows_are_wrong_on_both_backends(m, b, c, value, device):
    """docs/methods/sample_valuation.md "Edge cases": the kernel follows the reference (a row holding NaN or
    +-inf is never correct, flag 1), with no NaN reaching the interpreter's reductions ("All-NaN slice")."""
    x, y = logits(m, b, c, seed=m * 1000 + b)
    x = poison(x, seed=b)
    x[-1, 0] = float("nan")  # the label's own column too
    want = R.sample_valuation(x, y, value=value)
    got = sample_valuation(x.to(device), y.to(device), value=value)
    torch.testing.assert_close(got["phi"].cpu(), want["phi"], atol=1e-6, rtol=0)
    assert torch.equal(got["copies"].cpu(), want["copies"])
    assert got["flag"].item() == want["flag"].item() == 1.0 and torch.isfinite(got["phi"]).all()


@pytest.mark.filterwarnings("error:All-NaN slice encountered")
def test_nan_encoder_output_and_all_nan_rows(device, monkeypatch):
    """A NaN encoder output (every subset holding it non-finite) and an all-NaN logit row, through the kernel."""
    from mmkernels.valuation import valuation_subset_logits

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)]
    feats[0][1] = float("nan")
    w = torch.randn(10, 3, generator=g)
    monkeypatch.setenv("MMKERNELS_BACKEND", "reference")  # the masking has no Triton kernel
    f = valuation_subset_logits([t.to(device) for t in feats], lambda xs: torch.cat(xs, 1) @ w.to(device))
    monkeypatch.setenv("MMKERNELS_BACKEND", "triton")
    f[1, 2] = float("nan")  # an all-NaN row
    y = torch.tensor([0, 1, 2, 0])
    want = R.sample_valuation(f.cpu(), y)
    got = sample_valuation(f, y.to(device))
    torch.testing.assert_close(got["phi"].cpu(), want["phi"], atol=0, rtol=0)
    assert got["flag"].item() == 1.0 and want["values"][[0, 2], 1].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inf(dtype, device):
    x, y = logits(3, 33, 4, seed=7, dtype=dtype, layout="bmc")
    x[2, 5, 1] = float("inf")
    want = R.sample_valuation(x, y)
    got = sample_valuation(x.to(device), y.to(device))
    torch.testing.assert_close(got["phi"].cpu(), want["phi"], atol=1e-6, rtol=0)
    assert got["flag"].item() == 1.0


# ---------------------------------------- gpu-compile plan
# gpu-compile launch plan of the sample-valuation kernel (tests/gpu_compile.py loads it): one call of the launcher
# sample_valuation_triton per specialization of tests/test_valuation_triton.py and of the balancer on CUDA. The kernel
# specializes on the logits' dtype, SCALED (value rule), BLOCK_B / BLOCK_C (from B and C) and the integer arguments
# (strides, B, C, 2^M - 1, M: == 1, % 16 == 0); tensors are CPU torch.empty. The non-finite tests and the kernel
# properties (tests/test_valuation_properties.py) reuse these shapes: NaN/inf logits change no specialization.
def _plan_call(m, b, c, *, dtype="float32", layout="contiguous", scaled=True):
    import torch

    from mmkernels.reference import valuation_weight_table
    from mmkernels.triton_ops.valuation import sample_valuation_triton

    n = 2**m - 1
    x = torch.empty((n, b, c), dtype=getattr(torch, dtype))
    if layout == "bmc":
        x = torch.empty((b, n, c), dtype=getattr(torch, dtype)).transpose(0, 1)
    w, fact = valuation_weight_table(m)
    sample_valuation_triton(x, torch.empty(b, dtype=torch.int64), w, fact, scaled=scaled)


def gpu_compile_plan() -> list:
    out = []

    def add(note, m, b, c, **kw):
        out.append((f"sample_valuation M={m} B={b} C={c} {kw} [{note}]", lambda: _plan_call(m, b, c, **kw)))

    for m, b, c in CASES:
        for scaled in (True, False):
            add("parity", m, b, c, scaled=scaled)
    add("tie across class tiles", 2, 2, 600)
    for dtype in ("float16", "bfloat16"):
        add("half precision, [B, 2^M - 1, C] buffer", 3, 33, 4, dtype=dtype, layout="bmc")
    add("worked example", 2, 2, 3)
    add("thresholds M=4", 4, 1, 2)
    add("thresholds M=5", 5, 1, 2)
    add("balancer tests", 2, 10, 3)
    add("balancer tests, last batch", 2, 4, 3)
    add("bench-like", 2, 64, 309)
    add("bench-like bf16", 3, 256, 1000, dtype="bfloat16")
    return out
