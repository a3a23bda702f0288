"""The example trainer in the README runs as written (issue 5, item 6).

Takes the first ```python block of README.md containing the marker `# mmkernels-example`; until the lead merges the
API fragment into README.md, falls back to docs/api.md."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "# mmkernels-example"


def example_source() -> tuple[str, str]:
    for rel in ("README.md", os.path.join("docs", "api.md")):
        path = os.path.join(ROOT, rel)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
            if MARKER in block:
                return rel, block
    raise AssertionError(f"no ```python block with {MARKER!r} in README.md or docs/api.md")


def test_readme_example_runs():
    where, code = example_source()
    assert len(code.strip().splitlines()) <= 35, f"the example in {where} should stay about 30 lines"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"example from {where} failed:\n{proc.stdout}\n{proc.stderr}"
    assert "epoch 2: k = " in proc.stdout
