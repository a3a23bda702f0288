"""Triton lane: the fused sample-valuation kernel (argmax per subset -> v(S) -> phi -> copies, one launch) against the
reference (TRITON_INTERPRET=1 on CPU, or CUDA). Ties (small integer logits, also across C tiles), M = 2..8, layouts,
half precision, both value rules. Every case has its launcher specialization in tests/_plan_valuation.py."""
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
    x = torch.randint(0, 3, (2 ** m - 1, b, c), generator=g).to(dtype)   # many ties: first maximum must win
    if layout == "bmc":   # a [B, 2^M - 1, C] buffer seen as [2^M - 1, B, C]
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


@pytest.mark.parametrize("m,correct,modality", [
    (4, (0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1), 3),   # phi = 1 exactly
    (5, (0,) * 28 + (1, 1, 1), 0),                             # phi = 0.4 exactly
])
def test_thresholds_hit_exactly(m, correct, modality, device):
    """As tests/test_valuation_reference.py: the kernel sums M! phi exactly, so a value on a threshold gives 0."""
    f = torch.zeros(2 ** m - 1, 1, 2)
    f[:, 0, 0] = torch.tensor(correct, dtype=torch.float32)
    f[:, 0, 1] = 0.5
    got = sample_valuation(f.to(device), torch.tensor([0], device=device))
    assert got["copies"][modality, 0].item() == 0
    torch.testing.assert_close(got["phi"].cpu(), R.sample_valuation(f, torch.tensor([0]))["phi"], atol=0, rtol=0)
