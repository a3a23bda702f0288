"""Pure-PyTorch reference of every mmkernels op: the oracle the Triton kernels and the C++/CUDA extension are tested against.

Conventions (docs/architecture.md, docs/methods/):
- M modalities (2..8), B rows, C classes. Per-modality inputs are a list of M tensors or one stacked tensor [M, ...].
- Any float dtype in, fp32 accumulation (fp64 inputs are accumulated in fp64). Statistics (scores, ratios,
  coefficients, flags, running state) come back as fp32 tensors on the input's device.
- Everything is vectorised over rows (no Python loop over the batch) and nothing reads a device value on the host:
  no `.item()`, no Python branch on a tensor value; data-dependent choices use `torch.where`.
- No argument validation beyond what is needed to compute: the public ops validate at their boundary.

Papers (one page per method under docs/methods/): TPAMI = Wei et al. 2024 (OPM/OGM), AGM = Li et al. ICCV 2023,
MLB = Kontras et al., OLM = Zong et al.; the OGM-GE coefficient follows the authors' CVPR 2022 code (docs/methods/ogm_ge.md).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from . import _methods

__all__ = [
    "score_sums", "scores", "ratio_tpami", "ratio_mlb", "ogm_ge_coefficients", "ogm_coefficients",
    "opm_drop_probability", "agm_kappa", "agm_update_running", "mlb_coefficients", "olm_rates",
    "olm_rebalance_factors", "olm_update", "olm_targets", "logit_norms", "balance_coefficients_ref", "new_agm_state",
    "shapley_weights", "shapley_combine", "shapley_masked_inputs", "shapley_subset_grad_scale",
    "concat_unimodal_logits", "summation_unimodal_logits", "zero_out_unimodal_logits",
    "cov_noise_row_factor", "cov_noise_tap_backward", "cov_noise_from_per_sample", "ge_isotropic",
    "modality_drop_ref", "grad_tap_backward", "balance_from_sums_ref", "METHOD_DEFAULTS",
    "philox4x32_10", "philox_words", "philox_normals", "philox_ge_normals", "philox_uniforms_triton", "uniforms_from_words",
]

PROB_FLOOR = 1e-8          # AGM Eq. 4: p < 1e-8 is treated as 1e-8 in the 'ce' score
LOG_PROB_FLOOR = math.log(PROB_FLOOR)
OLM_EPS = 1e-8             # guard for C_m = 0 in OLM Eq. 8 (G/C with C clamped below at this value)
GE_STD_EPS = 1e-8          # authors' OGM-GE: noise std = unbiased std of the grad + 1e-8


# ----------------------------------------------------------------------------------------------- helpers
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 accumulate in fp32, fp64 in fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(t) -> torch.Tensor:
    """A tensor in its accumulation dtype (fp32, fp64 for fp64); numbers / lists of numbers become fp64."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.float64)                   # Python numbers: keep their precision
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t.to(_acc_dtype(t.dtype))


def _acc_like(x, ref: torch.Tensor) -> torch.Tensor:
    """A scalar or tensor hyperparameter (e.g. k) as a tensor on ref's device in ref's accumulation dtype."""
    dtype = _acc_dtype(ref.dtype)
    if isinstance(x, torch.Tensor):
        return x.to(device=ref.device, dtype=dtype)
    return torch.as_tensor(x, dtype=dtype, device=ref.device)       # a Python float straight into the target dtype


def _stack(x) -> torch.Tensor:
    """A list of M tensors [B, ...] or a stacked tensor [M, B, ...] -> the stacked tensor (no copy if already stacked)."""
    return x if isinstance(x, torch.Tensor) else torch.stack(list(x))


def _z(x: torch.Tensor, z: str) -> torch.Tensor:
    """The monotone map z of TPAMI Eq. 8 and 11: 'tanh' -> tanh(x - 1) (main text), 'sigmoid' -> sigmoid(x) (Tab. 15)."""
    if z == "tanh":
        return torch.tanh(x - 1.0)
    if z == "sigmoid":
        return torch.sigmoid(x)
    raise ValueError(f"z must be 'tanh' or 'sigmoid', got {z!r}")


def _offdiag(m: int, device) -> torch.Tensor:
    return ~torch.eye(m, dtype=torch.bool, device=device)


# ----------------------------------------------------------------------------------------------- scores
def score_sums(logits, labels: torch.Tensor, *, kind: str = "prob", ignore_index: int = -100):
    """Per-modality score sums over the valid rows and the number of valid rows.

    logits: [M, B, C] (or a list of M tensors [B, C]), any float dtype; labels: int [B]; rows with
    labels == ignore_index count nowhere (not in the sums, not in the count; their logits may even be NaN).
    A valid row whose label lies outside [0, C) scores NaN (so the pipeline's flag is 1, as in the Triton kernel).
    kind 'prob': sum_i softmax(u_m,i)[y_i]                       (TPAMI Eq. 6 and 7; OGM-GE; MLB Eq. 4)
    kind 'ce'  : sum_i -log(max(softmax(u_m,i)[y_i], 1e-8))      (AGM Eq. 4; computed as -max(log_softmax, log 1e-8))
    Returns (sums [M] fp32, count [] fp32).
    """
    x = _acc(_stack(logits))
    m, b, c = x.shape[0], x.shape[1], x.shape[2]
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < c)
    safe = torch.where(valid & in_range, labels, torch.zeros_like(labels)).long()
    logp = torch.log_softmax(x, dim=-1).gather(-1, safe.view(1, b, 1).expand(m, b, 1)).squeeze(-1)  # [M, B]
    if kind == "prob":
        val = logp.exp()
    elif kind == "ce":
        val = -logp.clamp(min=LOG_PROB_FLOOR)
    else:
        raise ValueError(f"kind must be 'prob' or 'ce', got {kind!r}")
    val = torch.where(in_range.view(1, b), val, torch.full_like(val, float("nan")))
    sums = torch.where(valid.view(1, b), val, torch.zeros_like(val)).sum(dim=1)
    count = valid.sum().to(torch.float32)
    return sums.to(torch.float32), count


def scores(logits, labels: torch.Tensor, *, kind: str = "prob", ignore_index: int = -100) -> torch.Tensor:
    """Per-modality scores [M] fp32 (docs/methods/).

    'prob': the SUM over valid rows of softmax(u_m)[y] (TPAMI Eq. 7 uses batch sums); 0 when no row is valid.
    'ce'  : the MEAN over valid rows of -log(max(p, 1e-8)) (AGM Eq. 4); NaN when no row is valid.
    """
    sums, count = score_sums(logits, labels, kind=kind, ignore_index=ignore_index)
    return sums if kind == "prob" else sums / count


# ----------------------------------------------------------------------------------------------- ratios
def ratio_tpami(s, *, variant: str = "ratio") -> torch.Tensor:
    """Discrepancy ratio rho [M] fp32 from scores s [M].

    'ratio' (TPAMI Eq. 7): rho_m = 1/(M-1) sum_{j != m} s_m / s_j   (s = batch SUMS of the 'prob' score).
    'difference' (TPAMI Tab. 15, row 'difference of scores'): d_m = 1/(M-1) sum_{j != m} (s_m - s_j) and we
        return rho_m = 1 + d_m. Interpretation: the paper writes the difference with batch sums, which makes its
        size grow with B; we take batch-MEAN scores (the caller passes s = sums / count, as balance_coefficients_ref
        does) and shift by 1 so that the same threshold rho > 1 (d > 0: modality m ahead) and the same z(x) of
        Eq. 8/11 apply unchanged.
    """
    s = _acc(s)
    m = s.shape[0]
    if variant == "ratio":
        pair = s.view(m, 1) / s.view(1, m)                              # pair[m, j] = s_m / s_j
        pair = torch.where(_offdiag(m, s.device), pair, torch.zeros_like(pair))
        rho = pair.sum(dim=1) / (m - 1)
    elif variant == "difference":
        rho = 1.0 + (s * m - s.sum()) / (m - 1)                          # 1/(M-1) sum_{j!=m}(s_m - s_j) = (M s_m - sum s)/(M-1)
    else:
        raise ValueError(f"variant must be 'ratio' or 'difference', got {variant!r}")
    return rho.to(torch.float32)


def ratio_mlb(s) -> torch.Tensor:
    """MLB Eq. 5: r_m = (1/(M-1) sum_{j != m} s_j) / s_m, s [M] 'prob' scores (sums or means: the ratio is the same)."""
    s = _acc(s)
    m = s.shape[0]
    return ((s.sum() - s) / ((m - 1) * s)).to(torch.float32)


# ----------------------------------------------------------------------------------------------- coefficients
def ogm_ge_coefficients(s, *, alpha: float = _methods.default("ogm_ge", "alpha"), tie: int = 0):
    """OGM-GE coefficients as the authors' code computes them (docs/methods/ogm_ge.md). s [M] 'prob' sums.

    M = 2: rho_0 = s_0/s_1, rho_1 = s_1/s_0; k = 1 - tanh(alpha * rho) for the suppressed modality, 1 for the other;
           k jumps at rho = 1 (from 1 to 1 - tanh(alpha)).
           tie=0 (CVPR 2022 code): suppress modality 1 iff rho_1 > 1, else modality 0 (a tie suppresses modality 0).
           tie=1 (TPAMI repository's OGM script): suppress modality 0 iff rho_0 > 1, else modality 1 (a tie
           suppresses modality 1).
    M > 2: rho = TPAMI Eq. 7 (ratio_tpami) and k_m = 1 - tanh(alpha * rho_m) if rho_m > 1 else 1.
    Returns (rho [M] fp32, k [M] fp32).
    """
    s = _acc(s)
    m = s.shape[0]
    if m == 2:
        rho = torch.stack([s[0] / s[1], s[1] / s[0]])
        sup = 1.0 - torch.tanh(alpha * rho)
        one = torch.ones_like(rho[0])
        first_ahead = ~(rho[1] > 1.0) if tie == 0 else rho[0] > 1.0    # who is suppressed (at a tie: modality `tie`)
        k = torch.stack([torch.where(first_ahead, sup[0], one), torch.where(first_ahead, one, sup[1])])
    else:
        rho = _acc(ratio_tpami(s))
        k = torch.where(rho > 1.0, 1.0 - torch.tanh(alpha * rho), torch.ones_like(rho))
    return rho.to(torch.float32), k.to(torch.float32)


def ogm_coefficients(rho, *, alpha: float = _methods.default("ogm", "alpha"), z: str = "tanh") -> torch.Tensor:
    """OGM, TPAMI Eq. 11: k_m = max(0, 1 - alpha * z(rho_m)) if rho_m > 1 else 1 (clamped at 0 so k stays in [0, 1])."""
    rho = _acc(rho)
    k = torch.where(rho > 1.0, (1.0 - alpha * _z(rho, z)).clamp(min=0.0), torch.ones_like(rho))
    return k.to(torch.float32)


def opm_drop_probability(rho, *, q_base: float = _methods.default("opm", "q_base"),
                         lam: float = _methods.default("opm", "lam"), z: str = "tanh") -> torch.Tensor:
    """OPM, TPAMI Eq. 8: q_m = min(1, q_base * (1 + lam * z(rho_m))) if rho_m > 1 else 0 (also clamped at 0)."""
    rho = _acc(rho)
    q = torch.where(rho > 1.0, (q_base * (1.0 + lam * _z(rho, z))).clamp(0.0, 1.0), torch.zeros_like(rho))
    return q.to(torch.float32)


def _agm_strength(s: torch.Tensor) -> torch.Tensor:
    """exp(M/(M-1) * (mean_k s_k - s_m)) = exp(1/(M-1) sum_{j != m} (s_j - s_m)) for 'ce' scores s."""
    m = s.shape[0]
    return torch.exp(m / (m - 1) * (s.mean() - s))


def agm_kappa(s, s_hat, *, alpha: float = _methods.default("agm", "alpha"), clip: float | None = None, steps=None):
    """AGM coefficients (AGM Eq. 7-9, Alg. 1) from the 'ce' scores s [M] and the running means s_hat [M].

    r_m     = exp(M/(M-1) * (mean_k s_k - s_m))      (Eq. 7, with the sign of the authors' code: s is a cross-entropy,
                                                       lower = stronger, so a strong modality has r > 1)
    tau_m   = the same on s_hat                       (Eq. 9; s_hat is the running mean BEFORE this step's update)
    kappa_m = exp(alpha * clamp(tau_m - r_m, max=clip))   (Eq. 8: exp(-alpha (r - tau)); clip None = no clamp)
    steps (optional, [] tensor or number): the number of past steps in s_hat; where steps == 0 there is no history:
    s_hat = 0 as in Alg. 1 (and the authors' code), so tau = 1 and kappa = exp(alpha * clamp(1 - r, max=clip)).
    Returns (r, tau, kappa), each [M] fp32.
    """
    s, s_hat = _acc(s), _acc(s_hat)
    r = _agm_strength(s)
    tau = _agm_strength(s_hat)
    if steps is not None:  # Alg. 1: s_hat starts at 0, so tau = exp(0) = 1 before any history
        tau = torch.where(_acc_like(steps, s) > 0, tau, torch.ones_like(tau))
    diff = tau - r
    if clip is not None:
        diff = diff.clamp(max=clip)
    kappa = torch.exp(alpha * diff)
    return r.to(torch.float32), tau.to(torch.float32), kappa.to(torch.float32)


def agm_update_running(s_hat, steps, s):
    """AGM Eq. 10, cumulative mean since step 1: t = steps + 1, s_hat <- s_hat * (t-1)/t + s / t.

    s_hat [M], steps [] (number of scores already averaged), s [M]. Returns (new_s_hat [M] fp32, new_steps [] fp32).
    At steps == 0 the result is s exactly (whatever s_hat held).
    """
    s_hat, s = _acc(s_hat), _acc(s)
    steps = _acc_like(steps, s)
    t = steps + 1.0
    new = torch.where(steps > 0, s_hat + (s - s_hat) / t, s)
    return new.to(torch.float32), t.to(torch.float32)


def mlb_coefficients(r, *, alpha: float = _methods.default("mlb", "alpha"),
                     beta_max: float = _methods.default("mlb", "beta_max")) -> torch.Tensor:
    """MLB Eq. 6-7: beta_m = beta_max if r_m > 1 else 2; k_m = 1 + (beta_m - 1) * tanh(alpha * (r_m - 1)).

    k > 1 accelerates a lagging modality (r > 1), k < 1 decelerates a leading one, k -> 1 as they converge.
    """
    r = _acc(r)
    beta = torch.where(r > 1.0, torch.full_like(r, beta_max), torch.full_like(r, 2.0))
    return (1.0 + (beta - 1.0) * torch.tanh(alpha * (r - 1.0))).to(torch.float32)


# ----------------------------------------------------------------------------------------------- OLM
def olm_rates(train_loss0, dev_loss0, train_loss, dev_loss):
    """OLM Eq. 6-7 per modality (each argument [M]; '0' = at the first evaluation, Theta^[0]).

    G_m = |L_dev0 - L_dev|   (generalisation rate, Eq. 6)
    C_m = ||L_dev - L_train| - |L_dev0 - L_train0||   (convergence rate, Eq. 7)
    Returns (G [M] fp32, C [M] fp32).
    """
    tr0, dv0, tr, dv = (_acc(t) for t in (train_loss0, dev_loss0, train_loss, dev_loss))
    g = (dv0 - dv).abs()
    c = ((dv - tr).abs() - (dv0 - tr0).abs()).abs()
    return g.to(torch.float32), c.to(torch.float32)


def olm_rebalance_factors(gen_rate, conv_rate) -> torch.Tensor:
    """OLM Eq. 8: lambda = softmax(G / C) over modalities. C >= 0 by Eq. 7; C = 0 is guarded by clamping C below at
    OLM_EPS = 1e-8 (so G = C = 0 gives 0 and G > 0 = C gives a large but finite logit)."""
    g, c = _acc(gen_rate), _acc(conv_rate)
    return torch.softmax(g / c.clamp(min=OLM_EPS), dim=0).to(torch.float32)


def logit_norms(logits) -> torch.Tensor:
    """OLM: ||s_m||_2 per row, averaged over the rows. logits [M, B, C] (or a list) -> [M] fp32."""
    x = _acc(_stack(logits))
    return torch.linalg.vector_norm(x, dim=-1).mean(dim=-1).to(torch.float32)


OLM_TARGETS = ("budget", "paper")


def olm_targets(w, logit_norms, lam, *, target: str = "budget") -> torch.Tensor:
    """OLM Eq. 9 target logit magnitudes t_m, [M] in the accumulation dtype (w >= 0, so ||w_k s_k|| = w_k n_k).

    "paper" (Eq. 9 as printed): t_m = lam_m * s_bar, s_bar = mean_k w_k n_k. The targets sum to s_bar = (1/M) of the
      total sum_k w_k n_k, so every fixed point of Alg. 1 has w_m n_m = t_m summing to S = S/M: S = 0, w = 0.
    "budget" (our reading, the default): t_m = M * lam_m * s_bar = lam_m * sum_k w_k n_k. The targets sum to the total,
      so w_m n_m = lam_m S is a fixed point for every S (the budget is kept); uniform lam asks for equal norms.
    """
    if target not in OLM_TARGETS:
        raise ValueError(f"target must be one of {OLM_TARGETS}, got {target!r}")
    w, n, lam = _acc(w), _acc(logit_norms), _acc(lam)
    total = (w * n).sum()
    return lam * (total if target == "budget" else total / n.numel())


def olm_update(w, logit_norms, lam, *, lr: float, steps: int, target: str = "budget") -> torch.Tensor:
    """OLM Alg. 1: `steps` SGD steps on Eq. 9, L = sum_m |w_m n_m - t_m|, t_m from `olm_targets` (see there).

    w [M] current coefficients (>= 0), logit_norms n [M] (mean row norm ||s_m||_2), lam [M] from Eq. 8.
    At each step the targets are recomputed from the current w (Alg. 1 recomputes s_bar in its loop) and then treated
    as constants (detached), so dL/dw_m = sign(w_m n_m - t_m) * n_m (sign(0) = 0); w <- max(0, w - lr * dL/dw).
    Why "budget" is the default: with "paper" the targets sum to 1/M of sum_k w_k n_k, so the only fixed point is
    w = 0 and the updates pull w towards it; with "budget" they sum to the total, and w_m n_m = lam_m * total is a
    fixed point.
    Note: only the targets keep the budget; far from the fixed point the sign steps move w_m n_m by lr * n_m^2 each,
    unequal when the norms differ, so the total can drift during the approach (near the fixed point it stays within a
    few steps' granularity). w is clamped at 0 after each step (a coefficient on a logit magnitude: the paper keeps
    the directions), in both variants. Returns w_new [M] fp32. (The loop runs over SGD steps, not rows.)
    """
    if target not in OLM_TARGETS:
        raise ValueError(f"target must be one of {OLM_TARGETS}, got {target!r}")
    w, n = _acc(w), _acc(logit_norms)
    for _ in range(int(steps)):
        t = olm_targets(w, n, lam, target=target)
        w = (w - lr * torch.sign(w * n - t) * n).clamp(min=0.0)
    return w.to(torch.float32)


# ----------------------------------------------------------------------------------------------- pipeline
METHOD_DEFAULTS = _methods.METHOD_DEFAULTS  # hyperparameters of each method and their defaults (the one table)


def new_agm_state(num_modalities: int, device=None) -> dict:
    """A fresh AGM state: dict(s_hat=zeros [M] fp32, steps=0 [] fp32)."""
    return {"s_hat": torch.zeros(num_modalities, dtype=torch.float32, device=device),
            "steps": torch.zeros((), dtype=torch.float32, device=device)}


def balance_coefficients_ref(logits, labels: torch.Tensor, method: str, *, state: dict | None = None,
                             ignore_index: int = -100, **hp) -> dict:
    """The whole pipeline scores -> ratios -> coefficients for one batch (docs/methods/), no host sync.

    logits [M, B, C] or a list of M [B, C]; labels int [B]; method in ogm_ge | ogm | opm | agm | mlb.
      ogm_ge: 'prob' sums, ogm_ge_coefficients (hp alpha=0.8, tie=0)
      ogm   : 'prob' sums, ratio_tpami, ogm_coefficients (hp alpha=0.8, z='tanh', ratio='ratio'|'difference')
      opm   : same ratio, opm_drop_probability -> q (hp q_base=0.5, lam=0.5, z='tanh', ratio)
      agm   : 'ce' means, r as ratios, kappa as coefficients (hp alpha=1.0, clip=None); state =
              dict(s_hat=[M] fp32, steps=[] fp32) is read (tau from s_hat before the update) and then updated IN
              PLACE with this step's scores (AGM Eq. 10). state None: no history (s_hat = 0, tau = 1, Alg. 1), nothing
              stored.
      mlb   : 'prob' sums, ratio_mlb, mlb_coefficients (hp alpha=0.8, beta_max=2.0)
    With ratio='difference' the ratio is formed on batch-mean scores (sums / count), see ratio_tpami.
    Returns dict(scores [M], ratios [M], coefficients [M], flag []) all fp32. flag: 2 no valid rows; else 1 a
    non-finite score, ratio or coefficient; else 0. When flag != 0 the coefficients are neutral (k = 1, q = 0,
    kappa = 1) and the AGM state is left untouched (selected with torch.where, no host sync); scores and ratios
    are returned as computed, so a NaN/inf that raised the flag stays visible. Finite scores can still give a
    non-finite ratio: e.g. a 'prob' sum of exactly 0 (softmax[y] underflows on every valid row) makes s_m / s_j
    inf or 0/0 = NaN. AGM's 'ce' score is clamped (p >= 1e-8), so it is finite whenever a row is valid, but
    kappa = exp(alpha * (tau - r)) can overflow to inf without `clip`: the flag catches that too.
    """
    _check_method(method, hp)
    kind = "ce" if method == "agm" else "prob"
    logits = logits.detach() if isinstance(logits, torch.Tensor) else [u.detach() for u in logits]  # statistics only
    sums, count = score_sums(logits, labels, kind=kind, ignore_index=ignore_index)
    return balance_from_sums_ref(sums, count, method, state=state, **hp)


def _check_method(method: str, hp: dict) -> None:
    if method not in METHOD_DEFAULTS:
        raise ValueError(f"method must be one of {tuple(METHOD_DEFAULTS)}, got {method!r}")
    unknown = set(hp) - set(METHOD_DEFAULTS[method])
    if unknown:
        raise TypeError(f"unknown hyperparameter(s) {sorted(unknown)} for method {method!r}; expected {sorted(METHOD_DEFAULTS[method])}")


def balance_from_sums_ref(sums: torch.Tensor, count: torch.Tensor, method: str, *, state: dict | None = None, **hp) -> dict:
    """The tail of the pipeline: score sums [M] and valid-row count [] (from score_sums, possibly all-reduced
    across ranks) -> dict(scores, ratios, coefficients, flag), updating the AGM state in place. See
    balance_coefficients_ref for the methods, the flag (2 no valid rows; else 1 a non-finite score, ratio or
    coefficient; else 0) and the neutral fallback."""
    _check_method(method, hp)
    p = {**METHOD_DEFAULTS[method], **hp}
    s = sums / count if method == "agm" else sums

    if method == "ogm_ge":
        ratios, coeff = ogm_ge_coefficients(s, alpha=p["alpha"], tie=p["tie"])
        neutral = 1.0
    elif method in ("ogm", "opm"):
        ratios = ratio_tpami(sums / count if p["ratio"] == "difference" else sums, variant=p["ratio"])
        if method == "ogm":
            coeff, neutral = ogm_coefficients(ratios, alpha=p["alpha"], z=p["z"]), 1.0
        else:
            coeff, neutral = opm_drop_probability(ratios, q_base=p["q_base"], lam=p["lam"], z=p["z"]), 0.0
    elif method == "agm":
        st = state if state is not None else new_agm_state(s.shape[0], s.device)
        ratios, _, coeff = agm_kappa(s, st["s_hat"], alpha=p["alpha"], clip=p["clip"], steps=st["steps"])
        neutral = 1.0
    else:  # mlb
        ratios = ratio_mlb(s)
        coeff, neutral = mlb_coefficients(ratios, alpha=p["alpha"], beta_max=p["beta_max"]), 1.0

    zero = torch.zeros((), dtype=torch.float32, device=s.device)
    finite = torch.isfinite(s).all() & torch.isfinite(ratios).all() & torch.isfinite(coeff).all()
    flag = torch.where(count == 0, zero + 2.0, torch.where(finite, zero, zero + 1.0))
    ok = flag == 0
    coeff = torch.where(ok, coeff, torch.full_like(coeff, neutral))
    if method == "agm" and state is not None:
        new_hat, new_steps = agm_update_running(state["s_hat"], state["steps"], s)
        state["s_hat"].copy_(torch.where(ok, new_hat, state["s_hat"]))
        state["steps"].copy_(torch.where(ok, new_steps, state["steps"]))
    return {"scores": s.to(torch.float32), "ratios": ratios, "coefficients": coeff, "flag": flag}


# ----------------------------------------------------------------------------------------------- Shapley (AGM Eq. 1-3)
def _subset_bits(m: int, device=None) -> torch.Tensor:
    """bits[S-1, j] = True iff modality j is in subset S, S = 1 .. 2^M - 1 (bitmask order)."""
    s = torch.arange(1, 2 ** m, device=device)
    return ((s.view(-1, 1) >> torch.arange(m, device=device).view(1, -1)) & 1).bool()


def shapley_weights(num_modalities: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """W [2^M - 1, M]: W[S-1, m] = coefficient of v(S) in the Shapley value phi_m, with v(empty) := 0 (AGM Eq. 1-2).

    phi_m = sum_{T not containing m} |T|! (M-|T|-1)! / M! * (v(T + m) - v(T)), hence
    W[S-1, m] =  (|S|-1)! (M-|S|)! / M!   if m in S
    W[S-1, m] = -|S|! (M-|S|-1)! / M!     otherwise.
    Efficiency, sum_m phi_m = v(all): the row of the full set (index 2^M - 2) sums to 1, every other row to 0.
    """
    m = num_modalities
    # 0!, 1!, ..., M! built on the device (exact in fp64): no host data to upload, so no copy that syncs on CUDA
    fact = torch.arange(m + 1, dtype=torch.float64, device=device).clamp(min=1).cumprod(0)
    bits = _subset_bits(m, device)
    size = bits.sum(dim=1, keepdim=True).expand(-1, m)
    pos = fact[size - 1] * fact[m - size] / fact[m]
    neg = -fact[size] * fact[(m - size - 1).clamp(min=0)] / fact[m]
    return torch.where(bits, pos, neg).to(dtype)


def _num_modalities_from_subsets(n: int) -> int:
    m = (n + 1).bit_length() - 1
    if 2 ** m - 1 != n:
        raise ValueError(f"the number of subset outputs must be 2^M - 1, got {n}")
    return m


def shapley_combine(subset_outputs: torch.Tensor) -> torch.Tensor:
    """Shapley mono-modal responses (AGM Eq. 1-3): phi[m] = sum_S W[S-1, m] * f(S).

    subset_outputs [2^M - 1, B, ...] (index S-1 = model output with only the modalities of bitmask S present; the
    last one is the full model). Returns phi [M, B, ...] in the input dtype, accumulated in fp32 (fp64 for fp64).
    """
    n = subset_outputs.shape[0]
    m = _num_modalities_from_subsets(n)
    x = _acc(subset_outputs)
    w = shapley_weights(m, dtype=x.dtype, device=x.device)
    phi = (w.t() @ x.reshape(n, -1)).reshape((m,) + tuple(subset_outputs.shape[1:]))
    return phi.to(subset_outputs.dtype)


def shapley_masked_inputs(inputs, fill=None) -> list:
    """Batched masked inputs of the muted subsets S = 1 .. 2^M - 2 (full set excluded), in bitmask order.

    inputs: M tensors [B, ...] (shapes may differ after B). Returns M tensors [(2^M - 2) * B, ...]: block S-1
    (rows (S-1)*B .. S*B-1) holds modality m's input iff bit m of S is set, else zeros (AGM: zero-padding 0^m),
    or fill[m] when fill is given: M tensors [1, ...] or [...] (one row of modality m; e.g. enc_m(0) for muted
    features). Differentiable in inputs and fill (fill[m] gets the gradient summed over its muted rows).
    """
    xs = list(inputs)
    m = len(xs)
    bits = _subset_bits(m, xs[0].device)[:-1]                          # [2^M - 2, M]
    out = []
    for j, x in enumerate(xs):                                        # loop over modalities, not rows
        keep = bits[:, j].view((-1,) + (1,) * x.dim())
        if fill is None:
            other = torch.zeros((), dtype=x.dtype, device=x.device)
        else:
            other = fill[j].reshape((1, 1) + tuple(x.shape[1:]))         # one row, broadcast over blocks and rows
        blk = torch.where(keep, x.unsqueeze(0), other)
        out.append(blk.reshape((-1,) + tuple(x.shape[1:])))
    return out


def shapley_subset_grad_scale(kappa) -> torch.Tensor:
    """c(S) = sum_m kappa_m W[S-1, m], [2^M - 1] fp32: the factor on the gradient reaching the output of subset S
    when the gradient reaching phi_m is scaled by kappa_m (AGM Eq. 6)."""
    k = _acc(kappa)
    w = shapley_weights(k.shape[0], dtype=k.dtype, device=k.device)
    return (w @ k).to(torch.float32)


# ----------------------------------------------------------------------------------------------- unimodal logits
def concat_unimodal_logits(feats, weight: torch.Tensor, bias: torch.Tensor | None, *, gamma=None) -> torch.Tensor:
    """Unimodal logits of a concatenation head (TPAMI Eq. 6, Sec. 4.5.2): u_m = feat_m W_m^T + gamma_m * b.

    feats: M tensors [B, D_m]; weight [C, sum_m D_m] = [W_1 ... W_M]; bias [C] or None; gamma [M] (default 1/M each).
    Returns [M, B, C] in the features' dtype (matmul accumulated in fp32; fp64 stays fp64). Differentiable.
    """
    xs = list(feats)
    m = len(xs)
    widths = [x.shape[-1] for x in xs]
    out_dtype = xs[0].dtype
    ws = _acc(weight).split(widths, dim=1)
    u = torch.stack([_acc(x) @ w_m.t() for x, w_m in zip(xs, ws)])   # [M, B, C]
    if bias is not None:
        g = torch.full((m,), 1.0 / m, dtype=u.dtype, device=u.device) if gamma is None else _acc_like(gamma, u).view(m)
        u = u + g.view(m, 1, 1) * _acc(bias).view(1, 1, -1)
    return u.to(out_dtype)


def summation_unimodal_logits(feats, heads: Sequence[Callable]) -> torch.Tensor:
    """Summation fusion (docs/architecture.md): u_m = head_m(feat_m), each head with its own full bias. Returns [M, B, C]."""
    return torch.stack([h(x) for h, x in zip(heads, feats)])


def zero_out_unimodal_logits(head: Callable, feats) -> torch.Tensor:
    """Zero-out unimodal estimate for a multi-layer head (TPAMI Sec. 4.3.7): u_m = head(feats with all j != m zeroed).

    head: callable on a list of M tensors [N, D_j] -> [N, C]. The M zeroed copies are concatenated along the batch
    (copy m = rows m*B .. (m+1)*B - 1) and the head is called ONCE. Returns [M, B, C].
    """
    xs = list(feats)
    m, b = len(xs), xs[0].shape[0]
    eye = torch.eye(m, dtype=torch.bool, device=xs[0].device)
    batched = []
    for j, x in enumerate(xs):                                        # loop over modalities, not rows
        keep = eye[:, j].view((m,) + (1,) * x.dim())
        batched.append(torch.where(keep, x.unsqueeze(0), torch.zeros((), dtype=x.dtype, device=x.device))
                       .reshape((m * b,) + tuple(x.shape[1:])))
    out = head(batched)
    return out.reshape((m, b) + tuple(out.shape[1:]))


# ----------------------------------------------------------------------------------------------- Philox (docs/architecture.md)
# Counter-based Philox4x32-10 (Salmon, Moraes, Dror, Shaw, SC 2011), the one random source of every backend.
# Stream layout (csrc/philox.h, and Triton's tl.randint with a 64-bit offset):
#   key = (seed & 0xffffffff, seed >> 32); counter of position ctr = (ctr & 0xffffffff, ctr >> 32, 0, 0), ctr mod 2^64.
# Words are held in int64 tensors in [0, 2^32); a 32 x 32 -> 64-bit product is formed from 32 x 16-bit pieces
# (each < 2^48), so nothing overflows int64. Vectorised over counters; the only loop is over the 10 rounds.
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57      # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85      # key schedule (Weyl constants)
_MASK32 = 0xFFFFFFFF
_TWO_M32 = 2.0 ** -32
_TRITON_UNIFORM_SCALE = 4.6566127342e-10             # triton/language/random.py uint_to_uniform_float (as fp32)


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of the 64-bit product a * b, a a 32-bit constant, b int64 words in [0, 2^32)."""
    t = a * (b >> 16)                                   # < 2^48: the product is t * 2^16 + s
    s = a * (b & 0xFFFF)                                # < 2^48
    r = ((t & 0xFFFF) << 16) + s                        # < 2^49: the low 48 bits' worth
    return (t >> 16) + (r >> 32), r & _MASK32


def philox4x32_10(counters: torch.Tensor, key) -> torch.Tensor:
    """Philox4x32-10 block function: counters int64 [..., 4] (words in [0, 2^32)), key (k0, k1) 32-bit ints.
    Returns the 4 output words, int64 [..., 4]. Checked against the Random123 known-answer vectors."""
    c0, c1, c2, c3 = (counters[..., j].to(torch.int64) for j in range(4))
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox_words(seed: int, offset: int, n: int, device=None) -> torch.Tensor:
    """int64 [n, 4]: the Philox words of stream positions offset .. offset + n - 1 (mod 2^64) for `seed`
    (the layout above; the same words as mmkernels._C.philox_words and Triton's tl.randint4x(seed, offset + i))."""
    seed, offset = int(seed), int(offset)
    i = torch.arange(n, dtype=torch.int64, device=device)                # n < 2^63
    low = (i & _MASK32) + (offset & _MASK32)                             # < 2^33: carry into the high word
    c0 = low & _MASK32
    c1 = ((i >> 32) + ((offset >> 32) & _MASK32) + (low >> 32)) & _MASK32
    zero = torch.zeros_like(c0)
    return philox4x32_10(torch.stack([c0, c1, zero, zero], dim=-1), ((seed & _MASK32), (seed >> 32) & _MASK32))


def _box_muller(a: torch.Tensor, b: torch.Tensor):
    """Two N(0, 1) from two words, in float64 then rounded once to fp32 (csrc/philox.h box_muller):
    u = (x + 0.5) / 2^32 in (0, 1); r = sqrt(-2 ln u_a), theta = 2 pi u_b; (r cos theta, r sin theta)."""
    ua = (a.to(torch.float64) + 0.5) * _TWO_M32
    ub = (b.to(torch.float64) + 0.5) * _TWO_M32
    r = torch.sqrt(-2.0 * torch.log(ua))
    theta = 6.283185307179586 * ub
    return (r * torch.cos(theta)).to(torch.float32), (r * torch.sin(theta)).to(torch.float32)


def philox_normals(seed: int, offset: int, n: int, device=None) -> torch.Tensor:
    """fp32 [n, 4]: the four Box-Muller normals (n0, n1, n2, n3) of Philox positions offset .. offset + n - 1, those of
    the extension (mmkernels._C.philox_normals; n0 = (words 0, 1) cos, n1 = sin, n2 / n3 from words 2, 3).
    The double-precision log/cos/sin of torch and of the C library may differ in the last double bit, so a value can
    in principle differ by 1 fp32 ulp where the double lands within an ulp of a rounding tie (about 1 in 10^8);
    tests find them bit-identical. The covariance tap's z_i is column 0 (position offset + i)."""
    w = philox_words(seed, offset, n, device)
    n0, n1 = _box_muller(w[:, 0], w[:, 1])
    n2, n3 = _box_muller(w[:, 2], w[:, 3])
    return torch.stack([n0, n1, n2, n3], dim=1)


def philox_ge_normals(numels: Sequence[int], seed: int, offset: int, device=None) -> list:
    """The normals of ge_isotropic_ (csrc/ge_isotropic.cpp): element j of tensor t is slot (base_t + j) % 4 of
    position offset + (base_t + j) // 4, base_t = sum_{s<t} 4 ceil(numel_s / 4). Returns T flat fp32 tensors;
    the call consumes sum_t ceil(numel_t / 4) positions."""
    counts = [(int(n) + 3) // 4 for n in numels]
    z = philox_normals(seed, offset, sum(counts), device)                # [sum counts, 4], one draw for all tensors
    return [blk.reshape(-1)[:int(n)] for blk, n in zip(z.split(counts), numels)]


def philox_uniforms_triton(seed: int, offset: int, n: int, device=None) -> torch.Tensor:
    """fp32 [n]: Triton's tl.rand(seed, offset + i), i < n (triton/language/random.py): word 0 of the position,
    read as int32 x, x' = x if x >= 0 else ~x (in [0, 2^31)), u = fp32(x') * fp32(4.6566127342e-10), in [0, 1)."""
    return uniforms_from_words(philox_words(seed, offset, n, device)[:, 0])


def uniforms_from_words(x: torch.Tensor) -> torch.Tensor:
    """tl.rand's fp32 uniforms from Philox word 0 (int64 [n] holding uint32 values): see philox_uniforms_triton."""
    x = torch.where(x >= 2 ** 31, _MASK32 - x, x)                        # ~x of the int32 reading, for x < 0
    scale = torch.tensor(_TRITON_UNIFORM_SCALE, dtype=torch.float32, device=x.device)
    return x.to(torch.float32) * scale


# ----------------------------------------------------------------------------------------------- noise (docs/methods/ogm_ge.md)
def cov_noise_row_factor(k, z: torch.Tensor, *, sigma: float = 1.0) -> torch.Tensor:
    """Row factor of the covariance-noise tap (docs/methods/ogm_ge.md, TPAMI Eq. 13-17): k + sigma * (z_i - mean(z)), [B] fp32
    (fp64 when z is fp64).

    Multiplying row i of the feature gradient of a batch-mean loss by this factor adds
    h = 1/B sum_i sigma (z_i - z_bar) g_i to every encoder parameter gradient, Cov(h) ~ sigma^2 U_hat / B.
    """
    zz = _acc(z)
    return _acc_like(k, zz) + sigma * (zz - zz.mean())


def cov_noise_tap_backward(grad: torch.Tensor, k, z: torch.Tensor, *, sigma: float = 1.0) -> torch.Tensor:
    """Backward of the covariance-noise tap: grad [B, ...] * row_factor[B] broadcast over trailing dims, in grad's dtype
    (computed in fp32, fp64 for fp64)."""
    g = _acc(grad)
    rf = cov_noise_row_factor(k, z, sigma=sigma).to(g.dtype).view((-1,) + (1,) * (g.dim() - 1))
    return (g * rf).to(grad.dtype)


def cov_noise_from_per_sample(per_sample_grads: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """docs/methods/ogm_ge.md: h = (z - z_bar)^T G / B from explicit per-sample gradients G [B, P] and normals z [B] -> [P]
    (G's accumulation dtype: fp32, fp64 for fp64)."""
    g = _acc(per_sample_grads)
    zc = _acc(z).to(g.dtype)
    zc = zc - zc.mean()
    return (zc @ g) / g.shape[0]


def ge_isotropic(grads, k, normals) -> list:
    """Parameter-mode GE as in the authors' OGM-GE code (docs/methods/ogm_ge.md): g <- k * g + (std(g) + 1e-8) * n per tensor,
    std = unbiased std of the unmodulated grad over all its elements, n ~ N(0, 1) given (same shapes as grads).
    A tensor with fewer than 2 elements (a PReLU weight, a scalar bias) has no unbiased std: it is defined as 0 here
    (noise 1e-8 * n), where torch.std (and the authors' loop) would give NaN and turn the parameter into NaN.

    grads: list of T tensors; k: T numbers / 0-d tensors or a tensor [T]; normals: list of T tensors.
    Returns a new list in each grad's dtype (computed in fp32, fp64 for fp64). The loop is over tensors, not rows.
    """
    out = []
    for i, (g, n) in enumerate(zip(grads, normals)):
        ga = _acc(g)
        ki = _acc_like(k[i], ga)
        std = (ga.std(unbiased=True) if ga.numel() >= 2 else ga.new_zeros(())) + GE_STD_EPS
        out.append((ki * ga + std * _acc(n).to(ga.dtype)).to(g.dtype))
    return out


# ----------------------------------------------------------------------------------------------- modality drop (OPM)
def modality_drop_ref(features, q, uniforms: torch.Tensor, *, rescale: str = "official", execute: bool = True) -> list:
    """OPM modality drop (TPAMI Alg. 1, docs/methods/opm.md) on M feature tensors [B, ...] (widths may differ).

    keep[m, i] = uniforms[m, i] >= q[m] (so P(drop) = q_m); a row where no modality is kept keeps all of them.
    Kept entries are scaled, dropped entries are 0:
      'official'    : every kept entry by 1/(1 - theta), theta = sum_m d_m q_m / sum_m d_m, d_m = elements per row of m
      'per_modality': kept entries of modality m by 1/(1 - q_m)
      'none'        : no scaling.
    A denominator of 0 (q_m = 1, or theta = 1) gives scale 1 instead of inf (only the fallback rows can then be kept).
    execute False -> the features unchanged (the p_exe gate is decided by the caller). Returns a list of M tensors
    in the features' dtypes (scaled in fp32, fp64 for fp64).
    """
    xs = list(features)
    if not execute:
        return xs
    m = len(xs)
    u = _acc(uniforms)
    qq = _acc_like(q, u).view(m)
    keep = u >= qq.view(m, 1)                                         # [M, B]
    keep = keep | ~keep.any(dim=0, keepdim=True)
    one = torch.ones((), dtype=u.dtype, device=u.device)
    if rescale == "official":
        d = torch.tensor([float(x[0].numel()) if x.shape[0] > 0 else float(math.prod(x.shape[1:])) for x in xs],
                         dtype=u.dtype, device=u.device)
        theta = (d * qq).sum() / d.sum()
        scale = torch.where(theta < 1.0, 1.0 / (1.0 - theta), one).expand(m)
    elif rescale == "per_modality":
        scale = torch.where(qq < 1.0, 1.0 / (1.0 - qq), one)
    elif rescale == "none":
        scale = one.expand(m)
    else:
        raise ValueError(f"rescale must be 'official', 'per_modality' or 'none', got {rescale!r}")
    out = []
    for j, x in enumerate(xs):                                        # loop over modalities, not rows
        shape = (-1,) + (1,) * (x.dim() - 1)
        xa = _acc(x)
        y = torch.where(keep[j].view(shape), xa * scale[j].to(xa.dtype), torch.zeros((), dtype=xa.dtype, device=x.device))
        out.append(y.to(x.dtype))
    return out


# ----------------------------------------------------------------------------------------------- grad tap
def grad_tap_backward(grad: torch.Tensor, k) -> torch.Tensor:
    """Backward of the feature tap (docs/methods/ogm_ge.md): grad * k (k a number or 0-d tensor), in grad's dtype."""
    g = _acc(grad)
    return (g * _acc_like(k, g)).to(grad.dtype)


# ----------------------------------------------------------------------------------------------- PMR, MMPareto, valuation
# PMR, MMPareto and valuation live in one module each and are part of this oracle.
from ._ref_pmr import *  # noqa: E402,F401,F403
from ._ref_mmpareto import *  # noqa: E402,F401,F403
from ._ref_valuation import *  # noqa: E402,F401,F403
from . import _ref_mmpareto, _ref_pmr, _ref_valuation  # noqa: E402

__all__ += _ref_pmr.__all__ + _ref_mmpareto.__all__ + _ref_valuation.__all__
