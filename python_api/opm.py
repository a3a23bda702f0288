"""OPM balancer: on-the-fly prediction modulation by modality drop (TPAMI 2024 Eq. 6-8, Alg. 1)."""

from __future__ import annotations

import weakref

import torch

from mmkernels import _validate

from . import _ops
from ._base import Balancer, LogitObserver, check_hyperparameter, check_real


class OPM(LogitObserver, Balancer):
    """Drop the features of the leading modality with probability q_m (TPAMI Eq. 8):
    q_m = min(1, q_base (1 + lam tanh(rho_m - 1))) if rho_m > 1 else 0, rho from Eq. 7.

    timing="next" (default; Alg. 1): q computed at step t is used to drop at step t + 1, so `drop(feats)` needs no
    second head pass and no sync:
        feats = bal.drop([enc_a(xa), enc_v(xv)])            # q from the previous step; identity in eval mode
        bal.observe(concat_unimodal_logits(undropped_feats, head), y)   # sets q for the next step
    timing="same" (default when official=True; the authors' code): q is computed on batch t and drops batch t. Call
    observe() on the undropped features first, then drop() in the same step (the coefficient launch precedes the
    drop; still no sync, but the unimodal logits come before the drop):
        feats = [enc_a(xa), enc_v(xv)]
        bal.observe(concat_unimodal_logits(feats, head), y)  # q of this batch
        feats = bal.drop(feats)                              # drops with it
    Arguments: q_base in (0, 1) (0.5), lam >= 0 (0.5), z, ratio (Tab. 15 variants); p_exe: the whole drop runs with
    this probability per step (default 1.0; official 0.7); rescale of the kept features: "per_modality"
    (1/(1 - q_m), default), "official" (1/(1 - theta), theta = sum d_m q_m / sum d_m; default when official=True)
    or "none". `coefficients` holds the q the next drop will use (exactly 0 when that drop's step is outside the
    window).
    """

    method = "opm"
    coefficient_method = "opm"
    neutral = 0.0

    def __init__(
        self,
        num_modalities: int,
        *,
        q_base: float = 0.5,
        lam: float = 0.5,
        z: str = "tanh",
        ratio: str = "ratio",
        p_exe: float | None = None,
        rescale: str | None = None,
        timing: str | None = None,
        official: bool = False,
        **kwargs,
    ):
        super().__init__(num_modalities, official=official, **kwargs)
        check_hyperparameter(q_base, "q_base")
        check_hyperparameter(lam, "lam")
        timing = ("same" if official else "next") if timing is None else timing
        _validate.check_choice(timing, ("next", "same"), "timing")
        _validate.check_choice(z, ("tanh", "sigmoid"), "z")
        _validate.check_choice(ratio, ("ratio", "difference"), "ratio")
        p_exe = (0.7 if official else 1.0) if p_exe is None else p_exe
        check_real(p_exe, "p_exe", low=0.0, high=1.0)
        rescale = ("official" if official else "per_modality") if rescale is None else rescale
        _validate.check_choice(rescale, ("official", "per_modality", "none"), "rescale")
        self.q_base, self.lam, self.z, self.ratio = float(q_base), float(lam), z, ratio
        self.p_exe, self.rescale, self.timing = float(p_exe), rescale, timing
        self._q_prev = torch.zeros(self.num_modalities)  # q in force before this step's observe()
        self._dropped = (-1, [], [])  # (step, weak references to the tensors drop() returned, their grad_fn nodes)

    def _hyperparameters(self) -> dict:
        return {"q_base": self.q_base, "lam": self.lam, "z": self.z, "ratio": self.ratio}

    def _hparams_state(self) -> dict:
        return {**super()._hparams_state(), "p_exe": self.p_exe, "rescale": self.rescale, "timing": self.timing}

    def _move(self, device) -> None:
        super()._move(device)
        self._q_prev = self._q_prev.to(self._device)

    def _extra_tensors(self) -> dict:
        return {"q_prev": self._q_prev}

    def _load_extra_tensors(self, tensors: dict) -> None:
        self._q_prev = tensors["q_prev"]

    @property
    def drop_probability(self) -> torch.Tensor:
        """q the drop of the current step uses, [M] fp32 device tensor (timing="same": this step's, once observed)."""
        if self.timing == "same":
            return self._stats["coefficients"]
        return self._q_prev if self._observed_step == self._step else self._stats["coefficients"]

    def drop(self, feats) -> list:
        """Drop modality m's features row-wise with probability q_m of the previous step (TPAMI Alg. 1), or of this
        step with timing="same" (observe() first).

        feats: list of M tensors [B, ...] (widths may differ). Identity in eval mode, without grad, outside the
        window, or when disabled. A row never loses every modality."""
        xs = self._check_list(feats, "feats")
        if self.enabled and self.training and torch.is_grad_enabled():
            self._roll_over()
        if not self._grad_step():
            return xs
        if self.timing == "same" and self._observed_step != self._step:
            raise RuntimeError(
                f"OPM(timing='same') drops with the q of this batch: call observe() on the undropped "
                f"unimodal logits before drop() (step {self._step})"
            )
        self._to_device(xs[0].device)
        out = _ops.modality_drop(
            xs,
            self.drop_probability,
            seed=self.seed,
            offset=self._noise_offset(self._step, 0) + (self.num_modalities + 1) * self._rows_before,
            rescale=self.rescale,
            p_exe=self.p_exe,
        )
        self._mark_on_backward(out)
        if torch.compiler.is_compiling():  # the misuse check below is eager-only (_check_not_dropped skips too)
            return out
        kept = [t for t, x in zip(out, xs) if t is not x]  # p_exe = 0 returns the inputs themselves
        # the nodes are held (not their ids): a released grad_fn's id can be reused by an unrelated node
        self._dropped = (self._step, [weakref.ref(t) for t in kept], [t.grad_fn for t in kept if t.grad_fn is not None])
        return out

    def observe(self, unimodal_logits, labels: torch.Tensor) -> None:
        """Score the UNDROPPED unimodal logits of this step and set q for the next step (TPAMI Alg. 1), or for this
        step's drop with timing="same"."""
        x = self._check_logits(unimodal_logits, labels)
        self._check_not_dropped(unimodal_logits)
        if not (self.enabled and self.training):
            return
        self._begin_observe()
        self._observe_checked(x, labels)

    def _observe_checked(self, x, labels) -> None:
        self._to_device(x.device)
        self._q_prev = self._stats["coefficients"]
        res = self._run_coefficients(x, labels)
        self._store(res, modulate=self.enabled and self.in_window(self._time_next()))

    def _defers_observation(self) -> bool:
        return self.timing == "next"  # q acts from the next step: one observation per step, every micro-batch

    def transform_features(self, model, feats, labels, **extras) -> list:
        """The protocol's hook 2: observe the undropped features' unimodal logits (timing="next": at the end of the
        step, over every micro-batch), then drop."""
        feats = Balancer.transform_features(self, model, feats, labels, **extras)
        self._observe_step(model, feats, labels)
        return self.drop(feats)

    _GRAPH_NODES = 32  # how far observe() looks back through the autograd graph of the logits (host time per step)

    def _check_not_dropped(self, unimodal_logits) -> None:
        """Raise if unimodal_logits are (views of) this step's drop() outputs or were computed from them with autograd
        (host-side: tensor identity, storage and the graph's nodes; no device read). Logits computed from dropped
        features without a graph (torch.no_grad, detach) cannot be recognised here."""
        step, refs, nodes = self._dropped
        if step != self._step or torch.compiler.is_compiling():
            return
        dropped = [t for t in (r() for r in refs) if t is not None]
        if not dropped:
            return
        xs = [unimodal_logits] if isinstance(unimodal_logits, torch.Tensor) else list(unimodal_logits)
        storages = {t.untyped_storage().data_ptr() for t in dropped if t.numel()}
        for m, x in enumerate(xs):
            if not isinstance(x, torch.Tensor):
                continue
            hit = any(x is t for t in dropped) or (x.numel() and x.untyped_storage().data_ptr() in storages)
            if not hit and nodes and x.grad_fn is not None:
                todo, seen = [x.grad_fn], set()
                while todo and len(seen) < self._GRAPH_NODES and not hit:
                    node = todo.pop()
                    if node is None or id(node) in seen:
                        continue
                    seen.add(id(node))
                    hit = any(node is n for n in nodes)
                    todo.extend(n for n, _ in node.next_functions)
            if hit:
                where = "unimodal_logits" if isinstance(unimodal_logits, torch.Tensor) else f"unimodal_logits[{m}]"
                raise ValueError(
                    f"{where} comes from the features bal.drop() returned in step {self._step}: OPM "
                    f"scores the UNDROPPED features (TPAMI Alg. 1); compute the unimodal logits from the "
                    f"encoders' outputs before drop()"
                )

    def _time_next(self) -> int:
        """Time of the drop that uses this observation's q."""
        if self.timing == "same":
            return self._step if self.unit == "step" else self._epoch
        return self._step + 1 if self.unit == "step" else self._epoch
