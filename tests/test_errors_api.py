"""Bad input: each case raises a clear error naming the argument (issue 5, item 5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmkernels.api as api

from _api_models import TinyModel, batch


def u_and_y(m=2, b=8, c=4):
    return torch.randn(m, b, c), torch.randint(0, c, (b,))


def test_mismatched_batch_sizes():
    bal = api.OGMGE(2)
    with pytest.raises(ValueError, match=r"feats\[1\].*batch size"):
        bal.tap([torch.randn(8, 3, requires_grad=True), torch.randn(7, 3, requires_grad=True)])
    with pytest.raises(ValueError, match=r"unimodal_logits\[1\].*batch size"):
        bal.observe([torch.randn(8, 4), torch.randn(7, 4)], torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"inputs\[1\].*batch size"):
        api.AGM(2).shapley_forward(
            [torch.randn(8, 5), torch.randn(7, 3)], torch.zeros(8, dtype=torch.long), model=TinyModel(2)
        )
    with pytest.raises(ValueError, match="labels"):
        bal.observe(*u_and_y(b=8)[:1], torch.zeros(9, dtype=torch.long))


def test_labels_out_of_range_and_float():
    u, y = u_and_y()
    y[2] = 4
    with pytest.raises(ValueError, match=r"labels\[2\] = 4"):
        api.OGMGE(2).observe(u, y)
    y[2] = -3
    with pytest.raises(ValueError, match=r"labels"):
        api.OPM(2).observe(u, y)
    y[2] = -100  # ignore_index is fine
    api.OPM(2).observe(u, y)
    with pytest.raises(TypeError, match="labels.*dtype"):
        api.MLB(2).loss(u[0], u, y.float())


@pytest.mark.parametrize("m", [1, 9])
@pytest.mark.parametrize("cls", [api.OGMGE, api.OGM, api.OPM, api.AGM, api.MLB, api.OLM])
def test_num_modalities_out_of_range(cls, m):
    with pytest.raises(ValueError, match="num_modalities"):
        cls(m)


def test_list_length_does_not_match_num_modalities():
    bal = api.OGMGE(2)
    with pytest.raises(ValueError, match=r"len\(feats\).*num_modalities=2"):
        bal.tap([torch.randn(4, 3)] * 3)
    u, y = u_and_y(m=3)
    with pytest.raises(ValueError, match=r"len\(unimodal_logits\).*num_modalities=2"):
        bal.observe(list(u), y)
    with pytest.raises(ValueError, match="unimodal_logits has 3 modalities"):
        bal.observe(u, y)
    with pytest.raises(ValueError, match=r"len\(logits_per_branch\)"):
        api.OLM(2).combine([torch.randn(4, 3)] * 3)
    with pytest.raises(ValueError, match=r"params must be a list of num_modalities=2"):
        api.OGMGE(2, official=True, params=[[torch.zeros(1)]])


def test_features_and_labels_on_different_devices():
    u, y = u_and_y()
    with pytest.raises(ValueError, match="labels is on meta"):
        api.OGMGE(2).observe(u, y.to("meta"))
    with pytest.raises(ValueError, match=r"feats\[1\] is on meta"):
        api.OGMGE(2).tap([torch.randn(4, 3), torch.randn(4, 3, device="meta")])


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: api.OGMGE(2, alpha=-0.1), "alpha"),
        (lambda: api.OGM(2, alpha=float("nan")), "alpha"),
        (lambda: api.AGM(2, alpha=-1.0), "alpha"),
        (lambda: api.MLB(2, alpha=-1.0), "alpha"),
        (lambda: api.OPM(2, q_base=0.0), "q_base"),
        (lambda: api.OPM(2, q_base=1.0), "q_base"),
        (lambda: api.OPM(2, q_base=1.5), "q_base"),
        (lambda: api.OPM(2, p_exe=1.5), "p_exe"),
        (lambda: api.MLB(2, beta_max=0.5), "beta_max"),
        (lambda: api.AGM(2, clip=0.0), "clip"),
        (lambda: api.AGM(2, muted_mode="fast"), "muted_mode"),
        (lambda: api.OGMGE(2, noise="gaussian"), "noise"),
        (lambda: api.OGMGE(2, noise="isotropic"), "params"),
        (lambda: api.OGMGE(2, start=5, end=5), "end"),
        (lambda: api.OGMGE(2, unit="batch"), "unit"),
        (lambda: api.OLM(2, lr=0.0), "lr"),
    ],
)
def test_bad_hyperparameters(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_observe_twice_in_a_step():
    u, y = u_and_y()
    bal = api.OGMGE(2)
    bal.observe(u, y)
    with pytest.raises(RuntimeError, match="twice in step 0.*bal.step"):
        bal.observe(u, y)
    bal.step()
    bal.observe(u, y)  # fine in the next step
    mlb = api.MLB(2)
    mlb.loss(u[0], u, y)
    with pytest.raises(RuntimeError, match="twice"):
        mlb.loss(u[0], u, y)


def test_optimizer_hook_steps_the_balancer():
    model = TinyModel(2)
    xs, y = batch(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bal = api.OGMGE(2, optimizer=opt)
    for t in range(3):
        feats = bal.tap(model.feats(xs))
        bal.observe(api.concat_unimodal_logits(feats, model.head), y)
        F.cross_entropy(model.fuse(feats), y).backward()
        opt.step()
        opt.zero_grad()
    assert bal.step_count == 3


@pytest.mark.parametrize("observe_first", [True, False])
def test_tap_after_backward(observe_first):
    model = TinyModel(2)
    xs, y = batch(2)
    bal = api.OGM(2)
    feats = model.feats(xs)
    if observe_first:
        bal.observe(api.concat_unimodal_logits(feats, model.head), y)
    tapped = bal.tap(feats)
    if not observe_first:
        bal.observe(api.concat_unimodal_logits(feats, model.head), y)
    F.cross_entropy(model.fuse(tapped), y).backward()
    with pytest.raises(RuntimeError, match="tap\\(\\) called after backward"):
        bal.tap(model.feats(xs))
    with pytest.raises(RuntimeError, match="twice"):
        bal.observe(api.concat_unimodal_logits(feats, model.head), y)
    bal.step()
    bal.tap(model.feats(xs))


def test_state_dict_for_another_method_or_m():
    sd = api.OGMGE(2).state_dict()
    with pytest.raises(ValueError, match="saved by a 'ogm_ge' balancer.*'opm'"):
        api.OPM(2).load_state_dict(sd)
    with pytest.raises(ValueError, match="num_modalities=2.*num_modalities=3"):
        api.OGMGE(3).load_state_dict(sd)
    with pytest.raises(ValueError, match="hyperparameters"):
        api.OGMGE(2, alpha=0.3).load_state_dict(sd)
    api.OGMGE(2, alpha=0.3).load_state_dict(sd, strict=False)
    with pytest.raises(ValueError, match="state_dict"):
        api.OGMGE(2).load_state_dict({"foo": 1})


def test_wrong_entry_point():
    assert not hasattr(api.OPM(2), "tap")  # OPM acts through drop()
    with pytest.raises(RuntimeError, match="modulate_grads"):
        api.OGMGE(2).modulate_grads()
    with pytest.raises(ValueError, match="model=.*encoders="):
        api.AGM(2).shapley_forward([torch.randn(2, 5), torch.randn(2, 3)], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="reuse"):
        api.AGM(2, muted_mode="reuse").shapley_forward(
            [torch.randn(2, 5), torch.randn(2, 3)], torch.zeros(2, dtype=torch.long), model=TinyModel(2)
        )


def test_unimodal_helper_errors():
    feats = [torch.randn(4, 6), torch.randn(4, 6)]
    with pytest.raises(ValueError, match="in_features=10"):
        api.concat_unimodal_logits(feats, torch.nn.Linear(10, 3))
    with pytest.raises(ValueError, match="len\\(feats\\)"):
        api.concat_unimodal_logits(feats[:1], torch.nn.Linear(6, 3))
    with pytest.raises(ValueError, match="gamma"):
        api.concat_unimodal_logits(feats, torch.nn.Linear(12, 3), gamma=[0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="len\\(heads\\)"):
        api.summation_unimodal_logits(feats, [torch.nn.Linear(6, 3)])


@pytest.mark.parametrize("kind", ["ogm_ge", "ogm", "opm", "mlb", "agm", "olm"])
def test_num_classes_catches_features_passed_as_logits(kind):
    """With num_classes=C, logits of another width (encoder features by mistake) are refused with a ValueError that
    names num_classes; the call changes no state; the right width is accepted; without num_classes nothing is
    checked (the default)."""
    import mmkernels.api as api
    from _api_models import C, TinyModel, batch

    make = {"ogm_ge": api.OGMGE, "ogm": api.OGM, "opm": api.OPM, "mlb": api.MLB, "agm": api.AGM, "olm": api.OLM}[kind]
    model = TinyModel(2)
    xs, y = batch(2, b=8)
    feats = model.feats(xs)  # [B, 6]: not [B, C]
    assert feats[0].shape[1] != C

    def call(bal, outs):
        if kind == "agm":
            return bal.shapley_forward(xs, y, encoders=list(model.encoders), head=lambda fs: outs(fs))
        if kind == "olm":
            return bal.combine(outs(feats))
        return bal.observe(outs(feats), y)

    wrong = (lambda fs: torch.stack(list(fs))) if kind != "agm" else (lambda fs: sum(fs))
    right = (lambda fs: torch.stack([f[:, :C] for f in fs])) if kind != "agm" else (lambda fs: sum(fs)[:, :C])
    bal = make(2, num_classes=C)
    before = bal.state_dict()
    with pytest.raises(ValueError, match=f"num_classes={C}"):
        call(bal, wrong)
    after = bal.state_dict()
    assert after["_extra_state"]["step"] == before["_extra_state"]["step"] and all(
        torch.equal(after[k], v) for k, v in before.items() if k != "_extra_state"
    )
    call(bal, right)
    call(make(2), wrong) if kind != "olm" else None  # no num_classes: not checked
