"""`python -m mmkernels demo --quick` end to end, and the synthetic data set's properties."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mmkernels.demo.data import make_dataset
from mmkernels.demo.methods import LABELS, METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dataset_is_deterministic_and_balanced():
    a, b = make_dataset(3), make_dataset(3)
    assert torch.equal(a.train.audio, b.train.audio) and torch.equal(a.test.visual, b.test.visual)
    assert not torch.equal(make_dataset(4).train.audio, a.train.audio)
    assert torch.bincount(a.train.labels).tolist() == [500] * 6
    assert len(a.dev) == 500 and len(a.test) == 1500
    with pytest.raises(ValueError, match="num_classes"):
        make_dataset(0, num_classes=5)


def test_visual_has_no_linear_signal_audio_has():
    """Class means of the raw visual input vanish (the sign is random per sample); audio's do not."""
    d = make_dataset(0).train
    for x, big in ((d.audio, True), (d.visual, False)):
        means = torch.stack([x[d.labels == c].mean(0) for c in range(6)])
        assert (means.norm(dim=1).min() > 2.0) == big


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "mmkernels", "demo", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    return proc, out


def test_demo_quick_prints_table_with_every_method(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "fused acc %" in text and "visual acc %" in text and "balancing %" in text
    for m in METHODS + ["audio alone", "visual alone"]:
        assert LABELS[m] in text, m
    for name in ("results.json", "table.md", "demo.png"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_quick_reproduces_imbalance(quick_run):
    """Joint training leaves the visual encoder well below what it reaches alone (the phenomenon under study)."""
    proc, out = quick_run
    data = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in data["summary"]}
    assert set(METHODS) <= set(rows)
    joint_visual, alone_visual = rows["joint"]["visual"][0], rows["visual alone"]["visual"][0]
    assert alone_visual - joint_visual > 0.10, (joint_visual, alone_visual)
    assert rows["joint"]["fused"][0] > rows["audio alone"]["fused"][0]  # visual still adds information
    for r in data["runs"]:
        if r["method"] not in ("joint",) and not r["method"].endswith("alone"):
            assert r["coef_trace"] and all(c is not None and len(c) == 2 for c in r["coef_trace"])
