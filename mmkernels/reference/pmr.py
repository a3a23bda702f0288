"""Reference math of PMR, Prototypical Modal Rebalance (Fan et al., CVPR 2023; docs/methods/pmr.md;
formulas from the authors' code fanyunfeng-bit/Modal-Imbalance-PMR, main_Prototype_grad.py). Re-exported by
mmkernels.reference.

Layout: features z [M, B, D] and prototypes P [M, C, D], modality first. Modalities with different widths D_m are
zero-padded to D = max D_m (`pmr_pad`): a zero column adds nothing to a distance, its gradient is dropped by the
slicing, and a class mean of zeros is zero, so padding changes no number.

Per batch (docs/methods/pmr.md), over the valid rows (label != ignore_index; the others count nowhere):
  d_m[i,k] = ||z_m,i - P_m[k]||_2,   p_m[i,:] = softmax(-d_m[i,:])
  s_m      = sum_i p_m[i, y_i]                         (score: a sum, not a mean)
  PCE_m    = mean_i -log p_m[i, y_i]                   (prototype cross-entropy)
  c_m      = alpha * 1[s_m < max_j s_j]                (M = 2: the authors' switch on rho = s_0 / s_1, tie -> (0, 0))
  L_PMR    = sum_m c_m PCE_m                            (c detached)
  ratios_m = s_m / max_{j != m} s_j                     (M = 2: rho and 1 / rho; c_m = alpha iff ratio_m < 1)
flag: 2 no valid row; else 1 a non-finite score or PCE (then every c_m = 0, the loss is 0); else 0.
A label outside [0, C) that is not ignore_index makes its row's score and PCE NaN (flag 1), as on every backend.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "pmr_pad",
    "pmr_distances",
    "pmr_row_log_probs",
    "pmr_sums",
    "pmr_coefficients",
    "pmr_ratios",
    "pmr_from_sums_ref",
    "pmr_forward_ref",
    "pmr_backward_ref",
    "pmr_class_sums",
    "pmr_refresh_ref",
    "pmr_prototypes_ref",
    "pmr_toolkit_factors",
    "pmr_literal",
    "pmr_literal_grad",
    "pmr_literal_prototypes",
]


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def pmr_pad(xs, name: str = "features") -> torch.Tensor:
    """A list of M tensors [N, D_m] (or one tensor [M, N, D]) -> [M, N, max D_m], zero-padded (differentiable)."""
    if isinstance(xs, torch.Tensor):
        return xs
    width = max(x.shape[-1] for x in xs)
    if all(x.shape[-1] == width for x in xs):
        return torch.stack(list(xs))
    return torch.stack([torch.nn.functional.pad(x, (0, width - x.shape[-1])) for x in xs])


def pmr_distances(z: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """d [M, B, C] = ||z[m, i] - P[m, k]||_2 from the differences (no ||z||^2 - 2 z.P + ||P||^2 expansion, so a row
    that equals a prototype has d = 0 exactly). Accumulation dtype (fp32; fp64 for fp64)."""
    diff = _acc(z)[:, :, None, :] - _acc(protos)[:, None, :, :]
    return diff.square().sum(-1).sqrt()


def pmr_row_log_probs(z, protos, labels, *, ignore_index: int = -100):
    """(log p_m[i, y_i] [M, B], valid [B]): log softmax(-d)[y] per row; NaN for an out-of-range label, 0 for
    ignored rows (use `valid`)."""
    d = pmr_distances(z, protos)
    logp = torch.log_softmax(-d, dim=-1)
    c = protos.shape[1]
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < c)
    idx = torch.where(in_range & valid, labels, 0).long()
    logp_y = logp.gather(2, idx.view(1, -1, 1).expand(logp.shape[0], -1, 1)).squeeze(2)
    logp_y = torch.where(in_range, logp_y, float("nan"))
    return torch.where(valid, logp_y, 0.0), valid


def pmr_sums(z, protos, labels, *, ignore_index: int = -100):
    """(score sums [M], PCE sums [M], valid-row count []): sum_i p[i, y_i], sum_i -log p[i, y_i] over valid rows."""
    logp_y, valid = pmr_row_log_probs(z, protos, labels, ignore_index=ignore_index)
    s = torch.where(valid, logp_y.exp(), 0.0).sum(1)
    return s, (-logp_y).sum(1), valid.sum().to(logp_y.dtype)


def pmr_coefficients(scores: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """docs/methods/pmr.md: c_m = alpha * 1[s_m < max_j s_j]. For M = 2 this is the authors' switch on rho = s_0 / s_1
    (rho < 1: (alpha, 0); rho > 1: (0, alpha); tie: (0, 0)); for M > 2 the natural extension (every modality but the
    strongest gets the PCE term)."""
    return alpha * (scores < scores.max()).to(scores.dtype)


def pmr_ratios(scores: torch.Tensor) -> torch.Tensor:
    """ratio_m = s_m / max_{j != m} s_j (M = 2: rho = s_0 / s_1 and 1 / rho). As computed (inf / NaN possible)."""
    m = scores.shape[0]
    others = (
        scores.unsqueeze(0)
        .expand(m, m)
        .masked_fill(torch.eye(m, dtype=torch.bool, device=scores.device), float("-inf"))
    )
    return scores / others.max(1).values


def pmr_from_sums_ref(score_sums, pce_sums, count, *, alpha: float = 1.0, local_count=None) -> dict:
    """The finalisation from the (possibly all-reduced) score sums and the valid-row count: scores, PCE (mean over
    the LOCAL rows, local_count defaults to count), ratios, coefficients, loss = sum_m c_m PCE_m, flag (module doc)."""
    local = count if local_count is None else local_count
    pce = torch.where(local > 0, pce_sums / local.clamp(min=1), 0.0)
    bad = ~(torch.isfinite(score_sums).all() & torch.isfinite(pce).all())
    flag = torch.where(count == 0, 2.0, torch.where(bad, 1.0, 0.0))
    coef = torch.where(flag == 0, pmr_coefficients(score_sums, alpha=alpha), 0.0)
    loss = torch.where(coef != 0, coef * pce, 0.0).sum()
    f32 = torch.float32
    return {
        "scores": score_sums.to(f32),
        "pce": pce.to(f32),
        "ratios": pmr_ratios(score_sums).to(f32),
        "coefficients": coef.to(f32),
        "flag": flag.to(f32),
        "loss": loss,
        "count": local.to(f32),
    }


def pmr_forward_ref(z, protos, labels, *, alpha: float = 1.0, ignore_index: int = -100) -> dict:
    """One PMR batch: z [M, B, D], protos [M, C, D], labels [B] -> dict(scores, pce, ratios, coefficients [M] fp32,
    flag [] fp32, count [] fp32, loss [] in the accumulation dtype (fp32; fp64 for fp64 inputs), differentiable in z
    when z requires grad (autograd through torch.cdist-like ops; `pmr_backward_ref` is the analytic gradient)."""
    s, pce, count = pmr_sums(z, protos, labels, ignore_index=ignore_index)
    return pmr_from_sums_ref(s, pce, count, alpha=alpha)


def pmr_backward_ref(grad_loss, z, protos, labels, coefficients, count, *, ignore_index: int = -100) -> torch.Tensor:
    """dL/dz [M, B, D] in z's dtype, L = sum_m c_m PCE_m (docs/methods/pmr.md):
    dL/dz_i = g (c_m / n) sum_k (p_ik - 1[k = y_i]) (P[k] - z_i) / d_ik, with the term 0 where d_ik = 0 (the
    authors' sqrt gives NaN there), n = valid rows, 0 for ignored rows and where c_m = 0. The differences P[k] - z_i
    are formed directly (as the authors and the kernel do), never as w @ P - z sum_k w, which cancels when a feature
    sits near a large-norm prototype. Features and prototypes of different float dtypes are promoted."""
    zz, pp = _acc(z), _acc(protos)
    d = pmr_distances(z, protos)
    p = torch.softmax(-d, dim=-1)
    c = protos.shape[1]
    valid = (labels != ignore_index) & (labels >= 0) & (labels < c)
    onehot = torch.nn.functional.one_hot(torch.where(valid, labels, 0).long(), c).to(p.dtype)
    coef = coefficients.to(p.dtype)
    scale = _acc(torch.as_tensor(grad_loss)).to(p.dtype) * coef / count.to(p.dtype).clamp(min=1)
    w = (p - onehot) / torch.where(d > 0, d, 1.0)
    w = torch.where((d > 0) & valid.view(1, -1, 1) & (coef != 0).view(-1, 1, 1), w * scale.view(-1, 1, 1), 0.0)
    diff = pp[:, None, :, :].to(p.dtype) - zz[:, :, None, :].to(p.dtype)  # [M, B, C, D]: P_k - z_i
    dz = (w.unsqueeze(-1) * torch.where(w.unsqueeze(-1) != 0, diff, 0.0)).sum(2)
    return dz.to(z.dtype)


# ----------------------------------------------------------------------------------------------- refresh
def pmr_class_sums(z, labels, num_classes: int, *, ignore_index: int = -100):
    """(sums [M, C, D], counts [M, C], skipped [M]) of the rows of each class per modality (index_add by label).
    Ignored rows and labels outside [0, C) count nowhere; a row of modality m holding a NaN/Inf feature is skipped
    for that modality (neither summed nor counted) and counted in skipped[m]. Accumulation dtype."""
    zz = _acc(z)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    finite = torch.isfinite(zz).all(-1)  # [M, N]
    keep = valid.view(1, -1) & finite
    idx = torch.where(valid, labels, 0).long()
    rows = torch.where(keep.unsqueeze(-1), zz, 0.0)
    sums = zz.new_zeros(zz.shape[0], num_classes, zz.shape[2]).index_add_(1, idx, rows)
    counts = zz.new_zeros(zz.shape[0], num_classes).index_add_(1, idx, keep.to(zz.dtype))
    skipped = (valid.view(1, -1) & ~finite).sum(1).to(zz.dtype)
    return sums, counts, skipped


def pmr_refresh_ref(sums, counts, old, *, mu: float, first: bool) -> torch.Tensor:
    """docs/methods/pmr.md: mean_k = sums_k / n_k (counts [M, C] per modality, or [C] shared); first refresh
    P = mean, later P = (1 - mu) mean + mu P_old; a class with n_k = 0 keeps its old prototype (the authors' 0/0 =
    NaN); an old prototype entry that is not finite is replaced by the mean (a clean refresh restores it).
    Returns [M, C, D] in old's dtype."""
    n = (counts if counts.dim() == 2 else counts.view(1, -1)).unsqueeze(-1)
    mean = sums / n.clamp(min=1)
    o = old.to(mean.dtype)
    new = mean if first else torch.where(torch.isfinite(o), (1.0 - mu) * mean + mu * o, mean)
    return torch.where(n > 0, new, o).to(old.dtype)


def pmr_prototypes_ref(z, labels, old, *, mu: float, first: bool, ignore_index: int = -100) -> torch.Tensor:
    """The refresh over one set of rows z [M, N, D] (the whole subset at once)."""
    sums, counts, _ = pmr_class_sums(z, labels, old.shape[1], ignore_index=ignore_index)
    return pmr_refresh_ref(sums, counts, old, mu=mu, first=first)


def pmr_toolkit_factors(scores: torch.Tensor) -> torch.Tensor:
    """The toolkit's M > 2 rule (docs/methods/pmr.md): r_m = s_m / min_j s_j,
    k_m = 1 - tanh(0.01 r_m) if r_m > 1 else 1 (a gradient factor; the toolkit drops the PCE term for M > 2)."""
    r = scores / scores.min()
    return torch.where(r > 1, 1.0 - torch.tanh(0.01 * r), torch.ones_like(r))


# ----------------------------------------------------------------------------------------------- literal
# A deliberately literal transcription (plain floats, Python loops over modalities, rows and classes, the math
# module), in the style of the authors' trainer; the vectorised functions above are compared against it in tests.
def pmr_literal(z, protos, labels, *, alpha=1.0, ignore_index=-100):
    """z [M][B][D], protos [M][C][D] nested lists, labels list of ints -> dict of floats / lists."""
    M = len(z)
    scores, pces, count = [], [], 0
    for m in range(M):
        s, pce, count = 0.0, 0.0, 0
        for i, y in enumerate(labels):
            if y == ignore_index:
                continue
            count += 1
            dist = []
            for k in range(len(protos[m])):
                dist.append(math.sqrt(sum((a - b) ** 2 for a, b in zip(z[m][i], protos[m][k]))))
            top = max(-v for v in dist)
            total = sum(math.exp(-v - top) for v in dist)
            logp = -dist[y] - top - math.log(total)
            s += math.exp(logp)
            pce += -logp
        scores.append(s)
        pces.append(pce / count if count else 0.0)
    if M == 2:  # the authors' switch
        rho = scores[0] / scores[1] if scores[1] != 0 else float("inf")
        coef = [alpha, 0.0] if rho < 1 else ([0.0, alpha] if rho > 1 else [0.0, 0.0])
    else:
        coef = [alpha if scores[m] < max(scores) else 0.0 for m in range(M)]
    if count == 0:
        coef = [0.0] * M
    loss = sum(coef[m] * pces[m] for m in range(M))
    return {"scores": scores, "pce": pces, "coefficients": coef, "loss": loss, "count": count}


def pmr_literal_grad(z, protos, labels, coef, *, ignore_index=-100):
    """dL/dz [M][B][D] by the chain rule written out per row and class (docs/methods/pmr.md)."""
    out = []
    n = sum(1 for y in labels if y != ignore_index)
    for m in range(len(z)):
        rows = []
        for i, y in enumerate(labels):
            g = [0.0] * len(z[m][i])
            if y != ignore_index and coef[m] != 0:
                dist = [math.sqrt(sum((a - b) ** 2 for a, b in zip(z[m][i], pk))) for pk in protos[m]]
                ex = [math.exp(-v) for v in dist]
                p = [e / sum(ex) for e in ex]
                for k, pk in enumerate(protos[m]):
                    if dist[k] == 0:
                        continue
                    w = coef[m] / n * (p[k] - (1.0 if k == y else 0.0)) / dist[k]
                    for j in range(len(g)):
                        g[j] += w * (pk[j] - z[m][i][j])
            rows.append(g)
        out.append(rows)
    return out


def pmr_literal_prototypes(z, labels, old, *, mu, first, ignore_index=-100):
    """The refresh per class, per modality, as the authors' loop (but an absent class keeps its old prototype)."""
    new = []
    for m in range(len(z)):
        rows = []
        for k in range(len(old[m])):
            members = [z[m][i] for i, y in enumerate(labels) if y == k and y != ignore_index]
            if not members:
                rows.append(list(old[m][k]))
                continue
            mean = [sum(col) / len(members) for col in zip(*members)]
            rows.append(mean if first else [(1 - mu) * a + mu * b for a, b in zip(mean, old[m][k])])
        new.append(rows)
    return new
