"""Every python block of README.md runs as written (issue 18, item 8): in one process, in the README's order, the
first block (the example) setting up the model, data and optimizer the others continue. A fragment that uses a name
the README leaves to the reader (xa, a loss, a second head) gets it from CONTEXT, defined from the example's objects;
the FSDP2 block runs on one gloo rank with a CPU mesh. A block needing an optional extra (lightning, transformers) is
skipped only where that package is not installed (the README's test command installs them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONTEXT = """
import mmkernels, torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
enc_a, enc_v = model.encoders
head, fusion = model.head, model.fuse
head_a, head_v = nn.Linear(32, C), nn.Linear(32, C)
xa, xv, y = x_audio[:B], x_video[:B], y_all[:B]
feats = [enc_a(xa), enc_v(xv)]
loss = F.cross_entropy(model.fuse(feats), y)
train_set = TensorDataset(x_audio, x_video, y_all)
loader = DataLoader(train_set, batch_size=B)
epochs = 2
opt = torch.optim.SGD(model.parameters(), lr=0.01)
"""

FSDP_CONTEXT = """
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from mmkernels.api import OGMGE
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
dist.init_process_group("gloo", rank=0, world_size=1)
device, nodes, gpus_per_node = "cpu", 1, 1
encoders = list(model.encoders)
"""

RUNNER = """
import os, re, sys
text = open(os.path.join(sys.argv[1], "README.md"), encoding="utf-8").read()
blocks = re.findall(r"```python\\n(.*?)```", text, flags=re.S)
ns = {"os": os}
for i, code in enumerate(blocks):
    if i:
        exec(CONTEXT, ns)
        if "fully_shard" in code:
            exec(FSDP_CONTEXT, ns)
    try:
        exec(compile(code, f"README.md python block {i}", "exec"), ns)
    except ModuleNotFoundError as exc:  # an optional extra this environment lacks (the gpu-stack lane)
        if exc.name not in ("lightning", "transformers", "accelerate"):
            raise
        print(f"block {i} skipped: {exc.name} is not installed")
    except Exception as exc:
        raise SystemExit(f"README.md python block {i} failed: {type(exc).__name__}: {exc}\\n{code}")
    print(f"block {i} ok")
if "dist" in ns and ns["dist"].is_initialized():
    ns["dist"].destroy_process_group()
print(f"{len(blocks)} blocks ran")
"""


def test_every_readme_python_block_runs():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        n = len(re.findall(r"```python\n(.*?)```", f.read(), flags=re.S))
    script = f"CONTEXT = {CONTEXT!r}\nFSDP_CONTEXT = {FSDP_CONTEXT!r}\n" + textwrap.dedent(RUNNER)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", script, ROOT], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"{n} blocks ran" in proc.stdout
