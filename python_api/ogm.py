"""OGM-GE and OGM balancers (CVPR 2022 authors' code; TPAMI 2024 Eq. 7, 11 and 13-17)."""

from __future__ import annotations

import torch

from mmkernels import _validate
from mmkernels._methods import default
from mmkernels.noise import ge_isotropic_shards_

from . import _dtensor, _ops
from ._base import Balancer, FeatureTaps, LogitObserver, ParameterModeMixin, check_hyperparameter, check_real

_AUTO = "auto"


class OGMGE(ParameterModeMixin, FeatureTaps, LogitObserver, Balancer):
    """On-the-fly gradient modulation with generalisation enhancement.

    Paper mode (default): rho = TPAMI Eq. 7, k_m = max(0, 1 - alpha tanh(rho_m - 1)) if rho_m > 1 else 1 (Eq. 11),
    applied by feature taps with batch-covariance noise: row i of modality m's feature gradient is multiplied by
    k_m + sigma (z_i - mean z) (Eq. 13-17, docs/methods/ogm_ge.md).
    official=True: the authors' coefficient (M = 2: k = 1 - tanh(alpha rho) for the leading modality; an exact tie
    suppresses modality 0 as in the CVPR 2022 code, modality 1 in OGM(official=True), the TPAMI repository's OGM
    script) and their noise: after backward, for every listed tensor, grad = k_m grad + N(0, std(grad)^2)
    ("isotropic", parameter mode: pass params= and call modulate_grads()).

    Arguments: num_modalities; alpha >= 0 (default 0.8, the authors' CREMA-D value); noise "covariance" (taps),
    "isotropic" (parameter mode) or None (default: "isotropic" if official else "covariance"); sigma: scale of the
    covariance noise; params: list of M iterables of tensors -> parameter mode; z, ratio: TPAMI Tab. 15 variants
    (paper mode only); modulate: "grad" (default, the papers': k scales the gradient) or "update" (k scales the change
    optimizer.step() makes to params; needs params= and optimizer=; the noise is still added to the gradient; use it
    with Adam/AdamW, which cancel a gradient scale, see ParameterModeMixin); plus the Balancer window/seed/sync
    arguments.
    """

    method = "ogm_ge"
    default_noise = "covariance"
    official_tie = 0  # modality an exact M = 2 tie suppresses with official=True (CVPR 2022 code: 0)

    def __init__(
        self,
        num_modalities: int,
        *,
        alpha: float = default("ogm_ge", "alpha"),
        noise=_AUTO,
        sigma: float = 1.0,
        params=None,
        official: bool = False,
        z: str = "tanh",
        ratio: str = "ratio",
        modulate: str = "grad",
        **kwargs,
    ):
        super().__init__(num_modalities, official=official, **kwargs)
        check_hyperparameter(alpha, "alpha")
        check_real(sigma, "sigma", low=0.0)
        _validate.check_choice(z, ("tanh", "sigmoid"), "z")
        _validate.check_choice(ratio, ("ratio", "difference"), "ratio")
        if noise == _AUTO:
            noise = "isotropic" if official else self.default_noise
        _validate.check_choice(noise, (None, "covariance", "isotropic"), "noise")
        if noise == "isotropic" and params is None:
            raise ValueError(
                "noise='isotropic' is the authors' parameter-mode rule: pass params= (a list of M "
                "iterables of tensors) and call modulate_grads() after backward"
            )
        if noise == "covariance" and params is not None:
            raise ValueError(
                "noise='covariance' works through feature taps (per-row factors); with params= use "
                "noise='isotropic' or noise=None"
            )
        self._init_params(params, modulate)
        self.alpha, self.sigma, self.noise, self.z, self.ratio = float(alpha), float(sigma), noise, z, ratio
        self.coefficient_method = "ogm_ge" if official else "ogm"

    def _hyperparameters(self) -> dict:
        if self.coefficient_method == "ogm_ge":
            return {"alpha": self.alpha, **({"tie": self.official_tie} if self.official_tie else {})}
        return {"alpha": self.alpha, "z": self.z, "ratio": self.ratio}

    def _hparams_state(self) -> dict:
        return {
            **super()._hparams_state(),
            "noise": self.noise,
            "sigma": self.sigma,
            "mode": "tap" if self._params is None else "parameter",
            "modulate": self._modulate,
        }

    def _tap_op(self, x, coef, modality, step):
        if self.noise == "covariance":
            return _ops.cov_noise_tap(
                x,
                coef[modality],
                sigma=self.sigma,
                seed=self.seed,
                offset=self._noise_offset(step, modality) + self._rows_before,
            )
        return _ops.grad_tap(x, coef[modality])

    def _apply_param_mode(self, coef: torch.Tensor) -> None:
        if self.noise != "isotropic":
            super()._apply_param_mode(coef)
            return
        groups = self._grads()
        grads = [g for group in groups for g in group]
        if not grads:
            return
        group_index = [m for m, group in enumerate(groups) for _ in group]  # tensor t belongs to modality m
        # seeded by (seed, step) only: identical on every rank, so DDP replicas stay equal (docs/methods/ogm_ge.md);
        # each step owns 2^32 Philox counters, so consecutive steps draw disjoint streams
        if self._shard_group is None:
            _ops.ge_isotropic_(grads, coef, seed=self.seed, offset=self._step << 32, group_index=group_index)
            return
        # FSDP2: std from the shards' (sum, sum of squares) reduced over the shard group, noise by global index
        params = [p for group in self._grad_params() for p in group]
        ge_isotropic_shards_(
            grads,
            coef,
            seed=self.seed,
            offset=self._step << 32,
            numels=[p.numel() for p in params],
            starts=[_dtensor.global_offset(p) for p in params],
            all_reduce=lambda stats: _dtensor.all_reduce_stats(stats, self._shard_group),
            group_index=group_index,
        )


class OGM(OGMGE):
    """OGM (TPAMI Eq. 7 and 11): OGMGE without noise by default (noise=None). official=True follows the authors' OGM
    script (TPAMI repository), which runs OGM-GE (authors' coefficient, isotropic noise in parameter mode) and whose
    M = 2 rule suppresses modality 0 iff rho_0 > 1, else modality 1: an exact tie suppresses modality 1."""

    method = "ogm"
    default_noise = None
    official_tie = 1
