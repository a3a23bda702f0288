"""The PMR balancer (python_api/pmr.py): a full small training loop against an authors'-style transcription, resume
bit-identical, the window, errors, no host sync in a training step, read-only statistics, the sync path."""

import copy

import pytest
import torch
import torch.nn.functional as F

import mmkernels.api.pmr as api_pmr
from mmkernels import reference as R
from mmkernels.api.pmr import PMR

from _api_models import C, TinyModel

N_BATCHES, B = 10, 12


def _data(m=2, seed=3):
    """N_BATCHES batches; modality 0 is informative (class-dependent shift), the others mostly noise."""
    g = torch.Generator().manual_seed(seed)
    from _api_models import IN_DIMS

    out = []
    for _ in range(N_BATCHES):
        y = torch.randint(0, C, (B,), generator=g)
        xs = []
        for i in range(m):
            x = torch.randn(B, IN_DIMS[i], generator=g)
            x[:, 0] += (2.0 if i == 0 else 0.3) * y.float()
            xs.append(x)
        out.append((xs, y))
    return out


def _refresh_batches(data):
    return data[: max(1, len(data) // 10)]  # the authors' first floor(n / 10) batches


def _run_balancer(model, bal, data, epochs, opt, start_epoch=0, log=None):
    for epoch in range(start_epoch, epochs):
        bal.set_epoch(epoch)
        model.eval()
        bal.begin_refresh()
        with torch.no_grad():
            for xs, y in _refresh_batches(data):
                bal.refresh(model.feats(xs), y)
        bal.end_refresh()
        model.train()
        for xs, y in data:
            feats = model.feats(xs)
            loss = F.cross_entropy(model.fuse(feats), y) + bal.loss(feats, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            bal.step()
            if log is not None:
                log.append((bal.coefficients.clone(), bal.scores.clone()))


def _run_authors_style(model, data, epochs, opt, *, alpha, mu, end, authors_schedule=False):
    """The authors' loop, transcribed with the literal reference (per-class Python loops, the M = 2 switch).
    authors_schedule: their refresh calls as their trainer makes them, calculate_prototype(epoch=0) before epoch 0
    and calculate_prototype(epoch) after each epoch e, with a plain class mean while epoch <= 0, so the first two
    refreshes are plain means (the EMA starts at the third); else the paper's reading (EMA from the second)."""
    protos = None
    for epoch in range(epochs):
        model.eval()
        with torch.no_grad():
            rows = [model.feats(xs) for xs, _ in _refresh_batches(data)]
            z = [torch.cat([r[m] for r in rows]) for m in range(len(rows[0]))]
            y = torch.cat([yy for _, yy in _refresh_batches(data)])
            old = protos if protos is not None else [[[0.0] * zm.shape[1] for _ in range(C)] for zm in z]
            called_with = 0 if epoch == 0 else epoch - 1  # the epoch argument of the authors' call
            plain = called_with <= 0 if authors_schedule else protos is None
            protos = R.pmr_literal_prototypes([zm.tolist() for zm in z], y.tolist(), old, mu=mu, first=plain)
        model.train()
        for xs, y in data:
            feats = model.feats(xs)
            loss = F.cross_entropy(model.fuse(feats), y)
            if epoch < end:
                lit = R.pmr_literal([f.tolist() for f in feats], protos, y.tolist(), alpha=alpha)
                for m, f in enumerate(feats):
                    if lit["coefficients"][m] != 0:
                        P = torch.tensor(protos[m], device=f.device)
                        logp = torch.log_softmax(-torch.cdist(f, P), 1)
                        loss = loss + lit["coefficients"][m] * F.nll_loss(logp, y)
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.mark.parametrize("m", [2, 3])
def test_training_loop_matches_authors_style(m):
    data = _data(m)
    model = TinyModel(m, seed=1)
    twin = copy.deepcopy(model)
    bal = PMR(m, num_classes=C, alpha=1.5, mu=0.2, end=2, unit="epoch")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    log = []
    _run_balancer(model, bal, data, 3, opt, log=log)
    _run_authors_style(twin, data, 3, torch.optim.SGD(twin.parameters(), lr=0.1), alpha=1.5, mu=0.2, end=2)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda s: f"{n}: {s}")
    fired = torch.stack([c for c, _ in log[: 2 * N_BATCHES]])
    assert (fired > 0).any(), "the PCE term never fired: the comparison would not test it"
    assert all(c.abs().sum().item() == 0 for c, _ in log[2 * N_BATCHES :])  # epoch 2 is outside the window
    assert bal.refreshes == 3


def test_resume_is_bit_identical():
    data = _data(2)
    model = TinyModel(2, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    bal = PMR(2, num_classes=C, alpha=1.0, mu=0.5, unit="epoch")
    _run_balancer(model, bal, data, 2, opt)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(bal.state_dict()))
    log_a = []
    _run_balancer(model, bal, data, 4, opt, start_epoch=2, log=log_a)

    model2 = TinyModel(2, seed=9)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    bal2 = PMR(2, num_classes=C, alpha=1.0, mu=0.5, unit="epoch")
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    bal2.load_state_dict(saved[2])
    log_b = []
    _run_balancer(model2, bal2, data, 4, opt2, start_epoch=2, log=log_b)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    for (ca, sa), (cb, sb) in zip(log_a, log_b):
        assert torch.equal(ca, cb) and torch.equal(sa, sb)
    for pa, pb in zip(bal.prototypes, bal2.prototypes):
        assert torch.equal(pa, pb)
    assert bal2.step_count == bal.step_count and bal2.refreshes == bal.refreshes


def _ready(m=2, **kw):
    bal = PMR(m, num_classes=C, **kw)
    model = TinyModel(m)
    ((xs, y),) = _data(m)[:1]
    with torch.no_grad():
        bal.update_prototypes(model.feats(xs), y)
    return bal, model, xs, y


def test_window_enabled_and_eval_give_exactly_zero():
    bal, model, xs, y = _ready(start=2, end=3)  # step window
    for step in range(4):
        feats = model.feats(xs)
        loss = bal.loss(feats, y)
        inside = 2 <= step < 3
        if inside:  # the weaker modality gets alpha and a positive PCE term
            assert bal.coefficients.tolist().count(1.0) == 1 and loss.item() > 0
        else:
            assert loss.item() == 0 and bal.coefficients.abs().sum().item() == 0
            loss.backward()  # a zero gradient, never NaN
            assert all(
                torch.equal(p.grad, torch.zeros_like(p.grad)) for p in model.encoders.parameters() if p.grad is not None
            )
        model.zero_grad()
        bal.step()
    bal.eval()
    assert bal.loss(model.feats(xs), y).item() == 0
    bal.train()
    bal.enabled = False
    assert bal.loss(model.feats(xs), y).item() == 0


def test_gradient_reaches_only_the_weak_encoders():
    bal, model, xs, y = _ready(3, alpha=1.0)
    feats = model.feats(xs)
    bal.loss(feats, y).backward()
    coef = bal.coefficients
    for m in range(3):
        g = model.encoders[m][0].weight.grad
        assert (g is not None and g.abs().sum().item() > 0) == (coef[m].item() > 0)
    assert model.head.weight.grad is None  # the PCE term never touches the head


def test_errors_and_rejected_calls_change_nothing():
    bal = PMR(2, num_classes=C)
    model = TinyModel(2)
    ((xs, y),) = _data(2)[:1]
    feats = model.feats(xs)
    with pytest.raises(RuntimeError, match="before any prototype"):
        bal.loss(feats, y)
    with pytest.raises(RuntimeError, match="begin_refresh"):
        bal.refresh(feats, y)
    bal.begin_refresh()
    with pytest.raises(RuntimeError, match="saw no batch"):
        bal.end_refresh()
    bad = y.clone()
    bad[0] = C
    with pytest.raises(ValueError, match="labels"):
        bal.refresh(feats, bad)
    with pytest.raises(ValueError, match="len\\(features\\)"):
        bal.refresh(feats[:1], y)
    with pytest.raises(ValueError, match="batch size"):
        bal.refresh([feats[0], feats[1][:3]], y)
    bal.refresh(feats, y)
    bal.end_refresh()
    with pytest.raises(ValueError, match="widths"):
        bal.loss([feats[0], feats[1][:, :2]], y)
    for kw, match in (({"alpha": -1.0}, "alpha"), ({"mu": 2.0}, "mu"), ({"num_classes": 0}, "num_classes")):
        with pytest.raises(ValueError, match=match):
            PMR(2, **{"num_classes": C, **kw})
    state = bal.state_dict()
    before = [p.clone() for p in bal.prototypes]
    broken = {**state, "prototypes": torch.zeros(2, C + 1, 6)}
    with pytest.raises(ValueError, match="prototypes"):
        bal.load_state_dict(broken)
    other = PMR(2, num_classes=C, alpha=3.0)
    with pytest.raises(ValueError, match="hyperparameters"):
        other.load_state_dict(state)
    assert other.prototypes is None and all(torch.equal(a, b) for a, b in zip(before, bal.prototypes))
    bal.loss(feats, y)
    with pytest.raises(RuntimeError, match="twice"):
        bal.loss(feats, y)
    assert not hasattr(bal, "tap")  # PMR acts through its loss term


def test_statistics_read_only_fp32_detached():
    bal, model, xs, y = _ready()
    bal.loss(model.feats(xs), y)
    for name in ("scores", "ratios", "coefficients", "flag", "pce"):
        t = getattr(bal, name)
        assert t.dtype == torch.float32 and not t.requires_grad
        with pytest.raises(AttributeError):
            setattr(bal, name, t)
    assert bal.nonfinite.dtype == torch.bool
    assert not any(p.requires_grad for p in bal.prototypes)


def test_different_widths_and_ignored_rows():
    g = torch.Generator().manual_seed(0)
    za, zv = torch.randn(8, 3, generator=g), torch.randn(8, 5, generator=g)
    y = torch.randint(0, C, (8,), generator=g)
    y[2] = -100
    bal = PMR(2, num_classes=C, alpha=0.6)
    bal.update_prototypes([za, zv], y)
    assert [tuple(p.shape) for p in bal.prototypes] == [(C, 3), (C, 5)]
    za2, zv2 = (za + 0.1).requires_grad_(), (zv - 0.2).requires_grad_()
    loss = bal.loss([za2, zv2], y)
    want = R.pmr_forward_ref(R.pmr_pad([za2.detach(), zv2.detach()]), R.pmr_pad(bal.prototypes), y, alpha=0.6)
    torch.testing.assert_close(loss, want["loss"])
    loss.backward()
    assert za2.grad[2].abs().sum().item() == 0 and zv2.grad[2].abs().sum().item() == 0


def test_training_step_has_no_host_reads(monkeypatch):
    from test_sync_free import SyncGuard

    monkeypatch.setattr(api_pmr, "check_label_values", lambda *a, **k: None)  # the deliberate CPU label check
    data = _data(2)
    model = TinyModel(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bal = PMR(2, num_classes=C, optimizer=opt)

    def refresh():
        bal.begin_refresh()
        with torch.no_grad():
            bal.refresh(model.feats(data[0][0]), data[0][1])
        bal.end_refresh()

    def step():
        xs, y = data[1]
        feats = model.feats(xs)
        loss = F.cross_entropy(model.fuse(feats), y) + bal.loss(feats, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    refresh()
    step()
    with SyncGuard() as guard:
        refresh()
        step()
    assert not guard.violations, guard.violations


def test_sync_path_single_rank(tmp_path):
    """sync=True under a one-rank gloo group: the all-reduce path of loss and refresh runs and changes nothing."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        bal_s, model, xs, y = _ready(sync=True)
        bal_n, _, _, _ = _ready(sync=False)
        for bal in (bal_s, bal_n):
            bal.begin_refresh()
            bal.refresh(model.feats(xs), y)
            bal.end_refresh()
        a, b = bal_s.loss(model.feats(xs), y), bal_n.loss(model.feats(xs), y)
        assert torch.equal(a, b) and torch.equal(bal_s.coefficients, bal_n.coefficients)
        assert all(torch.equal(p, q) for p, q in zip(bal_s.prototypes, bal_n.prototypes))
    finally:
        dist.destroy_process_group()


@pytest.mark.triton
def test_training_loop_on_the_triton_kernels(monkeypatch, device):
    """The same loop with the Triton kernels (the interpreter on CPU, or CUDA): the same parameters as the authors'
    style."""
    monkeypatch.setenv("MMKERNELS_BACKEND", "triton")
    data = [([x.to(device) for x in xs], y.to(device)) for xs, y in _data(3)[:4]]
    model = TinyModel(3, seed=4).to(device)
    twin = copy.deepcopy(model)
    bal = PMR(3, num_classes=C, alpha=1.5, mu=0.2, unit="epoch")
    _run_balancer(model, bal, data, 2, torch.optim.SGD(model.parameters(), lr=0.1))
    _run_authors_style(twin, data, 2, torch.optim.SGD(twin.parameters(), lr=0.1), alpha=1.5, mu=0.2, end=2)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("official", [False, True])
def test_refresh_schedule_default_and_official(official):
    """official=True: the authors' schedule (the second refresh is a plain mean too), against a literal
    transcription of their calls; the default follows the paper (EMA from the second refresh). The two differ."""
    data = _data(2)
    model = TinyModel(2, seed=1)
    twins = [copy.deepcopy(model), copy.deepcopy(model)]
    bal = PMR(2, num_classes=C, alpha=1.5, mu=0.2, end=3, unit="epoch", official=official)
    _run_balancer(model, bal, data, 3, torch.optim.SGD(model.parameters(), lr=0.1))
    for twin, schedule in zip(twins, (official, not official)):
        _run_authors_style(
            twin,
            data,
            3,
            torch.optim.SGD(twin.parameters(), lr=0.1),
            alpha=1.5,
            mu=0.2,
            end=3,
            authors_schedule=schedule,
        )
    for p, q, r in zip(model.parameters(), twins[0].parameters(), twins[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert max((p - r).abs().max().item() for p, r in zip(model.parameters(), twins[1].parameters())) > 1e-3


def test_refresh_skips_nonfinite_rows_and_recovers():
    """A NaN feature row in a refresh is skipped for its modality (counted in refresh_skipped), so the prototypes
    stay finite and the next loss has flag 0; prototypes poisoned with NaN (as an earlier release could leave them)
    are restored by the next clean refresh, even with mu = 0."""
    bal, model, xs, y = _ready(mu=0.0)
    feats = [f.detach().clone() for f in model.feats(xs)]
    feats[0][3, 1] = float("nan")
    bal.begin_refresh()
    bal.refresh(feats, y)
    bal.end_refresh()
    assert bal.refresh_skipped.tolist() == [1.0, 0.0]
    assert all(torch.isfinite(p).all() for p in bal.prototypes)
    keep = torch.arange(B) != 3
    want = R.pmr_prototypes_ref(
        torch.stack([feats[0][keep], feats[1][keep]]), y[keep], torch.zeros(2, C, 6), mu=0.0, first=True
    )[0]
    present = torch.bincount(y[keep], minlength=C) > 0
    torch.testing.assert_close(bal.prototypes[0][present], want[present])
    bal.loss(model.feats(xs), y)
    assert bal.flag.item() == 0.0
    bal.step()
    bal._protos[1, :, 0] = float("nan")  # poisoned
    bal.update_prototypes([f.detach() for f in model.feats(xs)], y)
    assert bal.refresh_skipped.tolist() == [0.0, 0.0]
    present = torch.bincount(y, minlength=C) > 0
    assert torch.isfinite(bal._protos[:, present]).all()


def test_load_state_dict_rejects_meta_prototypes_and_changes_nothing():
    bal, model, xs, y = _ready()
    bal.loss(model.feats(xs), y)
    before = bal.state_dict()
    sd = bal.state_dict()
    bad = {
        **sd,
        "prototypes": torch.empty(bal._protos.shape, device="meta"),
        "_extra_state": {**sd["_extra_state"], "step": 7},
    }
    with pytest.raises(ValueError, match="prototypes"):
        bal.load_state_dict(bad)
    after = bal.state_dict()
    assert after["_extra_state"] == before["_extra_state"]
    for k, v in before.items():
        assert k == "_extra_state" or torch.equal(after[k], v)


def test_int32_labels_give_the_int64_result():
    out = []
    for dtype in (torch.int64, torch.int32):
        bal, model = PMR(2, num_classes=C), TinyModel(2)
        ((xs, y),) = _data(2)[:1]
        with torch.no_grad():
            bal.update_prototypes(model.feats(xs), y.to(dtype))
        out.append((bal.loss(model.feats(xs), y.to(dtype)).detach(), bal.scores.clone(), bal._protos.clone()))
    for a, b in zip(*out):
        assert torch.equal(a, b)


def _readme_pmr_block() -> str:
    import os
    import re

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    (block,) = [b for b in blocks if "bal = PMR(" in b and "begin_refresh()" in b]
    return block


def test_readme_refresh_loop_uses_at_least_one_batch():
    """The README's PMR loop, run as written with a loader of 5 batches: the refresh pass takes at least one batch
    (the authors' max(1, n // 10)), so the first end_refresh() has rows and the PCE term is formed."""
    data = _data(2)[:5]
    model = TinyModel(2, seed=1)
    namespace = {
        "torch": torch,
        "C": C,
        "epochs": 2,
        "loader": [(xs[0], xs[1], y) for xs, y in data],
        "model": model,
        "enc_a": model.encoders[0],
        "enc_v": model.encoders[1],
        "head": lambda za, zv: model.fuse([za, zv]),
        "opt": torch.optim.SGD(model.parameters(), lr=0.1),
    }
    exec(_readme_pmr_block(), namespace)
    bal = namespace["bal"]
    assert bal.refreshes == 2 and all(torch.isfinite(p).all() for p in bal.prototypes)
    assert "max(1, len(loader) // 10)" in api_pmr.PMR.__doc__
