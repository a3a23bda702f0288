"""The one protocol of every balancer: the model contract, the step's output, and the generic training loop.

A training step, whatever the method (README "The protocol"):

    out = bal(model, inputs, labels)       # forward of one (micro-)batch -> StepOutput
    out.loss.backward()                    # any backward: GradScaler, Lightning, the HF Trainer, DDP
    bal.before_optimizer_step()            # once per optimizer step, after the last micro-batch's backward
    optimizer.step(); bal.step()           # bal.step() is automatic with optimizer=

plus bal.epoch_start(model, epoch, batches) before an epoch and bal.epoch_end(model, epoch, batches, val_batches)
after it. Inside bal(...) the hooks run in this order: encode -> transform_features -> fuse -> objective.

The model contract (stated once): `model.encoders`, M callables, encoder m maps inputs[m] [B, ...] to features
[B, D_m]; `model.fuse(feats)` maps the list of M features to the fused logits [B, C]; optional
`model.unimodal_logits(feats)` -> [M, B, C], the per-modality logits the balancers score (default: the fusion with
every other modality's features zeroed, `zero_out_unimodal_logits(model.fuse, feats)`; for a concatenation head
use `concat_unimodal_logits(feats, head)`, the papers' bias split).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterable

import torch

from .unimodal import zero_out_unimodal_logits


@dataclasses.dataclass
class StepOutput:
    """What bal(model, inputs, labels) returns.

    loss: the scalar this batch backpropagates (the method's objective: cross-entropy of the logits plus the
      method's own terms); logits: the prediction [B, C]; features: the M encoder outputs as fused;
      unimodal_logits: [M, B, C] when the method computed them (else None).
    """

    loss: torch.Tensor
    logits: torch.Tensor
    features: list
    unimodal_logits: torch.Tensor | None = None


def encoders_of(model, num_modalities: int) -> list:
    """model.encoders, checked: num_modalities callables."""
    encoders = getattr(model, "encoders", None)
    if encoders is None or not hasattr(model, "fuse"):
        raise TypeError(
            f"model must follow the balancer protocol: `model.encoders` (M callables) and `model.fuse(feats)` "
            f"(README: The protocol); {type(model).__name__} lacks "
            f"{'encoders' if encoders is None else 'fuse'}"
        )
    encoders = list(encoders)
    if len(encoders) != num_modalities:
        raise ValueError(f"len(model.encoders) must equal num_modalities={num_modalities}, got {len(encoders)}")
    return encoders


def check_inputs(inputs, num_modalities: int) -> list:
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(
            f"inputs must be a list of num_modalities={num_modalities} tensors, got {type(inputs).__name__}"
        )
    if len(inputs) != num_modalities:
        raise ValueError(f"len(inputs) must equal num_modalities={num_modalities}, got {len(inputs)}")
    return list(inputs)


def unimodal_logits(model, feats, *, detach: bool) -> torch.Tensor:
    """[M, B, C]: model.unimodal_logits(feats) if the model has it, else the zero-out fusion. detach: scores only
    (no graph)."""
    fn = getattr(model, "unimodal_logits", None)
    with torch.no_grad() if detach else torch.enable_grad() if torch.is_grad_enabled() else torch.no_grad():
        out = fn(feats) if fn is not None else zero_out_unimodal_logits(model.fuse, feats)
    if isinstance(out, (list, tuple)):
        out = torch.stack(list(out))
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[0] != len(feats):
        raise ValueError(
            f"model.unimodal_logits(feats) must return [M, B, C] (M = {len(feats)}), got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    return out.detach() if detach else out


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() for a pass (PMR's refresh, OLM's losses, the valuation pass), every submodule's own training
    flag restored afterwards."""
    modules = [model] if isinstance(model, torch.nn.Module) else []
    saved = [(sub, sub.training) for mod in modules for sub in mod.modules()]
    try:
        for mod in modules:
            mod.eval()
        yield
    finally:
        for sub, flag in saved:
            sub.training = flag


def split_batch(batch):
    """(inputs, labels) or (inputs, labels, extras: dict) -> (inputs, labels, extras)."""
    if isinstance(batch, dict):
        extras = {k: v for k, v in batch.items() if k not in ("inputs", "labels")}
        return batch["inputs"], batch["labels"], extras
    if not isinstance(batch, (list, tuple)) or len(batch) not in (2, 3):
        raise TypeError("a batch must be (inputs, labels), (inputs, labels, extras) or a dict with inputs, labels")
    return batch[0], batch[1], (batch[2] if len(batch) == 3 else {})


def unwrap(model):
    """The module behind DistributedDataParallel (the protocol's model), else model itself."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def train_step(model, balancer, optimizer, micro_batches, *, scaler=None) -> torch.Tensor:
    """One optimizer step over 1 or more micro-batches (gradient accumulation): each micro-batch's loss is divided
    by their number, so the accumulated gradient is that of their mean. Returns the mean loss (detached).
    Under DistributedDataParallel pass the DDP-wrapped model, whose module's forward(inputs, labels, **extras)
    returns balancer(module, inputs, labels, **extras): DDP syncs gradients only for a forward it runs; the
    micro-batches before the last run under no_sync()."""
    micro_batches = list(micro_batches)
    n = len(micro_batches)
    total = None
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    for j, batch in enumerate(micro_batches):
        inputs, labels, extras = split_batch(batch)
        with model.no_sync() if ddp and j < n - 1 else contextlib.nullcontext():  # DDP: one all-reduce per step
            out = model(inputs, labels, **extras) if ddp else balancer(model, inputs, labels, **extras)
            loss = out.loss / n
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    divisor = None
    if scaler is not None:
        scaler.unscale_(optimizer)
        divisor = scaler._scale  # the device tensor unscale_ divided by (get_scale() would read it on the host)
    balancer.before_optimizer_step(grad_divisor=divisor)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not balancer.steps_with_optimizer:
        balancer.step()
    return total


def fit(
    model,
    balancer,
    optimizer,
    train_batches: Iterable,
    *,
    epochs: int,
    accumulate: int = 1,
    scaler=None,
    val_batches: Iterable | None = None,
    on_epoch_end=None,
) -> list:
    """The generic loop: every balancer, changing only its constructor. train_batches / val_batches: re-iterable
    (a DataLoader or a list) of (inputs, labels[, extras]). accumulate: micro-batches per optimizer step.
    on_epoch_end(epoch, mean_loss): optional callback. Returns the mean training loss per epoch (host floats, read
    once per epoch)."""
    history = []
    for epoch in range(epochs):
        model.train()
        balancer.train()
        balancer.epoch_start(unwrap(model), epoch, train_batches)
        micro, losses = [], []
        for batch in train_batches:
            micro.append(batch)
            if len(micro) == accumulate:
                losses.append(train_step(model, balancer, optimizer, micro, scaler=scaler))
                micro = []
        if micro:
            losses.append(train_step(model, balancer, optimizer, micro, scaler=scaler))
        balancer.epoch_end(unwrap(model), epoch, train_batches, val_batches)
        mean = float(torch.stack(losses).mean()) if losses else float("nan")  # sync-ok: once per epoch
        history.append(mean)
        if on_epoch_end is not None:
            on_epoch_end(epoch, mean)
    return history
