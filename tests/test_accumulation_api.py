"""Gradient accumulation through the protocol (issue 18, item 3): steps count optimizer steps, and where a method's
coefficients act after the backward or in a later step (parameter mode, noise-free taps on the model's encoders, OPM,
OLM, MMPareto), n micro-batches give what one batch of n times the rows gives (to fp32 tolerance), with and without a
GradScaler. Where they must act inside the backward (covariance-noise taps, AGM's kappa, PMR's c) each micro-batch
uses its own (README: Gradient accumulation); their step counting and running state are tested here too."""

from __future__ import annotations

import copy

import pytest
import torch

import mmkernels.api as api

from _api_models import C, IN_DIMS, TinyModel

M, B = 3, 16


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, IN_DIMS[m], generator=g) * (1.0 + m) for m in range(M)]
    return xs, torch.randint(0, C, (B,), generator=g)


def split(xs, y, n: int) -> list:
    k = B // n
    return [([x[i * k : (i + 1) * k] for x in xs], y[i * k : (i + 1) * k]) for i in range(n)]


EXACT = {
    "ogm_taps": lambda enc, opt: api.OGM(M, alpha=2.0, optimizer=opt),
    "mlb_taps": lambda enc, opt: api.MLB(M, alpha=2.0, optimizer=opt),
    "ogm_params": lambda enc, opt: api.OGM(M, alpha=2.0, params=enc, optimizer=opt),
    "ogm_ge_official": lambda enc, opt: api.OGMGE(M, alpha=2.0, official=True, params=enc, seed=2, optimizer=opt),
    "mlb_params": lambda enc, opt: api.MLB(M, alpha=2.0, params=enc, optimizer=opt),
    "mlb_update": lambda enc, opt: api.MLB(M, alpha=2.0, params=enc, modulate="update", optimizer=opt),
    "olm": lambda enc, opt: api.OLM(M, optimizer=opt),
    "mmpareto": lambda enc, opt: api.MMPareto(M, params=enc, optimizer=opt),
}


def run(kind, n: int, scaler: bool, steps: int = 2):
    torch.manual_seed(0)
    model = TinyModel(M)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    bal = EXACT[kind]([list(e.parameters()) for e in model.encoders], opt)
    gs = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaler else None
    for t in range(steps):
        xs, y = data(t)
        api.train_step(model, bal, opt, split(xs, y, n), scaler=gs)
    return model, bal


@pytest.mark.parametrize("scaler", [False, True], ids=["fp32", "gradscaler"])
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("kind", list(EXACT))
def test_micro_batches_equal_one_large_batch(kind, n, scaler):
    big_model, big = run(kind, 1, scaler)
    model, bal = run(kind, n, scaler)
    assert bal.step_count == big.step_count == 2 and bal.skipped_steps == 0
    torch.testing.assert_close(bal.coefficients, big.coefficients, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), big_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("n", [2, 4])
def test_opm_drop_probability_is_that_of_one_large_batch(n):
    """OPM's q acts in the next step: observed once per step on every micro-batch's undropped logits."""
    qs = []
    for k in (1, n):
        model = TinyModel(M)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the same model in both runs: q depends on it alone
        bal = api.OPM(M, q_base=0.6, seed=1, optimizer=opt)
        for t in range(2):
            xs, y = data(t)
            api.train_step(model, bal, opt, split(xs, y, k))
        qs.append(bal.coefficients.clone())
        assert bal.step_count == 2
    torch.testing.assert_close(qs[1], qs[0], rtol=1e-6, atol=1e-7)


def test_agm_running_means_advance_once_per_optimizer_step():
    """Each micro-batch's kappa comes from its own Shapley scores and the running means of the earlier steps; the
    running means (AGM Eq. 10) take one update per optimizer step, with the step's aggregate score."""
    means = []
    for k in (1, 4):
        model = TinyModel(M)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        bal = api.AGM(M, optimizer=opt)
        for t in range(3):
            xs, y = data(t)
            api.train_step(model, bal, opt, split(xs, y, k))
        assert bal.step_count == 3 and float(bal._agm["steps"]) == 3.0
        means.append(bal.running_scores.clone())
    torch.testing.assert_close(means[1], means[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["ogm_ge", "mlb", "pmr", "agm"])
def test_steps_count_optimizer_steps_for_every_in_backward_method(kind):
    model = TinyModel(M)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    bal = {
        "ogm_ge": lambda: api.OGMGE(M, seed=1, optimizer=opt),
        "mlb": lambda: api.MLB(M, optimizer=opt),
        "pmr": lambda: api.PMR(M, num_classes=C, optimizer=opt),
        "agm": lambda: api.AGM(M, optimizer=opt),
    }[kind]()
    xs, y = data()
    if kind == "pmr":
        bal.epoch_start(model, 0, [(xs, y)])
    for _ in range(3):
        api.train_step(model, bal, opt, split(xs, y, 4))
    assert bal.step_count == 3 and bal.skipped_steps == 0 and bal.micro_batches == 4
    assert torch.isfinite(bal.coefficients).all()


def test_covariance_noise_streams_continue_across_micro_batches():
    """OGM-GE's noise taps: micro-batch j draws the normals of rows R_j.. of the step, not row 0 again."""
    model = TinyModel(M)
    bal = api.OGMGE(M, alpha=0.0, sigma=1.0, seed=3)  # k = 1: the tap adds noise only
    xs, y = data()
    offsets = []
    original = bal._tap_op

    def spy(x, coef, modality, step):
        offsets.append(bal._noise_offset(step, modality) + bal._rows_before)
        return original(x, coef, modality, step)

    bal._tap_op = spy
    for xb, yb in split(xs, y, 2):
        bal(copy.deepcopy(model), xb, yb).loss.backward()
    assert offsets[M] - offsets[0] == B // 2  # modality 0: the second micro-batch starts at row B/2
