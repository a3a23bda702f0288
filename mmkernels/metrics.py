"""Diagnostics researchers report for balanced multimodal learning, computed offline on a trained model.

- `unimodal_accuracy`: accuracy of each modality's unimodal logits u_m (e.g. `mmkernels.api.concat_unimodal_logits`).
- `imbalance`: the spread max_m a_m - min_m a_m of per-modality values a_m (accuracies or scores); with `reference`
  (each modality's accuracy when its encoder is trained alone), the spread of a_m / reference_m, i.e. how unevenly
  the modalities reach what they reach alone (0: even; the papers' "under-trained modality" shows as a large value).
- `competition_strength`: AGM's competition strength d^m (Li et al., ICCV 2023, Sec. 3.2, Eq. 11-13) from the fused
  model's features z and the mono-modal concept C^m.

The mono-modal concept (AGM Sec. 3.2.1, late fusion): C^m(x^m) is the logits [N, K] of modality m's branch trained
alone with the same settings (encoder m and a linear head). For early or hybrid fusion the paper uses the fused
model retrained with the other modalities' inputs set to zero. Either way it is a trained network; pass its outputs.
"""

from __future__ import annotations

import torch

__all__ = ["unimodal_accuracy", "imbalance", "competition_strength", "competition_strengths"]


def unimodal_accuracy(unimodal_logits, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy of argmax(u_m) against labels, per modality.

    unimodal_logits: [M, B, C] tensor or a list of M [B, C] tensors; labels: [B] int64. Returns [M] fp32 (a device
    tensor: nothing is read back on the host).
    """
    u = torch.stack(list(unimodal_logits)) if not isinstance(unimodal_logits, torch.Tensor) else unimodal_logits
    if u.dim() != 3 or u.shape[1] != labels.shape[0]:
        raise ValueError(
            f"unimodal_logits must be [M, B, C] with B = len(labels) = {labels.shape[0]}, got {tuple(u.shape)}"
        )
    return (u.argmax(-1) == labels.unsqueeze(0)).float().mean(1)


def imbalance(values, reference=None) -> torch.Tensor:
    """Spread of per-modality values: max_m a_m - min_m a_m, with a_m = values_m (or values_m / reference_m).

    values, reference: [M] (list or tensor). Returns a 0-d tensor; 0 means balanced. Units: those of `values`
    (points of accuracy) without reference, a fraction of each modality's alone accuracy with it.
    """
    a = torch.as_tensor(values, dtype=torch.float32)
    if reference is not None:
        a = a / torch.as_tensor(reference, dtype=torch.float32, device=a.device)
    if a.dim() != 1 or a.numel() < 2:
        raise ValueError(f"values must hold one number per modality (M >= 2), got shape {tuple(a.shape)}")
    return a.max() - a.min()


def competition_strength(
    z_fit: torch.Tensor,
    concept_fit: torch.Tensor,
    z_eval: torch.Tensor,
    concept_eval: torch.Tensor,
    *,
    ridge: float = 1e-2,
) -> torch.Tensor:
    """AGM competition strength d^m of one modality (Eq. 11-13), fitted on one held-out set, measured on another.

    z_*: [N, D] features before the fused model's last classifier layer (for a concat head: the concatenated
    encoder outputs); concept_*: [N, K] the mono-modal concept C^m on the same samples (see the module docstring).
    Eq. 11: f^m(z) = W z + b. Eq. 12: W, b minimise (1/N) sum_i ||f^m(z_i) - C^m(x_i)||^2 + ridge ||W||^2 on the fit
    set; we solve it in closed form on z standardised with the fit set's mean and sd (so `ridge` is scale-free) and
    use the squared Frobenius norm on W only (the paper prints lambda (||W||_2 + ||b||_2)). Eq. 13 on the eval set:
    d^m = sum_i ||C^m(x_i) - f^m(z_i)||^2 / sum_i ||C^m(x_i) - mean_j C^m(x_j)||^2.
    0: z predicts the concept linearly (no competition); 1: no better than the mean (strongest). Out of sample it
    can exceed 1. Returns a 0-d fp32 tensor.
    """
    for name, t in (("z_fit", z_fit), ("concept_fit", concept_fit), ("z_eval", z_eval), ("concept_eval", concept_eval)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [N, D or K], got shape {tuple(t.shape)}")
    if z_fit.shape[0] != concept_fit.shape[0] or z_eval.shape[0] != concept_eval.shape[0]:
        raise ValueError("z and concept must have the same number of rows in the fit and in the eval set")
    if z_fit.shape[1] != z_eval.shape[1] or concept_fit.shape[1] != concept_eval.shape[1]:
        raise ValueError("the fit and eval sets must have the same feature width D and number of classes K")
    zf, cf = z_fit.double(), concept_fit.double()
    mu, sd = zf.mean(0), zf.std(0)
    sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))  # constant features (e.g. dead ReLUs) stay at 0
    zs = (zf - mu) / sd
    c_mu = cf.mean(0)
    n, d = zs.shape
    # Eq. 12 with centred data: the intercept is b = mean(C) - W mean(z) = mean(C) (z is centred), W from the normal
    # equations (Z^T Z / N + ridge I) W^T = Z^T (C - mean C) / N
    gram = zs.T @ zs / n + ridge * torch.eye(d, dtype=zs.dtype, device=zs.device)
    w_t = torch.linalg.solve(gram, zs.T @ (cf - c_mu) / n)
    pred = ((z_eval.double() - mu) / sd) @ w_t + c_mu  # Eq. 11 on the eval set
    ce = concept_eval.double()
    residual = (ce - pred).pow(2).sum()
    spread = (ce - ce.mean(0)).pow(2).sum()
    return (residual / spread.clamp_min(1e-30)).float()  # Eq. 13


def competition_strengths(z_fit, concepts_fit, z_eval, concepts_eval, *, ridge: float = 1e-2) -> torch.Tensor:
    """d^m for every modality: concepts_* are M tensors [N, K] (or [M, N, K]), one mono-modal concept per modality,
    with the fused features z_* [N, D] shared. Returns [M] fp32."""
    if len(concepts_fit) != len(concepts_eval):
        raise ValueError(f"got {len(concepts_fit)} fit concepts and {len(concepts_eval)} eval concepts")
    return torch.stack(
        [competition_strength(z_fit, cf, z_eval, ce, ridge=ridge) for cf, ce in zip(concepts_fit, concepts_eval)]
    )
