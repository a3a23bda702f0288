"""OLM balancer: online logit modulation (Zong et al. Eq. 5-9, Alg. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkernels import _validate, reference

from . import protocol
from ._base import Balancer, check_int, check_real


class OLM(Balancer):
    """Fused logits sum_m w_m s_m over M branches (Eq. 5); the logit coefficients w (init 1) are refitted at each
    evaluation from the per-branch train and dev losses the trainer reports:
      G_m = |L_dev0 - L_dev| (Eq. 6), C_m = ||L_dev - L_train| - |L_dev0 - L_train0|| (Eq. 7),
      lambda = softmax(G / C) (Eq. 8), then `update_steps` SGD steps of rate `lr` on
      sum_m |w_m ||s_m|| - t_m| (Eq. 9, Alg. 1), ||s_m|| the mean row norm of branch m's logits over the training
      steps since the last report, w clamped at 0 after each step. Targets (reference.olm_targets):
      target="budget" (default, our reading): t_m = M lambda_m mean_k ||w_k s_k|| = lambda_m sum_k ||w_k s_k||, which
        keeps the total logit-norm budget (w_m ||s_m|| = lambda_m * total is a fixed point);
      target="paper" (Eq. 9 as printed): t_m = lambda_m mean_k ||w_k s_k||; the targets sum to 1/M of the total, so
        the only fixed point is w = 0 and the updates drive w towards it.

        logits = bal.combine([s_v, s_a, s_b])         # each [B, C]; w is a constant (not trained by the task loss)
        ...
        bal.report(train_losses, dev_losses)         # M numbers or a [M] tensor each, at every evaluation
    The first report only records the reference losses L0 (G = C = 0 there). w is part of the prediction (Eq. 5): it
    applies in training and eval mode whenever the balancer is enabled and inside the window; outside the window (or
    disabled) w acts as 1 (exactly). The norm statistics accumulate in training mode only.
    Arguments: lr (default 0.01), update_steps (default 10), target ("budget" default, or "paper").
    `scores` = mean logit norms used by the last update, `ratios` = lambda, `coefficients` = w in force.
    A non-finite loss, norm, lambda or update sets flag 1 (`nonfinite`) and w falls back to 1 (at the first report: the
    flag only, L0 is recorded as given). Under torch.distributed (sync) report() all-reduces the norm statistics and
    averages the reported losses over the ranks (one collective per report, on every rank), so w is the same everywhere.
    """

    method = "olm"
    _optional_tensors = ("train_loss0", "dev_loss0")

    def __init__(
        self, num_modalities: int, *, lr: float = 0.01, update_steps: int = 10, target: str = "budget", **kwargs
    ):
        super().__init__(num_modalities, **kwargs)
        check_real(lr, "lr", low=0.0, low_open=True)
        check_int(update_steps, "update_steps", minimum=1)
        _validate.check_choice(target, reference.OLM_TARGETS, "target")
        self.lr, self.update_steps, self.target = float(lr), int(update_steps), target
        m = self.num_modalities
        self._w = torch.ones(m)
        self._norm_sum = torch.zeros(m)
        self._norm_count = torch.zeros(())
        self._loss0 = None  # (train0 [M], dev0 [M]) after the first report

    def _hparams_state(self) -> dict:
        return {**super()._hparams_state(), "lr": self.lr, "update_steps": self.update_steps, "target": self.target}

    def _move(self, device) -> None:
        super()._move(device)
        self._w, self._norm_sum, self._norm_count = (
            t.to(self._device) for t in (self._w, self._norm_sum, self._norm_count)
        )
        if self._loss0 is not None:
            self._loss0 = tuple(t.to(self._device) for t in self._loss0)

    def _extra_tensors(self) -> dict:
        t = {"w": self._w, "norm_sum": self._norm_sum, "norm_count": self._norm_count}
        if self._loss0 is not None:
            t.update(train_loss0=self._loss0[0], dev_loss0=self._loss0[1])
        return t

    def _load_extra_tensors(self, tensors: dict) -> None:
        self._w, self._norm_sum, self._norm_count = tensors["w"], tensors["norm_sum"], tensors["norm_count"]
        self._loss0 = (tensors["train_loss0"], tensors["dev_loss0"]) if "train_loss0" in tensors else None

    @property
    def _applies_w(self) -> bool:
        """w is in force: enabled and inside the window, in training and eval mode alike (host decision)."""
        return self.enabled and self.in_window()

    @property
    def coefficients(self) -> torch.Tensor:
        """w in force now ([M] fp32, >= 0), in training and eval mode; exactly 1 outside the window or disabled."""
        return self._w if self._applies_w else torch.ones_like(self._w)

    def fuse(self, model, feats, inputs, labels):
        """The protocol's hook 3: sum_m w_m u_m over the model's unimodal logits (the branches, differentiable)."""
        return self.combine(protocol.unimodal_logits(model, feats, detach=False))

    def epoch_end(self, model, epoch: int, batches=None, val_batches=None) -> None:
        """The protocol's hook 7 (one evaluation per epoch): the branches' mean cross-entropies on `batches` and
        `val_batches` (no grad, eval mode) -> report()."""
        if batches is None or val_batches is None:
            raise ValueError(
                "OLM.epoch_end needs batches= (training) and val_batches= (held-out): w is refitted from the "
                "branches' train and validation losses (Eq. 6-8)"
            )
        self.report(self._branch_losses(model, batches), self._branch_losses(model, val_batches))

    def _branch_losses(self, model, batches) -> torch.Tensor:
        """Mean cross-entropy of each branch over the valid rows of `batches`, [M] fp32 (device, no host read)."""
        total, count = None, None
        with torch.no_grad(), protocol.eval_mode(model):
            for batch in batches:
                inputs, labels, _ = protocol.split_batch(batch)
                feats = self.encode(model, protocol.check_inputs(inputs, self.num_modalities))
                u = protocol.unimodal_logits(model, feats, detach=True).float()
                ce = torch.stack(
                    [F.cross_entropy(x, labels, ignore_index=self.ignore_index, reduction="sum") for x in u]
                )
                n = (labels != self.ignore_index).sum()
                total = ce if total is None else total + ce
                count = n if count is None else count + n
        if total is None:
            raise ValueError("OLM.epoch_end: batches / val_batches gave no batch")
        return total / count.clamp(min=1)

    def combine(self, logits_per_branch) -> torch.Tensor:
        """sum_m w_m s_m, [B, C] (Eq. 5), in training and eval mode (plain sum outside the window or disabled).
        Accumulates the branches' mean logit norms (detached) in training mode only."""
        if isinstance(logits_per_branch, (list, tuple)) and len(logits_per_branch) != self.num_modalities:
            raise ValueError(
                f"len(logits_per_branch) must equal num_modalities={self.num_modalities}, got {len(logits_per_branch)}"
            )
        x = _validate.as_stacked(logits_per_branch, "logits_per_branch", ndim=2)
        if x.shape[0] != self.num_modalities:
            raise ValueError(f"logits_per_branch has {x.shape[0]} branches but num_modalities={self.num_modalities}")
        self._check_width(x.shape[2], "logits_per_branch")
        self._to_device(x.device)
        if self.enabled and self.training and x.shape[1] > 0:
            self._norm_sum = self._norm_sum + reference.logit_norms(x.detach())
            self._norm_count = self._norm_count + 1.0
        if not self._applies_w:
            return x.sum(0)
        return (self._w.to(x.dtype).view(-1, 1, 1) * x).sum(0)

    def _as_losses(self, v, name: str) -> torch.Tensor:
        if isinstance(v, torch.Tensor):
            t = v.detach().reshape(-1)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(e, torch.Tensor) for e in v):
            t = torch.stack([e.detach().reshape(()) for e in v])
        else:
            try:
                t = torch.tensor([float(e) for e in v], dtype=torch.float32)
            except (TypeError, ValueError):
                raise TypeError(f"{name} must be {self.num_modalities} numbers or a tensor [M], got {v!r}") from None
        if t.numel() != self.num_modalities:
            raise ValueError(f"{name} must hold num_modalities={self.num_modalities} losses, got {t.numel()}")
        return t.to(device=self._device, dtype=torch.float32)

    def report(self, train_losses, dev_losses) -> None:
        """At each evaluation: per-branch train and dev losses -> lambda (Eq. 6-8) -> `update_steps` SGD steps on w
        (Eq. 9, Alg. 1, with the mean logit norms since the last report). The first call records L0 only."""
        tr, dv = self._as_losses(train_losses, "train_losses"), self._as_losses(dev_losses, "dev_losses")
        if not self.enabled:
            return
        m = self.num_modalities
        norm_sum, norm_count = self._norm_sum, self._norm_count
        if self._sync():  # every rank, every report, the same collective (docs/methods/)
            packed = torch.cat([norm_sum, norm_count.view(1), tr, dv])
            torch.distributed.all_reduce(packed)
            world = torch.distributed.get_world_size()
            norm_sum, norm_count = packed[:m], packed[m]
            tr, dv = packed[m + 1 : 2 * m + 1] / world, packed[2 * m + 1 :] / world
        if self._loss0 is None:
            self._loss0 = (tr, dv)
            finite = torch.isfinite(tr).all() & torch.isfinite(dv).all()
            self._stats = {**self._stats, "flag": torch.where(finite, 0.0, 1.0).to(self._device, torch.float32)}
            return
        g, c = reference.olm_rates(self._loss0[0], self._loss0[1], tr, dv)
        lam = reference.olm_rebalance_factors(g, c)
        norms = norm_sum / norm_count.clamp(min=1.0)
        w_new = reference.olm_update(self._w, norms, lam, lr=self.lr, steps=self.update_steps, target=self.target)
        # sign(NaN) = 0 would keep w silently: every input of the update must be finite too
        ok = (
            torch.isfinite(w_new).all()
            & torch.isfinite(lam).all()
            & torch.isfinite(norms).all()
            & torch.isfinite(tr).all()
            & torch.isfinite(dv).all()
        )
        # no logits seen since the last report: keep w; a non-finite update: w falls back to 1 and the flag is set
        w = torch.where(norm_count > 0, w_new, self._w)
        self._w = torch.where(ok, w, torch.ones_like(w))
        self._stats = {
            "scores": norms,
            "ratios": lam,
            "coefficients": self._w,
            "flag": torch.where(ok, 0.0, 1.0).to(device=self._device, dtype=torch.float32),
        }
        self._norm_sum = torch.zeros_like(self._norm_sum)
        self._norm_count = torch.zeros_like(self._norm_count)
