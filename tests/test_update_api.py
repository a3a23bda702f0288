"""modulate="update" (issue 13): the change of each listed tensor is k_m times the change the optimizer computed from
the same gradient, the optimizer's state is that of the unmodulated step, unlisted tensors are untouched.

Parameters are float64 so "relative 1e-6" measures the rule, not float32 rounding of p_old + k delta.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import mmkernels.api as api

from _api_models import TinyModel, batch

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
}
BALANCERS = {
    "ogm": lambda m, **kw: api.OGM(m, alpha=2.0, **kw),
    "ogm_ge-official": lambda m, **kw: api.OGMGE(m, alpha=2.0, official=True, **kw),  # isotropic GE noise
    "mlb": lambda m, **kw: api.MLB(m, alpha=2.0, **kw),
}


def listed(model):
    """Each modality's encoder tensors (the head is not listed: it must move as the optimizer says)."""
    return [list(enc.parameters()) for enc in model.encoders]


def setup(method, opt_name, m=2, device="cpu", **kw):
    model = TinyModel(m).double().to(device)
    opt = OPTIMIZERS[opt_name](model.parameters())
    bal = BALANCERS[method](m, params=listed(model), optimizer=opt, modulate="update", **kw)
    return model, opt, bal


def forward_observe(bal, model, xs, y):
    """One step's forward: observe the concat-head unimodal logits, return the loss (MLB: its multi-loss)."""
    feats = model.feats(xs)
    u = api.concat_unimodal_logits(feats, model.head)
    fused = model.fuse(feats)
    if isinstance(bal, api.MLB):
        return bal.loss(fused, list(u.detach()), y)
    bal.observe(u, y)
    return F.cross_entropy(fused, y)


def modulated_and_plain_step(method, opt_name, m=2, device="cpu", **kw):
    """One step with the balancer in "update" mode, and the unmodulated optimizer step on the SAME gradients (noise
    included) from an identical model and optimizer state. Returns (before, after, plain, optimizers, k)."""
    model, opt, bal = setup(method, opt_name, m, device=device, **kw)
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS[opt_name](twin.parameters())
    xs, y = batch(m, seed=3)
    xs, y = [x.double().to(device) for x in xs], y.to(device)
    before = copy.deepcopy(model.state_dict())
    loss = forward_observe(bal, model, xs, y)
    loss.backward()
    bal.modulate_grads()
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    k = bal.coefficients.clone()
    opt.step()
    twin_opt.step()
    return before, model, twin, opt, twin_opt, k


def assert_deltas(before, model, twin, k, rtol=1e-6):
    for name, p in model.named_parameters():
        delta, plain = p.detach() - before[name], twin.state_dict()[name] - before[name]
        scale = float(k[int(name.split(".")[1])]) if name.startswith("encoders.") else 1.0
        torch.testing.assert_close(delta, scale * plain, rtol=rtol, atol=1e-15, msg=lambda s: f"{name}: {s}")


def assert_same_optimizer_state(opt, twin_opt):
    a, b = opt.state_dict()["state"], twin_opt.state_dict()["state"]
    assert a.keys() == b.keys()
    for i in a:
        for key in a[i]:
            assert torch.equal(torch.as_tensor(a[i][key]), torch.as_tensor(b[i][key])), (i, key)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("method", list(BALANCERS))
def test_update_is_k_times_the_unmodulated_update(method, opt_name):
    before, model, twin, opt, twin_opt, k = modulated_and_plain_step(method, opt_name)
    assert (k != 1).any(), "the test needs a modulated modality"
    assert_deltas(before, model, twin, k)
    assert_same_optimizer_state(opt, twin_opt)


@pytest.mark.parametrize("m", [2, 3])
def test_update_mode_any_number_of_modalities(m):
    before, model, twin, opt, twin_opt, k = modulated_and_plain_step("mlb", "adam", m)
    assert (k != 1).any()
    assert_deltas(before, model, twin, k)


@pytest.mark.parametrize(
    "lane",
    [
        pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.backend("triton")]),
        pytest.param("ext", marks=[pytest.mark.ext, pytest.mark.backend(None)]),
    ],
)
def test_update_rule_on_every_backend_lane(lane, device):
    """The coefficients come from the lane's backend (the GE noise too on ext; it has no Triton kernel: CPU tensors
    run it on the C++ twin); the update rule holds the same."""
    for method in ("ogm", "mlb") + (("ogm_ge-official",) if lane == "ext" else ()):
        before, model, twin, opt, twin_opt, k = modulated_and_plain_step(method, "adamw-foreach", device=device)
        assert (k != 1).any()
        assert_deltas(before, model, twin, k)
        assert_same_optimizer_state(opt, twin_opt)


def _achieved_ratio(modulate: str, steps: int = 4):
    """Per step, ||delta of encoder m|| / ||delta the unmodulated optimizer would make||, OGM under Adam."""
    model = TinyModel(2).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    params = listed(model)
    bal = api.OGM(2, alpha=1.0, params=params, optimizer=opt, modulate=modulate)
    xs, y = batch(2, seed=3)
    xs = [x.double() for x in xs]
    ratios, ks = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = forward_observe(bal, model, xs, y)
        loss.backward()
        raw = [p.grad.clone() for p in model.parameters()]
        bal.modulate_grads()
        k = bal.coefficients.clone()
        state, snap = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
        probe = copy.deepcopy(model)  # the counterfactual: same state, unmodulated gradient
        probe_opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
        probe_opt.load_state_dict(state)
        for q, g in zip(probe.parameters(), raw):
            q.grad = g
        probe_opt.step()
        opt.step()
        got = [
            torch.cat(
                [
                    (p.detach() - snap[n]).flatten()
                    for n, p in model.named_parameters()
                    if n.startswith(f"encoders.{i}.")
                ]
            ).norm()
            for i in range(2)
        ]
        want = [
            torch.cat(
                [
                    (p.detach() - snap[n]).flatten()
                    for n, p in probe.named_parameters()
                    if n.startswith(f"encoders.{i}.")
                ]
            ).norm()
            for i in range(2)
        ]
        ratios.append(torch.stack([g / w for g, w in zip(got, want)]))
        ks.append(k)
    return torch.stack(ratios), torch.stack(ks)  # [steps, M] achieved update ratio, coefficient


def test_grad_mode_cancels_under_adam_update_mode_does_not():
    """A documented property, not a timing: Adam divides a gradient scale out, so in "grad" mode the achieved
    update ratio is ~1, not k (at Adam's first step exactly up to eps); "update" mode achieves k."""
    grad_ratio, grad_k = _achieved_ratio("grad")
    update_ratio, update_k = _achieved_ratio("update")
    torch.testing.assert_close(update_ratio, update_k.to(update_ratio.dtype), rtol=1e-6, atol=1e-12)
    suppressed = grad_k < 0.8
    assert suppressed[0].any() and suppressed.sum() >= 3, grad_k
    # grad mode: where k < 0.8 the update achieved is still >= 0.9 of the unmodulated one (first step: 1 - O(eps))
    assert (grad_ratio[suppressed] > 0.9).all(), (grad_ratio, grad_k)
    torch.testing.assert_close(grad_ratio[0], torch.ones_like(grad_ratio[0]), rtol=1e-4, atol=0)  # Adam's eps


def test_unlisted_tensors_and_outside_window_are_unmodulated():
    model = TinyModel(2).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    bal = api.OGM(2, alpha=2.0, params=listed(model), optimizer=opt, modulate="update", start=1)
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    xs, y = batch(2, seed=3)
    xs = [x.double() for x in xs]
    forward_observe(bal, model, xs, y).backward()
    bal.modulate_grads()
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    opt.step()
    twin_opt.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n  # step 0 is outside the window: bit-identical to the plain optimizer


def test_grad_scaler_skipped_step_changes_nothing():
    model, opt, bal = setup("ogm", "adam")
    model.float()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    xs, y = batch(2, seed=3)
    before = copy.deepcopy(model.state_dict())
    scaler.scale(forward_observe(bal, model, xs, y)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.unscale_(opt)
    bal.modulate_grads()
    scaler.step(opt)  # skipped: inf in the gradients
    scaler.update()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    assert opt.state_dict()["state"] == {}
    opt.zero_grad()
    forward_observe(bal, model, xs, y)  # the next step's observe ends the skipped one
    assert bal.skipped_steps == 1 and bal.step_count == 1


def _run(model, opt, bal, steps, seed0):
    for s in range(steps):
        xs, y = batch(2, seed=seed0 + s)
        xs = [x.double() for x in xs]
        opt.zero_grad()
        forward_observe(bal, model, xs, y).backward()
        bal.modulate_grads()
        opt.step()


@pytest.mark.parametrize("method", ["ogm_ge-official", "mlb"])
def test_resume_is_bit_identical(method):
    model, opt, bal = setup(method, "adamw-foreach")
    _run(model, opt, bal, 2, seed0=10)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), bal.state_dict()))
    _run(model, opt, bal, 2, seed0=20)
    model2, opt2, bal2 = setup(method, "adamw-foreach")
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    bal2.load_state_dict(saved[2])
    _run(model2, opt2, bal2, 2, seed0=20)
    for (n, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), n
    assert bal.state_dict()["_extra_state"]["hyperparameters"]["modulate"] == "update"


def test_snapshot_memory_is_the_listed_tensors():
    model, opt, bal = setup("ogm", "sgd")
    assert bal.update_snapshot_bytes() == sum(p.numel() * 8 for g in listed(model) for p in g)
    assert bal.modulate == "update"


# ----------------------------------------------------------------------------------------------- errors
def test_update_mode_errors_name_what_is_missing():
    model = TinyModel(2)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="params="):
        api.OGM(2, modulate="update", optimizer=opt)
    with pytest.raises(ValueError, match="optimizer="):
        api.MLB(2, modulate="update", params=listed(model))
    with pytest.raises(ValueError, match="modulate"):
        api.MLB(2, modulate="updates", params=listed(model), optimizer=opt)
    with pytest.raises(ValueError, match="LBFGS"):
        api.OGM(2, modulate="update", params=listed(model), optimizer=torch.optim.LBFGS(model.parameters()))
    only_head = torch.optim.Adam(model.head.parameters())
    with pytest.raises(ValueError, match=r"params\[0\]\[0\].*param_groups"):
        api.OGM(2, modulate="update", params=listed(model), optimizer=only_head)
    enc = list(model.encoders[0].parameters())
    with pytest.raises(ValueError, match=r"params\[1\]\[0\] is also listed"):
        api.OGM(2, modulate="update", params=[enc, enc[:1]], optimizer=opt)
    with pytest.raises(ValueError, match="noise='covariance'"):
        api.OGMGE(2, modulate="update", params=listed(model), optimizer=opt)  # paper OGM-GE: covariance taps
    with pytest.raises(ValueError, match="alpha"):
        api.OGM(2, alpha=-1.0, modulate="update", params=listed(model), optimizer=opt)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks  # rejected: nothing hooked


def test_step_before_modulate_grads_raises_and_changes_nothing():
    model, opt, bal = setup("ogm", "adam")
    xs, y = batch(2, seed=3)
    xs = [x.double() for x in xs]
    before = copy.deepcopy(model.state_dict())
    forward_observe(bal, model, xs, y).backward()
    with pytest.raises(RuntimeError, match="modulate_grads"):
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    assert opt.state_dict()["state"] == {}


def test_grad_mode_with_an_adaptive_optimizer_warns_once():
    """modulate="grad" (taps or parameter mode) with an Adam-family optimizer warns once per balancer class, pointing
    to modulate="update"; SGD, modulate="update" and no optimizer= do not warn."""
    import warnings

    import mmkernels.api._base as base

    base._WARNED_ADAPTIVE.clear()
    net = torch.nn.Linear(3, 2)
    adam = torch.optim.Adam(net.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="modulate='update'"):
        api.OGMGE(2, optimizer=adam)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        api.OGMGE(2, optimizer=adam)  # once per class
        api.MLB(2, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
        api.MLB(2, params=[[net.weight], [net.bias]], modulate="update", optimizer=adam)
        api.MLB(2)
    with pytest.warns(UserWarning, match="MLB"):
        api.MLB(2, optimizer=torch.optim.AdamW(net.parameters(), lr=0.1))
