"""No host reads of device values in a training step (README "The trainer API": no .item(), no .cpu(), no Python
branch on a device value), for every balancer and for the public ops.

How: after one warm-up step run normally, one full training step (forward through the balancer, loss, backward,
optimizer.step(), bal.step()) runs inside `SyncGuard`, which replaces torch.Tensor.item, .tolist, .numpy, .cpu,
__bool__, __int__, __float__ and __index__ for the duration of the step. A replaced method fails (AssertionError,
and the call is recorded, in case a library `except` swallowed the error) when the Python call stack holds a frame
from a file of the library (mmkernels/ or python_api/, installed as mmkernels.api); torch-internal calls with no
library frame on the stack, and the test's own code, pass through. The backward runs in the C++ autograd engine,
whose Python callbacks (autograd.Function.backward, hooks) are library frames, so reads there are caught too.
CPU only (the reference lane); tests/test_sync_free_cuda.py runs the same steps on a GPU under
torch.cuda.set_sync_debug_mode("error"), which also sees reads inside the C++/CUDA code.

The guard is shown to be honest in the self-tests at the bottom: a read injected into a balancer's call path (forward
and backward) is caught for every guarded method, and the genuine CPU label check (see `_no_cpu_label_check`) trips it.

Not covered: OLM.report() is an evaluation-time call (README: "at each evaluation"), not a training-step call, so it
is left out of the guarded step; OLM's training step is combine() + loss + backward + step.
"""

from __future__ import annotations

import functools
import inspect
import operator
import os

import pytest
import torch
import torch.nn.functional as F

import mmkernels
import mmkernels.api as api
from mmkernels import reference
from mmkernels.noise import cov_noise_tap, ge_isotropic_
from mmkernels.shapley import shapley_masked_batch, shapley_responses

from _api_models import TinyModel

GUARDED = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")
LIBRARY_DIRS = tuple(os.path.realpath(os.path.dirname(m.__file__)) + os.sep for m in (mmkernels, api))
_MISSING = object()


@functools.lru_cache(maxsize=None)
def _is_library_file(filename: str) -> bool:
    return os.path.realpath(filename).startswith(LIBRARY_DIRS)


def _library_frame() -> str | None:
    """'file:line in function' of the innermost library frame on the caller's stack, or None."""
    frame = inspect.currentframe()
    try:
        f = frame.f_back.f_back  # skip this function and the guard's wrapper
        while f is not None:
            if _is_library_file(f.f_code.co_filename):
                return f"{f.f_code.co_filename}:{f.f_lineno} in {f.f_code.co_name}"
            f = f.f_back
        return None
    finally:
        del frame


class SyncGuard:
    """Context manager: torch.Tensor host reads fail when called with a library frame on the stack (module docstring).

    `violations` lists every caught call (also the ones whose AssertionError something swallowed)."""

    def __init__(self):
        self.violations: list[str] = []
        self._saved: dict = {}

    def _wrap(self, name, original):
        def guarded(tensor, *args, **kwargs):
            where = _library_frame()
            if where is not None:
                msg = f"host read torch.Tensor.{name} in a training step, called from {where}"
                self.violations.append(msg)
                raise AssertionError(msg)
            return original(tensor, *args, **kwargs)

        guarded.__name__ = name
        return guarded

    def __enter__(self):
        for name in GUARDED:
            self._saved[name] = torch.Tensor.__dict__.get(name, _MISSING)
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        return self

    def __exit__(self, *exc):
        for name, old in self._saved.items():
            if old is _MISSING:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, old)
        self._saved = {}
        return False


def run_guarded(step) -> SyncGuard:
    """One warm-up step outside the guard, then one step inside it; fails on any library host read."""
    step()
    with SyncGuard() as guard:
        step()
    assert not guard.violations, "\n".join(guard.violations)
    return guard


@pytest.fixture(autouse=True)
def _no_cpu_label_check(monkeypatch):
    """check_label_values (python_api/_base.py) reads CPU labels on the host ON PURPOSE: it validates the class range
    of CPU label tensors (no device is involved, so no sync; it returns at once on CUDA, marked `# sync-ok`). It is
    the one deliberate read, so it is replaced by a no-op here; test_guard_sees_the_cpu_label_check shows the guard
    would otherwise flag it, and the cuda file keeps the real one."""
    noop = lambda *args, **kwargs: None  # noqa: E731
    monkeypatch.setattr(api._base, "check_label_values", noop)
    monkeypatch.setattr(api.agm, "check_label_values", noop)
    monkeypatch.setattr(api.pmr, "check_label_values", noop)


# ----------------------------------------------------------------------------------------------- steps
# Each make_* builds a model, optimizer and balancer on `device` and returns a closure running ONE training step.
# Shared with tests/test_sync_free_cuda.py. Inputs: a strong modality 0 and a weak modality 1 so the coefficients
# differ from neutral.
M, B, C = 2, 16, 4


def _data(device, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (B,), generator=g)
    xa = torch.randn(B, 5, generator=g)
    xa[:, :C] += 3.0 * F.one_hot(y, C)
    xv = torch.randn(B, 3, generator=g)
    xv[:, : min(3, C)] += 0.3 * F.one_hot(y, C)[:, :3]
    return [xa.to(device), xv.to(device)], y.to(device)


def _setup(device, extra=()):
    model = TinyModel(M).to(device)
    xs, y = _data(device)
    params = list(model.parameters()) + [p for mod in extra for p in mod.parameters()]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return model, xs, y, opt


def make_ogmge_covariance(device, observe_first=True):
    model, xs, y, opt = _setup(device)
    bal = api.OGMGE(M, alpha=0.8, noise="covariance", seed=3)

    def step():
        opt.zero_grad()
        feats = model.feats(xs)
        if observe_first:
            bal.observe(api.concat_unimodal_logits(feats, model.head), y)
            feats = bal.tap(feats)
        else:  # tap before observe: the deferred tap reads the coefficients in the backward
            feats = bal.tap(feats)
            bal.observe(api.concat_unimodal_logits(feats, model.head), y)
        F.cross_entropy(model.fuse(feats), y).backward()
        opt.step()
        bal.step()

    return step, bal


def make_ogmge_official(device):
    model, xs, y, opt = _setup(device)
    params = [[p for p in enc.parameters() if p.dim() >= 2] for enc in model.encoders]
    bal = api.OGMGE(M, alpha=0.8, official=True, noise="isotropic", params=params, seed=3)

    def step():
        opt.zero_grad()
        feats = model.feats(xs)
        bal.observe(api.concat_unimodal_logits(feats, model.head), y)
        F.cross_entropy(model.fuse(feats), y).backward()
        bal.modulate_grads()
        opt.step()
        bal.step()

    return step, bal


def make_ogm(device):
    model, xs, y, opt = _setup(device)
    bal = api.OGM(M, alpha=0.8)

    def step():
        opt.zero_grad()
        feats = model.feats(xs)
        bal.observe(api.concat_unimodal_logits(feats, model.head), y)
        F.cross_entropy(model.fuse(bal.tap(feats)), y).backward()
        opt.step()
        bal.step()

    return step, bal


def make_opm(device):
    model, xs, y, opt = _setup(device)
    bal = api.OPM(M, q_base=0.5, lam=0.5, seed=3)

    def step():
        opt.zero_grad()
        feats = model.feats(xs)
        dropped = bal.drop(feats)
        bal.observe(api.concat_unimodal_logits(feats, model.head), y)
        F.cross_entropy(model.fuse(dropped), y).backward()
        opt.step()
        bal.step()

    return step, bal


def make_agm(device, form="model", muted_mode="eval"):
    model, xs, y, opt = _setup(device)
    bal = api.AGM(M, alpha=1.0, clip=10.0, muted_mode=muted_mode)
    kw = dict(model=model) if form == "model" else dict(encoders=list(model.encoders), head=model.fuse)

    def step():
        opt.zero_grad()
        F.cross_entropy(bal.shapley_forward(xs, y, **kw), y).backward()
        opt.step()
        bal.step()

    return step, bal


def make_mlb(device):
    heads = [torch.nn.Linear(6, C).to(device) for _ in range(M)]  # TinyModel's feature width is 6
    model, xs, y, opt = _setup(device, extra=heads)
    bal = api.MLB(M, alpha=0.8, beta_max=2.0)

    def step():
        opt.zero_grad()
        feats = bal.tap(model.feats(xs))
        loss = bal.loss(model.fuse(feats), [h(f) for h, f in zip(heads, feats)], y)
        loss.backward()
        opt.step()
        bal.step()

    return step, bal


def make_olm(device):
    model, xs, y, opt = _setup(device)
    bal = api.OLM(M, lr=0.01, update_steps=10)

    def step():  # training step only: report() is an evaluation-time call (module docstring)
        opt.zero_grad()
        feats = model.feats(xs)
        branches = api.concat_unimodal_logits(feats, model.head, detach=False)
        F.cross_entropy(bal.combine(branches), y).backward()
        opt.step()
        bal.step()

    return step, bal


BALANCER_STEPS = {
    "ogmge-covariance-observe-first": functools.partial(make_ogmge_covariance, observe_first=True),
    "ogmge-covariance-tap-first": functools.partial(make_ogmge_covariance, observe_first=False),
    "ogmge-official-isotropic": make_ogmge_official,
    "ogm": make_ogm,
    "opm": make_opm,
    "agm-model": functools.partial(make_agm, form="model"),
    "agm-encoders-head-eval": functools.partial(make_agm, form="split", muted_mode="eval"),
    "agm-encoders-head-reuse": functools.partial(make_agm, form="split", muted_mode="reuse"),
    "mlb": make_mlb,
    "olm": make_olm,
}


def make_ops_step(device):
    """One step through the public ops directly: balance_coefficients for every method, grad_tap, modality_drop,
    cov_noise_tap, ge_isotropic_, shapley_masked_batch + shapley_responses, with a backward and an optimizer step."""
    model, xs, y, opt = _setup(device)
    agm_state = reference.new_agm_state(M, device)
    counter = [0]

    def step():
        t = counter[0]
        counter[0] += 1
        opt.zero_grad()
        feats = model.feats(xs)
        u = api.concat_unimodal_logits(feats, model.head)
        res = {
            meth: mmkernels.balance_coefficients(u, y, meth, **({"state": agm_state} if meth == "agm" else {}))
            for meth in mmkernels.METHOD_DEFAULTS
        }
        k = res["ogm"]["coefficients"]
        tapped = [mmkernels.grad_tap(feats[0], k[0]), cov_noise_tap(feats[1], k[1], sigma=1.0, seed=5, offset=t << 32)]
        dropped = mmkernels.modality_drop(
            tapped, res["opm"]["coefficients"], seed=5, offset=t << 32, rescale="per_modality"
        )
        loss = F.cross_entropy(model.fuse(dropped), y)
        # AGM's Shapley forward on the same model: muted subsets in one batch, then phi with kappa in the backward
        masked = shapley_masked_batch(xs)
        muted = model(*masked).reshape(2**M - 2, B, C)
        subsets = torch.cat([muted, model(*xs).unsqueeze(0)])
        fused = shapley_responses(subsets, res["agm"]["coefficients"]).sum(0)
        (loss + F.cross_entropy(fused, y)).backward()
        grads = [p.grad for enc in model.encoders for p in enc.parameters()]
        group_index = [m for m, enc in enumerate(model.encoders) for _ in enc.parameters()]
        ge_isotropic_(
            grads, res["ogm_ge"]["coefficients"], seed=5, offset=(t << 32) + (1 << 31), group_index=group_index
        )
        opt.step()

    return step


# ----------------------------------------------------------------------------------------------- tests
BACKENDS = [
    pytest.param(None, marks=pytest.mark.backend(None), id="auto"),
    pytest.param("reference", marks=pytest.mark.backend("reference"), id="reference"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BALANCER_STEPS))
def test_balancer_step_has_no_host_reads(name, backend):
    step, bal = BALANCER_STEPS[name]("cpu")
    run_guarded(step)
    assert bal.step_count == 2
    assert torch.equal(bal.flag, torch.zeros(()))
    if not isinstance(bal, api.OLM):  # the guarded step really modulated (coefficients off neutral)
        assert not torch.equal(bal.coefficients, torch.full((M,), float(bal.neutral))), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_ops_step_has_no_host_reads(backend):
    run_guarded(make_ops_step("cpu"))


def test_agm_shapley_scores_upload_no_host_data(monkeypatch):
    """The piece of AGM's step that runs the same code on CPU and CUDA must not place host data on the device:
    torch.tensor / torch.as_tensor of Python data with device= is a synchronous upload when the device is a GPU."""
    uploads = []

    def spy(real, name):
        def wrapper(data, *args, **kwargs):
            if kwargs.get("device") is not None and not isinstance(data, torch.Tensor) and _library_frame():
                uploads.append(f"torch.{name}({data!r}, device=...) from {_library_frame()}")
            return real(data, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch, "tensor", spy(torch.tensor, "tensor"))
    monkeypatch.setattr(torch, "as_tensor", spy(torch.as_tensor, "as_tensor"))
    subsets = torch.randn(2**M - 1, B, C)
    api._ops.shapley_responses(subsets)
    assert not uploads, "\n".join(uploads)


# ----------------------------------------------------------------------------------------------- guard self-tests
READS = {  # one way of each guarded host read
    "item": lambda t: t.item(),
    "tolist": lambda t: t.tolist(),
    "numpy": lambda t: t.numpy(),
    "cpu": lambda t: t.cpu(),
    "__bool__": lambda t: 1 if t > 0 else 0,  # a Python branch on a tensor
    "__int__": lambda t: int(t),
    "__float__": lambda t: float(t),
    "__index__": lambda t: operator.index(t.long()),
}
assert set(READS) == set(GUARDED)


@pytest.mark.parametrize("read", list(READS))
def test_guard_catches_a_read_injected_into_observe(read, monkeypatch):
    """A copy of OGM's coefficient call path with one host read added (the library files are not touched): the
    read sits in the coefficient plan's call as _base._run_coefficients makes it, so a library frame is on the
    stack."""
    original = api._ops.CoefficientPlan.__call__

    def with_read(self, *args, **kwargs):
        res = original(self, *args, **kwargs)
        READS[read](res["flag"])
        return res

    monkeypatch.setattr(api._ops.CoefficientPlan, "__call__", with_read)
    step, _ = make_ogm("cpu")
    step()  # warm-up: reads are allowed outside the guard
    with SyncGuard() as guard:
        with pytest.raises(AssertionError, match=f"torch.Tensor.{read} .*_base.py"):
            step()
    assert len(guard.violations) == 1


@pytest.mark.backend("reference")
def test_guard_catches_a_read_injected_into_the_backward(monkeypatch):
    """The covariance tap's backward (run by the C++ autograd engine) with an added read of k."""
    original = reference.cov_noise_tap_backward

    def with_read(grad, k, z, *, sigma=1.0):
        if k > 0:  # a Python branch on a device value
            pass
        return original(grad, k, z, sigma=sigma)

    monkeypatch.setattr(reference, "cov_noise_tap_backward", with_read)
    step, _ = make_ogmge_covariance("cpu")
    step()
    with SyncGuard() as guard:
        with pytest.raises(Exception):
            step()
    assert guard.violations and "__bool__" in guard.violations[0] and "noise.py" in guard.violations[0]


@pytest.mark.parametrize("swallowed", [False, True])
def test_guard_records_a_read_even_when_swallowed(swallowed, monkeypatch):
    original = api._ops.CoefficientPlan.__call__

    def with_read(self, *args, **kwargs):
        res = original(self, *args, **kwargs)
        try:
            res["flag"].item()
        except AssertionError:
            if not swallowed:
                raise
        return res

    monkeypatch.setattr(api._ops.CoefficientPlan, "__call__", with_read)
    step, _ = make_ogm("cpu")
    with SyncGuard() as guard:
        if swallowed:
            step()
        else:
            with pytest.raises(AssertionError):
                step()
    assert len(guard.violations) == 1


def test_guard_sees_the_cpu_label_check(monkeypatch):
    """The deliberate CPU label-range check (patched out above) is a genuine library read: with it restored the guard
    fails the step, which also shows the guard reaches the real call paths."""
    monkeypatch.undo()  # the real check_label_values
    step, _ = make_ogm("cpu")
    step()
    with SyncGuard() as guard, pytest.raises(AssertionError, match="check_label_values"):
        step()
    assert guard.violations


def test_guard_scope_and_restore():
    """Reads from code outside the library pass (torch internals, the test itself); every method is restored after."""
    before = {name: torch.Tensor.__dict__.get(name, _MISSING) for name in GUARDED}
    t = torch.tensor([2.5])
    with SyncGuard() as guard:
        assert all(torch.Tensor.__dict__.get(name) is not None for name in GUARDED)
        assert t.item() == 2.5 and t.tolist() == [2.5] and float(t) == 2.5 and bool(t)
    assert not guard.violations
    assert {name: torch.Tensor.__dict__.get(name, _MISSING) for name in GUARDED} == before
    assert t.item() == 2.5 and int(t) == 2 and operator.index(torch.tensor(3)) == 3


# ----------------------------------------------------------------------------------------------- the protocol
PROTOCOL_BALANCERS = {
    "ogm_ge": lambda model, opt: api.OGMGE(M, alpha=0.8, seed=5, optimizer=opt),
    "ogm_ge_official": lambda model, opt: api.OGMGE(
        M, alpha=0.8, official=True, params=[list(e.parameters()) for e in model.encoders], optimizer=opt
    ),
    "opm": lambda model, opt: api.OPM(M, q_base=0.6, seed=5, optimizer=opt),
    "agm": lambda model, opt: api.AGM(M, optimizer=opt),
    "mlb": lambda model, opt: api.MLB(M, optimizer=opt),
    "olm": lambda model, opt: api.OLM(M, optimizer=opt),
    "pmr": lambda model, opt: api.PMR(M, num_classes=C, optimizer=opt),
    "mmpareto": lambda model, opt: api.MMPareto(
        M, params=[list(e.parameters()) for e in model.encoders], optimizer=opt
    ),
}


@pytest.mark.parametrize("name", list(PROTOCOL_BALANCERS))
def test_protocol_step_has_no_host_reads(name):
    """One optimizer step of the generic loop (mmkernels.api.train_step) with 2 micro-batches, every hook of the
    step (forward hooks, backward, before_optimizer_step, step) inside the guard."""
    model, xs, y, opt = _setup("cpu")
    bal = PROTOCOL_BALANCERS[name](model, opt)
    bal.epoch_start(model, 0, [(xs, y)])  # PMR's refresh: between epochs, outside the step
    half = B // 2
    micro = [([x[:half] for x in xs], y[:half]), ([x[half:] for x in xs], y[half:])]
    run_guarded(lambda: api.train_step(model, bal, opt, micro))
    assert bal.step_count == 2 and bal.micro_batches == 2
