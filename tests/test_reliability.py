"""Issue 10: no silent wrong result, AMP and DDP edge cases, the authors' behaviour under official=True.

Each test names the item it proves. Unmarked tests run in the reference lane; `triton` / `ext` tests repeat the
op-level checks on those backends (TRITON_INTERPRET=1 / the C++ CPU twins).
"""

from __future__ import annotations

import math
import os
import sys

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mmkernels.api as api  # noqa: E402
from mmkernels import _validate, reference as R  # noqa: E402
from mmkernels.coefficients import balance_coefficients  # noqa: E402
from mmkernels.noise import ge_isotropic_  # noqa: E402
from mmkernels.taps import modality_drop  # noqa: E402

from _api_models import TinyModel, batch  # noqa: E402

WARN = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy under the Triton interpreter


def _logits(m=2, b=12, c=5, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, b, c, generator=g) * (1 + torch.arange(m).view(m, 1, 1))
    return x.to(device), torch.randint(0, c, (b,), generator=g).to(device)


# ------------------------------------------------------------------------------------ 1. one-element tensors
def _ge_one_element_case():
    grads = [torch.tensor([0.3]), torch.randn(7, generator=torch.Generator().manual_seed(1)), torch.tensor(-2.0)]
    return grads, torch.tensor([0.5, 1.0])


def _check_ge_one_element(grads, before):
    for g in grads:
        assert torch.isfinite(g).all()
    # std := 0 for fewer than 2 elements: the noise is 1e-8 * n, so k * g survives almost exactly
    assert abs(float(grads[0]) - 0.5 * 0.3) < 1e-6
    assert abs(float(grads[2]) - 1.0 * -2.0) < 1e-6
    want = R.ge_isotropic(
        before,
        torch.tensor([0.5, 1.0, 1.0]),
        [n.view(g.shape) for n, g in zip(R.philox_ge_normals([1, 7, 1], 5, 3), before)],
    )
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


@pytest.mark.backend("reference")
def test_item1_ge_isotropic_one_element_tensor_is_finite_reference():
    grads, k = _ge_one_element_case()
    before = [g.clone() for g in grads]
    ge_isotropic_(grads, k, seed=5, offset=3, group_index=[0, 1, 1])
    _check_ge_one_element(grads, before)


@pytest.mark.ext
@pytest.mark.backend("ext")
def test_item1_ge_isotropic_one_element_tensor_is_finite_ext():
    grads, k = _ge_one_element_case()
    before = [g.clone() for g in grads]
    ge_isotropic_(grads, k, seed=5, offset=3, group_index=[0, 1, 1])
    _check_ge_one_element(grads, before)


class _PReLUModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoders = nn.ModuleList(
            [nn.Sequential(nn.Linear(5, 6), nn.PReLU()), nn.Sequential(nn.Linear(3, 6), nn.PReLU())]
        )
        self.head = nn.Linear(12, 4)

    def feats(self, xs):
        return [enc(x) for enc, x in zip(self.encoders, xs)]


def test_item1_ogmge_official_parameter_mode_with_prelu_stays_finite():
    model = _PReLUModel()
    enc = model.encoders
    bal = api.OGMGE(2, official=True, alpha=0.8, params=[enc[0].parameters(), enc[1].parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        xs, y = batch(2, b=8, seed=step)
        feats = model.feats(xs)
        bal.observe(api.concat_unimodal_logits(feats, model.head), y)
        opt.zero_grad()
        F.cross_entropy(model.head(torch.cat(feats, 1)), y).backward()
        bal.modulate_grads()
        opt.step()
        bal.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} became non-finite"


# ------------------------------------------------------------------------------------ 2. OLM non-finite
def test_item2_olm_report_nonfinite_loss_sets_flag():
    bal = api.OLM(2)
    bal.combine(torch.randn(2, 4, 3))
    bal.report([1.0, 1.0], [1.2, 1.1])
    bal.combine(torch.randn(2, 4, 3))
    bal.report([0.8, float("nan")], [1.0, 1.0])
    assert float(bal.flag) == 1.0 and bool(bal.nonfinite)
    assert torch.equal(bal.coefficients, torch.ones(2))
    bal.combine(torch.randn(2, 4, 3))
    bal.report([0.7, 0.9], [0.9, 0.95])  # finite again: flag cleared
    assert float(bal.flag) == 0.0


def test_item2_olm_first_report_nonfinite_is_flagged():
    bal = api.OLM(2)
    bal.report([float("inf"), 1.0], [1.0, 1.0])
    assert bool(bal.nonfinite)


# ------------------------------------------------------------------------------------ 3. one table of ranges
BAD = {"alpha": [-1.0, math.inf], "q_base": [0.0, 1.0, 1.5], "lam": [-0.1], "beta_max": [0.5], "clip": [0.0, -1.0]}
METHOD_OF = {"alpha": "ogm", "q_base": "opm", "lam": "opm", "beta_max": "mlb", "clip": "agm"}
BALANCER_OF = {"alpha": api.OGM, "q_base": api.OPM, "lam": api.OPM, "beta_max": api.MLB, "clip": api.AGM}


@pytest.mark.parametrize("name, value", [(n, v) for n, vs in BAD.items() for v in vs])
def test_item3_op_and_balancers_share_ranges(name, value):
    assert set(BAD) == set(_validate.HYPERPARAMETER_RANGES)
    x, y = _logits()
    with pytest.raises(ValueError, match=name):
        balance_coefficients(x, y, METHOD_OF[name], **{name: value})
    with pytest.raises(ValueError, match=name):
        BALANCER_OF[name](2, **{name: value})


def test_item3_ogm_alpha_negative_and_mlb_beta_below_one_rejected():
    x, y = _logits()
    with pytest.raises(ValueError, match=r"alpha must be a finite number in \[0.0, inf\)"):
        balance_coefficients(x, y, "ogm", alpha=-1)
    with pytest.raises(ValueError, match=r"beta_max must be a finite number in \[1.0, inf\)"):
        balance_coefficients(x, y, "mlb", beta_max=0.5)
    with pytest.raises(ValueError, match="tie"):
        balance_coefficients(x, y, "ogm_ge", tie=2)


# ------------------------------------------------------------------------------------ 4. out-of-range labels
def _bad_labels_flag(device="cpu"):
    x, y = _logits(c=4, device=device)
    y[3] = 4
    for method in ("ogm_ge", "ogm", "opm", "agm", "mlb"):
        out = balance_coefficients(x, y, method)
        assert float(out["flag"]) == 1.0, method
        neutral = 0.0 if method == "opm" else 1.0
        assert torch.equal(out["coefficients"], torch.full((2,), neutral, device=device)), method
    y[3] = -3
    assert float(balance_coefficients(x, y, "ogm")["flag"]) == 1.0


@pytest.mark.backend("reference")
def test_item4_out_of_range_labels_flag_reference():
    _bad_labels_flag()


@WARN
@pytest.mark.triton
@pytest.mark.backend("triton")
def test_item4_out_of_range_labels_flag_triton(device):
    _bad_labels_flag(device)


def test_item4_balancer_names_labels_on_cpu():
    x, y = _logits(c=4)
    y[2] = 9
    with pytest.raises(ValueError, match=r"labels\[2\] = 9"):
        api.OGM(2).observe(x, y)


# ------------------------------------------------------------------------------------ 5. errors that name things
@WARN
@pytest.mark.triton
@pytest.mark.backend("triton")
def test_item5_modality_drop_empty_batch_triton(device):
    feats = [torch.zeros(0, 3, device=device), torch.zeros(0, 5, device=device)]
    q = torch.tensor([0.5, 0.0], device=device)
    out = modality_drop(feats, q, seed=0, offset=0)
    assert [tuple(o.shape) for o in out] == [(0, 3), (0, 5)]
    out = modality_drop(torch.zeros(2, 0, 4, device=device), q, seed=0, offset=0)
    assert tuple(out.shape) == (2, 0, 4)


def test_item5_modality_drop_empty_batch_reference():
    out = modality_drop([torch.zeros(0, 3), torch.zeros(0, 5)], torch.tensor([0.5, 0.0]), seed=0, offset=0)
    assert [tuple(o.shape) for o in out] == [(0, 3), (0, 5)]


def test_item5_zero_out_unimodal_logits_names_head():
    linear = nn.Linear(8, 3)
    feats = [torch.randn(4, 4), torch.randn(4, 4)]
    with pytest.raises(TypeError, match="head must be a callable"):
        api.zero_out_unimodal_logits(feats, linear)  # arguments swapped
    with pytest.raises(TypeError, match="head must take a list of M feature tensors"):
        api.zero_out_unimodal_logits(linear, feats)  # a Linear takes one tensor, not the list
    u = api.zero_out_unimodal_logits(lambda fs: linear(torch.cat(fs, 1)), feats)
    assert tuple(u.shape) == (2, 4, 3)


def test_item5_load_state_dict_names_tensors_and_rejects_meta():
    bal = api.OGM(2)
    sd = bal.state_dict()
    host = sd["_extra_state"]
    broken = {k: v for k, v in sd.items() if k != "_extra_state"}
    with pytest.raises(ValueError, match="_extra_state"):
        bal.load_state_dict(broken)
    meta = {k: v if k == "_extra_state" else torch.empty_like(v, device="meta") for k, v in sd.items()}
    with pytest.raises(ValueError, match="meta"):
        bal.load_state_dict(meta)
    lacking = {k: v for k, v in sd.items() if k != "coefficients"}
    with pytest.raises(ValueError, match="coefficients"):
        bal.load_state_dict(lacking)
    bad_shape = {**sd, "scores": torch.zeros(3)}
    with pytest.raises(ValueError, match="scores"):
        bal.load_state_dict(bad_shape)
    bal._step = 7
    with pytest.raises(ValueError):
        bal.load_state_dict({"_extra_state": {**host, "step": 3}})
    assert bal.step_count == 7  # a rejected load changes nothing
    bal.load_state_dict(sd)
    assert bal.step_count == 0


def test_item5_seed_and_ignore_index_out_of_int64_named_at_construction():
    with pytest.raises(ValueError, match="seed"):
        api.OGMGE(2, seed=2**63)
    with pytest.raises(ValueError, match="ignore_index"):
        api.OGM(2, ignore_index=2**63)
    with pytest.raises(TypeError, match="ignore_index"):
        api.OGM(2, ignore_index=True)


@pytest.mark.parametrize(
    "lane",
    [
        pytest.param("reference", marks=pytest.mark.backend("reference")),
        pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.backend("triton"), WARN]),
    ],
)
def test_item5_ignore_index_beyond_int64_named_by_the_op(lane, device):
    x, y = _logits(device=device)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        balance_coefficients(x, y, "ogm", ignore_index=2**63)


# ------------------------------------------------------------------------------------ 6. rejected call, no state change
def test_item6_agm_bad_labels_then_retry_same_step():
    model = TinyModel(2, seed=0)
    bal = api.AGM(2, alpha=1.0)
    xs, y = batch(2, b=8)
    bad = y.clone()
    bad[0] = 99
    with pytest.raises(ValueError, match="labels"):
        bal.shapley_forward(xs, bad, encoders=list(model.encoders), head=model.fuse)
    assert int(bal._agm["steps"]) == 0
    out = bal.shapley_forward(xs, y, encoders=list(model.encoders), head=model.fuse)  # the retry in the same step works
    F.cross_entropy(out, y).backward()
    assert int(bal._agm["steps"]) == 1


# ------------------------------------------------------------------------------------ 7. statistics never require grad
def _no_grad_outputs(device="cpu"):
    x, y = _logits(device=device)
    x.requires_grad_(True)
    for method in ("ogm_ge", "ogm", "opm", "agm", "mlb"):
        out = balance_coefficients(x, y, method)
        assert not any(v.requires_grad for v in out.values()), method
        out = balance_coefficients(list(x.unbind(0)), y, method)
        assert not any(v.requires_grad for v in out.values()), method


@pytest.mark.backend("reference")
def test_item7_coefficients_never_require_grad_reference():
    _no_grad_outputs()


@WARN
@pytest.mark.triton
@pytest.mark.backend("triton")
def test_item7_coefficients_never_require_grad_triton(device):
    _no_grad_outputs(device)


# ------------------------------------------------------------------------------------ 8. AMP skipped steps
@pytest.mark.parametrize("kind", ["ogmge", "opm", "opm_same", "agm", "mlb"])
def test_item8_gradscaler_skipped_step_with_optimizer(kind):
    model = TinyModel(2, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bal = {
        "ogmge": lambda: api.OGMGE(2, optimizer=opt),
        "opm": lambda: api.OPM(2, optimizer=opt),
        "opm_same": lambda: api.OPM(2, optimizer=opt, timing="same"),
        "agm": lambda: api.AGM(2, optimizer=opt),
        "mlb": lambda: api.MLB(2, optimizer=opt),
    }[kind]()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    mlb_heads = nn.ModuleList(nn.Linear(6, 4) for _ in range(2))
    for step in range(4):
        xs, y = batch(2, b=8, seed=step)
        opt.zero_grad()
        if kind == "agm":
            logits = bal.shapley_forward(xs, y, encoders=list(model.encoders), head=model.fuse)
            loss = F.cross_entropy(logits, y)
        else:
            feats = model.feats(xs)
            if kind == "ogmge":
                bal.observe(api.concat_unimodal_logits(feats, model.head), y)
                loss = F.cross_entropy(model.fuse(bal.tap(feats)), y)
            elif kind == "opm":
                dropped = bal.drop(feats)
                bal.observe(api.concat_unimodal_logits(feats, model.head), y)
                loss = F.cross_entropy(model.fuse(dropped), y)
            elif kind == "opm_same":
                bal.observe(api.concat_unimodal_logits(feats, model.head), y)
                loss = F.cross_entropy(model.fuse(bal.drop(feats)), y)
            else:
                tapped = bal.tap(feats)
                loss = bal.loss(model.fuse(tapped), torch.stack([h(f) for h, f in zip(mlb_heads, tapped)]), y)
        scaler.scale(loss).backward()
        if step in (0, 1):  # forced inf: GradScaler skips optimizer.step()
            model.head.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    assert bal.skipped_steps == 2
    assert bal.step_count == 4  # ended by the hook (2) or by the next step (2)


def test_item8_without_optimizer_the_misuse_error_stays():
    model = TinyModel(2, seed=0)
    bal = api.OGMGE(2)
    xs, y = batch(2, b=8)
    feats = model.feats(xs)
    bal.observe(api.concat_unimodal_logits(feats, model.head), y)
    F.cross_entropy(model.fuse(bal.tap(feats)), y).backward()
    with pytest.raises(RuntimeError, match="after backward"):
        bal.tap(model.feats(xs))


# ------------------------------------------------------------------------------------ 9, 10. DDP
def _ddp_worker(rank: int, world: int, init: str, outdir: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        res = {"ogm": [], "agm": [], "olm": None}
        ogm, agm_state = api.OGM(2, alpha=0.8), R.new_agm_state(2)
        for step in range(4):
            x, y = _logits(b=6, seed=10 * rank + step)
            if rank == 1 and step == 0:
                x, y = x[:, :0], y[:0]  # empty batch on rank 1
            if rank == 1 and step == 2:
                y = torch.full_like(y, -100)  # every row ignored on rank 1
            ogm.observe(x, y)
            ogm.step()
            res["ogm"].append(ogm.coefficients.clone())
            res["agm"].append(balance_coefficients(x, y, "agm", state=agm_state, sync=True)["coefficients"].clone())
        olm = api.OLM(2, lr=0.05)
        g = torch.Generator().manual_seed(rank)
        for _ in range(3):
            for _ in range(2):
                olm.combine(torch.randn(2, 5, 3, generator=g) * (1 + 3 * rank))
            olm.report([1.0 + rank, 0.5], [1.3, 0.9 - 0.1 * rank])
        res["olm"] = olm.coefficients.clone()
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_item9_item10_ddp_empty_and_ignored_batches_and_olm(tmp_path):
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'rdv'}", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for key in ("ogm", "agm"):
        for step, (c0, c1) in enumerate(zip(r0[key], r1[key])):
            assert torch.equal(c0, c1), f"{key} step {step}: {c0} vs {c1}"
    # step 0: rank 1 empty, so the global batch is rank 0's: the synced coefficients equal rank 0's own batch
    x, y = _logits(b=6, seed=0)
    torch.testing.assert_close(r0["ogm"][0], R.balance_coefficients_ref(x, y, "ogm", alpha=0.8)["coefficients"])
    assert torch.equal(r0["olm"], r1["olm"]), f"OLM w differs: {r0['olm']} vs {r1['olm']}"
    assert not torch.equal(r0["olm"], torch.ones(2)), "OLM never moved w: the test would prove nothing"


# ------------------------------------------------------------------------------------ 11. AGM first step
def _agm_first_step(device="cpu"):
    x, y = _logits(m=3, seed=4, device=device)
    state = R.new_agm_state(3, device=device)
    out = balance_coefficients(x, y, "agm", state=state, alpha=1.5)
    r = out["ratios"]
    torch.testing.assert_close(out["coefficients"], torch.exp(1.5 * (1.0 - r)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out["coefficients"], torch.ones(3, device=device))


@pytest.mark.backend("reference")
def test_item11_agm_first_step_tau_is_one_reference():
    _agm_first_step()


@WARN
@pytest.mark.triton
@pytest.mark.backend("triton")
def test_item11_agm_first_step_tau_is_one_triton(device):
    _agm_first_step(device)


def test_item11_agm_balancer_first_step_kappa():
    model = TinyModel(2, seed=0)
    bal = api.AGM(2, alpha=1.0)
    xs, y = batch(2, b=8)
    bal.shapley_forward(xs, y, encoders=list(model.encoders), head=model.fuse)
    torch.testing.assert_close(bal.coefficients, torch.exp(1.0 - bal.ratios))


# ------------------------------------------------------------------------------------ 12. AGM window after step 0
def _agm_run(official: bool, steps=4, start=2):
    model = TinyModel(2, seed=0)
    bal = api.AGM(2, alpha=1.0, start=start, official=official)
    seen = []
    for step in range(steps):
        xs, y = batch(2, b=8, seed=step)
        out = bal.shapley_forward(xs, y, encoders=list(model.encoders), head=model.fuse)
        F.cross_entropy(out, y).backward()
        with torch.no_grad():
            subsets = bal._subset_outputs(xs, None, list(model.encoders), model.fuse)
            seen.append(R.scores(R.shapley_combine(subsets), y, kind="ce"))
        if step < start:
            assert torch.equal(bal.coefficients, torch.ones(2))
        bal.step()
    return bal, seen


def test_item12_agm_official_running_means_from_first_step():
    bal, seen = _agm_run(official=True)
    assert float(bal.running_scores.new_tensor(0) + bal._agm["steps"]) == 4.0
    torch.testing.assert_close(bal.running_scores, torch.stack(seen).mean(0), rtol=1e-5, atol=1e-6)
    default, seen_d = _agm_run(official=False)
    assert float(default._agm["steps"]) == 2.0  # default: from the window's first step
    torch.testing.assert_close(default.running_scores, torch.stack(seen_d[2:]).mean(0), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ 13. OPM timing
def test_item13_opm_official_same_step_timing():
    model = TinyModel(2, seed=0)
    bal = api.OPM(2, official=True, q_base=0.6)
    assert bal.timing == "same" and api.OPM(2).timing == "next"
    xs, y = batch(2, b=8)
    feats = model.feats(xs)
    with pytest.raises(RuntimeError, match="observe"):
        bal.drop(feats)  # same-step timing: observe first
    u = api.concat_unimodal_logits(feats, model.head)
    bal.observe(u, y)
    want = R.balance_coefficients_ref(u, y, "opm", q_base=0.6)["coefficients"]
    torch.testing.assert_close(bal.drop_probability, want)  # q of THIS batch drops this batch
    assert (want > 0).any()
    bal.drop(feats)


def test_item13_opm_default_next_step_timing():
    model = TinyModel(2, seed=0)
    bal = api.OPM(2, q_base=0.6)
    xs, y = batch(2, b=8)
    feats = model.feats(xs)
    bal.drop(feats)
    bal.observe(api.concat_unimodal_logits(feats, model.head), y)
    assert torch.equal(bal.drop_probability, torch.zeros(2))  # this step dropped with the previous (none) q


# ------------------------------------------------------------------------------------ 14. OGM tie
def _tie_logits(device="cpu"):
    x, y = _logits(m=1, seed=7, device=device)
    return torch.cat([x, x]), y  # identical modalities: an exact tie


def _tie_checks(device="cpu"):
    x, y = _tie_logits(device)
    k0 = balance_coefficients(x, y, "ogm_ge", alpha=0.5)["coefficients"]
    k1 = balance_coefficients(x, y, "ogm_ge", alpha=0.5, tie=1)["coefficients"]
    damp = 1 - math.tanh(0.5)
    torch.testing.assert_close(k0, torch.tensor([damp, 1.0], device=device))
    torch.testing.assert_close(k1, torch.tensor([1.0, damp], device=device))


@pytest.mark.backend("reference")
def test_item14_ogm_ge_tie_rules_reference():
    _tie_checks()


@WARN
@pytest.mark.triton
@pytest.mark.backend("triton")
def test_item14_ogm_ge_tie_rules_triton(device):
    _tie_checks(device)


def test_item14_ogm_official_tie_suppresses_modality_1():
    x, y = _tie_logits()
    w = [torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)]
    for cls, suppressed in ((api.OGM, 1), (api.OGMGE, 0)):
        bal = cls(2, official=True, alpha=0.5, params=[[w[0]], [w[1]]])
        bal.observe(x, y)
        k = bal.coefficients
        assert float(k[suppressed]) < 1.0 and float(k[1 - suppressed]) == 1.0, (cls.__name__, k)


@pytest.mark.parametrize("kind", ["ogmge", "pmr"])
def test_item8_a_rolled_over_step_warns_once(kind):
    """A step ended without optimizer.step() (GradScaler skip, or micro-batches run outside the protocol) is never
    counted silently: the first one raises a RuntimeWarning pointing to the protocol's accumulation; later ones are
    only counted."""
    model = TinyModel(2, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bal = api.OGMGE(2, optimizer=opt) if kind == "ogmge" else api.PMR(2, num_classes=4, optimizer=opt)
    if kind == "pmr":
        xs, y = batch(2, b=16, seed=9)
        with torch.no_grad():
            bal.update_prototypes(model.feats(xs), y)

    def micro_batch(seed):
        xs, y = batch(2, b=8, seed=seed)
        feats = model.feats(xs)
        if kind == "ogmge":
            bal.observe(api.concat_unimodal_logits(feats, model.head), y)
            loss = F.cross_entropy(model.fuse(bal.tap(feats)), y)
        else:
            loss = F.cross_entropy(model.fuse(feats), y) + bal.loss(feats, y)
        loss.backward()

    micro_batch(0)
    with pytest.warns(RuntimeWarning, match="Accumulating gradients"):
        micro_batch(1)  # a second micro-batch of the same optimizer step
    assert bal.skipped_steps == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        micro_batch(2)
    opt.step()
    assert bal.skipped_steps == 2 and bal.step_count == 3
