"""Every balancer of mmkernels.api under CPU AMP (issue 18, item 4): one training step (the valuation balancers: one
valuation pass, value() + rows(), then a training step on those rows) under bf16 autocast, and one under fp16
autocast with torch.amp.GradScaler. The statistics stay fp32, finite and close to those of the same step in fp32;
the gradients are finite and GradScaler takes the step. Then an fp16 overflow in an encoder's gradient: GradScaler
must skip that step, as in plain training."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import mmkernels.api as api

from _api_models import C, FEAT, TinyModel, batch

# Statistics against the fp32 step, atol = rtol: bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.0039), the
# logits pass two bf16 matmuls and the coefficients a softmax score ratio (alpha = 2 doubles its error); the largest
# deviation seen here is 0.004 (MMPareto's cos), 0.02 leaves 5x. fp16 keeps 11 bits (2^-11 = 0.0005; seen: 0.0005).
# The valuation statistics count argmax hits: equal unless a top-two logit gap were within rounding (none here).
TOL = {torch.bfloat16: 0.02, torch.float16: 0.005}
STATS = ("scores", "ratios", "coefficients")
SCALE = 2.0**16  # GradScaler's default init_scale
MAKERS = {
    "ogmge": lambda m: api.OGMGE(2, alpha=2.0, seed=3),
    "ogm": lambda m: api.OGM(2, alpha=2.0),
    "opm": lambda m: api.OPM(2, seed=3),
    "agm": lambda m: api.AGM(2, alpha=2.0),
    "mlb": lambda m: api.MLB(2),
    "olm": lambda m: api.OLM(2),
    "pmr": lambda m: api.PMR(2, num_classes=C, alpha=1.5),
    "mmpareto": lambda m: api.MMPareto(2, params=[e.parameters() for e in m.encoders]),
    "sample_valuation": lambda m: api.SampleValuation(2, 16, start=1),
    "modality_valuation": lambda m: api.ModalityValuation(2, 16, start=1, alpha=2.0, seed=3),
}


def _unimodal_heads(model):
    """MMPareto's unimodal heads, seeded so that encoder 0's two gradients conflict (cos -0.12), encoder 1's agree."""
    g = torch.Generator().manual_seed(6)
    model.uni = torch.nn.ModuleList(torch.nn.Linear(FEAT, C) for _ in range(2))
    with torch.no_grad():
        for p in model.uni.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _forward_backward(kind, model, bal, xs, y, scale):
    """The step's forward, balancer and backward of scale(loss) (as in tests/test_compile_api.py::_step)."""
    if kind == "agm":
        return scale(F.cross_entropy(bal.shapley_forward(xs, y, model=model), y)).backward()
    feats = model.feats(xs)
    if kind == "mmpareto":
        losses = [scale(F.cross_entropy(h(f), y)) for h, f in zip(model.uni, feats)]
        return bal.backward(scale(F.cross_entropy(model.fuse(feats), y)), losses)
    if kind == "opm":
        bal.observe(api.concat_unimodal_logits(feats, model.head), y)
        loss = F.cross_entropy(model.fuse(bal.drop(feats)), y)
    elif kind == "mlb":
        feats = bal.tap(feats)
        loss = bal.loss(model.fuse(feats), api.concat_unimodal_logits(feats, model.head, detach=False), y)
    elif kind == "olm":
        loss = F.cross_entropy(bal.combine(api.concat_unimodal_logits(feats, model.head, detach=False)), y)
    elif kind == "pmr":
        loss = F.cross_entropy(model.fuse(feats), y) + bal.loss(feats, y)
    else:
        bal.observe(api.concat_unimodal_logits(feats, model.head), y)
        loss = F.cross_entropy(model.fuse(bal.tap(feats)), y)
    scale(loss).backward()


def run(kind, dtype, model):
    """One step of `kind` under autocast(dtype) (None: fp32; fp16 with a GradScaler) -> (balancer, gradients)."""
    xs, y = batch(2)
    if kind == "mmpareto":
        _unimodal_heads(model)
    bal = MAKERS[kind](model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE) if dtype == torch.float16 else None
    amp = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    if kind == "olm":
        bal.report([1.0, 1.2], [1.1, 1.3])  # L0; the report after the step refits w from this step's logit norms
    if kind == "pmr":
        bal.begin_refresh()
        with amp, torch.no_grad():
            bal.refresh(model.feats(xs), y)
        bal.end_refresh()
    if kind.endswith("valuation"):
        index = bal.valuation_indices(0) if kind == "modality_valuation" else torch.arange(16)
        with amp, torch.no_grad():
            bal.value(bal.subset_logits(model.feats([x[index] for x in xs]), model.fuse), y[index], index)
        rows, keep = bal.rows(1)
        xs, y = [x[rows] for x in xs], y[rows]
    with amp:
        if kind.endswith("valuation"):
            loss = F.cross_entropy(model.fuse(api.apply_keep(model.feats(xs), keep)), y)
            (scaler.scale(loss) if scaler else loss).backward()
        else:
            _forward_backward(kind, model, bal, xs, y, scaler.scale if scaler else lambda t: t)
    if scaler is not None:
        scaler.unscale_(opt)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == SCALE, "GradScaler skipped the step (inf/NaN gradients)"
    else:
        opt.step()
    bal.step()
    if kind == "olm":
        bal.report([0.8, 1.1], [0.9, 1.25])
    return bal, grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16_gradscaler"])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_amp_step(kind, dtype):
    base = TinyModel(2)
    model = copy.deepcopy(base)
    bal, grads = run(kind, dtype, model)
    ref, _ = run(kind, None, copy.deepcopy(base))
    assert len(grads) == len(list(model.parameters())) and all(torch.isfinite(g).all() for g in grads.values())
    for name in STATS:
        got, want = getattr(bal, name), getattr(ref, name)
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype], msg=lambda s: f"{kind} {name}: {s}")
    assert bal.flag.item() == ref.flag.item() == 0
    if kind == "mmpareto":  # the Pareto rule acted on encoder 0 (conflict) and not on encoder 1
        assert bal.scores.tolist() == [1.0, 0.0]


def _overflow_step(path):
    """fp16 + GradScaler on a batch whose modality 0 is 30x larger: encoder 0's scaled weight gradient overflows
    fp16, the head's does not. Returns (scale after the step, whether encoder 0 moved)."""
    xs, y = batch(2)
    xs = [xs[0] * 30, xs[1]]
    model = TinyModel(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    w0 = model.encoders[0][0].weight.detach().clone()
    if path == "protocol":
        bal = api.MMPareto(2, params=[e.parameters() for e in model.encoders], optimizer=opt)
        with torch.autocast("cpu", dtype=torch.float16):
            api.train_step(model, bal, opt, [(xs, y)], scaler=scaler)
    else:
        bal = api.MMPareto(2, params=[e.parameters() for e in model.encoders])
        with torch.autocast("cpu", dtype=torch.float16):
            feats = model.feats(xs)
            u = api.zero_out_unimodal_logits(model.fuse, feats)  # the protocol's default unimodal logits
            loss_mm, losses = F.cross_entropy(model.fuse(feats), y), [F.cross_entropy(v, y) for v in u]
        if path == "plain":
            scaler.scale(loss_mm + sum(losses)).backward()
        else:
            bal.backward(scaler.scale(loss_mm), [scaler.scale(v) for v in losses])
        scaler.step(opt)
        scaler.update()
    return scaler.get_scale(), not torch.equal(w0, model.encoders[0][0].weight)


@pytest.mark.parametrize("path", ["plain", "protocol"])
def test_gradscaler_skips_an_encoder_overflow(path):
    """Plain training (no balancer) and MMPareto through the protocol (train_step: unscale_ runs before the combine,
    so the scaler sees the inf): the step is skipped, the scale halved."""
    assert _overflow_step(path) == (SCALE / 2, False)


@pytest.mark.xfail(
    strict=True,
    reason="MMPareto.backward() replaces an encoder's non-finite (overflowed, scaled) gradient by 0 and sets flag 1, "
    "so GradScaler finds no inf: it steps without that encoder's gradient and keeps the scale "
    "(AssertionError: assert (65536.0, False) == (32768.0, False))",
)
def test_gradscaler_skips_an_encoder_overflow_through_mmpareto_backward():
    assert _overflow_step("backward") == (SCALE / 2, False)
