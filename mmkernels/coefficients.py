"""balance_coefficients: per-modality scores -> discrepancy ratios -> coefficients (docs/methods/ogm.md, TPAMI Eq. 6-7
and 11).

Validation happens here, once; then the backend runs: the fused Triton kernel on CUDA tensors (ONE launch,
zero host syncs; mmkernels/triton_ops/coefficients.py), the extension's C++ twin on CPU tensors (ONE call: scores,
ratios, coefficients, flag and AGM state; csrc/coefficients.cpp, math in csrc/coefficients_math.h; a list input is
read in place, not stacked), or the pure-PyTorch reference elsewhere (mmkernels/reference/, also the CPU path
under torch.compile and with sync), which computes the same numbers. Under torch.compile the one-launch Triton
path is the custom op `mmkernels::balance_coefficients` (with a fake implementation): one opaque call, and the
launcher's workspace cache (keyed by device and stream) stays out of the traced graph. In eager mode the launcher is
called directly, skipping the op's dispatch (host time that would exceed the kernel's own).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from . import _methods, reference
from ._backend import backend_for
from ._validate import check_choice, check_hyperparameter, check_ignore_index, check_labels, check_modalities

METHODS = _methods.METHODS  # the one table: mmkernels/_methods.py
METHOD_DEFAULTS = _methods.METHOD_DEFAULTS  # hyperparameters each method accepts, with their defaults
_ALL_HP = dict(_methods.UNUSED_DEFAULTS)


def _check_hyperparameters(method: str, hp: dict) -> dict:
    if torch.compiler.is_compiling():  # traced once anyway; Dynamo would warn about the lru_cache
        return _check_hyperparameters_uncached(method, hp)
    try:  # a trainer passes the same hyperparameters every step: validated once per distinct set
        return _checked_hyperparameters(method, tuple((k, type(v), v) for k, v in sorted(hp.items())))
    except TypeError as exc:
        if "unhashable" not in str(exc):
            raise
        return _check_hyperparameters_uncached(method, hp)


@functools.lru_cache(maxsize=256)
def _checked_hyperparameters(method: str, items: tuple) -> dict:
    return _check_hyperparameters_uncached(method, {k: v for k, _, v in items})


def _check_hyperparameters_uncached(method: str, hp: dict) -> dict:
    allowed = METHOD_DEFAULTS[method]
    unknown = set(hp) - set(allowed)
    if unknown:
        raise TypeError(
            f"unknown hyperparameter(s) {sorted(unknown)} for method {method!r}; expected {sorted(allowed)}"
        )
    p = {**_ALL_HP, **allowed, **hp}
    for name in ("alpha", "q_base", "lam", "beta_max", "clip"):  # the balancers' ranges (_validate's one table)
        check_hyperparameter(p[name], name)
    if isinstance(p["tie"], bool) or p["tie"] not in (0, 1):
        raise ValueError(f"tie must be 0 or 1 (the modality an exact M = 2 tie suppresses), got {p['tie']!r}")
    check_choice(p["z"], ("tanh", "sigmoid"), "z")
    check_choice(p["ratio"], ("ratio", "difference"), "ratio")
    return p


def _check_state(state, m: int, device: torch.device) -> None:
    if state is None:
        return
    if not isinstance(state, dict) or "s_hat" not in state or "steps" not in state:
        raise TypeError(
            f"state must be None or a dict with tensors 's_hat' [M] and 'steps' [] "
            f"(see mmkernels.reference.new_agm_state), got {type(state).__name__}"
        )
    for key, shape in (("s_hat", (m,)), ("steps", ())):
        t = state[key]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != shape:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"state[{key!r}] must be a float32 tensor of shape {shape}, got {got}")
        if t.device != device:
            raise ValueError(f"state[{key!r}] is on {t.device} but the logits are on {device}")


@torch.library.custom_op("mmkernels::balance_coefficients", mutates_args={"s_hat", "steps"})
def balance_coefficients_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    s_hat: Optional[torch.Tensor],
    steps: Optional[torch.Tensor],
    method: str,
    ignore_index: int,
    alpha: float,
    q_base: float,
    lam: float,
    beta_max: float,
    clip: Optional[float],
    z: str,
    ratio: str,
    tie: int = 0,
) -> torch.Tensor:
    """The fused Triton kernel, one launch: logits [M, B, C] (any strides), labels [B] int -> fp32 out [3M + 1]
    = scores [0:M], ratios [M:2M], coefficients [2M:3M], flag [3M]. AGM: s_hat [M] and steps [] fp32 are
    updated in place (None: no history, nothing kept); other methods ignore them (pass None). clip None: no clip.
    No validation here (balance_coefficients validates)."""
    from .triton_ops.coefficients import balance_coefficients_launch

    return balance_coefficients_launch(
        logits,
        labels,
        s_hat,
        steps,
        method,
        ignore_index=ignore_index,
        alpha=alpha,
        q_base=q_base,
        lam=lam,
        beta_max=beta_max,
        clip=clip,
        z=z,
        ratio=ratio,
        tie=tie,
    )


@balance_coefficients_op.register_fake
def _balance_coefficients_fake(
    logits, labels, s_hat, steps, method, ignore_index, alpha, q_base, lam, beta_max, clip, z, ratio, tie=0
):
    return logits.new_empty(3 * logits.shape[0] + 1, dtype=torch.float32)


def _split(out: torch.Tensor, m: int) -> dict:
    """out [3M + 1] -> dict of views (no copy)."""
    return {"scores": out[:m], "ratios": out[m : 2 * m], "coefficients": out[2 * m : 3 * m], "flag": out[3 * m]}


def balance_coefficients(
    unimodal_logits,
    labels: torch.Tensor,
    method: str,
    *,
    state: dict | None = None,
    ignore_index: int = -100,
    sync: bool = False,
    group=None,
    **hyperparameters,
) -> dict:
    """Scores, discrepancy ratios and coefficients of M modalities for one batch, without a host sync.

    unimodal_logits: a list of M tensors [B, C] or one tensor [M, B, C] (any strides, not copied), float.
    labels: int [B]; rows equal to `ignore_index` count nowhere.
    method and its hyperparameters (defaults in METHOD_DEFAULTS):
      "ogm_ge": authors' coefficient k (alpha; tie=0: an exact M = 2 tie suppresses modality 0, as the CVPR 2022
                code; tie=1: modality 1, as the TPAMI repository's OGM script)
      "ogm":    TPAMI Eq. 11, k = max(0, 1 - alpha z(rho)) where rho > 1 (alpha, z="tanh"|"sigmoid",
                ratio="ratio"|"difference")
      "opm":    TPAMI Eq. 8, drop probability q (q_base, lam, z, ratio)
      "agm":    AGM Eq. 7-10, ratios r and coefficients kappa (alpha, clip=None); `state` (from
                mmkernels.reference.new_agm_state) holds the running means and is updated IN PLACE
      "mlb":    Kontras et al. Eq. 5-7, ratios r and k (alpha, beta_max)
    sync: when torch.distributed is initialised, all-reduce the score sums and counts (over `group`) before
      forming ratios, so every rank gets the coefficients of the global batch. This path is plain Python (on
      CUDA: two Triton launches around the all_reduce), not a custom op: under torch.compile keep it outside
      the compiled region. sync=False (or no process group) on CUDA is the custom op
      `mmkernels::balance_coefficients` (one launch; traceable with fullgraph=True).
    Hyperparameter ranges (the balancers' own, mmkernels._validate.HYPERPARAMETER_RANGES): alpha >= 0, q_base in
    (0, 1), lam >= 0, beta_max >= 1, clip None or > 0; ValueError naming the argument otherwise.
    B = 0 is allowed (flag 2, neutral coefficients; with sync the rank still joins the all-reduce).
    Returns dict(scores [M], ratios [M], coefficients [M], flag []) of fp32 device tensors that never require grad
    (the logits are detached). flag: 0 ok,
    1 a non-finite score, ratio or coefficient (coefficients neutral: k = 1, q = 0, kappa = 1; AGM state
    untouched; scores and ratios returned as computed), 2 no valid row (same neutral result; 2 wins over 1).
    Labels outside [0, C) that are not ignore_index give a non-finite score (flag 1) on every backend (the
    balancers check label values on CPU tensors first and raise a ValueError naming `labels`); a 'prob' score sum of
    exactly 0 (softmax[y] underflows on every row) gives an inf or NaN ratio (flag 1).
    """
    stacked, m, first, p = _validated(unimodal_logits, labels, method, state, ignore_index, hyperparameters)
    distributed = bool(sync) and torch.distributed.is_available() and torch.distributed.is_initialized()

    if first.device.type == "cpu" and not distributed and not torch.compiler.is_compiling():
        if backend_for(first, op="balance_coefficients", available=_CPU_BACKENDS) == "ext" and _ext_twin() is not None:
            return _ext_cpu(
                unimodal_logits if stacked else list(unimodal_logits),
                stacked,
                labels,
                method,
                state,
                ignore_index,
                p,
                m,
            )
    logits = unimodal_logits if stacked else torch.stack(list(unimodal_logits))
    backend = backend_for(logits, labels, op="balance_coefficients", available=("reference", "triton"))
    if backend == "triton":
        x = logits.detach()  # a view, no copy: the outputs are statistics, never differentiated through the op
        s_hat, steps = (state["s_hat"], state["steps"]) if method == "agm" and state is not None else (None, None)
        hp = dict(
            ignore_index=int(ignore_index),
            alpha=float(p["alpha"]),
            q_base=float(p["q_base"]),
            lam=float(p["lam"]),
            beta_max=float(p["beta_max"]),
            clip=None if p["clip"] is None else float(p["clip"]),
            z=p["z"],
            ratio=p["ratio"],
            tie=int(p["tie"]),
        )
        if torch.compiler.is_compiling():  # traced: the opaque custom op (one launch)
            out = torch.ops.mmkernels.balance_coefficients(x, labels, s_hat, steps, method, **hp)
        else:  # eager: the launcher directly (the op's dispatch would cost more host time than the kernel)
            from .triton_ops.coefficients import balance_coefficients_launch

            out = balance_coefficients_launch(x, labels, s_hat, steps, method, sync=distributed, group=group, **hp)
        return _split(out, m)
    hp = {k: p[k] for k in METHOD_DEFAULTS[method]}
    logits = logits.detach()  # statistics only: the outputs never require grad
    if not distributed:
        return reference.balance_coefficients_ref(logits, labels, method, state=state, ignore_index=ignore_index, **hp)
    return _reference_synced(logits, labels, method, state, ignore_index, group, hp)


def _validated(unimodal_logits, labels, method, state, ignore_index, hyperparameters):
    """Every check of balance_coefficients (raises, changing nothing). Returns (stacked, M, first tensor, the
    hyperparameters with defaults)."""
    stacked = check_modalities(unimodal_logits, "unimodal_logits", ndim=2)
    first = unimodal_logits if stacked else unimodal_logits[0]
    m = first.shape[0] if stacked else len(unimodal_logits)
    b, c = first.shape[-2], first.shape[-1]
    if c < 1:
        raise ValueError(f"unimodal_logits must have at least one class, got shape [M, B, C] = {[m, b, c]}")
    check_labels(labels, b, first.device)
    check_choice(method, METHODS, "method")
    check_ignore_index(ignore_index)
    p = _check_hyperparameters(method, hyperparameters)
    if method == "agm":
        _check_state(state, m, first.device)
    return stacked, m, first, p


_CPU_BACKENDS = ("reference", "triton", "ext")  # on CPU tensors the extension's twin exists (csrc/coefficients.cpp)


@functools.lru_cache(maxsize=None)
def _ext_twin():
    """mmkernels._C.balance_coefficients, or None (no extension, or one built before the twin existed)."""
    from ._backend import load_ext

    return getattr(load_ext(), "balance_coefficients", None)


def _ext_arguments(method: str, ignore_index: int, p: dict) -> tuple:
    """The twin's arguments after (inputs, labels, s_hat, steps): method id, ignore_index and the hyperparameters."""
    clip = None if p["clip"] is None else float(p["clip"])
    return (
        _METHOD_ID[method],
        int(ignore_index),
        float(p["alpha"]),
        float(p["q_base"]),
        float(p["lam"]),
        float(p["beta_max"]),
        clip,
        p["z"] == "sigmoid",
        p["ratio"] == "difference",
        int(p["tie"]),
    )


def _ext_cpu(logits, stacked, labels, method, state, ignore_index, p, m) -> dict:
    """The C++ CPU twin: one call computes scores, ratios, coefficients, flag and the AGM state update."""
    s_hat, steps = (state["s_hat"], state["steps"]) if method == "agm" and state is not None else (None, None)
    xs = [logits.detach()] if stacked else [u.detach() for u in logits]
    return _split(_ext_twin()(xs, labels, s_hat, steps, *_ext_arguments(method, ignore_index, p)), m)


_METHOD_ID = _methods.KERNEL_IDS  # = csrc/coefficients_math.h CoeffMethod (tests/test_methods_table.py)


def _reference_synced(logits, labels, method, state, ignore_index, group, hp) -> dict:
    """Reference path with the score sums and counts all-reduced across ranks (docs/architecture.md, Conventions: every
    rank joins every collective); the rest of the pipeline is built from mmkernels/reference/coefficients.py's own
    pieces."""
    kind = "ce" if method == "agm" else "prob"
    sums, count = reference.score_sums(logits, labels, kind=kind, ignore_index=ignore_index)
    packed = torch.cat([sums, count.view(1)])
    torch.distributed.all_reduce(packed, group=group)
    sums, count = packed[:-1], packed[-1]
    return reference.balance_from_sums_ref(sums, count, method, state=state, **hp)


class CoefficientPlan:
    """balance_coefficients for a training loop: the checks that do not depend on the batch (method,
    hyperparameters, ignore_index) run once, at construction; the rest (shapes, dtypes, devices, backend) once per
    distinct input layout, which is then kept with its launch prepared (triton_ops.coefficients.PreparedLaunch: the
    output buffer, grid, constants) or its C++ / reference call bound. A call looks the layout up and launches.

    plan(logits [M, B, C] tensor, labels [B], state=None) -> dict(scores [M], ratios [M], coefficients [M], flag [])
    with the same numbers as balance_coefficients(logits, labels, method, ...), in fresh tensors every call. A list of
    logits, sync=True under torch.distributed, and tracing under torch.compile take balance_coefficients itself. AGM:
    `state` is checked on every call (it may be replaced between calls).
    """

    def __init__(self, method: str, *, ignore_index: int = -100, **hyperparameters):
        check_choice(method, METHODS, "method")
        check_ignore_index(ignore_index)
        self.method, self.ignore_index = method, int(ignore_index)
        self.hyperparameters = dict(hyperparameters)
        self._p = _check_hyperparameters(method, self.hyperparameters)
        self._layouts: dict = {}

    def __call__(
        self, logits, labels: torch.Tensor, state: dict | None = None, *, sync: bool = False, group=None
    ) -> dict:
        if (
            not isinstance(logits, torch.Tensor)
            or torch.compiler.is_compiling()
            or (sync and torch.distributed.is_available() and torch.distributed.is_initialized())
        ):
            return balance_coefficients(
                logits,
                labels,
                self.method,
                state=state,
                ignore_index=self.ignore_index,
                sync=sync,
                group=group,
                **self.hyperparameters,
            )
        out = self._run(logits, labels, state)
        return out if isinstance(out, dict) else _split(out, logits.shape[0])

    def raw(self, logits: torch.Tensor, labels: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        """The same call (logits one tensor [M, B, C], no sync) returning the packed fp32 [3M + 1] (scores [0:M],
        ratios [M:2M], coefficients [2M:3M], flag [3M]) without building the four views: the least host time."""
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"CoefficientPlan.raw takes logits as one tensor [M, B, C], got {type(logits).__name__}")
        out = self._run(logits, labels, state)
        if isinstance(out, dict):
            return torch.cat([out["scores"], out["ratios"], out["coefficients"], out["flag"].view(1)])
        return out

    def _run(self, logits, labels, state):
        key = (
            logits.shape,
            logits.stride(),
            logits.dtype,
            logits.device,
            labels.shape,
            labels.dtype,
            labels.device,
            labels.stride(),
            os.environ.get("MMKERNELS_BACKEND"),
        )
        run = self._layouts.get(key)
        if run is None:
            run = self._prepare(logits, labels, state)
            if len(self._layouts) >= 64:
                self._layouts.clear()
            self._layouts[key] = run
        elif self.method == "agm":
            _check_state(state, logits.shape[0], logits.device)
        return run(logits, labels, state)

    def _prepare(self, logits, labels, state):
        """Full validation of this layout, then the bound call of its backend."""
        _, _, _, p = _validated(logits, labels, self.method, state, self.ignore_index, self.hyperparameters)
        method, agm = self.method, self.method == "agm"
        if (
            logits.device.type == "cpu"
            and backend_for(logits, op="balance_coefficients", available=_CPU_BACKENDS) == "ext"
            and _ext_twin() is not None
        ):
            twin, args = _ext_twin(), _ext_arguments(method, self.ignore_index, p)

            def run_ext(x, y, st):
                s_hat, steps = (st["s_hat"], st["steps"]) if agm and st is not None else (None, None)
                return twin([x.detach()], y, s_hat, steps, *args)

            return run_ext
        if backend_for(logits, labels, op="balance_coefficients", available=("reference", "triton")) == "triton":
            from .triton_ops.coefficients import PreparedLaunch

            launch = PreparedLaunch(logits, labels, method, {**p, "ignore_index": self.ignore_index})

            def run_triton(x, y, st):  # the kernel only reads x: no detach needed
                if agm and st is not None:
                    return launch(x, y, st["s_hat"], st["steps"])
                return launch(x, y, None, None)

            return run_triton
        hp, ii = {k: p[k] for k in METHOD_DEFAULTS[method]}, self.ignore_index

        def run_reference(x, y, st):
            return reference.balance_coefficients_ref(x.detach(), y, method, state=st, ignore_index=ii, **hp)

        return run_reference
