"""The example trainer in the README runs as written (issue 5, item 6).

Takes the first ```python block of README.md containing the marker `# mmkernels-example`."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "# mmkernels-example"


def example_source() -> tuple[str, str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        if MARKER in block:
            return "README.md", block
    raise AssertionError(f"no ```python block with {MARKER!r} in README.md")


def test_readme_example_runs():
    where, code = example_source()
    assert len(code.strip().splitlines()) <= 40, f"the example in {where} should stay under 40 lines"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"example from {where} failed:\n{proc.stdout}\n{proc.stderr}"
    assert "epoch 2: k = " in proc.stdout
