"""AGM balancer: adaptive gradient modulation with Shapley mono-modal responses (AGM, ICCV 2023, Eq. 1-10, Alg. 1)."""

from __future__ import annotations

import contextlib

import torch

from mmkernels import _validate, reference

from . import _ops, protocol
from ._base import Balancer, check_hyperparameter, check_label_values


@contextlib.contextmanager
def _training_mode(modules, mode: bool):
    """Temporarily set train(mode) on modules, restoring every submodule's own flag afterwards (host state only)."""
    modules = [mod for mod in modules if isinstance(mod, torch.nn.Module)]
    saved = [(sub, sub.training) for mod in modules for sub in mod.modules()]
    try:
        for mod in modules:
            mod.train(mode)
        yield
    finally:
        for sub, flag in saved:
            sub.training = flag


class AGM(Balancer):
    """AGM: the balancer runs the Shapley forwards itself and returns fused logits whose backward carries kappa.

    phi_m = sum_S W[S-1, m] f(S) (Eq. 1-3, v(empty) = 0, so sum_m phi_m = f(all)); s_m = mean CE of phi_m;
    r_m = exp(M/(M-1) (mean_k s_k - s_m)) (Eq. 7); tau_m the same on the running means s_hat (Eq. 9-10);
    kappa_m = exp(alpha clamp(tau_m - r_m, max=clip)) (Eq. 8). The returned logits equal f(all); in the backward the
    gradient reaching phi_m is multiplied by kappa_m (the output of subset S receives sum_m kappa_m W[S-1, m] g).

        out = bal(model, inputs, y)      # the protocol: model.encoders, model.fuse; out.loss = CE(f(all))
        # the building block: model= (model(*inputs)) or encoders= and head= (head(list of M features) -> logits)
        logits = bal.shapley_forward(inputs, y, encoders=[enc_a, enc_v], head=head)

    Cost per step (M modalities, B rows):
      model=         : 1 training forward (B rows) + 1 eval-mode forward of the muted subsets ((2^M - 2) B rows).
      encoders+head, muted_mode="eval" (default, the authors' numbers): the encoders run once in training mode and
                       once in eval mode (B rows each), enc_m(0) once (1 row), the head once on B rows and once on
                       (2^M - 2) B rows in eval mode.
      encoders+head, muted_mode="reuse": the encoders run ONCE; the present modalities of the muted subsets reuse
                       the training-mode features (BatchNorm batch statistics, dropout as in training) - cheaper, not
                       the authors' numbers when the encoders have BatchNorm or dropout.
    Muted passes run in eval mode with autograd on (BatchNorm running statistics, as the authors do).
    Arguments: alpha >= 0 (default 1.0), clip (None or > 0; authors: 10 on CREMA-D, 7 on UR-Funny), muted_mode.
    First step (Alg. 1, and the authors' code): s_hat starts at 0, so tau = 1 and kappa = exp(alpha (1 - r)).
    official=True, as the authors' code: (1) the running means s_hat average from the first training step even when
    the window starts later (before `start` the Shapley pass runs to update them, kappa stays 1); (2) after the
    window's end the last kappa stays in force. By default s_hat averages from the window's first step (no extra
    pass before it) and kappa returns to 1 outside the window.
    """

    method = "agm"
    coefficient_method = "agm"

    def __init__(
        self, num_modalities: int, *, alpha: float = 1.0, clip: float | None = None, muted_mode: str = "eval", **kwargs
    ):
        super().__init__(num_modalities, **kwargs)
        check_hyperparameter(alpha, "alpha")
        check_hyperparameter(clip, "clip")
        _validate.check_choice(muted_mode, ("eval", "reuse"), "muted_mode")
        self.alpha, self.clip, self.muted_mode = float(alpha), clip, muted_mode
        self._agm = reference.new_agm_state(self.num_modalities)
        self._agm_start, self._agm_pending, self._step_modulates = None, [], False  # protocol micro-batches

    def _hyperparameters(self) -> dict:
        return {"alpha": self.alpha, "clip": self.clip}

    def _hparams_state(self) -> dict:
        return {**super()._hparams_state(), "muted_mode": self.muted_mode}

    def _move(self, device) -> None:
        super()._move(device)
        self._agm = {k: v.to(self._device) for k, v in self._agm.items()}

    def _extra_tensors(self) -> dict:
        return {"s_hat": self._agm["s_hat"], "steps": self._agm["steps"]}

    def _load_extra_tensors(self, tensors: dict) -> None:
        self._agm = {"s_hat": tensors["s_hat"], "steps": tensors["steps"]}

    @property
    def running_scores(self) -> torch.Tensor:
        """s_hat, the cumulative mean of the scores (AGM Eq. 10) since the first modulated step (official=True: since
        the first training step), [M] fp32."""
        return self._agm["s_hat"]

    # ---------------------------------------------------------------- forward
    def _check_inputs(self, inputs, labels, model, encoders, head):
        if not isinstance(inputs, (list, tuple)):
            raise TypeError(
                f"inputs must be a list of num_modalities={self.num_modalities} tensors, got {type(inputs).__name__}"
            )
        if len(inputs) != self.num_modalities:
            raise ValueError(f"len(inputs) must equal num_modalities={self.num_modalities}, got {len(inputs)}")
        for i, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor) or x.dim() < 1:
                raise TypeError(f"inputs[{i}] must be a tensor [B, ...], got {type(x).__name__}")
            if x.shape[0] != inputs[0].shape[0]:
                raise ValueError(
                    f"inputs[{i}] has batch size {x.shape[0]} but inputs[0] has {inputs[0].shape[0]}; "
                    f"batch sizes must match"
                )
            if x.device != inputs[0].device:
                raise ValueError(f"inputs[{i}] is on {x.device} but inputs[0] is on {inputs[0].device}")
        _validate.check_labels(labels, inputs[0].shape[0], inputs[0].device, "labels")
        if (model is None) == (encoders is None and head is None):
            raise ValueError("give either model= (called as model(*inputs)) or encoders= and head=")
        if model is None:
            if encoders is None or head is None:
                raise ValueError("encoders= and head= must be given together")
            if len(encoders) != self.num_modalities:
                raise ValueError(f"len(encoders) must equal num_modalities={self.num_modalities}, got {len(encoders)}")
        elif self.muted_mode == "reuse":
            raise ValueError("muted_mode='reuse' reuses encoder features: give encoders= and head= instead of model=")

    def fuse(self, model, feats, inputs, labels):
        """The protocol's hook 3: the Shapley forward on the model's encoders and fusion, reusing the training-mode
        features of hook 1 for the full pass."""
        encoders = protocol.encoders_of(model, self.num_modalities)
        return self.shapley_forward(inputs, labels, encoders=encoders, head=model.fuse, _feats=feats)

    def shapley_forward(
        self, inputs, labels: torch.Tensor, *, model=None, encoders=None, head=None, _feats=None
    ) -> torch.Tensor:
        """The building block of hook 3: fused logits f(all) [B, C] whose backward scales the gradient reaching phi_m
        by kappa_m (this step's). model= (called as model(*inputs)) or encoders= and head= (head(list of M
        features))."""
        self._check_inputs(inputs, labels, model, encoders, head)
        inputs = list(inputs)
        live = self.enabled and self.training and torch.is_grad_enabled()
        if live:
            self._roll_over()
        modulate = self._grad_step()
        t = self._step if self.unit == "step" else self._epoch
        # official: the authors' running means average from the first training step, before the window too
        track = live and self.official and not modulate and t < self.start
        frozen = (
            self.official
            and live
            and self.end is not None
            and not self.in_window()
            and self._observed_step >= 0
            and not track
        )
        if not (modulate or frozen or track):
            if self.training and not self.in_window():  # kappa returns to 1 outside the window (exactly)
                self._stats = {**self._stats, "coefficients": torch.ones_like(self._stats["coefficients"])}
            if model is not None:
                return model(*inputs)
            return head(_feats if _feats is not None else [enc(x) for enc, x in zip(encoders, inputs)])
        observe = modulate or track
        if observe:  # may this step observe? (raises before any work; recorded only once the labels are checked)
            self._begin_observe("forward", mark=False)
        if inputs[0].shape[0] == 0:  # no rows: plain logits, flag 2, neutral kappa, state untouched (as every balancer)
            return self._empty_batch(inputs, labels, model, encoders, head, _feats, observe, modulate)
        subsets = self._subset_outputs(inputs, model, encoders, head, _feats)  # [2^M - 1, B, ...]
        self._to_device(subsets.device)
        if observe:
            phi = _ops.shapley_responses(subsets.detach())  # [M, B, C], scores only (the extension where built)
            self._check_width(phi.shape[-1], "the model's (head's) output")
            check_label_values(labels, phi.shape[-1], self.ignore_index)  # a rejected call changes no state
            self._observed_step = self._step
            self._hold_running_means(phi, labels)
            self._store(self._run_coefficients(phi, labels, state=self._agm), modulate=modulate)
            self._step_modulates = modulate
        out = _ops.shapley_fused(subsets, self._stats["coefficients"])
        self._mark_on_backward([out])
        return out

    def _empty_batch(self, inputs, labels, model, encoders, head, feats, observe: bool, modulate: bool):
        """B = 0: the fused logits of the empty batch; the coefficient op still runs on empty responses (flag 2,
        neutral kappa, no state update), so under sync every rank joins its collective."""
        if model is not None:
            out = model(*inputs)
        else:
            out = head(feats if feats is not None else [enc(x) for enc, x in zip(encoders, inputs)])
        if observe:
            self._to_device(out.device)
            phi = out.detach().float().unsqueeze(0).expand(self.num_modalities, *out.shape)
            self._observed_step = self._step
            self._store(self._run_coefficients(phi, labels, state=self._agm), modulate=modulate)
        self._mark_on_backward([out])
        return out

    def _hold_running_means(self, phi, labels) -> None:
        """Protocol micro-batches: each one's kappa uses the running means of the earlier steps (the state is reset
        to the step's start before it); before_optimizer_step() then advances them once, with the step's aggregate
        score (Eq. 10 per optimizer step)."""
        if self._protocol_step != self._step:
            return
        if self.micro_batches == 1:
            self._agm_start = {k: v.clone() for k, v in self._agm.items()}
            self._agm_pending = []
        else:
            self._agm = {k: v.clone() for k, v in self._agm_start.items()}
        self._agm_pending.append((phi, labels))

    def before_optimizer_step(self, grad_divisor=None) -> None:
        super().before_optimizer_step(grad_divisor)
        pending = getattr(self, "_agm_pending", None)
        if self._protocol_step != self._step or self.micro_batches < 2 or not pending:
            return
        self._agm = {k: v.clone() for k, v in self._agm_start.items()}
        phi, labels = torch.cat([p for p, _ in pending], 1), torch.cat([y for _, y in pending])
        self._agm_pending = []
        self._store(self._run_coefficients(phi, labels, state=self._agm), modulate=self._step_modulates)

    def _subset_outputs(self, inputs, model, encoders, head, feats=None) -> torch.Tensor:
        """Outputs of every non-empty subset, bitmask order (index S-1); the last is the training-mode full pass."""
        b = inputs[0].shape[0]
        n_muted = 2**self.num_modalities - 2
        if model is not None:
            full = model(*inputs)
            masked = _ops.shapley_masked_batch(inputs)
            with _training_mode([model], False):
                muted = model(*masked)
        else:
            feats = feats if feats is not None else [enc(x) for enc, x in zip(encoders, inputs)]
            full = head(feats)
            with _training_mode(list(encoders), False):
                # enc_m(0): one zero row per modality, broadcast (every muted row sees the same value)
                zero_feats = [enc(torch.zeros_like(x[:1])) for enc, x in zip(encoders, inputs)]
                present = feats if self.muted_mode == "reuse" else [enc(x) for enc, x in zip(encoders, inputs)]
            # muted rows hold enc_m(0) instead of 0 (the features of a zero input); its gradient is the sum over them
            masked = _ops.shapley_masked_batch(present, fill=zero_feats)
            with _training_mode([head], False):
                muted = head(masked)
        muted = muted.reshape((n_muted, b) + tuple(full.shape[1:]))
        return torch.cat([muted.to(full.dtype), full.unsqueeze(0)])
