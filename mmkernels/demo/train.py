"""Training, evaluation, the linear probe and the diagnostics of the demo, for any number of views."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..metrics import competition_strengths, unimodal_accuracy
from .data import Splits
from .methods import make_method
from .models import ConcatClassifier, build_model, make_encoder
from .timing import StepTimer


@dataclass
class DemoConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "sgd"  # sgd (lr, momentum) | adam | adamw (adaptive_lr)
    adaptive_lr: float = 1e-3
    backbone: str = "mlp"
    device: str = "cpu"
    trace_every: int = 10
    warmup_steps: int = 20  # excluded from the step timing (first-call costs)
    probe_iters: int = 100


@dataclass
class RunResult:
    method: str
    seed: int
    fused_acc: float
    modality_acc: list  # [M] linear-probe accuracy of each encoder (frozen), on the test split
    ms_per_step: float
    balance_share: float
    trace_steps: list = field(default_factory=list)
    ratio_trace: list = field(default_factory=list)  # [n_trace][M] (what each method calls its ratio)
    coef_trace: list = field(default_factory=list)  # [n_trace][M] (its coefficient)
    peak_mib: float = float("nan")  # peak CUDA memory of the training loop (nan on CPU)
    unimodal_acc: list = field(default_factory=list)  # [M] accuracy of each view's unimodal logits u_m, test split
    competition: list | None = None  # [M] AGM competition strength d^m (None: no alone runs)
    update_ratio: list | None = None  # [M] mean over probe steps of the update-norm ratio achieved (parameter mode)
    update_coef: list | None = None  # [M] mean coefficient k_m over the same steps


def _batches(n, batch_size, steps, seed, device):
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            if done >= steps:
                return
            yield perm[i : i + batch_size].to(device)
            done += 1


def _inputs(data, idx=None):
    """(list of M view tensors [B, D_m], labels [B]) of the rows idx (all rows when None)."""
    if idx is None:
        return list(data.views), data.labels
    return [x[idx] for x in data.views], data.labels[idx]


@torch.no_grad()
def _features(encoder, x, chunk=1024):
    return torch.cat([encoder(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])


def linear_probe_accuracy(encoder, x_train, y_train, x_test, y_test, num_classes, *, iters=100, seed=0):
    """Accuracy of a multinomial logistic regression (L-BFGS, small L2) on the frozen, standardised features."""
    encoder.eval()
    f_tr, f_te = _features(encoder, x_train).float(), _features(encoder, x_test).float()
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    f_tr, f_te = (f_tr - mu) / sd, (f_te - mu) / sd
    torch.manual_seed(seed)
    lin = torch.nn.Linear(f_tr.shape[1], num_classes).to(f_tr.device)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(f_tr), y_train) + 1e-4 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (lin(f_te).argmax(1) == y_test).float().mean().item()  # sync-ok: evaluation, after training


def make_optimizer(params, cfg: DemoConfig):
    """SGD with momentum (the default, the papers'), or Adam / AdamW at cfg.adaptive_lr (same weight decay)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    return cls(params, lr=cfg.adaptive_lr, weight_decay=cfg.weight_decay)


def _peak_start(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_mib(dev):
    """Peak CUDA memory allocated since _peak_start, in MiB; nan on CPU."""
    return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan")


def train_unimodal(splits: Splits, modality: int, seed: int, cfg: DemoConfig, on_step=None):
    """The encoder of one view trained alone (encoder + linear head, the joint run's settings): the reference each
    view's accuracy under joint training is compared with, and its mono-modal concept (AGM Sec. 3.2.1, late fusion).

    Returns (RunResult, concept): concept = (logits on the dev split [N_dev, K], logits on the test split [N_test, K]).
    """
    dev = torch.device(cfg.device)
    tr, dv, te = splits.train.to(dev), splits.dev.to(dev), splits.test.to(dev)
    torch.manual_seed(seed)
    enc = make_encoder(cfg.backbone, splits.dims[modality], modality, seed=seed)
    model = ConcatClassifier([enc], splits.num_classes).to(dev)
    opt = make_optimizer(model.parameters(), cfg)
    timer = StepTimer(dev)
    x_tr = tr.views[modality]
    model.train()
    _peak_start(dev)
    for step, idx in enumerate(_batches(len(tr), cfg.batch_size, cfg.steps, seed, dev)):
        timer.skip(step < min(cfg.warmup_steps, cfg.steps // 4))  # short runs still time 3/4 of their steps
        with timer.step():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model([x_tr[idx]]), tr.labels[idx])
            loss.backward()
            opt.step()
        if on_step:
            on_step(step)
    peak = _peak_mib(dev)
    x_te = te.views[modality]
    model.eval()
    with torch.no_grad():
        concept = (_logits(model, [dv.views[modality]]), _logits(model, [x_te]))
        acc = (concept[1].argmax(1) == te.labels).float().mean().item()  # sync-ok: evaluation
    probe = linear_probe_accuracy(
        enc, x_tr, tr.labels, x_te, te.labels, splits.num_classes, iters=cfg.probe_iters, seed=seed
    )
    accs = [float("nan")] * len(splits.names)
    accs[modality] = probe
    uni = [float("nan")] * len(splits.names)
    uni[modality] = acc
    t = timer.summary()
    result = RunResult(
        f"{splits.names[modality]} alone", seed, acc, accs, t["ms_per_step"], 0.0, peak_mib=peak, unimodal_acc=uni
    )
    return result, concept


def train_method(splits: Splits, method: str, seed: int, cfg: DemoConfig, on_step=None, concepts=None) -> RunResult:
    """Joint training of the M-encoder concat classifier with one balancing method (or none: "joint").

    concepts: None, or per view the (dev, test) logits of its encoder trained alone (train_unimodal), for AGM's
    competition strength d^m (fitted on the dev split, measured on the test split).
    """
    dev = torch.device(cfg.device)
    tr, dv, te = splits.train.to(dev), splits.dev.to(dev), splits.test.to(dev)
    torch.manual_seed(seed)
    model = build_model(cfg.backbone, splits.dims, splits.num_classes, seed=seed).to(dev)
    runner = make_method(method, model, num_classes=splits.num_classes, seed=seed, total_steps=cfg.steps)
    opt = make_optimizer(runner.parameters(), cfg)
    runner.train_split, runner.batch_size = tr, cfg.batch_size
    runner.bind(opt)
    probing = hasattr(runner, "probe_next_step")
    timer = StepTimer(dev)
    steps_seen, ratios, coefs = [], [], []
    model.train()
    _peak_start(dev)
    for step, idx in enumerate(_batches(len(tr), cfg.batch_size, cfg.steps, seed, dev)):
        inputs, y = _inputs(tr, idx)
        probe = probing and step % cfg.trace_every == 0
        if probe:  # the achieved update ratio needs a counterfactual optimizer step: not timed
            runner.probe_next_step()
        timer.skip(probe or step < min(cfg.warmup_steps, cfg.steps // 4))  # short runs time 3/4 of their steps
        with timer.step():
            runner.step(inputs, y, opt, timer)
        if step % cfg.trace_every == 0 or step == cfg.steps - 1:
            r, c = runner.trace(inputs, y)  # device tensors, read back after training
            steps_seen.append(step)
            ratios.append(r)
            coefs.append(c)
        runner.end_step(step, lambda: _split_losses(runner, tr, dv))
        if on_step:
            on_step(step)
    peak = _peak_mib(dev)
    model.eval()
    inputs, y = _inputs(te)
    with torch.no_grad():
        fused = (runner.eval_logits(inputs).argmax(1) == y).float().mean().item()  # sync-ok: evaluation
        uni = unimodal_accuracy(runner.unimodal_logits(inputs), y).tolist()  # sync-ok: evaluation
    probes = [
        linear_probe_accuracy(
            model.encoders[m],
            tr.views[m],
            tr.labels,
            inputs[m],
            y,
            splits.num_classes,
            iters=cfg.probe_iters,
            seed=seed,
        )
        for m in range(len(inputs))
    ]
    strength = None
    if concepts is not None:
        with torch.no_grad():
            z_dev, z_test = _fused_features(model, dv.views), _fused_features(model, inputs)
        strength = competition_strengths(z_dev, [c[0] for c in concepts], z_test, [c[1] for c in concepts]).tolist()
    t = timer.summary()
    update_ratio = update_coef = None
    if probing and runner.achieved:
        update_ratio = torch.stack([r for r, _ in runner.achieved]).mean(0).tolist()  # sync-ok: after training
        update_coef = torch.stack([k for _, k in runner.achieved]).mean(0).tolist()  # sync-ok: after training
    ratio_trace = [r.tolist() if r is not None else None for r in ratios]  # sync-ok: after training
    coef_trace = [c.tolist() if c is not None else None for c in coefs]  # sync-ok: after training
    return RunResult(
        method,
        seed,
        fused,
        probes,
        t["ms_per_step"],
        t["balance_share"],
        steps_seen,
        ratio_trace,
        coef_trace,
        peak_mib=peak,
        unimodal_acc=uni,
        competition=strength,
        update_ratio=update_ratio,
        update_coef=update_coef,
    )


def _logits(model, views, chunk=1024):
    """model(views) in row chunks: [N, K]."""
    return torch.cat([model([x[i : i + chunk] for x in views]) for i in range(0, views[0].shape[0], chunk)])


def _fused_features(model, views, chunk=1024):
    """z: the concatenated encoder outputs, the input of the last classifier layer, [N, sum_m D_m]."""
    return torch.cat(
        [torch.cat(model.encode([x[i : i + chunk] for x in views]), 1) for i in range(0, views[0].shape[0], chunk)]
    )


@torch.no_grad()
def _split_losses(runner, tr, dev_split, n=1024):
    """Per-modality unimodal CE losses on (a slice of) the train and the held-out split, for OLM's evaluation hook."""
    out = []
    for data in (tr, dev_split):
        inputs, y = _inputs(data, torch.arange(min(n, len(data)), device=data.labels.device))
        out.append(runner.unimodal_losses(inputs, y))
    return out
