"""Under FSDP2 (fully_shard), parameter mode (OGM-GE, OGM, MLB with params=), MMPareto and concat_unimodal_logits on
a sharded head are supported (tests/test_fsdp.py compares them with one process); a DTensor laid out otherwise than
FSDP2 / HSDP (e.g. Shard(1), tensor parallel), or a plain tensor listed next to sharded ones, is refused with a clear
NotImplementedError (never a silent statistic of one shard). Feature-level taps keep working. One gloo process in a
subprocess (the group never leaks into the other tests)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import os, tempfile
import torch, torch.distributed as dist, torch.nn as nn
from torch.distributed.fsdp import fully_shard
import mmkernels.api as api

dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
try:
    enc = nn.ModuleList([nn.Linear(5, 6), nn.Linear(3, 6)])
    head = nn.Linear(12, 4)
    for m in (*enc, head):
        fully_shard(m)
    refused = []
    for make, kw in ((api.OGMGE, {"official": True}), (api.OGM, {}), (api.MLB, {}), (api.MMPareto, {})):
        make(2, params=[enc[0].parameters(), enc[1].parameters()], **kw)  # FSDP2 layouts: supported (test_fsdp.py)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    cols = nn.Parameter(distribute_tensor(torch.randn(4, 6), init_device_mesh("cpu", (1,)), [Shard(1)]))
    for name, make in [
        ("OGMGE", lambda: api.OGMGE(2, params=[[cols], enc[1].parameters()], official=True)),
        ("MMPareto", lambda: api.MMPareto(2, params=[[cols], enc[1].parameters()])),
    ]:
        try:
            make()
        except NotImplementedError as exc:
            assert "FSDP2" in str(exc) and "params[0][0]" in str(exc) and "Shard(dim=1)" in str(exc), exc
            refused.append(name)
    plain = nn.Parameter(torch.randn(3))
    for make in (api.OGM, api.MMPareto):  # a plain tensor next to shards: its statistic would count once per rank
        try:
            make(2, params=[enc[0].parameters(), [plain]])
        except NotImplementedError as exc:
            assert "params[1][0] is not sharded but params[0][0] is (FSDP2)" in str(exc), exc
            refused.append(make.__name__ + "-mixed")
    feats = [enc[0](torch.randn(8, 5)), enc[1](torch.randn(8, 3))]
    assert api.concat_unimodal_logits(feats, head).shape == (2, 8, 4)  # read through the module (test_fsdp.py)
    bal = api.OGMGE(2)                                         # feature-level taps: fine under FSDP2
    y = torch.randint(0, 4, (8,))
    bal.observe(torch.randn(2, 8, 4), y)
    head(torch.cat(bal.tap(feats), 1)).sum().backward()
    print("REFUSED", ",".join(refused))
finally:
    dist.destroy_process_group()
"""


def test_non_fsdp2_dtensor_layouts_are_refused_with_a_clear_error():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "REFUSED OGMGE,MMPareto,OGM-mixed,MMPareto-mixed" in proc.stdout, proc.stdout
