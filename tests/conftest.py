"""Test lanes (see tests/run_lanes.py): markers `triton`, `ext`, `cuda`; unmarked tests form the reference lane.

The `device` fixture is "cpu" except in the cuda lane (MMKERNELS_TEST_DEVICE=cuda).
`@pytest.mark.backend("ext")` (on a test, or in a module's pytestmark) runs it with MMKERNELS_BACKEND=ext;
`backend(None)` runs it with MMKERNELS_BACKEND unset (automatic choice).
"""

import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: Triton kernels (TRITON_INTERPRET=1 on CPU, or CUDA in the cuda lane)")
    config.addinivalue_line("markers", "ext: the C++ extension mmkernels._C (CPU twins, or CUDA in the cuda lane)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    config.addinivalue_line("markers", "slow: longer end-to-end tests")
    config.addinivalue_line("markers", "full: heavy tests left out of the quick default run (run with --full / in CI)")
    config.addinivalue_line("markers", "backend(name): run with MMKERNELS_BACKEND=name (None: unset)")


def lane_device() -> str:
    return os.environ.get("MMKERNELS_TEST_DEVICE", "cpu")


@pytest.fixture
def device():
    dev = lane_device()
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return dev


@pytest.fixture(autouse=True)
def _backend_marker(request, monkeypatch):
    marker = request.node.get_closest_marker("backend")
    if marker is None:
        return
    name = marker.args[0]
    if name is None:
        monkeypatch.delenv("MMKERNELS_BACKEND", raising=False)
    else:
        monkeypatch.setenv("MMKERNELS_BACKEND", name)


# The heavy tests, marked `full` here in one place: tests/run_lanes.py leaves them out of the quick default run
# (./scripts/test.sh); --full and CI run them. Measured on a quiet 2-core machine (call + setup, seconds).
FULL_ONLY = (
    "tests/test_gpu_suite_dry_run.py",  # 40 s: benchmarks/gpu_suite.sh --dry-run
    "tests/test_compile_api.py::test_compiled",  # 30 s: torch.compile of models and whole steps
    "tests/test_demo_backbone.py",  # 21 s: the demo with ResNet-18 encoders
    "tests/test_ddp.py",
    "tests/test_mmpareto_ddp.py",  # 5 s each: 2-process gloo groups
    "tests/test_valuation_ddp.py",
    "tests/test_fsdp.py::test_fsdp_four_ranks_match_one_process",  # 45 s: 4 gloo ranks under FSDP2
    "tests/test_examples.py::test_cremad_trainer_end_to_end",  # 11 s: the CREMA-D example, three methods
)  # (the triton and ext-cpu lanes take under a minute each: nothing there is full-only)


def pytest_collection_modifyitems(config, items):
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    on_cuda = lane_device() == "cuda"
    for item in items:
        if item.nodeid.startswith(FULL_ONLY):
            item.add_marker(pytest.mark.full)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))
        elif "triton" in item.keywords and not (interp or on_cuda):
            item.add_marker(pytest.mark.skip(reason="Triton tests need TRITON_INTERPRET=1 or the cuda lane"))
        elif "ext" in item.keywords:
            from mmkernels._backend import ext_available

            ok, why = ext_available()
            if not ok:
                item.add_marker(pytest.mark.skip(reason=why))
