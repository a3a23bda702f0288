"""A deliberately literal, slow transcription of the papers' equations (Python loops over rows and subsets, the
math module, plain floats). The vectorised reference (mmkernels/reference/) is compared against it.

Inputs are plain nested lists of floats (use `to_list`); outputs are floats / lists of floats.
"""

from __future__ import annotations

import itertools
import math


def to_list(t):
    return t.detach().double().cpu().tolist()


def softmax_row(row):
    mx = max(row)
    ex = [math.exp(v - mx) for v in row]
    tot = sum(ex)
    return [e / tot for e in ex]


def scores(logits, labels, kind, ignore_index=-100):
    """TPAMI Eq. 6-7 ('prob': batch SUM of the softmax probability of the true class) and AGM Eq. 4 ('ce': batch MEAN
    of -log p, with p < 1e-8 taken as 1e-8). logits [M][B][C] lists, labels [B] ints."""
    out = []
    for m in range(len(logits)):
        total, count = 0.0, 0
        for i, y in enumerate(labels):
            if y == ignore_index:
                continue
            p = softmax_row(logits[m][i])[y]
            total += p if kind == "prob" else -math.log(max(p, 1e-8))
            count += 1
        if kind == "prob":
            out.append(total)
        else:
            out.append(total / count if count else math.nan)
    return out


def ratio_tpami(s, variant="ratio"):
    """TPAMI Eq. 7 (ratio) and Tab. 15 (difference; returned as 1 + d on the scores given)."""
    M = len(s)
    rho = []
    for m in range(M):
        acc = 0.0
        for j in range(M):
            if j != m:
                acc += s[m] / s[j] if variant == "ratio" else s[m] - s[j]
        rho.append(acc / (M - 1) if variant == "ratio" else 1.0 + acc / (M - 1))
    return rho


def ratio_mlb(s):
    """MLB Eq. 5."""
    M = len(s)
    return [(sum(s[j] for j in range(M) if j != i) / (M - 1)) / s[i] for i in range(M)]


def z_fn(x, z):
    return math.tanh(x - 1.0) if z == "tanh" else 1.0 / (1.0 + math.exp(-x))


def ogm_ge(s, alpha):
    """OGM-GE as in the authors' CVPR 2022 code for M = 2 (if/else on the second modality's ratio);
    the TPAMI ratio with k = 1 - tanh(alpha rho) when rho > 1 for M > 2."""
    if len(s) == 2:
        ratio_1 = s[1] / s[0]
        ratio_0 = 1.0 / ratio_1
        if ratio_1 > 1:
            k = [1.0, 1.0 - math.tanh(alpha * max(ratio_1, 0.0))]
        else:
            k = [1.0 - math.tanh(alpha * max(ratio_0, 0.0)), 1.0]
        return [s[0] / s[1], ratio_1], k
    rho = ratio_tpami(s)
    return rho, [1.0 - math.tanh(alpha * r) if r > 1 else 1.0 for r in rho]


def ogm(rho, alpha, z="tanh"):
    """TPAMI Eq. 11 (k clamped at 0)."""
    return [max(0.0, 1.0 - alpha * z_fn(r, z)) if r > 1 else 1.0 for r in rho]


def opm(rho, q_base=0.5, lam=0.5, z="tanh"):
    """TPAMI Eq. 8 (q clipped to 1)."""
    return [min(1.0, q_base * (1.0 + lam * z_fn(r, z))) if r > 1 else 0.0 for r in rho]


def agm_strength(s):
    """AGM Eq. 7 with the authors' sign for cross-entropy scores: exp(1/(M-1) sum_{j != m} (s_j - s_m))."""
    M = len(s)
    return [math.exp(sum(s[j] - s[m] for j in range(M) if j != m) / (M - 1)) for m in range(M)]


def agm(s, history, alpha, clip=None):
    """AGM Eq. 7-10: tau from the arithmetic mean of the scores of all PAST steps (history: list of score lists);
    no history -> s_hat = 0 (Alg. 1, the authors' code), tau = 1. kappa = exp(-alpha (r - tau)), the exponent's
    (tau - r) clipped at `clip`."""
    M = len(s)
    r = agm_strength(s)
    if history:
        s_hat = [sum(h[m] for h in history) / len(history) for m in range(M)]
        tau = agm_strength(s_hat)
    else:
        tau = [1.0] * M
    kappa = []
    for m in range(M):
        d = tau[m] - r[m]
        if clip is not None:
            d = min(d, clip)
        kappa.append(math.exp(alpha * d))
    return r, tau, kappa


def mlb(r, alpha, beta_max=2.0):
    """MLB Eq. 6-7."""
    out = []
    for ri in r:
        beta = beta_max if ri > 1 else 2.0
        out.append(1.0 + (beta - 1.0) * math.tanh(alpha * (ri - 1.0)))
    return out


def shapley_phi(v, M):
    """Textbook Shapley value over all M! orderings: phi_m = 1/M! sum_pi [v(P_pi^m + m) - v(P_pi^m)], where P_pi^m is
    the set of players before m in ordering pi; v maps a frozenset of modalities to a value, v(empty) = 0."""

    def val(S):
        return 0.0 if not S else v[frozenset(S)]

    phi = [0.0] * M
    perms = list(itertools.permutations(range(M)))
    for pi in perms:
        before = set()
        for m in pi:
            phi[m] += val(before | {m}) - val(before)
            before.add(m)
    return [p / len(perms) for p in phi]


def shapley_phi_subsets(v, M):
    """The subset form (AGM Eq. 1 with v(empty) = 0): phi_m = sum_{T not containing m}
    |T|!(M-|T|-1)!/M! [v(T+m) - v(T)]."""

    def val(S):
        return 0.0 if not S else v[frozenset(S)]

    phi = []
    for m in range(M):
        others = [j for j in range(M) if j != m]
        acc = 0.0
        for size in range(M):
            for T in itertools.combinations(others, size):
                w = math.factorial(size) * math.factorial(M - size - 1) / math.factorial(M)
                acc += w * (val(set(T) | {m}) - val(set(T)))
        phi.append(acc)
    return phi


def olm_rates(tr0, dv0, tr, dv):
    """OLM Eq. 6-7 per modality."""
    G = [abs(dv0[m] - dv[m]) for m in range(len(tr))]
    C = [abs(abs(dv[m] - tr[m]) - abs(dv0[m] - tr0[m])) for m in range(len(tr))]
    return G, C


def olm_lambda(G, C, eps=1e-8):
    """OLM Eq. 8: softmax of G/C (C guarded at eps)."""
    x = [g / max(c, eps) for g, c in zip(G, C)]
    mx = max(x)
    e = [math.exp(v - mx) for v in x]
    return [v / sum(e) for v in e]


def logit_norms(logits):
    """Mean over rows of ||s_m||_2."""
    return [sum(math.sqrt(sum(v * v for v in row)) for row in rows) / len(rows) for rows in logits]


def olm_update(w, n, lam, lr, steps, target="budget"):
    """OLM Alg. 1: SGD on Eq. 9, the targets recomputed at each step from s_bar = mean_k ||w_k s_k|| and
    held constant for that step's gradient: dL/dw_m = sign(w_m n_m - target_m) n_m, then w_m = max(0, w_m - lr dL/dw_m).
    target "paper": lam_m * s_bar (Eq. 9 as printed); "budget": M * lam_m * s_bar."""
    w = list(w)
    M = len(w)
    for _ in range(steps):
        s_bar = sum(abs(w[k]) * n[k] for k in range(M)) / M
        new = []
        for m in range(M):
            tgt = lam[m] * s_bar * (M if target == "budget" else 1)
            diff = w[m] * n[m] - tgt
            sign = (diff > 0) - (diff < 0)
            new.append(max(0.0, w[m] - lr * sign * n[m]))
        w = new
    return w
