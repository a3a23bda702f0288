"""Triton lane, edge sizes of the fused coefficient kernel against mmkernels.reference.balance_coefficients_ref:
a very wide class axis (C = 65536: 64 online-softmax tiles of 1024 fp32 / 32 of 2048 fp16 classes per row) and a
very long batch (B = 65536 rows, C = 2: several row-block programs adding into the atomic workspace, the last ticket
finalising). Run on CPU with TRITON_INTERPRET=1, or on CUDA in the cuda lane (the `device` fixture).

Tolerances are those of tests/test_coefficients_triton.py: rtol 2e-5, atol 1e-6 on scores, ratios, coefficients,
the flag and the AGM running state (fp16 logits: the same, as both sides read the fp16 values and accumulate in fp32).
"""

import pytest
import torch

from mmkernels import reference as R
from mmkernels.coefficients import balance_coefficients

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")]

RTOL, ATOL = 2e-5, 1e-6
HP = {  # non-default hyperparameters, as in test_coefficients_triton.py
    "ogm_ge": {"alpha": 0.8},
    "ogm": {"alpha": 0.6},
    "opm": {"q_base": 0.4, "lam": 0.7},
    "agm": {"alpha": 1.5},
    "mlb": {"alpha": 0.8, "beta_max": 3.0},
}


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MMKERNELS_BACKEND", "triton")


def _logits(M, B, C, device, dtype=torch.float32, seed=0):
    """Modality-dependent sharpness (the ratios differ from 1) and a bump on the label's logit (scores well above
    the underflow of softmax[y] even at C = 65536)."""
    g = torch.Generator().manual_seed(seed)
    sharp = torch.linspace(0.5, 2.0, M).view(M, 1, 1)
    x = torch.randn(M, B, C, generator=g) * 2.0 * sharp
    y = torch.randint(0, C, (B,), generator=g)
    x[torch.arange(M).view(M, 1), torch.arange(B).view(1, B), y.view(1, B)] += 8.0 * sharp.view(M, 1)
    return x.to(dtype).to(device), y.to(device)


def _check_all_methods(x, y, device, msg):
    M = x.shape[0]
    for method, hp in HP.items():
        st_k = R.new_agm_state(M, device) if method == "agm" else None
        st_r = R.new_agm_state(M, device) if method == "agm" else None
        for _ in range(2 if method == "agm" else 1):  # AGM: the second call reads the running means
            got = balance_coefficients(x, y, method, state=st_k, **hp)
            want = R.balance_coefficients_ref(x, y, method, state=st_r, **hp)
            assert set(got) == set(want) == {"scores", "ratios", "coefficients", "flag"}
            for key in want:
                assert got[key].dtype == torch.float32 and got[key].shape == want[key].shape, (msg, method, key)
                torch.testing.assert_close(
                    got[key].cpu(),
                    want[key].cpu(),
                    rtol=RTOL,
                    atol=ATOL,
                    equal_nan=True,
                    msg=lambda m: f"{msg} {method} {key}: {m}",
                )
            assert got["flag"].item() == 0, (msg, method)
        if method == "agm":
            torch.testing.assert_close(st_k["s_hat"], st_r["s_hat"], rtol=RTOL, atol=ATOL)
            assert torch.equal(st_k["steps"], st_r["steps"])
    # the coefficients are not trivially neutral at these sizes (a broken reduction would not hide behind k = 1)
    k = balance_coefficients(x, y, "ogm", **HP["ogm"])["coefficients"]
    assert (k - 1).abs().max() > 1e-3, msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_wide_classes_c65536(dtype, device):
    x, y = _logits(2, 2, 65536, device, dtype=dtype, seed=11)
    _check_all_methods(x, y, device, f"M=2 B=2 C=65536 {dtype}")


def test_long_batch_b65536(device):
    # the full B = 65536: 4 interpreter programs (2 modalities x 2 row blocks of 32768), well under 1 s on CPU
    x, y = _logits(2, 65536, 2, device, seed=12)
    y[::7] = -100  # ignored rows spread over every row block
    _check_all_methods(x, y, device, "M=2 B=65536 C=2")
