"""Test lanes (see tests/run_lanes.py): markers `triton`, `ext`, `cuda`; unmarked tests form the reference lane.

The `device` fixture is "cpu" except in the cuda lane (MMKERNELS_TEST_DEVICE=cuda).
"""
import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: Triton kernels (TRITON_INTERPRET=1 on CPU, or CUDA in the cuda lane)")
    config.addinivalue_line("markers", "ext: the C++ extension mmkernels._C (CPU twins, or CUDA in the cuda lane)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    config.addinivalue_line("markers", "slow: longer end-to-end tests")


def lane_device() -> str:
    return os.environ.get("MMKERNELS_TEST_DEVICE", "cpu")


@pytest.fixture
def device():
    dev = lane_device()
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return dev


def pytest_collection_modifyitems(config, items):
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    on_cuda = lane_device() == "cuda"
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))
        elif "triton" in item.keywords and not (interp or on_cuda):
            item.add_marker(pytest.mark.skip(reason="Triton tests need TRITON_INTERPRET=1 or the cuda lane"))
        elif "ext" in item.keywords:
            from mmkernels._backend import ext_available

            ok, why = ext_available()
            if not ok:
                item.add_marker(pytest.mark.skip(reason=why))
