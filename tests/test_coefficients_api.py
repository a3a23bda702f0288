"""Reference lane: balance_coefficients' validation, dispatch and reference path (CPU, no Triton)."""

import pytest
import torch

from mmkernels import reference as R
from mmkernels.coefficients import METHOD_DEFAULTS, balance_coefficients


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 5, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    return x, y


@pytest.mark.parametrize("method", list(METHOD_DEFAULTS))
def test_cpu_default_matches_reference(method, batch, monkeypatch):
    """CPU tensors run the C++ twin when the extension is built (else the reference): the same numbers to fp32
    summation order, the AGM state updated in place alike."""
    monkeypatch.delenv("MMKERNELS_BACKEND", raising=False)
    x, y = batch
    st_a, st_b = R.new_agm_state(3), R.new_agm_state(3)
    for _ in range(2):
        got = balance_coefficients(x, y, method, state=st_a if method == "agm" else None)
        want = R.balance_coefficients_ref(x, y, method, state=st_b if method == "agm" else None)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=2e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(st_a["s_hat"], st_b["s_hat"], rtol=2e-5, atol=1e-6)
    assert torch.equal(st_a["steps"], st_b["steps"])


def test_list_and_stacked_inputs_agree(batch):
    x, y = batch
    a = balance_coefficients(list(x.unbind(0)), y, "ogm", alpha=0.5)
    b = balance_coefficients(x, y, "ogm", alpha=0.5)
    for key in a:
        assert torch.equal(a[key], b[key])


def test_forced_backend_without_implementation_raises(batch, monkeypatch):
    """An op that lacks the forced backend raises instead of computing something else (the drop has no C++ twin)."""
    from mmkernels import modality_drop

    monkeypatch.setenv("MMKERNELS_BACKEND", "ext")
    with pytest.raises(RuntimeError, match="no ext implementation"):
        modality_drop([torch.randn(4, 3), torch.randn(4, 3)], torch.tensor([0.5, 0.0]), seed=0, offset=0)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x, y: balance_coefficients(x, y, "ogmge"), ValueError, "method must be one of"),
        (lambda x, y: balance_coefficients(x, y, "ogm_ge", lam=0.5), TypeError, "unknown hyperparameter"),
        (lambda x, y: balance_coefficients(x, y, "ogm", z="relu"), ValueError, "z must be one of"),
        (lambda x, y: balance_coefficients(x, y, "ogm", ratio="log"), ValueError, "ratio must be one of"),
        (lambda x, y: balance_coefficients(x, y, "ogm", alpha=float("nan")), ValueError, "alpha must be a finite"),
        (lambda x, y: balance_coefficients(x, y, "agm", clip="10"), ValueError, "clip must be a finite"),
        (lambda x, y: balance_coefficients(x, y[:-1], "ogm"), ValueError, "labels must have shape"),
        (lambda x, y: balance_coefficients(x, y.float(), "ogm"), TypeError, "labels must be an integer"),
        (lambda x, y: balance_coefficients(x[:1], y, "ogm"), ValueError, "number of modalities"),
        (lambda x, y: balance_coefficients(x[0], y, "ogm"), ValueError, "3 dims"),
        (lambda x, y: balance_coefficients(x.long(), y, "ogm"), TypeError, "floating"),
        (lambda x, y: balance_coefficients(x[:, :, :0], y, "ogm"), ValueError, "at least one class"),
        (lambda x, y: balance_coefficients(x, y, "ogm", ignore_index=1.5), TypeError, "ignore_index"),
        (
            lambda x, y: balance_coefficients(x, y, "agm", state={"s_hat": torch.zeros(2), "steps": torch.zeros(())}),
            ValueError,
            "s_hat",
        ),
        (lambda x, y: balance_coefficients(x, y, "agm", state={"s_hat": torch.zeros(3)}), TypeError, "state must be"),
    ],
)
def test_validation_errors(call, exc, match, batch):
    x, y = batch
    with pytest.raises(exc, match=match):
        call(x, y)


def test_sync_reference_path_single_process_group(batch, tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    x, y = batch
    y = y.clone()
    y[3] = -100
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for method in METHOD_DEFAULTS:
            st_a, st_b = R.new_agm_state(3), R.new_agm_state(3)
            got = balance_coefficients(x, y, method, state=st_a if method == "agm" else None, sync=True)
            want = R.balance_coefficients_ref(x, y, method, state=st_b if method == "agm" else None)
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0.0, equal_nan=True)
            assert torch.equal(st_a["s_hat"], st_b["s_hat"])
        y_none = torch.full_like(y, -100)
        assert balance_coefficients(x, y_none, "ogm", sync=True)["flag"].item() == 2
    finally:
        dist.destroy_process_group()
