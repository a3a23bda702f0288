"""Run every test lane in its own pytest process and print one summary line per lane.

Lanes (DESIGN.md section 7):
  reference   unmarked tests: the reference, the API, the demo (CPU)
  triton      @pytest.mark.triton with TRITON_INTERPRET=1 set before triton is imported (CPU tensors)
  ext-cpu     @pytest.mark.ext: the C++ CPU twins of mmkernels._C
  benchmarks  benchmarks/ in their reduced CPU form, timing disabled (checks they run, asserts no speed)
  cuda        triton + ext + cuda tests on a GPU (MMKERNELS_TEST_DEVICE=cuda); skipped without one
Exit status is non-zero if any lane fails. Usage: python tests/run_lanes.py [--lanes a,b] [pytest args...]
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LANES = {
    "reference": (["tests", "-m", "not triton and not ext and not cuda"], {}),
    "triton": (["tests", "-m", "triton"], {"TRITON_INTERPRET": "1"}),
    "ext-cpu": (["tests", "-m", "ext"], {}),
    "benchmarks": (["benchmarks", "--benchmark-disable"], {}),
    "cuda": (["tests", "-m", "triton or ext or cuda"], {"MMKERNELS_TEST_DEVICE": "cuda"}),
}


def gpu_reason() -> str | None:
    """None when a CUDA device is usable, else why not (asked in a subprocess-free way, after import)."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device visible"
    return None


def run_lane(name: str, extra: list[str]) -> tuple[str, str]:
    args, env_add = LANES[name]
    env = dict(os.environ, **env_add)
    if name != "cuda":
        env.pop("MMKERNELS_TEST_DEVICE", None)
    if name != "triton":
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, *extra]
    print(f"\n===== lane {name}: {' '.join(cmd[1:])}" + (f"  [{' '.join(f'{k}={v}' for k, v in env_add.items())}]" if env_add else ""), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = ""
    for line in proc.stdout:
        sys.stdout.write(line)
        if re.search(r"\b(passed|failed|error|skipped|no tests ran)\b", line):
            last = line.strip().strip("=").strip()
    rc = proc.wait()
    took = f"{time.time() - t0:.0f}s"
    if rc == 0:
        return "PASSED", f"{last} ({took})"
    if rc == 5:
        return "FAILED", f"no tests collected ({took})"
    return "FAILED", f"{last or f'pytest exit code {rc}'} ({took})"


def main(argv: list[str]) -> int:
    lanes = list(LANES)
    if argv[:1] == ["--lanes"]:
        lanes, argv = argv[1].split(","), argv[2:]
    results = {}
    for name in lanes:
        if name == "cuda":
            why = gpu_reason()
            if why:
                results[name] = ("SKIPPED", why)
                continue
        results[name] = run_lane(name, argv)
    print("\n===== lane summary")
    for name, (status, detail) in results.items():
        print(f"lane {name:<10} {status:<7} {detail}")
    return 0 if all(s != "FAILED" for s, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
