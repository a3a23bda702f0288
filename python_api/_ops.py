"""The public mmkernels ops the balancers call, gathered in one place (no math here: it lives in mmkernels.reference
and in the kernels behind these ops, which fall back to the reference when a backend is missing)."""

from __future__ import annotations

import torch

from mmkernels.coefficients import CoefficientPlan, balance_coefficients  # noqa: F401  (docs/methods/)
from mmkernels.noise import cov_noise_tap, ge_isotropic_  # noqa: F401  (docs/methods/ogm_ge.md)
from mmkernels.shapley import shapley_masked_batch, shapley_responses  # noqa: F401  (docs/methods/agm.md)
from mmkernels.taps import grad_tap, modality_drop  # noqa: F401  (docs/methods/ogm_ge.md, docs/methods/opm.md)


def shapley_fused(subset_outputs: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """sum_m phi_m (= f(all)) whose backward sends c(S) g = sum_m kappa_m W[S-1, m] g to subset S (AGM Eq. 6)."""
    return shapley_responses(subset_outputs, kappa).sum(0)
