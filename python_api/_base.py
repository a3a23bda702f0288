"""The protocol every balancer shares: window, step counter, train/eval, observe, taps, state_dict.

Host state (Python ints and bools): the step and epoch counters, the modulation window, the per-step phase
(observed? backward seen?). Device state (fp32 tensors): scores, ratios, coefficients, the flag, and each
method's running state. Nothing in a training step reads a device value on the host.
"""

from __future__ import annotations

import numbers
import warnings

import torch

from mmkernels import _validate

import torch.nn.functional as F

from . import _dtensor, _ops, _update, protocol

STATE_VERSION = 2  # 1: the dict of the first releases ({"method", ..., "tensors"}); 2: nn.Module state_dict
EXTRA_STATE = "_extra_state"  # nn.Module's key of get_extra_state()
_HOST_KEYS = (
    "method",
    "num_modalities",
    "version",
    "hyperparameters",
    "step",
    "epoch",
    "seed",
    "enabled",
    "observed_step",
)


# ----------------------------------------------------------------------------------------------- checks
def check_int(value, name: str, *, minimum: int = 0, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")


check_real = _validate.check_real
check_hyperparameter = _validate.check_hyperparameter  # the coefficient op's ranges (one table, _validate)


def check_num_modalities(m) -> int:
    if isinstance(m, bool) or not isinstance(m, numbers.Integral):
        raise TypeError(f"num_modalities must be an int, got {type(m).__name__}")
    _validate.check_num_modalities(int(m), "num_modalities")
    return int(m)


def check_label_values(labels: torch.Tensor, num_classes: int, ignore_index: int, name: str = "labels") -> None:
    """Labels in [0, C) or == ignore_index. Checked on CPU tensors only (a host read, no device sync); on CUDA an
    out-of-range label is caught by the coefficient op instead (non-finite score -> flag 1, neutral coefficients)."""
    if labels.device.type != "cpu" or labels.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bool(bad.any()):  # sync-ok: CPU tensor, no device involved
        i = int(bad.nonzero()[0, 0])  # sync-ok: CPU tensor, error path
        raise ValueError(
            f"{name} must be class indices in [0, {num_classes}) or ignore_index={ignore_index}; "
            f"{name}[{i}] = {int(labels[i])}"
        )  # sync-ok: error path


def masked_mean_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over the valid rows (fp32); 0, not NaN, when no row is valid. No host sync."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)


class _Neutral:
    """Marker: backward of a deferred tap in a step where observe() never ran -> the gradient passes unchanged."""


class _DeferredTap(torch.autograd.Function):
    """Identity forward; the backward applies the coefficients that observe() set LATER in the same step.

    Used when tap() comes before observe() (the coefficients of this step are not known at tap time). The
    backward runs the balancer's public tap op on the incoming gradient (its forward is a view, its backward the
    kernel), so the math stays in the op. Eager mode only: torch.compile traces a backward at forward time, so under
    compile call observe() before tap() (tap then passes the coefficients to the op directly).
    """

    @staticmethod
    def forward(ctx, x, balancer, modality: int, step: int):
        ctx.balancer, ctx.modality, ctx.step = balancer, modality, step
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        bal = ctx.balancer
        bal._mark_backward(ctx.step)
        coef = bal._coefficients_of_step(ctx.step)
        if coef is None:
            return grad, None, None, None
        with torch.enable_grad():
            x = grad.detach().requires_grad_(True)
            y = bal._tap_op(x, coef, ctx.modality, ctx.step)
            (gx,) = torch.autograd.grad(y, x, grad)
        return gx, None, None, None


# ----------------------------------------------------------------------------------------------- base
class _Constructed(type(torch.nn.Module)):
    """Runs _attach_optimizer_hooks() after __init__ returns, so hooks on the user's optimizer exist only for a
    balancer whose constructor accepted every argument."""

    def __call__(cls, *args, **kwargs):
        obj = super().__call__(*args, **kwargs)
        obj._attach_optimizer_hooks()
        return obj


class Balancer(torch.nn.Module, metaclass=_Constructed):
    """Base class of every balancer (the protocol in README "The trainer API"), a torch.nn.Module without parameters.

    As a submodule of the model (model.balancer = OGMGE(...)) it follows the model: .to()/.cuda() move its device
    state (kept fp32 whatever dtype the model is cast to), .train()/.eval() switch it, and model.state_dict() holds
    it: one tensor entry per statistic and running state (scores, ratios, coefficients, flag, and the method's own),
    plus "_extra_state" with the host counters (step, epoch, seed, window, hyperparameters, version). A state saved
    by an earlier release (the plain dict of version 1) still loads. The device state is saved and moved like buffers
    but not registered as buffers on purpose: DistributedDataParallel broadcasts a module's buffers from rank 0 at
    every forward, which would overwrite the per-rank sums a balancer all-reduces itself (the valuation's phi sums).

    Common keyword arguments:
      start, end, unit: the modulation window, start <= t < end (end None: no end), t the step counter
        (unit="step", advanced by step()) or the epoch (unit="epoch", set by set_epoch()). Outside it every
        coefficient is exactly neutral (k = 1, q = 0, kappa = 1, w = 1) and the taps are the identity.
      enabled: False turns the balancer into a no-op (same as being outside the window).
      official: reproduce the authors' public code where it differs from the paper (README "Differences").
      ignore_index: label of rows that count nowhere.
      seed: seed of the counter-based noise / drop streams (an int in [0, 2**63)); the offset follows the step counter.
      sync: all-reduce the score sums under torch.distributed (None: when a process group with > 1 rank is up).
        Every rank joins every collective in the same order, whatever its batch (an empty or all-ignored batch too).
      optimizer: if given, step() is called automatically after each optimizer.step(). A step whose
        optimizer.step() never comes (torch.amp.GradScaler skips it when the gradients hold inf/NaN) is ended by
        the next step's first call (observe, tap, drop, forward, loss) once its backward has run; `skipped_steps`
        counts them, and the first one raises a RuntimeWarning (gradient accumulation, which is not supported yet,
        would show up here: each micro-batch after the first is taken for a skipped step).
      num_classes: C, optional; when given, unimodal logits whose last dimension is not C are refused (a ValueError
        that says encoder features were probably passed instead of logits). Without it the width is not checked.
    """

    method: str = ""  # name stored in state_dict
    coefficient_method: str = ""  # method name of mmkernels.balance_coefficients
    neutral: float = 1.0  # coefficient value that means "no modulation"

    def __init__(
        self,
        num_modalities: int,
        *,
        start: int = 0,
        end: int | None = None,
        unit: str = "step",
        enabled: bool = True,
        official: bool = False,
        ignore_index: int = -100,
        seed: int = 0,
        sync: bool | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        num_classes: int | None = None,
    ):
        torch.nn.Module.__init__(self)
        self.num_modalities = check_num_modalities(num_modalities)
        check_int(num_classes, "num_classes", minimum=1, allow_none=True)
        check_int(start, "start")
        check_int(end, "end", allow_none=True)
        if end is not None and end <= start:
            raise ValueError(f"end must be greater than start (window start <= t < end), got start={start}, end={end}")
        _validate.check_choice(unit, ("step", "epoch"), "unit")
        _validate.check_counter(seed, "seed")
        _validate.check_ignore_index(ignore_index)
        self.start, self.end, self.unit = int(start), end, unit
        self.enabled = bool(enabled)
        self.official = bool(official)
        self.ignore_index = int(ignore_index)
        self.seed = int(seed)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.sync = sync
        self._step = 0
        self._epoch = 0
        self._observed_step = -1  # step of the last observe()
        self._protocol_step = -1  # step in which bal(model, inputs, labels) ran
        self._closed_step = -1  # step in which before_optimizer_step() ran
        self.micro_batches = 0  # forwards of the protocol in the current step
        self._rows_before = 0  # rows of this step's earlier micro-batches (random streams continue after them)
        self._rows_in_step = 0
        self._pending = []  # (detached unimodal logits, labels) of this step's micro-batches, observed at the end
        self._backward_step = -1  # step in which a backward through our taps (or modulate_grads) was seen
        self._device = torch.device("cpu")
        m = self.num_modalities
        self._stats = {
            "scores": torch.zeros(m),
            "ratios": torch.zeros(m),
            "coefficients": torch.full((m,), float(self.neutral)),
            "flag": torch.zeros(()),
        }
        self._auto_step = optimizer is not None
        self._optimizer = optimizer
        self.skipped_steps = 0  # steps ended without optimizer.step() (GradScaler skips), optimizer= only
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")

    def _attach_optimizer_hooks(self) -> None:
        """Called once the whole constructor has succeeded (_Constructed): a rejected construction hooks nothing."""
        if self._optimizer is not None:
            self._hook = self._optimizer.register_step_post_hook(lambda *_: self.step())

    # ---------------------------------------------------------------- host-side protocol
    def step(self) -> None:
        """End the training step (call after optimizer.step(), or pass optimizer= to do it automatically)."""
        self._step += 1

    def _roll_over(self) -> None:
        """optimizer= given and this step is over, yet optimizer.step() never came (GradScaler skipped it): end the
        step here, as the hook would have. Over means: before_optimizer_step() ran (the protocol, which also tells
        micro-batches apart), or, for the building blocks alone, this step's backward ran."""
        if not self._auto_step:
            return
        over = (
            self._closed_step == self._step if self._protocol_step == self._step else self._backward_step == self._step
        )
        if over:
            if not self.skipped_steps:
                warnings.warn(
                    f"{type(self).__name__}: step {self._step} ended without optimizer.step() and was "
                    f"counted in skipped_steps, as after a torch.amp.GradScaler skip. Accumulating gradients "
                    f"over micro-batches? Run them through bal(model, inputs, labels) and call "
                    f"bal.before_optimizer_step() once per optimizer step (README: The protocol).",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self.skipped_steps += 1
            self.step()

    def _mark_on_backward(self, tensors) -> None:
        """Record the backward of this step when a gradient reaches one of `tensors` (eager; a host flag only)."""
        if torch.compiler.is_compiling():
            return
        step = self._step
        for y in tensors:
            if isinstance(y, torch.Tensor) and y.requires_grad:
                y.register_hook(lambda g, s=step: self._mark_backward(s))

    def set_epoch(self, epoch: int) -> None:
        check_int(epoch, "epoch")
        self._epoch = int(epoch)

    @property
    def step_count(self) -> int:
        return self._step

    @property
    def epoch(self) -> int:
        return self._epoch

    def in_window(self, t: int | None = None) -> bool:
        """Whether time t (default: now) is inside the modulation window (host decision, no device read)."""
        if t is None:
            t = self._step if self.unit == "step" else self._epoch
        return self.start <= t and (self.end is None or t < self.end)

    @property
    def active(self) -> bool:
        """Modulating now: enabled, in training mode, inside the window."""
        return self.enabled and self.training and self.in_window()

    def _grad_step(self) -> bool:
        return self.active and torch.is_grad_enabled()

    def _sync(self) -> bool:
        if self.sync is not None:
            return bool(self.sync)
        d = torch.distributed
        return d.is_available() and d.is_initialized() and d.get_world_size() > 1

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        d = torch.distributed
        if d.is_available() and d.is_initialized():
            return d.get_rank(), d.get_world_size()
        return 0, 1

    # ---------------------------------------------------------------- device state
    def _to_device(self, device: torch.device) -> None:
        if device != self._device:
            self._move(device)

    def _move(self, device) -> None:
        self._device = torch.device(device)
        self._stats = {k: v.to(self._device) for k, v in self._stats.items()}

    def _apply(self, fn, recurse=True):
        """Every nn.Module move or cast (to, cuda, half, ...) ends here: the device state follows the device, never
        the dtype (statistics stay fp32)."""
        out = super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self._device)).device
        if device != self._device:
            self._move(device)
        return out

    @property
    def scores(self) -> torch.Tensor:
        """Per-modality scores of the last observed batch, [M] fp32 device tensor (read-only)."""
        return self._stats["scores"]

    @property
    def ratios(self) -> torch.Tensor:
        """Per-modality discrepancy ratios of the last observed batch, [M] fp32 (read-only)."""
        return self._stats["ratios"]

    @property
    def coefficients(self) -> torch.Tensor:
        """Current coefficients [M] fp32 (k, q or kappa; exactly neutral outside the window), read-only."""
        return self._stats["coefficients"]

    @property
    def flag(self) -> torch.Tensor:
        """0 ok, 1 a non-finite score, ratio or coefficient, 2 no valid row (fp32 0-d device tensor)."""
        return self._stats["flag"]

    @property
    def nonfinite(self) -> torch.Tensor:
        """Bool 0-d device tensor: the last observed batch gave a non-finite score, ratio or coefficient (they fell
        back)."""
        return self._stats["flag"] == 1

    # ---------------------------------------------------------------- validation
    def _check_list(self, xs, name: str, *, same_shape: bool = False) -> list:
        if isinstance(xs, torch.Tensor):
            if xs.dim() < 2:
                raise ValueError(f"{name} as one tensor must be stacked [M, B, ...], got shape {tuple(xs.shape)}")
            xs = list(xs.unbind(0))
        if not isinstance(xs, (list, tuple)):
            raise TypeError(f"{name} must be a list of {self.num_modalities} tensors, got {type(xs).__name__}")
        if len(xs) != self.num_modalities:
            raise ValueError(f"len({name}) must equal num_modalities={self.num_modalities}, got {len(xs)}")
        _validate.check_same(list(xs), name, same_shape=same_shape)
        return list(xs)

    def _check_logits(self, logits, labels, name: str = "unimodal_logits") -> torch.Tensor:
        if isinstance(logits, (list, tuple)) and len(logits) != self.num_modalities:
            raise ValueError(f"len({name}) must equal num_modalities={self.num_modalities}, got {len(logits)}")
        x = _validate.as_stacked(logits, name, ndim=2)
        if x.shape[0] != self.num_modalities:
            raise ValueError(f"{name} has {x.shape[0]} modalities but num_modalities={self.num_modalities}")
        _validate.check_labels(labels, x.shape[1], x.device, "labels")
        self._check_width(x.shape[2], name)
        check_label_values(labels, x.shape[2], self.ignore_index)
        return x

    def _check_width(self, width: int, name: str) -> None:
        """The class dimension of logits against num_classes (when given)."""
        if self.num_classes is not None and width != self.num_classes:
            raise ValueError(
                f"{name} must have num_classes={self.num_classes} columns (the unimodal logits [B, C]), "
                f"got {width}: were encoder features passed instead of logits?"
            )

    # ---------------------------------------------------------------- observe
    def _begin_observe(self, what: str = "observe", *, mark: bool = True) -> None:
        """Check that this step may observe (raises otherwise, changing nothing) and, if mark, record it."""
        self._roll_over()
        if self._observed_step == self._step:
            raise RuntimeError(
                f"{type(self).__name__}.{what}() was called twice in step {self._step}; call "
                f"bal.step() after optimizer.step() (or pass optimizer= to the constructor)"
            )
        if self._backward_step == self._step:
            raise RuntimeError(
                f"{type(self).__name__}.{what}() called after backward in step {self._step}; "
                f"call bal.step() to start the next step first"
            )
        if mark:
            self._observed_step = self._step

    def _hyperparameters(self) -> dict:
        """Hyperparameters passed to balance_coefficients."""
        return {}

    def _run_coefficients(self, x: torch.Tensor, labels: torch.Tensor, *, state=None) -> dict:
        """The public coefficient op (through a CoefficientPlan: checks once per layout) on stacked logits [M, B, C]
        (detached). Run for an empty batch too (flag 2,
        neutral coefficients): under sync every rank must join the all-reduce of every step."""
        self._to_device(x.device)
        hp = self._hyperparameters()
        key = (self.coefficient_method, self.ignore_index, tuple(sorted(hp.items())))
        if getattr(self, "_plan_key", None) != key:  # validated once per set of hyperparameters
            self._plan = _ops.CoefficientPlan(self.coefficient_method, ignore_index=self.ignore_index, **hp)
            self._plan_key = key
        return self._plan(x.detach(), labels, state, sync=self._sync())

    def _store(self, res: dict | None, *, modulate: bool) -> None:
        """Keep the op's outputs; coefficients exactly neutral when not modulating (host decision)."""
        if res is None:  # empty batch: nothing observed, nothing updated except the neutral fall back
            res = {
                "scores": self._stats["scores"],
                "ratios": self._stats["ratios"],
                "flag": torch.full((), 2.0, device=self._device),
                "coefficients": torch.full((self.num_modalities,), float(self.neutral), device=self._device),
            }
        coef = res["coefficients"] if modulate else torch.full_like(res["coefficients"], float(self.neutral))
        self._stats = {"scores": res["scores"], "ratios": res["ratios"], "coefficients": coef, "flag": res["flag"]}

    # ---------------------------------------------------------------- taps
    def _noise_offset(self, step: int, modality: int) -> int:
        """Philox offset of modality m's stream at `step`; distinct per (step, rank, modality)
        (docs/methods/ogm_ge.md)."""
        rank, world = self._rank_world()
        return ((step * world + rank) * self.num_modalities + modality) << 32

    @property
    def _rows_before(self) -> int:
        """Rows of this step's earlier micro-batches (protocol forwards): a random stream of the step continues
        after them, so micro-batch j draws what rows R_j.. of one large batch would (0 for a step's first)."""
        return self._rows_seen if self._protocol_step == self._step else 0

    @_rows_before.setter
    def _rows_before(self, value: int) -> None:
        self._rows_seen = value

    def _mark_backward(self, step: int) -> None:
        if step == self._step:
            self._backward_step = step

    # ---------------------------------------------------------------- the protocol (python_api/protocol.py)
    @property
    def steps_with_optimizer(self) -> bool:
        """optimizer= was given: each optimizer.step() also ends the balancer's step (else call step())."""
        return self._auto_step

    def forward(self, model, inputs, labels: torch.Tensor, **extras) -> protocol.StepOutput:
        """One (micro-)batch of a step, the same call for every balancer: encode -> transform_features -> fuse ->
        objective (README "The protocol"). model: the protocol's model (`encoders`, `fuse`, optional
        `unimodal_logits`); inputs: M tensors [B, ...]; labels [B]. Returns StepOutput(loss, logits, features,
        unimodal_logits); backpropagate `loss`. Several calls before before_optimizer_step() are the micro-batches
        of one optimizer step (gradient accumulation)."""
        inputs = protocol.check_inputs(inputs, self.num_modalities)
        self._begin_micro_batch(inputs[0].shape[0] if inputs[0].dim() else 0)
        feats = self.encode(model, inputs)
        feats = self.transform_features(model, feats, labels, **extras)
        logits = self.fuse(model, feats, inputs, labels)
        loss, uni = self.objective(model, logits, feats, labels)
        return protocol.StepOutput(loss=loss, logits=logits, features=feats, unimodal_logits=uni)

    def encode(self, model, inputs: list) -> list:
        """Hook 1: the M encoder outputs [B, D_m] (model.encoders[m](inputs[m]))."""
        return [enc(x) for enc, x in zip(protocol.encoders_of(model, self.num_modalities), inputs)]

    def transform_features(self, model, feats: list, labels: torch.Tensor, **extras) -> list:
        """Hook 2: the features the fusion sees (taps, drops, keep-masks); identity here."""
        if extras:
            raise TypeError(f"{type(self).__name__} takes no batch extras, got {sorted(extras)}")
        return feats

    def fuse(self, model, feats: list, inputs: list, labels: torch.Tensor) -> torch.Tensor:
        """Hook 3: the fused logits [B, C]; model.fuse(feats) here."""
        return model.fuse(feats)

    def objective(self, model, logits: torch.Tensor, feats: list, labels: torch.Tensor):
        """Hook 4: (the loss to backpropagate, the unimodal logits [M, B, C] or None); the mean cross-entropy of the
        fused logits over the valid rows here."""
        return masked_mean_ce(logits, labels, self.ignore_index), None

    def before_optimizer_step(self, grad_divisor=None) -> None:
        """Hook 5: after the backward of the step's last micro-batch, before optimizer.step(): statistics deferred to
        the end of the step, parameter-mode modulation, MMPareto's combination. grad_divisor: what .grad was divided
        by since backward (GradScaler.unscale_ divides by its scale: pass scaler's scale tensor; no host read), or
        None; only MMPareto needs it (its unimodal share was taken inside backward), the other methods' gradient
        operations commute with a common scale."""
        if self._pending:
            self._observe_pending()
        self._closed_step = self._step

    def epoch_start(self, model, epoch: int, batches=None) -> None:
        """Hook 6: before an epoch (set_epoch; PMR refreshes its prototypes from the first tenth of `batches`)."""
        self.set_epoch(epoch)

    def epoch_end(self, model, epoch: int, batches=None, val_batches=None) -> None:
        """Hook 7: after an epoch (OLM refits w from the branches' train and validation losses; the valuation
        balancers value the samples and serve the next epoch's rows)."""

    def _begin_micro_batch(self, rows: int) -> None:
        """Host bookkeeping of bal(model, inputs, labels): a forward after this step's backward is the next
        micro-batch of the same optimizer step (its own observation for the coefficients that act inside backward;
        the deferred statistics keep accumulating)."""
        if not (self.training and torch.is_grad_enabled()):
            return
        self._roll_over()
        if self._protocol_step == self._step:
            if self._closed_step == self._step:
                raise RuntimeError(
                    f"{type(self).__name__}: a forward after before_optimizer_step() in step {self._step}; call "
                    f"bal.step() after optimizer.step() (or pass optimizer= to the constructor)"
                )
            self.micro_batches += 1
            if self._backward_step == self._step:  # the previous micro-batch's backward ran: observe anew
                self._observed_step = self._backward_step = -1
        else:
            self.micro_batches, self._pending, self._rows_in_step = 1, [], 0
        self._protocol_step = self._step
        self._rows_before = self._rows_in_step
        self._rows_in_step += rows

    def _defers_observation(self) -> bool:
        """The coefficients act after backward or in the next step: observe once per step, on the concatenated
        logits of every micro-batch (equal to one large batch)."""
        return False

    def _observe_pending(self) -> None:
        xs, ys = zip(*self._pending)
        self._pending = []
        if not (self.enabled and self.training):
            return
        x, y = torch.cat(xs, 1), torch.cat(ys)
        self._observed_step = self._step
        self._observe_checked(x, y)

    def _observe_checked(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """The coefficients from checked, stacked unimodal logits [M, B, C]."""
        self._store(self._run_coefficients(x, labels), modulate=self.in_window())

    # ---------------------------------------------------------------- state
    def _hparams_state(self) -> dict:
        return {
            "start": self.start,
            "end": self.end,
            "unit": self.unit,
            "official": self.official,
            "ignore_index": self.ignore_index,
            **self._hyperparameters(),
        }

    def _extra_tensors(self) -> dict:
        return {}

    def _load_extra_tensors(self, tensors: dict) -> None:
        pass

    _optional_tensors: tuple = ()  # extra state tensors a state_dict may lack (OLM's reference losses)

    def _upgrade_state(self, state: dict) -> dict:
        """A state_dict saved by an earlier release, in today's layout (a new dict; the argument is not modified)."""
        return state

    def _check_state(self, state, strict: bool) -> None:
        """Everything load_state_dict reads, checked before anything is assigned (a rejected load changes nothing)."""
        if not isinstance(state, dict) or "method" not in state or "num_modalities" not in state:
            raise ValueError("state must be a dict returned by a balancer's state_dict()")
        if state["method"] != self.method:
            raise ValueError(f"state was saved by a {state['method']!r} balancer, cannot load it into {self.method!r}")
        if state["num_modalities"] != self.num_modalities:
            raise ValueError(
                f"state was saved for num_modalities={state['num_modalities']}, "
                f"this balancer has num_modalities={self.num_modalities}"
            )
        missing = [k for k in ("hyperparameters", "step", "epoch", "seed", "enabled", "tensors") if k not in state]
        if missing:
            raise ValueError(f"state lacks the entries {missing} (expected a balancer's state_dict())")
        for key in ("step", "epoch"):
            check_int(state[key], f"state[{key!r}]")
        _validate.check_counter(state["seed"], "state['seed']")
        t = state["tensors"]
        if not isinstance(t, dict):
            raise TypeError(f"state['tensors'] must be a dict of tensors, got {type(t).__name__}")
        mine = {**self._stats, **self._extra_tensors()}
        required = [k for k in mine if k not in self._optional_tensors]
        missing = [k for k in required if k not in t]
        if missing:
            raise ValueError(f"state['tensors'] lacks {missing} (expected {sorted(required)})")
        m = self.num_modalities
        for k, v in t.items():
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                raise TypeError(
                    f"state['tensors'][{k!r}] must be a floating tensor, got "
                    f"{v.dtype if isinstance(v, torch.Tensor) else type(v).__name__}"
                )
            if v.is_meta:
                raise ValueError(
                    f"state['tensors'][{k!r}] is a meta tensor (no data); load a state_dict saved with "
                    f"its values (e.g. torch.load(..., map_location='cpu'))"
                )
            want = tuple(mine[k].shape) if k in mine else ((m,) if k in self._optional_tensors else None)
            if want is not None and tuple(v.shape) != want:
                raise ValueError(f"state['tensors'][{k!r}] must have shape {list(want)}, got {list(v.shape)}")
        diff = self._hparams_diff(state["hyperparameters"])
        if strict and diff:
            raise ValueError(
                f"state has other hyperparameters (saved, current): {diff}; pass strict=False to keep the current ones"
            )

    def _host_state(self) -> dict:
        """Host entries of a method beyond the common ones (PMR: the prototypes' widths and the refresh count)."""
        return {}

    def _device_state(self) -> dict:
        """Every device tensor a resume needs, by state_dict key."""
        return {**self._stats, **self._extra_tensors()}

    def get_extra_state(self) -> dict:
        """The host side of the state: method, M, version, hyperparameters, counters, seed (nn.Module protocol)."""
        return {
            "method": self.method,
            "num_modalities": self.num_modalities,
            "version": STATE_VERSION,
            "hyperparameters": self._hparams_state(),
            "step": self._step,
            "epoch": self._epoch,
            "seed": self.seed,
            "enabled": self.enabled,
            "observed_step": self._observed_step,
            **self._host_state(),
        }

    def set_extra_state(self, state) -> None:  # loading goes through _load_from_state_dict (checks first)
        raise RuntimeError("a balancer's extra state is loaded by load_state_dict(), together with its tensors")

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for key, value in self._device_state().items():  # cloned: later in-place updates do not reach a saved state
            destination[prefix + key] = value.detach().clone()
        destination[prefix + EXTRA_STATE] = self.get_extra_state()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        mine = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if EXTRA_STATE not in mine:
            raise ValueError(
                f"state lacks {prefix + EXTRA_STATE!r} (the balancer's host state): expected a state_dict() of "
                f"a {type(self).__name__} (or of a model holding it)"
            )
        host = mine.pop(EXTRA_STATE)
        if not isinstance(host, dict):
            raise TypeError(f"state[{prefix + EXTRA_STATE!r}] must be a dict, got {type(host).__name__}")
        state = {**host, "tensors": mine}
        if host.get("method") == self.method:
            state = self._upgrade_state(state)
        known = set(self._device_state()) | set(self._optional_tensors)
        unknown = [prefix + k for k in state["tensors"] if k not in known]
        if unknown and self._strict_hparams:  # strict, on the balancer itself: refused before anything changes
            raise RuntimeError(f"Unexpected key(s) in state_dict of {type(self).__name__}: {unknown}")
        unexpected_keys.extend(unknown)
        state = {**state, "tensors": {k: v for k, v in state["tensors"].items() if k in known}}
        strict_hp = self._strict_hparams
        if strict_hp is None:  # loaded through a parent module: differing hyperparameters are reported, not raised
            diff = self._hparams_diff(state.get("hyperparameters"))
            if diff:
                unexpected_keys.append(f"{prefix}{EXTRA_STATE} (hyperparameters differ, (saved, current): {diff})")
            strict_hp = False
        self._load_state(state, strict_hp)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module.load_state_dict, plus: the version-1 dict of earlier releases is accepted (converted), and
        strict=True also requires the saved hyperparameters to equal the current ones (strict=False keeps the
        current ones). Every entry is checked before anything is assigned: a rejected state changes nothing."""
        if isinstance(state_dict, dict) and "tensors" in state_dict and "method" in state_dict:
            state_dict = _from_version_1(state_dict)
        self._strict_hparams = bool(strict)
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            self._strict_hparams = None

    _strict_hparams = None  # load_state_dict(strict=...) called on the balancer itself (None: through a parent)

    def _hparams_diff(self, saved) -> dict:
        current = self._hparams_state()
        if not isinstance(saved, dict):
            return {}
        return {k: (saved.get(k), current.get(k)) for k in set(current) | set(saved) if saved.get(k) != current.get(k)}

    def _load_state(self, state: dict, strict: bool) -> None:
        """Check, then assign, a state in the layout {host entries..., "tensors": {...}} (upgraded first)."""
        if isinstance(state, dict) and state.get("method") == self.method:
            state = self._upgrade_state(state)
        self._check_state(state, strict)
        self._step, self._epoch, self.seed = int(state["step"]), int(state["epoch"]), int(state["seed"])
        self.enabled = bool(state["enabled"])
        self._observed_step = int(state.get("observed_step", -1))
        self._backward_step = -1
        t = state["tensors"]
        self._stats = {k: t[k].to(self._device).clone() for k in self._stats}
        self._load_extra_tensors({k: v.to(self._device).clone() for k, v in t.items() if k not in self._stats})

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self._hparams_state().items())
        return f"{type(self).__name__}(num_modalities={self.num_modalities}, {hp})"


def _from_version_1(state: dict) -> dict:
    """The dict of version 1 ({"method", ..., "tensors": {...}}) as a version-2 state_dict (flat tensors +
    "_extra_state")."""
    if not isinstance(state["tensors"], dict):
        raise TypeError(f"state['tensors'] must be a dict of tensors, got {type(state['tensors']).__name__}")
    flat, host = dict(state["tensors"]), {}
    for key, value in state.items():
        if key == "tensors":
            continue
        if isinstance(value, torch.Tensor):
            flat[key] = value
        else:
            host[key] = value
    flat[EXTRA_STATE] = host
    return flat


class LogitObserver:
    """observe(): the balancers whose coefficients come from this step's unimodal logits (OGM-GE, OGM, OPM, MLB)."""

    def observe(self, unimodal_logits, labels: torch.Tensor) -> None:
        """Score this step's unimodal logits ([M, B, C] or a list of M [B, C]; detached) and set the coefficients.

        Call once per step. No host sync. Empty batch or no valid row: no update, neutral coefficients.
        """
        x = self._check_logits(unimodal_logits, labels)
        if not (self.enabled and self.training):
            return
        self._begin_observe()
        self._observe_checked(x, labels)

    def _observe_step(self, model, feats: list, labels: torch.Tensor) -> None:
        """The protocol's observation of this micro-batch: now, or deferred to before_optimizer_step()."""
        if not (self.enabled and self.training and torch.is_grad_enabled()):
            return
        u = protocol.unimodal_logits(model, feats, detach=True)
        if self._defers_observation():
            x = self._check_logits(u, labels)
            self._pending.append((x, labels))
        else:
            self.observe(u, labels)


class FeatureTaps:
    """tap(): the balancers that scale encoder-output gradients by their coefficients (OGM-GE, OGM, MLB)."""

    _tap_groups = None  # the protocol's deferred taps: encoder m's parameters (None: taps act in the backward)

    def transform_features(self, model, feats: list, labels: torch.Tensor, **extras) -> list:
        """The protocol's hook 2. A tap without noise scales every gradient that reaches encoder m by k_m, which is
        k_m times encoder m's parameter gradients: with the model's encoders as modules owning disjoint parameters,
        the protocol scales those after the step's last backward instead (before_optimizer_step), from one
        observation of every micro-batch (gradient accumulation then equals one large batch). Otherwise (noise
        taps, encoders without parameters of their own): observe this micro-batch, then tap (observe first: the
        taps get this step's coefficients directly, which torch.compile needs). Parameter mode: observe only."""
        feats = Balancer.transform_features(self, model, feats, labels, **extras)
        self._tap_groups = self._encoder_parameters(model) if self._uses_taps() and self._grad_step() else None
        self._observe_step(model, feats, labels)
        return self.tap(feats) if self._uses_taps() and self._tap_groups is None else feats

    def _encoder_parameters(self, model):
        """[M lists]: the parameters of model.encoders (requires_grad), when the taps may act on them: no noise,
        nn.Module encoders, each parameter in one encoder only; else None."""
        if getattr(self, "noise", None) is not None:
            return None
        encoders = protocol.encoders_of(model, self.num_modalities)
        if not all(isinstance(e, torch.nn.Module) for e in encoders):
            return None
        groups = [[p for p in e.parameters() if p.requires_grad] for e in encoders]
        ids = [id(p) for g in groups for p in g]
        if not all(groups) or len(set(ids)) != len(ids):
            return None
        return groups

    def before_optimizer_step(self, grad_divisor=None) -> None:
        super().before_optimizer_step(grad_divisor)
        groups, self._tap_groups = self._tap_groups, None
        if groups is None or not self.active or self._observed_step != self._step:
            return
        coef = self._stats["coefficients"]
        for m, group in enumerate(groups):
            grads = [_dtensor.local(p.grad) for p in group if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, coef[m])

    def _tap_op(self, x: torch.Tensor, coef: torch.Tensor, modality: int, step: int) -> torch.Tensor:
        """The public op a tap applies to modality m (plain gradient scaling here; noise in OGM-GE)."""
        return _ops.grad_tap(x, coef[modality])

    def _coefficients_of_step(self, step: int):
        return self._stats["coefficients"] if self._observed_step == step else None

    def _uses_taps(self) -> bool:
        return True

    def tap(self, feats) -> list:
        """Identity on the M encoder outputs (a list of [B, ...]); the backward multiplies modality m's gradient by
        this step's coefficient (and adds the noise the balancer is configured with).

        Call it on the encoder outputs before the fusion head. observe() may come before or after it in the step
        (after: eager only, see _DeferredTap). Outside the window, in eval mode or without grad: the identity.
        """
        xs = self._check_list(feats, "feats")
        if not self._uses_taps():
            raise RuntimeError(
                f"{type(self).__name__} is in parameter mode (params= given): call "
                f"modulate_grads() after backward instead of tap()"
            )
        if not self._grad_step():
            return xs
        self._roll_over()
        if self._backward_step == self._step:
            raise RuntimeError(
                f"{type(self).__name__}.tap() called after backward in step {self._step}; call "
                f"bal.step() after optimizer.step() (or pass optimizer= to the constructor)"
            )
        self._to_device(xs[0].device)
        step = self._step
        if xs[0].shape[0] == 0:  # no rows: nothing to scale (the ops need B > 0)
            self._mark_on_backward(xs)
            return xs
        if self._observed_step == step:  # coefficients known now: pass them to the op (compile-friendly)
            coef = self._stats["coefficients"]
            out = [self._tap_op(x, coef, m, step) for m, x in enumerate(xs)]
            self._mark_on_backward(out)
            return out
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"under torch.compile call {type(self).__name__}.observe() before tap() "
                f"(the deferred tap reads the coefficients at backward time, eager only)"
            )
        return [_DeferredTap.apply(x, self, m, step) for m, x in enumerate(xs)]


# ----------------------------------------------------------------------------------------------- parameter mode
_ADAPTIVE = tuple(
    getattr(torch.optim, name)
    for name in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "Adafactor")
    if hasattr(torch.optim, name)
)
_WARNED_ADAPTIVE: set = set()


def _warn_adaptive(bal) -> None:
    """Once per process and balancer class: modulate="grad" with an adaptive optimizer, which divides a gradient's
    scale out of its update (README "Adaptive optimizers"), so k barely changes what the optimizer does."""
    opt = bal._optimizer
    if opt is None or bal._modulate != "grad" or not isinstance(opt, _ADAPTIVE):
        return
    key = (type(bal).__name__, type(opt).__name__)
    if key in _WARNED_ADAPTIVE:
        return
    _WARNED_ADAPTIVE.add(key)
    warnings.warn(
        f"{type(bal).__name__}(modulate='grad') with torch.optim.{type(opt).__name__}: an adaptive optimizer "
        f"divides the scale of a gradient out of its update, so the coefficient k barely changes the step. Pass "
        f"modulate='update' with params= and optimizer= to scale the update itself (README: Adaptive optimizers).",
        UserWarning,
        stacklevel=4,
    )


class ParameterModeMixin:
    """Modulation on listed parameter tensors (the authors' placement): params is a list of M iterables of tensors
    (modality m's tensors, e.g. only its conv weights).

    modulate="grad" (the papers'): after backward, modulate_grads() scales their gradients, grad <- k_m grad.
    modulate="update": the gradients are left as they are (GE noise, where enabled, is still added by
    modulate_grads()) and the change optimizer.step() makes to each listed tensor is scaled instead,
    delta_p <- k_m delta_p, with the optimizer's state left as the unmodulated step leaves it (python_api/_update.py).
    It keeps k's effect under adaptive optimizers (Adam, AdamW, RMSprop), whose step divides the gradient's scale
    out. Needs params= and optimizer=.
    """

    _modulate = "grad"
    _update = None
    _shard_group = None

    def _init_params(self, params, modulate: str = "grad") -> None:
        _validate.check_choice(modulate, ("grad", "update"), "modulate")
        self._params = None
        if params is None and modulate == "update":
            raise ValueError(
                f"{type(self).__name__}(modulate='update') needs params= (a list of num_modalities="
                f"{self.num_modalities} iterables of tensors: the tensors whose update is scaled)"
            )
        if params is None:
            return
        if not isinstance(params, (list, tuple)) or len(params) != self.num_modalities:
            got = len(params) if isinstance(params, (list, tuple)) else type(params).__name__
            raise ValueError(
                f"params must be a list of num_modalities={self.num_modalities} iterables of tensors "
                f"(one per modality), got {got}"
            )
        groups, seen = [], {}
        for m, group in enumerate(params):
            ts = [group] if isinstance(group, torch.Tensor) else list(group)
            for i, t in enumerate(ts):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"params[{m}][{i}] must be a tensor, got {type(t).__name__}")
                _dtensor.check_sharding(t, f"params[{m}][{i}]")
                if id(t) in seen:
                    raise ValueError(
                        f"params[{m}][{i}] is also listed as params{list(seen[id(t)])}: a tensor belongs "
                        f"to one modality"
                    )
                seen[id(t)] = (m, i)
            groups.append(ts)
        shard_group = _dtensor.common_shard_group(groups)
        if modulate == "update":
            _update.check_optimizer(self._optimizer, groups, type(self).__name__)
            self._update = _update.UpdateScaler(groups)
        self._params = groups
        self._shard_group = shard_group  # FSDP2: the group per-tensor statistics are reduced over (None: unsharded)
        self._modulate = modulate

    def _uses_taps(self) -> bool:
        return self._params is None

    def _attach_optimizer_hooks(self) -> None:
        super()._attach_optimizer_hooks()  # the step counter's post-hook first
        _warn_adaptive(self)
        if self._update is not None:
            self._optimizer.register_step_pre_hook(lambda *_: self._snapshot_before_update())
            self._optimizer.register_step_post_hook(lambda *_: self._update.after_step())

    def _grads(self) -> list[list[torch.Tensor]]:
        """The listed tensors' gradients, per modality; under FSDP2 the rank's local shards (written in place)."""
        return [[_dtensor.local(p.grad) for p in group if p.grad is not None] for group in self._params]

    def _grad_params(self) -> list[list[torch.Tensor]]:
        """The listed tensors that have a gradient, aligned with _grads()."""
        return [[p for p in group if p.grad is not None] for group in self._params]

    def _scale_grads_(self, coef: torch.Tensor) -> None:
        """grad <- k_m * grad for modality m's tensors (docs/methods/ogm_ge.md without noise): one foreach launch per
        modality."""
        for m, grads in enumerate(self._grads()):
            if grads:
                torch._foreach_mul_(grads, coef[m])

    def modulate_grads(self) -> None:
        """Parameter mode, after backward and before optimizer.step(): apply this step's coefficients to the listed
        tensors' gradients (plus noise if configured); with modulate="update" only the noise (the coefficients act
        on the update, in optimizer.step()). Outside the window: nothing."""
        if self._params is None:
            raise RuntimeError(f"{type(self).__name__} is in feature-tap mode; pass params= to use modulate_grads()")
        self._backward_step = self._step
        if not self.active:
            return
        if self._observed_step != self._step:
            raise RuntimeError(f"{type(self).__name__}.modulate_grads(): observe() was not called in step {self._step}")
        coef = self._stats["coefficients"]
        self._apply_param_mode(torch.ones_like(coef) if self._modulate == "update" else coef)

    def _apply_param_mode(self, coef: torch.Tensor) -> None:
        if self._modulate != "update":
            self._scale_grads_(coef)

    def _defers_observation(self) -> bool:  # the coefficients act after backward: one observation per step
        return self._params is not None or self._tap_groups is not None

    def before_optimizer_step(self, grad_divisor=None) -> None:
        """The protocol's hook 5: observe the step (every micro-batch at once), then modulate_grads()."""
        super().before_optimizer_step(grad_divisor)
        if self._params is not None and self.enabled and self.training:
            self.modulate_grads()

    def _snapshot_before_update(self) -> None:
        """modulate="update": snapshot the listed tensors when this step modulates (a host decision)."""
        if not self.active or self._observed_step != self._step:
            return
        if self._backward_step != self._step:
            raise RuntimeError(
                f"{type(self).__name__}(modulate='update'): optimizer.step() came before "
                f"modulate_grads() in step {self._step}; call bal.modulate_grads() after backward"
            )
        self._update.before_step(self._stats["coefficients"])

    @property
    def modulate(self) -> str:
        """ "grad" (the coefficients scale the gradients) or "update" (they scale optimizer.step()'s change)."""
        return self._modulate

    def update_snapshot_bytes(self) -> int:
        """modulate="update": bytes of the parameter snapshot it keeps (0 otherwise)."""
        return self._update.extra_bytes() if self._update is not None else 0
