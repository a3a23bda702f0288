"""Training, evaluation and the linear probe of the demo."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import AVSplits
from .methods import make_method
from .models import ConcatClassifier, build_model, MLPEncoder, SyntheticResNetEncoder
from .timing import StepTimer


@dataclass
class DemoConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    backbone: str = "mlp"
    device: str = "cpu"
    trace_every: int = 10
    warmup_steps: int = 20         # excluded from the step timing (first-call costs)
    probe_iters: int = 100


@dataclass
class RunResult:
    method: str
    seed: int
    fused_acc: float
    modality_acc: list             # linear-probe accuracy of each encoder (frozen), on the test split
    ms_per_step: float
    balance_share: float
    trace_steps: list = field(default_factory=list)
    ratio_trace: list = field(default_factory=list)   # [n_trace][M] (what each method calls its ratio)
    coef_trace: list = field(default_factory=list)    # [n_trace][M] (its coefficient)


def _batches(n, batch_size, steps, seed, device):
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            if done >= steps:
                return
            yield perm[i:i + batch_size].to(device)
            done += 1


def _inputs(data, idx=None):
    if idx is None:
        return [data.audio, data.visual], data.labels
    return [data.audio[idx], data.visual[idx]], data.labels[idx]


@torch.no_grad()
def _features(encoder, x, chunk=1024):
    return torch.cat([encoder(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])


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


def _encoder_for(cfg, in_dim, channels, seed):
    if cfg.backbone == "mlp":
        return MLPEncoder(in_dim)
    return SyntheticResNetEncoder(in_dim, channels, 64, seed)


def train_unimodal(splits: AVSplits, modality: int, seed: int, cfg: DemoConfig, on_step=None) -> RunResult:
    """The encoder of one modality trained alone (encoder + linear head), the reference each modality's
    accuracy under joint training is compared with."""
    dev = torch.device(cfg.device)
    tr, te = splits.train.to(dev), splits.test.to(dev)
    torch.manual_seed(seed)
    dims = (tr.audio.shape[1], tr.visual.shape[1])
    enc = _encoder_for(cfg, dims[modality], (1, 3)[modality], seed + (101, 202)[modality])
    model = ConcatClassifier([enc], splits.num_classes).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    timer = StepTimer(dev)
    x_tr = (tr.audio, tr.visual)[modality]
    model.train()
    for step, idx in enumerate(_batches(len(tr), cfg.batch_size, cfg.steps, seed, dev)):
        timer.skip(step < min(cfg.warmup_steps, cfg.steps // 4))  # short runs still time 3/4 of their steps
        with timer.step():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model([x_tr[idx]]), tr.labels[idx])
            loss.backward()
            opt.step()
        if on_step:
            on_step(step)
    x_te = (te.audio, te.visual)[modality]
    model.eval()
    with torch.no_grad():
        acc = (model([x_te]).argmax(1) == te.labels).float().mean().item()  # sync-ok: evaluation
    probe = linear_probe_accuracy(enc, x_tr, tr.labels, x_te, te.labels, splits.num_classes, iters=cfg.probe_iters, seed=seed)
    accs = [float("nan"), float("nan")]
    accs[modality] = probe
    t = timer.summary()
    return RunResult(("audio alone", "visual alone")[modality], seed, acc, accs, t["ms_per_step"], 0.0)


def train_method(splits: AVSplits, method: str, seed: int, cfg: DemoConfig, on_step=None) -> RunResult:
    """Joint training of the two-encoder concat classifier with one balancing method (or none: "joint")."""
    dev = torch.device(cfg.device)
    tr, dv, te = splits.train.to(dev), splits.dev.to(dev), splits.test.to(dev)
    torch.manual_seed(seed)
    model = build_model(cfg.backbone, tr.audio.shape[1], tr.visual.shape[1], splits.num_classes, seed=seed).to(dev)
    runner = make_method(method, model, num_classes=splits.num_classes, seed=seed, total_steps=cfg.steps)
    opt = torch.optim.SGD(runner.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    timer = StepTimer(dev)
    steps_seen, ratios, coefs = [], [], []
    model.train()
    for step, idx in enumerate(_batches(len(tr), cfg.batch_size, cfg.steps, seed, dev)):
        inputs, y = _inputs(tr, idx)
        timer.skip(step < min(cfg.warmup_steps, cfg.steps // 4))  # short runs still time 3/4 of their steps
        with timer.step():
            runner.step(inputs, y, opt, timer)
        if step % cfg.trace_every == 0 or step == cfg.steps - 1:
            r, c = runner.trace(inputs, y)   # device tensors, read back after training
            steps_seen.append(step)
            ratios.append(r)
            coefs.append(c)
        runner.end_step(step, lambda: _split_losses(runner, tr, dv))
        if on_step:
            on_step(step)
    model.eval()
    inputs, y = _inputs(te)
    with torch.no_grad():
        fused = (runner.eval_logits(inputs).argmax(1) == y).float().mean().item()  # sync-ok: evaluation
    probes = [linear_probe_accuracy(model.encoders[m], (tr.audio, tr.visual)[m], tr.labels, inputs[m], y,
                                    splits.num_classes, iters=cfg.probe_iters, seed=seed) for m in range(2)]
    t = timer.summary()
    ratio_trace = [r.tolist() if r is not None else None for r in ratios]  # sync-ok: after training
    coef_trace = [c.tolist() if c is not None else None for c in coefs]    # sync-ok: after training
    return RunResult(method, seed, fused, probes, t["ms_per_step"], t["balance_share"], steps_seen, ratio_trace, coef_trace)


@torch.no_grad()
def _split_losses(runner, tr, dev_split, n=1024):
    """Per-modality unimodal CE losses on (a slice of) the train and the held-out split, for OLM's evaluation hook."""
    out = []
    for data in (tr, dev_split):
        inputs, y = _inputs(data, torch.arange(min(n, len(data)), device=data.labels.device))
        out.append(runner.unimodal_losses(inputs, y))
    return out
