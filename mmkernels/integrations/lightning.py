"""PyTorch Lightning: BalancerCallback runs any balancer with a LightningModule in automatic optimization.

The LightningModule holds the balancer as a submodule (so .train()/.eval(), .to() and checkpoints follow it) and
follows the model contract itself (`encoders`, `fuse`, optional `unimodal_logits`); its training_step returns
`self.balancer(self, inputs, labels).loss`. The callback runs the rest of the protocol (README "The protocol";
docs/integrations/lightning.md):

- on_before_optimizer_step (after the last micro-batch's backward; under a GradScaler after the precision plugin's
  unscale_): bal.before_optimizer_step(grad_divisor=the scaler's scale tensor, no host read);
- on_train_batch_end of a batch that stepped the optimizer: bal.step() (the step counter counts optimizer steps,
  whatever accumulate_grad_batches is; nothing when the balancer got optimizer=, its hook does it);
- on_train_epoch_start: bal.epoch_start(module, epoch, the trainer's train dataloader);
- on_train_batch_end of the epoch's last batch (before validation and before a checkpoint of that epoch is saved):
  bal.epoch_end(module, epoch, the train dataloader, the val dataloader(s)).

The dataloaders reach the epoch hooks through the trainer's own input pipeline (precision conversion, the batch
transfer hooks, the strategy's device). Needs `lightning` (`pip install mmkernels[lightning]`).
"""

from __future__ import annotations

try:
    import lightning.pytorch as pl
except ImportError as exc:  # the optional dependency
    raise ImportError(
        "mmkernels.integrations.lightning needs PyTorch Lightning (the `lightning` package): "
        "pip install mmkernels[lightning]"
    ) from exc

import torch

from mmkernels.api import OLM, Balancer, SampleValuation

__all__ = ["BalancerCallback", "find_balancer"]


def find_balancer(module: torch.nn.Module, name: str | None = None) -> Balancer:
    """The one balancer among module's submodules (or the submodule called `name`); a clear error when there is
    none or there are several."""
    if name is not None:
        try:
            found = module.get_submodule(name)
        except AttributeError:
            found = None
        if not isinstance(found, Balancer):
            raise ValueError(
                f"{type(module).__name__} has no balancer called {name!r} "
                f"(got {type(found).__name__ if found is not None else 'nothing'})"
            )
        return found
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, Balancer)]
    if not found:
        raise ValueError(
            f"BalancerCallback: {type(module).__name__} holds no mmkernels balancer. Assign one as a submodule in "
            f"__init__ (self.balancer = OGMGE(num_modalities)) and return self.balancer(self, inputs, labels).loss "
            f"from training_step (docs/integrations/lightning.md)"
        )
    if len(found) > 1:
        raise ValueError(
            f"BalancerCallback: {type(module).__name__} holds {len(found)} balancers "
            f"({', '.join(n or '<the module itself>' for n, _ in found)}); one balancer runs one training step: keep "
            f"one, or pass BalancerCallback(name=...) to select the one this callback drives"
        )
    return found[0][1]


def _grad_divisor(trainer, optimizer):
    """What .grad was divided by since backward: the precision plugin's GradScaler scale (the device tensor, no host
    read) once the plugin has unscaled this optimizer's gradients, else None (no scaler, bf16, or an optimizer that
    unscales inside its own step)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    opt = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch optimizer
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is not None:
        from torch.amp.grad_scaler import OptState

        state = states.get(id(opt))  # .get: the defaultdict creates nothing
        if state is None or state["stage"] is not OptState.UNSCALED:
            return None
    return scaler._scale


class _Batches:
    """A re-iterable view of one or more dataloaders whose batches go through the trainer's input pipeline (as its
    training and validation batches do): precision conversion, on_before_batch_transfer, the strategy's
    batch_to_device (transfer_batch_to_device, on_after_batch_transfer)."""

    def __init__(self, loaders: list, trainer, module):
        self.loaders, self.trainer, self.module = loaders, trainer, module

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)

    def __iter__(self):
        trainer, module = self.trainer, self.module
        for idx, loader in enumerate(self.loaders):
            for batch in loader:
                batch = trainer.precision_plugin.convert_input(batch)
                hook = getattr(module, "_on_before_batch_transfer", None)
                batch = hook(batch, dataloader_idx=idx) if hook is not None else batch
                yield trainer.strategy.batch_to_device(batch, dataloader_idx=idx)


def _loaders(source) -> list:
    """The trainer's train_dataloader / val_dataloaders (one loader, a list, or a dict of them) as a list."""
    if source is None:
        return []
    if isinstance(source, dict):
        return list(source.values())
    if isinstance(source, (list, tuple)):
        return list(source)
    return [source]


class BalancerCallback(pl.Callback):
    """Runs the balancer that a LightningModule holds through the protocol's per-step and per-epoch hooks (module
    docstring; docs/integrations/lightning.md).

        class Lit(lightning.LightningModule):           # follows the model contract itself
            def __init__(self):
                super().__init__()
                self.encoders = nn.ModuleList([audio_net, visual_net])
                self.head = nn.Linear(2 * 512, num_classes)
                self.balancer = mmkernels.OGMGE(2)      # a submodule: train/eval, .to(), checkpoints
            def fuse(self, feats):
                return self.head(torch.cat(feats, 1))
            def training_step(self, batch, batch_idx):
                inputs, labels = batch
                return self.balancer(self, inputs, labels).loss

        lightning.Trainer(callbacks=[BalancerCallback()], accumulate_grad_batches=2).fit(Lit(), loader)

    name: the balancer's submodule name, needed only when the module holds several. model: the submodule name of
    the model the balancer runs on, when not the LightningModule itself (what training_step passes as model).
    val_batches: a re-iterable of held-out batches for epoch_end (OLM), used instead of the trainer's validation
    dataloaders (which Lightning sets up only when the module has a validation_step).
    """

    def __init__(self, *, name: str | None = None, model: str | None = None, val_batches=None):
        super().__init__()
        self.name, self.model_name, self.val_batches = name, model, val_batches
        self.balancer: Balancer | None = None
        self._stepped = False  # before_optimizer_step ran; step() at the end of this batch

    # ---------------------------------------------------------------- setup
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self.balancer = find_balancer(pl_module, self.name)
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "BalancerCallback needs automatic optimization; under manual optimization call "
                "bal.before_optimizer_step() after the step's last backward and bal.step() after optimizer.step() "
                "in training_step yourself"
            )
        model = self._model(pl_module)
        if getattr(model, "encoders", None) is None or not callable(getattr(model, "fuse", None)):
            raise TypeError(
                f"BalancerCallback: {type(model).__name__} must follow the balancer protocol's model contract: "
                f"`encoders` (M callables) and `fuse(feats)` (README: The protocol); pass BalancerCallback(model=...) "
                f"when training_step runs the balancer on a submodule"
            )
        rows = getattr(self.balancer, "_rows_dataset", None)
        if (
            isinstance(self.balancer, SampleValuation)
            and rows is not None
            and trainer.reload_dataloaders_every_n_epochs != 1
        ):
            raise ValueError(
                f"{type(self.balancer).__name__}(rows=...) serves new rows every epoch (the dataset grows): build the "
                f"Trainer with reload_dataloaders_every_n_epochs=1 so that each epoch's DataLoader (its length, a "
                f"DistributedSampler) sees them"
            )
        self._stepped = False

    def _model(self, pl_module):
        return pl_module if self.model_name is None else pl_module.get_submodule(self.model_name)

    def _val_batches(self, trainer, pl_module):
        if self.val_batches is not None:
            return self.val_batches
        if trainer.val_dataloaders is None:  # no sanity check ran: set the validation data up now
            val_loop = trainer.fit_loop.epoch_loop.val_loop
            if trainer.limit_val_batches != 0 and hasattr(val_loop, "setup_data"):
                val_loop.setup_data()
        loaders = _loaders(trainer.val_dataloaders)
        return _Batches(loaders, trainer, pl_module) if loaders else None

    # ---------------------------------------------------------------- the protocol's hooks
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        train = _Batches(_loaders(trainer.train_dataloader), trainer, pl_module)
        with trainer.precision_plugin.val_step_context():  # no-grad eval passes (PMR's refresh), as validation
            self.balancer.epoch_start(self._model(pl_module), trainer.current_epoch, train)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.balancer.before_optimizer_step(grad_divisor=_grad_divisor(trainer, optimizer))
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._stepped:
            self._stepped = False
            if not self.balancer.steps_with_optimizer:
                self.balancer.step()
        n = trainer.num_training_batches
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or (n != float("inf") and batch_idx + 1 >= n)
        if last and type(self.balancer).epoch_end is not Balancer.epoch_end:  # the base hook does nothing
            train = _Batches(_loaders(trainer.train_dataloader), trainer, pl_module)
            val = self._val_batches(trainer, pl_module)
            if val is None and isinstance(self.balancer, OLM):
                raise ValueError(
                    "OLM refits w after each epoch from the branches' train and held-out losses: give the "
                    "LightningModule (or DataModule) a val_dataloader and a validation_step (limit_val_batches > 0), "
                    "or pass BalancerCallback(val_batches=...)"
                )
            with trainer.precision_plugin.val_step_context():
                self.balancer.epoch_end(self._model(pl_module), trainer.current_epoch, train, val)
