"""Under FSDP2 (fully_shard), the paths that take per-tensor statistics of parameters refuse the sharded DTensor
parameters with a clear NotImplementedError (never a silent statistic of one shard): parameter mode (OGM-GE, OGM,
MLB with params=), MMPareto, and concat_unimodal_logits reading a sharded head weight. Feature-level taps keep
working. One gloo process in a subprocess (the group never leaks into the other tests)."""

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
    for name, make in [
        ("OGMGE", lambda: api.OGMGE(2, params=[enc[0].parameters(), enc[1].parameters()], official=True)),
        ("OGM", lambda: api.OGM(2, params=[enc[0].parameters(), enc[1].parameters()])),
        ("MLB", lambda: api.MLB(2, params=[enc[0].parameters(), enc[1].parameters()])),
        ("MMPareto", lambda: api.MMPareto(2, params=[enc[0].parameters(), enc[1].parameters()])),
    ]:
        try:
            make()
        except NotImplementedError as exc:
            assert "FSDP2" in str(exc) and "params[0][0]" in str(exc), exc
            refused.append(name)
    feats = [enc[0](torch.randn(8, 5)), enc[1](torch.randn(8, 3))]
    try:
        api.concat_unimodal_logits(feats, head)
    except NotImplementedError as exc:
        assert "linear.weight" in str(exc), exc
        refused.append("concat_unimodal_logits")
    bal = api.OGMGE(2)                                         # feature-level taps: fine under FSDP2
    y = torch.randint(0, 4, (8,))
    bal.observe(torch.randn(2, 8, 4), y)
    head(torch.cat(bal.tap(feats), 1)).sum().backward()
    print("REFUSED", ",".join(refused))
finally:
    dist.destroy_process_group()
"""


def test_sharded_parameters_are_refused_with_a_clear_error():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "REFUSED OGMGE,OGM,MLB,MMPareto,concat_unimodal_logits" in proc.stdout, proc.stdout
