"""Backend selection and the import-never-fails promise (docs/architecture.md)."""

import os
import subprocess
import sys

import pytest
import torch

import mmkernels
from mmkernels import _backend


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_import_does_not_touch_the_gpu():
    out = _run("import torch, mmkernels; print(torch.cuda.is_initialized())")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("False")


def test_import_survives_missing_triton_and_extension():
    # Block both imports the way a machine without them would fail.
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['mmkernels._C'] = None\n"
        "import mmkernels\n"
        "ok, why = mmkernels.triton_available(); assert not ok and 'triton' in why, why\n"
        "ok, why = mmkernels.ext_available(); assert not ok and 'mmkernels._C' in why, why\n"
        "text = mmkernels.env_report()\n"
        "assert 'triton: no' in text and 'extension mmkernels._C: no' in text\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr


def test_env_report_lists_every_piece(capsys):
    text = mmkernels.env_report()
    for key in ("torch", "triton:", "extension mmkernels._C:", "CUDA devices:", "MMKERNELS_BACKEND:"):
        assert key in text
    assert text in capsys.readouterr().out


def test_cpu_tensors_never_go_to_triton(monkeypatch):
    monkeypatch.delenv("MMKERNELS_BACKEND", raising=False)
    x = torch.zeros(2)
    choice = _backend.backend_for(x, op="t", available=("reference", "triton"))
    assert choice == "reference"


def test_cpu_tensors_go_to_the_extension_when_built(monkeypatch):
    monkeypatch.delenv("MMKERNELS_BACKEND", raising=False)
    x = torch.zeros(2)
    expected = "ext" if _backend.load_ext() is not None else "reference"
    assert _backend.backend_for(x, op="t", available=("reference", "ext")) == expected


def test_forced_backend_is_honoured_and_checked(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("MMKERNELS_BACKEND", "reference")
    assert _backend.backend_for(x, op="t", available=("reference", "triton", "ext")) == "reference"
    monkeypatch.setenv("MMKERNELS_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="has no triton implementation"):
        _backend.backend_for(x, op="t", available=("reference", "ext"))
    monkeypatch.setenv("MMKERNELS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="MMKERNELS_BACKEND must be one of"):
        _backend.backend_for(x, op="t")


def test_forced_extension_without_extension_raises(monkeypatch):
    monkeypatch.setenv("MMKERNELS_BACKEND", "ext")
    monkeypatch.setattr(_backend, "_load_ext", lambda: (None, "not built (test)"))
    with pytest.raises(RuntimeError, match="not built"):
        _backend.backend_for(torch.zeros(1), op="t", available=("reference", "ext"))


def test_missing_cuda_pieces_warn_once_and_fall_back(monkeypatch):
    monkeypatch.delenv("MMKERNELS_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "triton_available", lambda: (False, "no triton (test)"))
    monkeypatch.setattr(_backend, "ext_has_cuda", lambda: False)
    monkeypatch.setattr(_backend, "_warned", set())

    class FakeCuda(torch.Tensor):
        is_cuda = True

    x = torch.zeros(1).as_subclass(FakeCuda)
    with pytest.warns(RuntimeWarning, match="no triton"):
        assert _backend.backend_for(x, op="t", available=("reference", "triton")) == "reference"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.backend_for(x, op="t", available=("reference", "triton")) == "reference"


def test_forced_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    """Triton cannot run on CPU tensors outside the interpreter: a clear error, not a crash inside Triton."""
    monkeypatch.setenv("MMKERNELS_BACKEND", "triton")
    monkeypatch.setattr(_backend, "triton_available", lambda: (True, "triton (test)"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="got CPU tensors"):
        _backend.backend_for(torch.zeros(2), op="t", available=("reference", "triton"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.backend_for(torch.zeros(2), op="t", available=("reference", "triton")) == "triton"


@pytest.mark.cuda
def test_triton_ops_on_a_device_that_is_not_current():
    """Triton launches on the current device: tensors on cuda:1 with cuda:0 current must still be computed on cuda:1
    (mmkernels._backend.device_guard), with the same numbers as on the current device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from mmkernels.coefficients import balance_coefficients
    from mmkernels.taps import grad_tap, modality_drop

    torch.cuda.set_device(0)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 64, 10, generator=gen)
    labels = torch.randint(0, 10, (64,), generator=gen)
    feats = torch.randn(2, 64, 16, generator=gen)
    results = []
    for dev in ("cuda:0", "cuda:1"):
        out = balance_coefficients(logits.to(dev), labels.to(dev), "ogm", alpha=0.5)
        f = feats.to(dev).requires_grad_()
        grad_tap(f, out["coefficients"][0]).sum().backward()
        dropped = modality_drop(feats.to(dev), [0.3, 0.6], seed=1, offset=5)
        torch.cuda.synchronize(dev)
        results.append([out["coefficients"].cpu(), out["flag"].cpu(), f.grad.cpu(), dropped.cpu()])  # sync-ok: test
    assert torch.cuda.current_device() == 0
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)  # not bitwise: the score sums are fp32 atomics in any order
