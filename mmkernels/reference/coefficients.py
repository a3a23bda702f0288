"""Scores, discrepancy ratios and coefficients of OGM-GE, OGM, OPM, AGM and MLB, and the pipeline that chains them
(docs/methods/ogm_ge.md, ogm.md, opm.md, agm.md, mlb.md)."""

from __future__ import annotations

import torch

from .. import _methods
from ._common import LOG_PROB_FLOOR, _acc, _acc_like, _offdiag, _stack, _z

__all__ = [
    "score_sums",
    "scores",
    "ratio_tpami",
    "ratio_mlb",
    "ogm_ge_coefficients",
    "ogm_coefficients",
    "opm_drop_probability",
    "agm_kappa",
    "agm_update_running",
    "mlb_coefficients",
    "balance_coefficients_ref",
    "new_agm_state",
    "balance_from_sums_ref",
    "METHOD_DEFAULTS",
]


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
        pair = s.view(m, 1) / s.view(1, m)  # pair[m, j] = s_m / s_j
        pair = torch.where(_offdiag(m, s.device), pair, torch.zeros_like(pair))
        rho = pair.sum(dim=1) / (m - 1)
    elif variant == "difference":
        rho = 1.0 + (s * m - s.sum()) / (m - 1)  # 1/(M-1) sum_{j!=m}(s_m - s_j) = (M s_m - sum s)/(M-1)
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
        first_ahead = ~(rho[1] > 1.0) if tie == 0 else rho[0] > 1.0  # who is suppressed (at a tie: modality `tie`)
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


def opm_drop_probability(
    rho,
    *,
    q_base: float = _methods.default("opm", "q_base"),
    lam: float = _methods.default("opm", "lam"),
    z: str = "tanh",
) -> torch.Tensor:
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


def mlb_coefficients(
    r, *, alpha: float = _methods.default("mlb", "alpha"), beta_max: float = _methods.default("mlb", "beta_max")
) -> torch.Tensor:
    """MLB Eq. 6-7: beta_m = beta_max if r_m > 1 else 2; k_m = 1 + (beta_m - 1) * tanh(alpha * (r_m - 1)).

    k > 1 accelerates a lagging modality (r > 1), k < 1 decelerates a leading one, k -> 1 as they converge.
    """
    r = _acc(r)
    beta = torch.where(r > 1.0, torch.full_like(r, beta_max), torch.full_like(r, 2.0))
    return (1.0 + (beta - 1.0) * torch.tanh(alpha * (r - 1.0))).to(torch.float32)


# ----------------------------------------------------------------------------------------------- pipeline
METHOD_DEFAULTS = _methods.METHOD_DEFAULTS  # hyperparameters of each method and their defaults (the one table)


def new_agm_state(num_modalities: int, device=None) -> dict:
    """A fresh AGM state: dict(s_hat=zeros [M] fp32, steps=0 [] fp32)."""
    return {
        "s_hat": torch.zeros(num_modalities, dtype=torch.float32, device=device),
        "steps": torch.zeros((), dtype=torch.float32, device=device),
    }


def balance_coefficients_ref(
    logits, labels: torch.Tensor, method: str, *, state: dict | None = None, ignore_index: int = -100, **hp
) -> dict:
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
        raise TypeError(
            f"unknown hyperparameter(s) {sorted(unknown)} for method {method!r}; "
            f"expected {sorted(METHOD_DEFAULTS[method])}"
        )


def balance_from_sums_ref(
    sums: torch.Tensor, count: torch.Tensor, method: str, *, state: dict | None = None, **hp
) -> dict:
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
