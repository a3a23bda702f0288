"""The benchmark pieces that are not timings: the authors'-style baselines compute the methods' math, and the
renderer turns pytest-benchmark JSON into the table. (The benchmark files themselves run in the `benchmarks` lane,
reduced and untimed: `pytest benchmarks --benchmark-disable`.)"""

import json
import math
import os
import sys

import pytest
import torch

from mmkernels import reference as ref
from mmkernels.demo.models import ConcatClassifier, MLPEncoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import authors_style  # noqa: E402
import render  # noqa: E402


def _model(M=2, seed=0):
    torch.manual_seed(seed)
    return ConcatClassifier([MLPEncoder(5 + m, width=8, out_dim=4) for m in range(M)], 3)


def _batch(M=2, B=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 5 + m, generator=g) for m in range(M)], torch.randint(0, 3, (B,), generator=g)


def test_loop_scores_match_reference():
    g = torch.Generator().manual_seed(0)
    u, y = torch.randn(7, 4, generator=g), torch.randint(0, 4, (7,), generator=g)
    s = ref.scores(u.unsqueeze(0), y, kind="prob")[0]
    assert torch.allclose(authors_style._loop_prob_score(u, y), s, atol=1e-6)
    ce = ref.scores(u.unsqueeze(0), y, kind="ce")[0]
    assert math.isclose(authors_style._loop_ce_score(u, y), ce.item(), rel_tol=1e-5)


@pytest.mark.parametrize("M", [2, 3])
def test_authors_agm_shapley_and_kappa(M):
    """The authors'-style AGM: loss on sum phi = f(all); kappa after two steps equals the reference formula."""
    model, (x, y) = _model(M), _batch(M)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the model stays fixed, so both steps see one f
    state = authors_style.AGMState(M)
    loss = authors_style.agm_step(model, x, y, opt, state, alpha=1.0, clip=10.0)
    model.eval()
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(model(x), y)
        outs = []
        for S in range(1, 2**M):
            outs.append(model([xi if (S >> m) & 1 else torch.zeros_like(xi) for m, xi in enumerate(x)]))
        phi = ref.shapley_combine(torch.stack(outs))
    assert torch.allclose(loss, full, atol=1e-5)
    s = ref.scores(phi, y, kind="ce")
    assert torch.allclose(torch.tensor(state.s_hat), s, atol=1e-5)
    assert state.steps == 1


def test_authors_ogm_ge_and_mlb_and_opm_steps_run():
    model, (x, y) = _model(), _batch()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert torch.isfinite(authors_style.ogm_ge_step(model, x, y, opt, alpha=0.8, weight_dims=(2,)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    heads = torch.nn.ModuleList([torch.nn.Linear(4, 3) for _ in range(2)])
    opt = torch.optim.SGD(list(model.parameters()) + list(heads.parameters()), lr=0.1)
    assert torch.isfinite(authors_style.mlb_step(model, heads, x, y, opt))
    import random

    assert torch.isfinite(authors_style.opm_step(model, x, y, opt, p_exe=1.0, rng=random.Random(0)))


def test_authors_mlb_scales_encoder_grads_by_k():
    """With lr 1 and no momentum the update of encoder m equals k_m times its multi-loss gradient."""
    model, (x, y) = _model(), _batch()
    heads = torch.nn.ModuleList([torch.nn.Linear(4, 3) for _ in range(2)])
    feats = model.encode(x)
    uni = [h(f) for h, f in zip(heads, feats)]
    loss = torch.nn.functional.cross_entropy(model.fuse(feats), y) + sum(
        torch.nn.functional.cross_entropy(u, y) for u in uni
    )
    w0 = model.encoders[0].net[0].weight
    (g,) = torch.autograd.grad(loss, w0)
    s = ref.scores(torch.stack([u.detach() for u in uni]), y, kind="prob") / y.shape[0]
    k = ref.mlb_coefficients(ref.ratio_mlb(s), alpha=0.8, beta_max=2.0)
    before = w0.detach().clone()
    opt = torch.optim.SGD(list(model.parameters()) + list(heads.parameters()), lr=1.0)
    authors_style.mlb_step(model, heads, x, y, opt, alpha=0.8)
    assert torch.allclose(before - model.encoders[0].net[0].weight.detach(), k[0] * g, atol=1e-5)


def _fake_bench(name, method, impl, M, median):
    return {
        "name": name,
        "group": f"train_step M={M}",
        "stats": {"median": median, "mean": median, "stddev": 0.0, "rounds": 3},
        "extra_info": {
            "impl": impl,
            "method": method,
            "M": M,
            "device": "cpu",
            "batch": 4,
            "shapes": [[1, 8, 8]],
            "full": False,
            "host_syncs": None,
            "kernels": None,
            "peak_mib": None,
        },
    }


def test_render_table_and_png(tmp_path):
    data = {
        "machine_info": {"node": "n", "cpu": {"brand_raw": "c"}, "python_version": "3"},
        "benchmarks": [
            _fake_bench("a", "joint", "mmkernels", 2, 0.010),
            _fake_bench("b", "agm", "mmkernels", 2, 0.012),
            _fake_bench("c", "agm", "authors", 2, 0.020),
            {
                "name": "test_coef[B32]",
                "group": "coefficients",
                "stats": {"median": 1e-4, "mean": 1e-4, "stddev": 0, "rounds": 5},
                "extra_info": {"B": 32},
            },
        ],
    }
    p = tmp_path / "r.json"
    p.write_text(json.dumps(data))
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    assert render.main([str(p), "--md", str(md), "--png", str(png)]) == 0
    text = md.read_text()
    assert "| agm | 2 | mmkernels | 12.000 | 1.200 |" in text
    assert "| agm | 2 | authors | 20.000 | 2.000 |" in text
    assert "### coefficients" in text and "test_coef[B32]" in text and "B=32" in text
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:4] == b"\x89PNG"
