"""Baselines "in the authors' style": the balancing methods as their public trainers do them (described in
the authors' code; written here from that description, not copied). They are what a researcher who copies a
trainer loop gets today, and what bench_train_step.py compares mmkernels against:
- scores summed with a Python loop over the batch rows (one tiny op per row),
- Python branches on device values and one `.item()` per parameter tensor (host syncs),
- AGM: 2^M - 2 extra muted forwards of the *whole* model (zeroed raw inputs, eval mode, autograd on),
- OPM: rows that lose every modality removed from the batch (a dynamic shape).
Every function is one full training step: forward, loss, backward, modulation, optimizer step. The model is any
`ConcatClassifier` (M encoders + one linear concat head, see mmkernels/demo/models.py).
"""

from __future__ import annotations

import math
import random
from itertools import combinations

import torch
import torch.nn.functional as F


def _unimodal_from_concat(model, feats):
    """u_m = f_m W_m^T + b / M (the authors' split of the concat head, CVPR 2022 code / TPAMI Sec. 4.5.2)."""
    w, b = model.head.weight, model.head.bias
    out, start = [], 0
    for f in feats:
        d = f.shape[1]
        out.append(f @ w[:, start : start + d].t() + b / len(feats))
        start += d
    return out


def _loop_prob_score(logits, y):
    """sum_i softmax(u)[i, y_i], one row at a time (authors' scoring loop)."""
    p = F.softmax(logits, dim=1)
    total = 0.0
    for i in range(y.shape[0]):
        total = total + p[i][y[i]]
    return total


def _loop_ce_score(logits, y):
    """mean_i -log max(softmax(u)[i, y_i], 1e-8), one row at a time, read back as a Python float (AGM code)."""
    p = F.softmax(logits, dim=1)
    total = 0.0
    for i in range(y.shape[0]):
        total += -math.log(max(p[i][y[i]].item(), 1e-8))
    return total / y.shape[0]


def joint_step(model, inputs, y, opt):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(inputs), y)
    loss.backward()
    opt.step()
    return loss.detach()


def ogm_ge_step(model, inputs, y, opt, *, alpha=0.8, weight_dims=(4,)):
    """OGM-GE (CVPR 2022 code), two modalities: ratio of looped scores, Python branch, then after backward for each
    encoder weight tensor with grad.dim() in weight_dims: grad = k * grad + N(0, (std(grad).item() + 1e-8)^2)."""
    assert len(inputs) == 2, "the authors' OGM-GE code handles exactly two modalities"
    opt.zero_grad(set_to_none=True)
    feats = model.encode(inputs)
    out = model.fuse(feats)
    loss = F.cross_entropy(out, y)
    u_a, u_v = _unimodal_from_concat(model, feats)
    score_a, score_v = _loop_prob_score(u_a, y), _loop_prob_score(u_v, y)
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:  # host sync: Python branch on a device value
        coeff_v, coeff_a = 1 - math.tanh(alpha * ratio_v.item()), 1.0
    else:
        coeff_a, coeff_v = 1 - math.tanh(alpha * ratio_a.item()), 1.0
    loss.backward()
    for enc, coeff in zip(model.encoders, (coeff_a, coeff_v)):
        for p in enc.parameters():
            if p.grad is not None and p.grad.dim() in weight_dims:
                std = p.grad.std().item() + 1e-8  # one sync per tensor
                p.grad = p.grad * coeff + torch.zeros_like(p.grad).normal_(0, std)
    opt.step()
    return loss.detach()


def opm_step(model, inputs, y, opt, *, q_base=0.5, lam=0.5, p_exe=0.7, rng=random):
    """OPM (TPAMI code): looped scores from undropped features with the head's detached weights, q per modality with
    a Python branch (q not detached), per-sample Bernoulli keep masks, rows with nothing kept removed (dynamic shape),
    all features rescaled by 1 / (1 - theta), theta = sum d_m q_m / sum d_m."""
    opt.zero_grad(set_to_none=True)
    feats = model.encode(inputs)
    M = len(feats)
    w, b = model.head.weight.detach(), model.head.bias.detach()
    scores, start = [], 0
    for f in feats:
        d = f.shape[1]
        scores.append(_loop_prob_score(f @ w[:, start : start + d].t() + b / M, y))
        start += d
    q = []
    for m in range(M):
        rho = sum(scores[m] / scores[j] for j in range(M) if j != m) / (M - 1)
        if rho > 1:  # host sync
            q.append(torch.clamp(q_base * (1 + lam * torch.tanh(torch.relu(rho - 1))), 0, 1))
        else:
            q.append(torch.zeros((), device=y.device))
    if rng.random() < p_exe:
        keeps = [torch.bernoulli((1 - q[m]).expand(y.shape[0])) for m in range(M)]
        alive = torch.stack(keeps).sum(0) > 0
        widths = [f.shape[1] for f in feats]
        theta = sum(d * qm for d, qm in zip(widths, q)) / sum(widths)
        feats = [f[alive] * k[alive, None] / (1 - theta) for f, k in zip(feats, keeps)]  # boolean index: sync
        y = y[alive]
    loss = F.cross_entropy(model.fuse(feats), y)
    loss.backward()
    opt.step()
    return loss.detach()


def _shapley_weight(M, size):
    """Weight of v(S) for |S| = size in phi_m (m in S: +, m not in S: - with size+1): |S|!(M-|S|-1)!/M!."""
    return math.factorial(size) * math.factorial(M - size - 1) / math.factorial(M)


class AGMState:
    def __init__(self, M):
        self.s_hat = [0.0] * M
        self.steps = 0


def subset_values(model, inputs):
    """v(S) for every non-empty subset S (frozensets): the full model on the inputs, then once more per muted subset
    (the other inputs zeroed) in eval mode with autograd on, as the authors' AGM code."""
    M = len(inputs)
    full = model(inputs)
    was_training = model.training
    model.eval()
    values = {frozenset(range(M)): full}
    for size in range(1, M):
        for subset in combinations(range(M), size):
            muted = [x if m in subset else torch.zeros_like(x) for m, x in enumerate(inputs)]
            values[frozenset(subset)] = model(muted)
    model.train(was_training)
    return values


def shapley_phis(values, M):
    """phi_m = sum over S not containing m of w(|S|) (v(S + m) - v(S)), v(empty) = 0 (AGM Eq. 1-3), as a Python sum."""
    full = values[frozenset(range(M))]
    zero = torch.zeros_like(full)
    phis = []
    for m in range(M):
        phi = 0
        others = [j for j in range(M) if j != m]
        for size in range(0, M):
            for rest in combinations(others, size):
                with_m = values[frozenset(rest) | {m}]
                without = values[frozenset(rest)] if rest else zero
                phi = phi + _shapley_weight(M, size) * (with_m - without)
        phis.append(phi)
    return phis


def agm_step(model, inputs, y, opt, state: AGMState, *, alpha=1.0, clip=10.0):
    """AGM (ICCV 2023 code): the full model again on every muted subset (zeroed raw inputs) in eval mode with
    autograd on; Shapley responses; looped CE scores read back as floats; kappa in Python; gradient hooks."""
    M = len(inputs)
    opt.zero_grad(set_to_none=True)
    phis = shapley_phis(subset_values(model, inputs), M)
    s = [_loop_ce_score(phi.detach(), y) for phi in phis]
    mean_s = sum(s) / M
    r = [math.exp(M / (M - 1) * (mean_s - s_m)) for s_m in s]
    if state.steps > 0:
        mean_hat = sum(state.s_hat) / M
        tau = [math.exp(M / (M - 1) * (mean_hat - h)) for h in state.s_hat]
    else:
        tau = r
    kappa = [math.exp(alpha * min(t - rr, clip)) for t, rr in zip(tau, r)]
    state.steps += 1
    state.s_hat = [h + (s_m - h) / state.steps for h, s_m in zip(state.s_hat, s)]
    for phi, k in zip(phis, kappa):
        phi.register_hook(lambda g, k=k: g * k)
    loss = F.cross_entropy(sum(phis), y)
    loss.backward()
    if model.head.weight.grad.abs().max() > 1:  # authors clip when a head grad leaves [-1, 1] (a sync)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


def mlb_step(model, uni_heads, inputs, y, opt, *, alpha=0.8, beta_max=2.0):
    """MLB (Kontras et al. code): multi-loss with per-encoder heads; k_m from batch-mean scores; after backward every
    gradient of encoder m, head m and fusion slice m multiplied by k_m read back per parameter tensor."""
    M = len(inputs)
    opt.zero_grad(set_to_none=True)
    feats = model.encode(inputs)
    fused = model.fuse(feats)
    uni = [h(f) for h, f in zip(uni_heads, feats)]
    loss = F.cross_entropy(fused, y) + sum(F.cross_entropy(u, y) for u in uni)
    rows = torch.arange(y.shape[0], device=y.device)
    s = [F.softmax(u.detach(), dim=1)[rows, y].mean() for u in uni]
    k = []
    for m in range(M):
        r = sum(s[j] / s[m] for j in range(M) if j != m) / (M - 1)
        beta = beta_max if r > 1 else 2.0  # host sync
        k.append(1 + (beta - 1) * torch.tanh(alpha * (r - 1)))
    loss.backward()
    start = 0
    for m in range(M):
        for p in list(model.encoders[m].parameters()) + list(uni_heads[m].parameters()):
            if p.grad is not None:
                p.grad.mul_(k[m].item())  # one sync per parameter tensor
        d = feats[m].shape[1]
        model.head.weight.grad[:, start : start + d].mul_(k[m].item())
        start += d
    opt.step()
    return loss.detach()


def pmr_prototypes(model, inputs, y, num_classes):
    """Class means of each modality's features (no grad, eval mode): the prototypes the step below uses."""
    model.eval()
    with torch.no_grad():
        feats = model.encode(inputs)
    model.train()
    return [
        torch.stack([f[y == k].mean(0) if (y == k).any() else torch.zeros_like(f[0]) for k in range(num_classes)])
        for f in feats
    ]


def pmr_step(model, inputs, y, opt, protos, *, alpha=1.0):
    """PMR (Fan et al. code), two modalities: distances ||z_i - P_k|| by a Python double loop over rows and classes
    (B x C tiny ops), p = softmax(-d), scores summed over rows one at a time, the switch `if ratio > 1` on the host
    (a sync), PCE on the weaker modality added to the fused CE."""
    opt.zero_grad(set_to_none=True)
    feats = model.encode(inputs)
    loss = F.cross_entropy(model.fuse(feats), y)
    scores, pces = [], []
    for f, P in zip(feats, protos):
        d = torch.stack(
            [
                torch.stack([torch.sqrt(((f[i] - P[k]) ** 2).sum()) for k in range(P.shape[0])])
                for i in range(f.shape[0])
            ]
        )
        logp = F.log_softmax(-d, dim=1)
        total = 0.0
        for i in range(y.shape[0]):
            total = total + logp[i][y[i]].exp()
        scores.append(total)
        pces.append(F.nll_loss(logp, y))
    ratio = (scores[0] / scores[1]).item()
    if ratio > 1:
        loss = loss + alpha * pces[1]
    elif ratio < 1:
        loss = loss + alpha * pces[0]
    loss.backward()
    opt.step()
    return loss.detach()


def mmpareto_step(model, uni_heads, inputs, y, opt, *, gamma=1.5):
    """MMPareto (Wei & Hu code): backward of the multimodal loss and of each unimodal loss in turn (retain_graph),
    cloning and clearing the encoder gradients in between; per encoder the three inner products read back on the host
    (`if cos > 0`, the two-objective solver on CPU), a fourth backward of the summed loss, then per tensor the
    combination and `if r > 1` (one sync per tensor) before the step."""
    opt.zero_grad(set_to_none=True)
    feats = model.encode(inputs)
    loss_mm = F.cross_entropy(model.fuse(feats), y)
    losses = [F.cross_entropy(h(f), y) for h, f in zip(uni_heads, feats)]
    enc = [list(e.parameters()) for e in model.encoders]

    def take(ps):
        out = [p.grad.clone() for p in ps]
        for p in ps:
            p.grad = None
        return out

    loss_mm.backward(retain_graph=True)
    g_mm = [take(ps) for ps in enc]
    g_u = []
    for k, loss in enumerate(losses):
        loss.backward(retain_graph=True)
        g_u.append(take(enc[k]))
    opt.zero_grad(set_to_none=True)
    (loss_mm + sum(losses)).backward()
    for ps, new in zip(enc, mmpareto_combine_loop(g_mm, g_u, gamma=gamma)):
        for p, g in zip(ps, new):
            p.grad = g
    opt.step()
    return loss_mm.detach()


def mmpareto_combine_loop(g_mm, g_u, *, gamma=1.5):
    """The authors' combination, encoder by encoder: the three inner products read back on the host (`if cos > 0`,
    the solver on the CPU), then per tensor h, the norm ratio and `if r > 1` (one sync per tensor). Returns the new
    gradients, one list per encoder."""
    out = []
    for gm, gu in zip(g_mm, g_u):
        a = sum((g * g).sum() for g in gm).cpu()
        b = sum((g * u).sum() for g, u in zip(gm, gu)).cpu()
        c = sum((u * u).sum() for u in gu).cpu()
        cos = b / (a * c).sqrt()
        if cos > 0:
            out.append([gamma * (g + u) for g, u in zip(gm, gu)])
            continue
        w_m = 0.999 if b >= a else (0.001 if b >= c else float((c - b) / (a + c - 2 * b)))
        w_u = 1 - w_m
        new = []
        for g, u in zip(gm, gu):
            h = 2 * (w_m * g + w_u * u)
            r = (g + u).norm() / h.norm()
            new.append(gamma * (h * r if r.item() > 1 else h))
        out.append(new)
    return out
