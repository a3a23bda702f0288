"""Run every test lane in its own pytest process and print one summary line per lane.

Lanes (docs/architecture.md):
  lint        scripts/lint.sh: ruff check and ruff format --check (pyproject.toml: line length 120), a few seconds
  reference   unmarked tests: the reference, the API, the demo (CPU)
  triton      @pytest.mark.triton with TRITON_INTERPRET=1 set before triton is imported (CPU tensors)
  ext-cpu     @pytest.mark.ext: the C++ CPU twins of mmkernels._C
  benchmarks  benchmarks/ in their reduced CPU form, timing disabled (checks they run, asserts no speed)
  gpu-stack   scripts/gpu_stack_lane.sh: reference, ext-cpu and gpu-compile again on the GPU machines' stack (python
              3.12, torch 2.11, triton 3.6) in its own venv; runs by default only with MMKERNELS_GPU_STACK_LANE=1 (CI)
  gpu-compile tests/gpu_compile.py (a plain command, not pytest): every Triton kernel specialization of the tests and
              benchmarks compiled for sm_90a and sm_80 without a GPU; fails on a compile error, a spill, smem > 48 KiB
  cuda        triton + ext + cuda tests on a GPU (MMKERNELS_TEST_DEVICE=cuda); skipped without one
Quick by default (the README's test command, a few minutes on 2 CPU cores): the reference, triton and ext-cpu lanes
without the tests marked `full` (process groups, torch.compile, end-to-end demo and example runs, long property
searches; the list is in tests/conftest.py), and the cuda lane where a GPU is visible. `--full` (or
MMKERNELS_TEST_FULL=1, which CI sets) runs every test and adds the benchmarks and gpu-compile lanes.
Exit status is non-zero if any lane fails.
Usage: python tests/run_lanes.py [--full] [--lanes a,b] [pytest args...]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LANES = {
    "lint": (["bash", "scripts/lint.sh"], {"PYTHON": sys.executable}),
    "reference": (["tests", "-m", "not triton and not ext and not cuda"], {}),
    "triton": (["tests", "-m", "triton"], {"TRITON_INTERPRET": "1"}),
    "ext-cpu": (["tests", "-m", "ext"], {}),
    "benchmarks": (["benchmarks", "--benchmark-disable"], {}),
    "gpu-compile": ([sys.executable, "tests/gpu_compile.py"], {}),
    "gpu-stack": (["bash", "scripts/gpu_stack_lane.sh"], {}),
    "cuda": (["tests", "-m", "triton or ext or cuda"], {"MMKERNELS_TEST_DEVICE": "cuda"}),
}
COMMAND_LANES = {
    "lint",
    "gpu-compile",
    "gpu-stack",
}  # whole commands (no pytest arguments); their last output line is the summary
OPT_IN_LANES = {"gpu-stack": "MMKERNELS_GPU_STACK_LANE"}  # run by default only when this variable is 1 (CI sets it)
FULL_ONLY_LANES = {"benchmarks", "gpu-compile"}  # heavy whole lanes: run with --full (or when named with --lanes)
FULL_ENV = "MMKERNELS_TEST_FULL"


def lane_args(name: str, full: bool) -> list[str]:
    """The lane's pytest arguments; in the quick run the `full` tests are deselected (a marker expression)."""
    args = list(LANES[name][0])
    if full or name in COMMAND_LANES or name == "cuda":
        return args
    if "-m" in args:
        i = args.index("-m") + 1
        args[i] = f"({args[i]}) and not full"
    else:
        args += ["-m", "not full"]
    return args


def gpu_reason() -> str | None:
    """None when a CUDA device is usable, else why not (asked in a subprocess-free way, after import)."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device visible"
    return None


def run_lane(name: str, extra: list[str], full: bool = True) -> tuple[str, str]:
    env_add = LANES[name][1]
    args = lane_args(name, full)
    env = dict(os.environ, **env_add)
    if full:
        env[FULL_ENV] = "1"  # the gpu-stack lane's inner run_lanes.py runs everything too
    if name != "cuda":
        env.pop("MMKERNELS_TEST_DEVICE", None)
    if name != "triton":
        env.pop("TRITON_INTERPRET", None)
    command = name in COMMAND_LANES
    cmd = list(args) if command else [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, *extra]
    print(
        f"\n===== lane {name}: {' '.join(cmd[1:])}"
        + (f"  [{' '.join(f'{k}={v}' for k, v in env_add.items())}]" if env_add else ""),
        flush=True,
    )
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = ""
    for line in proc.stdout:
        sys.stdout.write(line)
        if command:
            last = line.strip() or last
        elif re.search(r"\b(passed|failed|error|skipped|no tests ran)\b", line):
            last = line.strip().strip("=").strip()
    rc = proc.wait()
    took = f"{time.time() - t0:.0f}s"
    if rc == 0:
        return "PASSED", f"{last} ({took})"
    if rc == 5 and not command:
        return "FAILED", f"no tests collected ({took})"
    runner = args[-1] if command else "pytest"
    return "FAILED", f"{last or f'{runner} exit code {rc}'} ({took})"


def select(argv: list[str]) -> tuple[list[str], bool, list[str]]:
    """(lanes, full, the remaining pytest arguments) from the command line and the environment."""
    full = os.environ.get(FULL_ENV) == "1"
    if "--full" in argv:
        full, argv = True, [a for a in argv if a != "--full"]
    lanes = [
        name
        for name in LANES
        if (name not in OPT_IN_LANES or os.environ.get(OPT_IN_LANES[name]) == "1")
        and (full or name not in FULL_ONLY_LANES)
    ]
    if argv[:1] == ["--lanes"]:
        lanes, argv = argv[1].split(","), argv[2:]
        unknown = [n for n in lanes if n not in LANES]
        if unknown:
            raise SystemExit(f"unknown lane(s) {unknown}; choose from {','.join(LANES)}")
    return lanes, full, argv


def main(argv: list[str]) -> int:
    lanes, full, argv = select(argv)
    what = "every test" if full else "without the tests marked full; --full runs everything"
    print(f"===== {'full' if full else 'quick'} run ({what}): lanes {','.join(lanes)}", flush=True)
    results = {}
    for name in lanes:
        if name == "cuda":
            why = gpu_reason()
            if why:
                results[name] = ("SKIPPED", why)
                continue
        results[name] = run_lane(name, argv, full)
    print("\n===== lane summary")
    for name, (status, detail) in results.items():
        print(f"lane {name:<11} {status:<7} {detail}")
    return 0 if all(s != "FAILED" for s, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
