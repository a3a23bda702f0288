"""`python -m mmkernels demo --quick` end to end on the synthetic set, its properties, and the training code with any
number of views (M = 8 on random data)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mmkernels.demo.data import Splits, Views, make_dataset
from mmkernels.demo.methods import LABELS, METHODS
from mmkernels.demo.report import format_diagnostics, format_table, summarize
from mmkernels.demo.train import DemoConfig, train_method, train_unimodal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dataset_is_deterministic_and_balanced():
    a, b = make_dataset(3), make_dataset(3)
    assert a.names == ("audio", "visual") and a.dims == [16, 64]
    assert torch.equal(a.train.views[0], b.train.views[0]) and torch.equal(a.test.views[1], b.test.views[1])
    assert not torch.equal(make_dataset(4).train.views[0], a.train.views[0])
    assert torch.bincount(a.train.labels).tolist() == [500] * 6
    assert len(a.dev) == 500 and len(a.test) == 1500
    with pytest.raises(ValueError, match="num_classes"):
        make_dataset(0, num_classes=5)


def test_visual_has_no_linear_signal_audio_has():
    """Class means of the raw visual input vanish (the sign is random per sample); audio's do not."""
    d = make_dataset(0).train
    for x, big in ((d.views[0], True), (d.views[1], False)):
        means = torch.stack([x[d.labels == c].mean(0) for c in range(6)])
        assert (means.norm(dim=1).min() > 2.0) == big


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [sys.executable, "-m", "mmkernels", "demo", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, out


def test_demo_quick_prints_table_with_every_method(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "fused acc %" in text and "visual acc %" in text and "balancing %" in text and "peak MiB" in text
    assert "audio: acc % / d" in text and "imbalance (pts)" in text  # the diagnostics table
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
    joint_visual, alone_visual = rows["joint"]["probe"][1][0], rows["visual alone"]["probe"][1][0]
    assert alone_visual - joint_visual > 0.10, (joint_visual, alone_visual)
    assert rows["joint"]["imbalance"][0] > rows["mlb"]["imbalance"][0]  # MLB evens the unimodal accuracies
    assert rows["joint"]["fused"][0] > rows["audio alone"]["fused"][0]  # visual still adds information
    for r in data["runs"]:
        if r["method"] not in ("joint",) and not r["method"].endswith("alone"):
            assert r["coef_trace"] and all(c is not None and len(c) == 2 for c in r["coef_trace"])


def _random_splits(m, n=(48, 16, 24), num_classes=3, seed=0):
    """M random views [N, 5 + m] with a weak class signal in each (just enough for every code path to run)."""
    g = torch.Generator().manual_seed(seed)

    def part(rows):
        y = torch.arange(rows) % num_classes
        return Views([torch.randn(rows, 5 + j, generator=g) + y[:, None].float() for j in range(m)], y)

    return Splits(part(n[0]), part(n[1]), part(n[2]), num_classes, tuple(f"v{j}" for j in range(m)))


@pytest.fixture
def one_thread():
    """Tiny MLP steps: one thread, as the demo's CLI sets (two threads on a busy 2-core machine are ~10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_and_report_with_eight_views(one_thread):
    """M = 8 (the API's maximum): every method trains, traces 8 coefficients, reports 8 probes, 8 unimodal
    accuracies and 8 competition strengths; both tables have a column per view."""
    splits = _random_splits(8)
    cfg = DemoConfig(steps=3, batch_size=16, warmup_steps=1, probe_iters=3)
    runs, concepts = [], []
    for m in range(8):
        result, concept = train_unimodal(splits, m, 0, cfg)
        assert result.method == f"v{m} alone" and concept[0].shape == (16, 3) and concept[1].shape == (24, 3)
        runs.append(result)
        concepts.append(concept)
    for method in METHODS:
        r = train_method(splits, method, 0, cfg, concepts=concepts)
        assert len(r.modality_acc) == len(r.unimodal_acc) == len(r.competition) == 8, method
        assert r.peak_mib != r.peak_mib  # nan on CPU
        if method != "joint":
            assert all(len(c) == 8 for c in r.coef_trace), method
        runs.append(r)
    rows = summarize(runs, splits.names)
    assert [r["method"] for r in rows] == METHODS + [f"v{m} alone" for m in range(8)]
    for text in (format_table(rows, splits.names), format_diagnostics(rows, splits.names)):
        assert all(f"v{m}" in text.splitlines()[0] for m in range(8))
    assert rows[0]["verdict"] == "" and "pts fused" in rows[1]["verdict"]


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_update_mode_rows_measure_the_update_ratio_achieved(one_thread, optimizer):
    """--optimizer adam: the parameter-mode rows report the update-norm ratio achieved per view (a counterfactual
    unmodulated step on the probe steps). modulate="update" achieves k (MLB has no noise); "grad" under Adam does
    not."""
    from mmkernels.demo.report import format_update_ratios

    splits = _random_splits(2)
    cfg = DemoConfig(steps=21, batch_size=16, warmup_steps=1, probe_iters=3, optimizer=optimizer, trace_every=5)
    runs = [train_method(splits, method, 0, cfg) for method in ("mlb_params", "mlb_update", "ogm_ge_update")]
    grad, update = runs[0], runs[1]
    torch.testing.assert_close(torch.tensor(update.update_ratio), torch.tensor(update.update_coef), rtol=1e-4, atol=0)
    ratio, k = torch.tensor(grad.update_ratio), torch.tensor(grad.update_coef)
    assert ((ratio - 1).abs() < 0.5 * (k - 1).abs()).all(), (ratio, k)  # Adam divides most of k out
    text = format_update_ratios(summarize(runs, splits.names), splits.names)
    assert "achieved / k" in text.splitlines()[0] and len(text.splitlines()) == 2 + 3
