"""benchmarks/gpu_suite.sh --dry-run: every stage on CPU with tiny shapes, so the one GPU call cannot waste itself on
a broken script. Checks what comes back from a lent machine: at most 8 files, every JSON line parses, the tests and
benchmarks were recorded as they ran, and render.py produced the tables."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FILES_BACK = 8  # what the device tool returns from $OUT


def test_gpu_suite_dry_run(tmp_path):
    out = tmp_path / "suite"
    env = dict(os.environ, PYTHON=sys.executable, SUITE_BUDGET_S="300", MMKERNELS_GIT_COMMIT="dry-run")
    env.pop("MMKERNELS_TEST_DEVICE", None)
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--dry-run", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES_BACK, files
    assert {"summary.txt", "versions.txt", "results.jsonl", "benchmarks.md", "logs.tar.gz"} <= set(files), files
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    stages = {r["stage"] for r in records}
    assert {
        "tests_new",
        "bench_coef",
        "bench_train",
        "tests_cuda",
        "bench_compiled",
        "bench_new",
        "bench_rest",
    } <= stages, stages
    benches = [r for r in records if r["kind"] == "benchmark"]
    assert benches and all(r["stats"]["median"] > 0 and r["stats"]["rounds"] >= 1 for r in benches)
    for stage in ("tests_new", "tests_cuda"):
        assert any(r["kind"] == "test" and r["stage"] == stage and r["outcome"] == "passed" for r in records), stage
    new_files = {r["nodeid"].split("::")[0] for r in records if r["kind"] == "test" and r["stage"] == "tests_new"}
    assert len(new_files) >= 2, new_files  # one pytest process per file, each recorded
    assert "commit: dry-run" in (out / "versions.txt").read_text()
    md = (out / "benchmarks.md").read_text()
    assert "## Training step" in md and "| joint | 2 |" in md
    summary = (out / "summary.txt").read_text()
    assert "render: ok" in summary and "rc=0" in summary and "rc=1" not in summary
