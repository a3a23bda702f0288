"""pytest setup for benchmarks/ (pytest-benchmark).

Files are named bench_*.py and collected here (the root pytest.ini only lists tests/).
Size switch: reduced CPU shapes by default; full (papers') shapes with `--bench-full` or MMKERNELS_BENCH_FULL=1.
Fixtures: `bench_full` (bool), `bench_device` ("cuda" when a GPU is visible, else "cpu"; MMKERNELS_BENCH_DEVICE
overrides). In CI the lane runs `pytest benchmarks --benchmark-disable`: each benchmark body runs once and nothing is
timed.
"""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # so bench files can `import authors_style`
    sys.path.insert(0, HERE)


def pytest_addoption(parser):
    parser.addoption(
        "--bench-full",
        action="store_true",
        default=False,
        help="full benchmark shapes (ResNet-18 on 1x257x299 / 3x224x224, large B and C); default reduced CPU shapes",
    )


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        if parent.session.isinitpath(file_path):  # named on the command line: pytest's python plugin collects it
            return None
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def is_full(config) -> bool:
    return bool(config.getoption("--bench-full")) or os.environ.get("MMKERNELS_BENCH_FULL", "0") == "1"


@pytest.fixture(scope="session")
def bench_full(pytestconfig) -> bool:
    return is_full(pytestconfig)


@pytest.fixture(scope="session")
def bench_device() -> str:
    forced = os.environ.get("MMKERNELS_BENCH_DEVICE")
    if forced:
        if forced == "cuda":
            import torch

            if not torch.cuda.is_available():
                pytest.skip("MMKERNELS_BENCH_DEVICE=cuda but no CUDA device is visible")
        return forced
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
