"""The demo's `--backbone resnet18` path end to end on CPU, shrunk to a few seconds.

`python -m mmkernels demo` has flags for the steps, seeds, methods and batch size but not for the data set size
(3000/500/1500 rows, every one of them pushed through two ResNet-18s for the evaluation and the linear probes) nor
for the 20 untimed warm-up steps. So the CLI runs in-process (cli.main) with make_dataset shrunk to 64/16/32 rows
and warmup_steps=1 (so that --steps 3 still times two steps); the model building, the runners, the training loop,
the probes and the report are the demo's own code.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

pytest.importorskip("torchvision")

from mmkernels.demo import cli, data, train  # noqa: E402
from mmkernels.demo.methods import LABELS, METHODS  # noqa: E402
from mmkernels.demo.models import SyntheticResNetEncoder  # noqa: E402

STEPS, BATCH = 3, 8
RESNET18_CONVS = 20  # stem + 16 in the basic blocks + 3 downsample projections


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_resnet18")
    mp = pytest.MonkeyPatch()
    runners, models = {}, []
    make_dataset, make_method, build_model = data.make_dataset, train.make_method, train.build_model

    def recording_make_method(name, model, **kw):
        runners[name] = make_method(name, model, **kw)
        return runners[name]

    def recording_build_model(*args, **kw):
        models.append(build_model(*args, **kw))
        return models[-1]

    mp.setattr(cli, "make_dataset", lambda seed: make_dataset(seed, n_train=64, n_dev=16, n_test=32))
    mp.setattr(cli, "DemoConfig", functools.partial(train.DemoConfig, warmup_steps=1))
    mp.setattr(train, "make_method", recording_make_method)
    mp.setattr(train, "build_model", recording_build_model)
    try:
        rc = cli.main(
            [
                "--backbone",
                "resnet18",
                "--steps",
                str(STEPS),
                "--seeds",
                "1",
                "--batch-size",
                str(BATCH),
                "--methods",
                ",".join(METHODS),
                "--out",
                str(out),
            ]
        )
    finally:
        mp.undo()
    return rc, out, runners, models


def test_resnet18_demo_runs_and_writes_outputs(resnet_run):
    rc, out, _, _ = resnet_run
    assert rc == 0
    for name in ("results.json", "table.md", "demo.png"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    for m in METHODS + ["audio alone", "visual alone"]:
        assert LABELS[m] in table, m


def test_resnet18_results_json(resnet_run):
    _, out, _, _ = resnet_run
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["backbone"] == "resnet18" and res["config"]["steps"] == STEPS
    runs = {r["method"]: r for r in res["runs"]}
    assert set(runs) == set(METHODS) | {"audio alone", "visual alone"}
    for name, r in runs.items():
        assert 0.0 <= r["fused_acc"] <= 1.0, name
        assert r["ms_per_step"] > 0.0, name  # two timed steps after the one warm-up step
        probes = [a for a in r["modality_acc"] if not math.isnan(a)]
        assert len(probes) == (1 if name.endswith("alone") else 2) and all(0.0 <= a <= 1.0 for a in probes), name
    for name in METHODS:
        r = runs[name]
        assert r["trace_steps"] == [0, STEPS - 1], name  # trace_every 10: the first and the last step
        if name != "joint":  # every balancer traces M = 2 finite coefficients
            assert all(len(c) == 2 and all(math.isfinite(v) for v in c) for c in r["coef_trace"]), name


def test_resnet18_models_and_runners(resnet_run):
    """What the resnet18 path built: two ResNet-18 encoders (1- and 3-channel 64x64 images, 512-d features), and the
    authors' OGM-GE modulating exactly the conv weights."""
    _, _, runners, models = resnet_run
    assert len(models) == len(METHODS)
    model = runners["ogm_ge"].model
    assert all(isinstance(enc, SyntheticResNetEncoder) for enc in model.encoders)
    assert model.encoders[0].to_image.shape == (1, 64, 64) and model.encoders[1].to_image.shape == (3, 64, 64)
    assert model.head.in_features == 1024 and model.head.out_features == 6
    x = [torch.randn(BATCH, 16), torch.randn(BATCH, 64)]
    model.eval()
    with torch.no_grad():
        feats = model.encode(x)
        assert [tuple(f.shape) for f in feats] == [(BATCH, 512), (BATCH, 512)]
        assert tuple(model(x).shape) == (BATCH, 6)
    groups = runners["ogm_ge"].bal._params
    assert [len(g) for g in groups] == [RESNET18_CONVS, RESNET18_CONVS]
    assert all(p.dim() == 4 for g in groups for p in g)
    assert groups[0][0].shape[1] == 1 and groups[1][0].shape[1] == 3  # the stems take 1 and 3 channels
    assert runners["ogm_ge"].bal.step_count == STEPS
    assert all(runners[m].bal.step_count == STEPS for m in METHODS if m != "joint")
