"""tests/run_lanes.py: the quick default run and --full (CI), and the `full` list in tests/conftest.py."""

import importlib.util
import os
import re

import pytest

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("run_lanes", os.path.join(ROOT, "tests", "run_lanes.py"))
run_lanes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_lanes)


@pytest.fixture
def env(monkeypatch):
    for name in (run_lanes.FULL_ENV, "MMKERNELS_GPU_STACK_LANE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_quick_by_default(env):
    lanes, full, rest = run_lanes.select(["-x"])
    assert not full and rest == ["-x"]
    assert {"lint", "reference", "triton", "ext-cpu", "cuda"} <= set(lanes)
    assert lanes[0] == "lint"  # seconds: a style slip fails before the long lanes
    assert not set(lanes) & {"benchmarks", "gpu-compile", "gpu-stack"}
    assert run_lanes.lane_args("reference", False)[-2:] == ["-m", "(not triton and not ext and not cuda) and not full"]
    assert run_lanes.lane_args("triton", False)[-1] == "(triton) and not full"


@pytest.mark.parametrize("how", ["flag", "env"])
def test_full_runs_every_lane_and_test(env, how):
    if how == "env":
        env.setenv(run_lanes.FULL_ENV, "1")
    lanes, full, rest = run_lanes.select(["--full"] if how == "flag" else [])
    assert full and rest == []
    assert {"reference", "triton", "ext-cpu", "benchmarks", "gpu-compile", "cuda"} <= set(lanes)
    assert run_lanes.lane_args("reference", True) == list(run_lanes.LANES["reference"][0])


def test_ci_also_gets_the_gpu_stack_lane(env):
    env.setenv(run_lanes.FULL_ENV, "1")
    env.setenv("MMKERNELS_GPU_STACK_LANE", "1")
    assert "gpu-stack" in run_lanes.select([])[0]


def test_named_lanes_and_unknown_lane(env):
    assert run_lanes.select(["--lanes", "gpu-compile,reference", "-x"]) == (["gpu-compile", "reference"], False, ["-x"])
    with pytest.raises(SystemExit, match="unknown lane"):
        run_lanes.select(["--lanes", "nope"])


@pytest.mark.parametrize("prefix", conftest.FULL_ONLY)
def test_every_full_entry_names_a_real_test(prefix):
    """A renamed file or test would silently move a heavy test back into the quick run."""
    path, _, name = prefix.partition("::")
    assert os.path.exists(os.path.join(ROOT, path)), path
    if name:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            assert re.search(rf"^def {re.escape(name)}", f.read(), re.M), prefix
