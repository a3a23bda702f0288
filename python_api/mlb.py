"""MLB balancer: multi-loss gradient modulation (Kontras et al. Eq. 3-7)."""

from __future__ import annotations

import torch

from mmkernels import _validate
from mmkernels._methods import default

from . import protocol
from ._base import Balancer, FeatureTaps, LogitObserver, ParameterModeMixin, check_hyperparameter, masked_mean_ce


class MLB(ParameterModeMixin, FeatureTaps, LogitObserver, Balancer):
    """Multi-loss balancing: L = CE(f) + sum_m CE(u_m) (Eq. 3) with per-modality heads u_m; r_m = 1/(M-1) sum_{j != m}
    s_j / s_m (Eq. 5, s = 'prob' score of u_m), beta_m = beta_max if r_m > 1 else 2, k_m = 1 + (beta_m - 1)
    tanh(alpha (r_m - 1)) (Eq. 6-7): k > 1 accelerates a lagging encoder, k < 1 decelerates a leading one.

        feats = bal.tap([enc_a(xa), enc_v(xv)])              # encoder m's gradient scaled by k_m
        loss = bal.loss(fusion(feats), [head_a(feats[0]), head_v(feats[1])], y)   # observes, returns the multi-loss
    Arguments: alpha >= 0 (default 0.8, the authors' CREMA-D value), beta_max >= 1 (default 2.0); params= (M iterables
    of tensors, e.g. encoder m + its unimodal head) for the authors' placement after backward (modulate_grads());
    modulate="update" (needs params= and optimizer=) scales the change optimizer.step() makes to those tensors
    instead of their gradients, so k keeps its effect under Adam (the authors train MLB with Adam).
    """

    method = "mlb"
    coefficient_method = "mlb"

    def __init__(
        self,
        num_modalities: int,
        *,
        alpha: float = default("mlb", "alpha"),
        beta_max: float = default("mlb", "beta_max"),
        params=None,
        modulate: str = "grad",
        **kwargs,
    ):
        super().__init__(num_modalities, **kwargs)
        check_hyperparameter(alpha, "alpha")
        check_hyperparameter(beta_max, "beta_max")
        self.alpha, self.beta_max = float(alpha), float(beta_max)
        self._init_params(params, modulate)

    def _hyperparameters(self) -> dict:
        return {"alpha": self.alpha, "beta_max": self.beta_max}

    def _hparams_state(self) -> dict:
        return {
            **super()._hparams_state(),
            "mode": "tap" if self._params is None else "parameter",
            "modulate": self._modulate,
        }

    def objective(self, model, logits, feats, labels):
        """The protocol's hook 4: the multi-loss CE(f) + sum_m CE(u_m) (Eq. 3), u_m = the model's unimodal logits of
        the (tapped) features, differentiable (they train the unimodal heads); observed in hook 2."""
        u = protocol.unimodal_logits(model, feats, detach=False)
        total = masked_mean_ce(logits, labels, self.ignore_index)
        for m in range(self.num_modalities):
            total = total + masked_mean_ce(u[m], labels, self.ignore_index)
        return total, u

    def loss(self, fused_logits: torch.Tensor, unimodal_logits, labels: torch.Tensor) -> torch.Tensor:
        """The multi-loss CE(fused) + sum_m CE(u_m) (Eq. 3, equal weights; mean over valid rows) and observe(u, y)."""
        _validate.check_float(fused_logits, "fused_logits")
        x = self._check_logits(unimodal_logits, labels)
        if fused_logits.dim() != 2 or tuple(fused_logits.shape) != tuple(x.shape[1:]):
            raise ValueError(
                f"fused_logits must have shape [B, C] = {list(x.shape[1:])} like each unimodal logit, "
                f"got {tuple(fused_logits.shape)}"
            )
        if fused_logits.device != x.device:
            raise ValueError(f"fused_logits is on {fused_logits.device} but unimodal_logits are on {x.device}")
        if self.enabled and self.training:
            self._begin_observe("loss")
            self._store(self._run_coefficients(x, labels), modulate=self.in_window())
        total = masked_mean_ce(fused_logits, labels, self.ignore_index)
        for m in range(self.num_modalities):
            total = total + masked_mean_ce(x[m], labels, self.ignore_index)
        return total
