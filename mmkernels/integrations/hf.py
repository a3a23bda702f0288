"""Hugging Face transformers: BalancedTrainer runs any balancer with the `transformers.Trainer`.

The model (an nn.Module; the Trainer's `model`) follows the model contract (`encoders`, `fuse`, optional
`unimodal_logits`) and holds the balancer as a submodule (`model.balancer = OGMGE(2)`), so `.train()`/`.eval()` and
`.to()` follow it. BalancedTrainer runs the protocol (README "The protocol"; docs/integrations/hf.md):

- compute_loss: `model.balancer(model, inputs, labels, **extras).loss` on the batch's M inputs (keys `inputs_0` ..
  `inputs_{M-1}`, or `input_keys=`, or one key `inputs` holding the list), its labels (`labels_key`, default
  "labels") and the extras the balancer takes (`keep`, `index` of the valuation balancers), under the accelerator's
  autocast; returns {"loss", "logits"} as the outputs for evaluation;
- training_step of the optimizer step's last micro-batch (after its backward, before the Trainer unscales and clips):
  bal.before_optimizer_step(); the gradients it modulates are the ones the Trainer clips and steps;
- on_optimizer_step: bal.step() (the step counter counts optimizer updates whatever gradient_accumulation_steps is;
  nothing when the balancer got optimizer=, its hook does it);
- on_epoch_begin: bal.epoch_start(model, epoch, the train dataloader's batches);
- on_step_end of the epoch's last optimizer step (before that step's evaluation and checkpoint): bal.epoch_end(model,
  epoch, the train batches, the eval dataset's batches);
- checkpoints: the balancers' state goes to `mmkernels_balancers.pt` beside the model's weights (safetensors cannot
  store a balancer's "_extra_state" dict) and comes back on resume_from_checkpoint and load_best_model_at_end.

Needs `transformers` and `accelerate` (`pip install mmkernels[hf]`).
"""

from __future__ import annotations

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # the optional dependency
    raise ImportError(
        "mmkernels.integrations.hf needs Hugging Face transformers and accelerate: pip install mmkernels[hf]"
    ) from exc

import contextlib
import inspect
import math
import os
from collections.abc import Mapping

import torch

from mmkernels.api import OLM, Balancer, SampleValuation, StepOutput, ValuationDataset
from mmkernels.api import protocol

__all__ = [
    "BALANCER_STATE_NAME",
    "BalancedTrainer",
    "EpochRows",
    "ProtocolCollator",
    "find_balancer",
    "load_balancer_states",
    "load_checkpoint",
]

BALANCER_STATE_NAME = "mmkernels_balancers.pt"  # {submodule name: balancer.state_dict()} in each checkpoint


# ---------------------------------------------------------------------------------------------------- balancers
def _balancers(model: torch.nn.Module) -> list:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Balancer) and n]


def find_balancer(model: torch.nn.Module, name: str | None = None) -> Balancer:
    """The one balancer among model's submodules (or the submodule called `name`); a clear error when there is none
    or there are several."""
    if name is not None:
        try:
            found = model.get_submodule(name)
        except AttributeError:
            found = None
        if not isinstance(found, Balancer):
            raise ValueError(
                f"{type(model).__name__} has no balancer called {name!r} "
                f"(got {type(found).__name__ if found is not None else 'nothing'})"
            )
        return found
    found = _balancers(model)
    if not found:
        raise ValueError(
            f"BalancedTrainer: {type(model).__name__} holds no mmkernels balancer. Assign one as a submodule of the "
            f"model (model.balancer = OGMGE(num_modalities)); BalancedTrainer runs it (docs/integrations/hf.md)"
        )
    if len(found) > 1:
        raise ValueError(
            f"BalancedTrainer: {type(model).__name__} holds {len(found)} balancers ({', '.join(n for n, _ in found)}); "
            f"one balancer runs one training step: keep one, or pass BalancedTrainer(balancer_name=...)"
        )
    return found[0][1]


def _check_contract(model) -> None:
    if getattr(model, "encoders", None) is None or not callable(getattr(model, "fuse", None)):
        raise TypeError(
            f"BalancedTrainer: {type(model).__name__} must follow the balancer protocol's model contract: `encoders` "
            f"(M callables) and `fuse(feats)` (README: The protocol), and hold the balancer as a submodule"
        )


def _ignore_load(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def _balancer_loads_deferred(model: torch.nn.Module):
    """While the Trainer loads the model's weights file (which holds no balancer entries), the balancers load
    nothing (a balancer refuses a state without its "_extra_state"); load_balancer_states() loads them afterwards."""
    bals = [b for _, b in _balancers(model)]
    for b in bals:
        b.__dict__["_load_from_state_dict"] = _ignore_load  # the instance's own, for this load only
    try:
        yield
    finally:
        for b in bals:
            b.__dict__.pop("_load_from_state_dict", None)


def _without_balancers(state_dict: dict, names: list) -> dict:
    prefixes = tuple(n + "." for n in names)
    return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}


def balancer_states(model: torch.nn.Module) -> dict:
    """{submodule name: state_dict()} of every balancer the model holds (what BALANCER_STATE_NAME stores)."""
    return {name: bal.state_dict() for name, bal in _balancers(model)}


def load_balancer_states(model: torch.nn.Module, checkpoint_dir: str, *, strict: bool = True) -> None:
    """Load BALANCER_STATE_NAME of a BalancedTrainer checkpoint into the balancers of `model` (every one of them;
    strict: the saved hyperparameters must equal the current ones)."""
    path = os.path.join(checkpoint_dir, BALANCER_STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: the checkpoint holds no balancer state (BalancedTrainer saves it there beside "
            f"the model's weights)"
        )
    states = torch.load(path, map_location="cpu", weights_only=True)
    found = dict(_balancers(model))
    if set(states) != set(found):
        raise ValueError(
            f"{path} holds the balancers {sorted(states)}, {type(model).__name__} holds {sorted(found)}: load it into "
            f"the model it was saved from"
        )
    for name, state in states.items():
        found[name].load_state_dict(state, strict=strict)


def load_checkpoint(model: torch.nn.Module, checkpoint_dir: str, *, strict: bool = True):
    """Load a BalancedTrainer checkpoint (or save_model() output) of a plain nn.Module into `model`: the weights
    (model.safetensors, or pytorch_model.bin) and the balancers' state (BALANCER_STATE_NAME). Returns
    load_state_dict's result."""
    weights = os.path.join(checkpoint_dir, "model.safetensors")
    if os.path.isfile(weights):
        import safetensors.torch

        state = safetensors.torch.load_file(weights, device="cpu")
    elif os.path.isfile(os.path.join(checkpoint_dir, "pytorch_model.bin")):
        state = torch.load(os.path.join(checkpoint_dir, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{checkpoint_dir} holds neither model.safetensors nor pytorch_model.bin")
    with _balancer_loads_deferred(model):
        result = model.load_state_dict(state, strict=strict)
    load_balancer_states(model, checkpoint_dir, strict=strict)
    return result


# ---------------------------------------------------------------------------------------------------- data
class ProtocolCollator:
    """A data_collator from the protocol's batches to the dict batch BalancedTrainer reads: items -> collate(items)
    = (inputs, labels[, extras]) -> {"inputs": [M tensors], "labels": labels, **extras}. collate: the protocol
    collate function (e.g. ValuationDataset.collate); None: items (x_1, ..., x_M, y) stacked by default_collate."""

    def __init__(self, collate=None):
        self.collate = collate

    def __call__(self, items) -> dict:
        if self.collate is None:
            data = torch.utils.data.default_collate(items)
            batch = (list(data[:-1]), data[-1])
        else:
            batch = self.collate(items)
        inputs, labels, extras = protocol.split_batch(batch)
        return {"inputs": list(inputs), "labels": labels, **extras}


class EpochRows(torch.utils.data.IterableDataset):
    """The rows of a ValuationDataset as an iterable dataset, for SampleValuation / ModalityValuation(rows=...) under
    the Trainer: each epoch serves every row installed for it (originals plus copies; the count changes per epoch),
    shuffled by (seed, epoch) when shuffle. The Trainer fixes the number of steps of an epoch of a dataset with a
    length when train() starts, which would drop the copies; an iterable epoch runs until its rows run out (the
    Trainer then needs max_steps). Under DataLoader workers each worker serves a share of the rows."""

    def __init__(self, rows: ValuationDataset, *, shuffle: bool = True, seed: int = 0):
        if not isinstance(rows, ValuationDataset):
            raise TypeError(f"rows must be a ValuationDataset, got {type(rows).__name__}")
        self.rows, self.shuffle, self.seed, self.epoch = rows, bool(shuffle), int(seed), 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer (through the accelerate dataloader)
        self.epoch = int(epoch)

    def __iter__(self):
        n = len(self.rows)
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        info = torch.utils.data.get_worker_info()
        if info is not None:
            order = order[info.id :: info.num_workers]
        for r in order.tolist():  # sync-ok: a CPU permutation of the dataset's rows, in the data loader
            yield self.rows[r]


class _Batches:
    """A re-iterable view of the Trainer's dataloaders for the epoch hooks: the underlying DataLoader's batches
    (the sampler's current epoch; under several processes this rank's shard) moved to the device as the Trainer moves
    its own, as the protocol's (inputs, labels, extras). Iterating the underlying loader leaves the accelerate
    wrapper's iteration count and the gradient state alone."""

    def __init__(self, loaders: list, trainer: "BalancedTrainer"):
        self.loaders, self.trainer = loaders, trainer

    def __len__(self) -> int:
        return sum(len(getattr(loader, "base_dataloader", loader)) for loader in self.loaders)

    def __iter__(self):
        for loader in self.loaders:
            for batch in getattr(loader, "base_dataloader", loader):
                yield self.trainer.protocol_batch(self.trainer._prepare_inputs(batch))


# ---------------------------------------------------------------------------------------------------- the trainer
class _ProtocolHooks(TrainerCallback):
    """The per-step and per-epoch hooks of the protocol (BalancedTrainer adds it; the module docstring says when)."""

    def __init__(self, trainer: "BalancedTrainer"):
        self.trainer = trainer
        self.epoch = None  # the epoch running (counted from the Trainer's, on resume too)
        self.ended = True  # epoch_end ran for self.epoch
        self.skip_start = False  # resumed mid-epoch: that epoch's epoch_start ran before the checkpoint
        self.sized = True  # the train dataloader has a length
        self.stopped = False  # a step of this epoch stopped the training (max_steps)

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.trainer._check_training()
        self.trainer._step_closed = False
        self.epoch, self.ended, self.stopped = None, True, False
        epoch = state.epoch or 0.0
        self.skip_start = state.global_step > 0 and not args.ignore_data_skip and epoch != math.floor(epoch)
        try:  # an epoch of a dataset with a length ends at a known step; an iterable one when its rows run out
            self.sized = len(train_dataloader) > 0
        except TypeError:
            self.sized = False

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.epoch = math.floor(state.epoch or 0.0) if self.epoch is None else self.epoch + 1
        self.ended, self.stopped = False, False
        if self.skip_start:  # its state (prototypes, epoch counter) came back with the checkpoint
            self.skip_start = False
            return
        self.trainer._epoch_start(self.epoch, train_dataloader)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer._step_closed:
            self.trainer._step_closed = False
            bal = self.trainer.balancer
            if not bal.steps_with_optimizer:
                bal.step()

    def on_step_end(self, args, state, control, train_dataloader=None, **kwargs):
        # the Trainer sets state.epoch = epoch + (batch + 1) / batches_in_epoch: epoch + 1 exactly at its last step,
        # which comes before this step's evaluation and checkpoint
        self.stopped = control.should_training_stop or control.should_epoch_stop  # max_steps (DefaultFlowCallback)
        if self.sized and not self.ended and state.epoch is not None and state.epoch >= self.epoch + 1:
            self.ended = True
            self.trainer._epoch_end(self.epoch, train_dataloader)

    def on_epoch_end(self, args, state, control, train_dataloader=None, **kwargs):
        # an iterable dataset's epoch ends when its rows run out; one cut by max_steps gets no epoch_end (neither
        # does an epoch of a dataset with a length that max_steps or a callback cut short)
        if not self.sized and not self.ended and not self.stopped:
            self.ended = True
            self.trainer._epoch_end(self.epoch, train_dataloader)


class BalancedTrainer(Trainer):
    """transformers.Trainer running the balancer that the model holds (module docstring; docs/integrations/hf.md).

        class AudioVisual(nn.Module):                     # the model contract: encoders + fuse
            def __init__(self):
                super().__init__()
                self.encoders = nn.ModuleList([audio_net, visual_net])
                self.head = nn.Linear(2 * 512, num_classes)
                self.balancer = mmkernels.OGMGE(2)        # a submodule: train/eval and .to() follow the model
            def fuse(self, feats):
                return self.head(torch.cat(feats, 1))

        # dataset items {"inputs_0": audio, "inputs_1": video, "labels": y}
        BalancedTrainer(model=AudioVisual(), args=TrainingArguments(...), train_dataset=data).train()

    Keyword arguments beyond the Trainer's:
      input_keys: the M batch keys of the inputs, in the order of model.encoders (default: "inputs_0" ..
        "inputs_{M-1}", or "inputs" when a batch has that key holding the list of M tensors, e.g. from
        ProtocolCollator);
      labels_key: the batch key of the labels (default "labels"; the default data collator renames "label" to it);
      extra_keys: the batch keys passed to the balancer as extras (default: the keywords its transform_features
        takes, `keep` and `index` for the valuation balancers; other keys are left out);
      balancer_name: the balancer's submodule name, needed only when the model holds several;
      val_batches: a re-iterable of held-out protocol batches ((inputs, labels[, extras])) for epoch_end (OLM),
        used instead of the eval dataset.
    With remove_unused_columns (the default) the keys above are the columns kept.
    """

    def __init__(
        self,
        *args,
        input_keys=None,
        labels_key: str = "labels",
        extra_keys=None,
        balancer_name: str | None = None,
        val_batches=None,
        **kwargs,
    ):
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "BalancedTrainer: the balancer's objective is the loss (bal(model, inputs, labels).loss); "
                "compute_loss_func cannot be combined with it"
            )
        self.input_keys = None if input_keys is None else list(input_keys)
        self.labels_key, self.balancer_name, self.val_batches = labels_key, balancer_name, val_batches
        self.extra_keys = None if extra_keys is None else list(extra_keys)
        self._cached_balancer = (None, None)
        self._step_closed = False  # before_optimizer_step ran; step() after optimizer.step()
        self._val_loaders = None
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            raise ValueError(
                "BalancedTrainer does not support DeepSpeed: its engine steps the optimizer inside backward, before "
                "the balancer's before_optimizer_step() could run"
            )
        if self.args.n_gpu > 1:
            raise ValueError(
                "BalancedTrainer does not support torch.nn.DataParallel (several GPUs in one process: the balancer "
                "would run in throw-away replicas); launch one process per GPU (torchrun, accelerate launch)"
            )
        self.loss_is_scaled_for_ga = False  # the balancer's loss is a per-batch mean: the Trainer divides it by k
        self.model_accepts_loss_kwargs = False  # the loss takes no num_items_in_batch
        if self.args.label_names is None:
            self.label_names = [labels_key]
        if self.model is not None:  # (with model_init the checks come at train())
            _check_contract(self._protocol_model())
            self._check_keys()
        self.add_callback(_ProtocolHooks(self))

    # ---------------------------------------------------------------- the model and the batches
    def _protocol_model(self, model=None) -> torch.nn.Module:
        """The module that follows the contract and holds the balancer (DDP, compile wrappers removed)."""
        model = self.model if model is None else model
        try:
            return self.accelerator.unwrap_model(model, keep_torch_compile=False)
        except TypeError:  # an accelerate without keep_torch_compile
            return self.accelerator.unwrap_model(model)

    @property
    def balancer(self) -> Balancer:
        """The balancer the model holds (found once per model)."""
        model = self._protocol_model()
        if self._cached_balancer[0] is not model:
            self._cached_balancer = (model, find_balancer(model, self.balancer_name))
        return self._cached_balancer[1]

    def _check_keys(self) -> None:
        m = self.balancer.num_modalities  # finds the balancer: a clear error when there is none, or several
        if self.input_keys is not None and len(self.input_keys) != m:
            raise ValueError(f"input_keys names {len(self.input_keys)} keys, the balancer has num_modalities={m}")

    def _extra_keys(self) -> list:
        if self.extra_keys is not None:
            return self.extra_keys
        params = list(inspect.signature(self.balancer.transform_features).parameters.values())[3:]
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [p.name for p in params if p.kind in kinds]

    def protocol_batch(self, batch) -> tuple:
        """A Trainer batch (a dict) as the protocol's (inputs: M tensors, labels, extras)."""
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"BalancedTrainer reads dict batches (keys inputs_0 .. inputs_{{M-1}} and labels, or input_keys=), got "
                f"{type(batch).__name__}; wrap a collate function that returns (inputs, labels[, extras]) in "
                f"ProtocolCollator"
            )
        m = self.balancer.num_modalities
        if self.input_keys is not None:
            keys = self.input_keys
        elif "inputs" in batch:
            keys = None
        else:
            keys = [f"inputs_{i}" for i in range(m)]
        wanted = ["inputs"] if keys is None else list(keys)
        missing = [k for k in wanted + [self.labels_key] if k not in batch]
        if missing:
            raise KeyError(
                f"BalancedTrainer: the batch lacks {missing} (it has {sorted(batch)}); name the inputs with "
                f"input_keys= and the labels with labels_key= (docs/integrations/hf.md)"
            )
        inputs = list(batch["inputs"]) if keys is None else [batch[k] for k in keys]
        extras = {k: batch[k] for k in self._extra_keys() if k in batch}
        return inputs, batch[self.labels_key], extras

    def _set_signature_columns_if_needed(self) -> None:
        """remove_unused_columns keeps the columns the balancer reads (the model's forward does not name them)."""
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            m = self.balancer.num_modalities
            keys = ["inputs", *(self.input_keys or [f"inputs_{i}" for i in range(m)]), self.labels_key]
            self._signature_columns = list(dict.fromkeys(self._signature_columns + keys + self._extra_keys()))

    # ---------------------------------------------------------------- the step
    def _run(self, model, inputs, labels, extras) -> StepOutput:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # DDP syncs the gradients of a forward it runs: the module's forward runs the balancer
            if type(model.module).forward is torch.nn.Module.forward:
                raise TypeError(
                    f"under DistributedDataParallel {type(model.module).__name__}.forward(inputs, labels, **extras) "
                    f"must return self.balancer(self, inputs, labels, **extras) (README: The protocol)"
                )
            out = model(inputs, labels, **extras)
        else:
            core = self._protocol_model(model)
            out = self.balancer(core, inputs, labels, **extras)
        if not isinstance(out, StepOutput):
            raise TypeError(f"the balancer step returned {type(out).__name__}, expected a StepOutput")
        return out

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """bal(model, inputs, labels, **extras).loss (the per-batch loss; the Trainer divides it by the number of
        micro-batches); for evaluation the outputs {"loss", "logits"}."""
        xs, labels, extras = self.protocol_batch(inputs)
        with self.accelerator.autocast():
            out = self._run(model, xs, labels, extras)
        if return_outputs:
            return out.loss, {"loss": out.loss, "logits": out.logits}
        return out.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step, then, after the backward of the optimizer step's last micro-batch (the Trainer marks
        it with sync_gradients) and before the Trainer unscales, clips and steps: bal.before_optimizer_step()."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            # nothing divided .grad since backward (a GradScaler's unscale_ comes with the Trainer's clipping, after
            # this): grad_divisor=None; MMPareto's share and .grad carry the same loss scale
            self.balancer.before_optimizer_step()
            self._step_closed = True
        return loss

    def _check_training(self) -> None:
        """At train(): the contract, the balancer's optimizer, the valuation rows' dataset."""
        _check_contract(self._protocol_model())
        self._check_keys()
        bal = self.balancer
        own = getattr(bal, "_optimizer", None)
        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's AcceleratedOptimizer wraps it
        if own is not None and own is not opt:
            raise ValueError(
                f"{type(bal).__name__} got optimizer= another optimizer than the Trainer's: build the optimizer "
                f"first, pass it to the balancer and to BalancedTrainer(optimizers=(optimizer, None))"
            )
        rows = getattr(bal, "_rows_dataset", None)
        if isinstance(bal, SampleValuation) and rows is not None and self.train_dataset is not None:
            if not isinstance(self.train_dataset, torch.utils.data.IterableDataset):
                raise ValueError(
                    f"{type(bal).__name__}(rows=...) serves new rows every epoch, but the Trainer fixes the steps of "
                    f"an epoch of a dataset with a length when train() starts (the copies would be dropped): train on "
                    f"EpochRows(rows) (an iterable epoch, with max_steps) instead"
                )

    # ---------------------------------------------------------------- the epochs
    @contextlib.contextmanager
    def _epoch_pass(self):
        """The epoch hooks' passes: under the accelerator's autocast (as the steps), leaving the random state as it
        was (iterating a DataLoader draws a seed: the training that follows, and a resumed run, see the same)."""
        dev = self.args.device
        devices = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"), self.accelerator.autocast():
            yield

    def _epoch_start(self, epoch: int, train_dataloader) -> None:
        if train_dataloader is not None and hasattr(train_dataloader, "set_epoch"):
            train_dataloader.set_epoch(epoch)  # the order this epoch trains on (the Trainer sets the same next)
        batches = _Batches([train_dataloader], self) if train_dataloader is not None else None
        with self._epoch_pass():
            self.balancer.epoch_start(self._protocol_model(), epoch, batches)

    def _val_batches(self):
        if self.val_batches is not None:
            return self.val_batches
        if self.eval_dataset is None:
            return None
        if self._val_loaders is None:
            if isinstance(self.eval_dataset, dict):
                self._val_loaders = [self.get_eval_dataloader(name) for name in self.eval_dataset]
            else:
                self._val_loaders = [self.get_eval_dataloader()]
        return _Batches(self._val_loaders, self)

    def _epoch_end(self, epoch: int, train_dataloader) -> None:
        bal = self.balancer
        if type(bal).epoch_end is Balancer.epoch_end:  # the base hook does nothing
            return
        val = self._val_batches()
        if val is None and isinstance(bal, OLM):
            raise ValueError(
                "OLM refits w after each epoch from the branches' train and held-out losses: give the Trainer an "
                "eval_dataset, or pass BalancedTrainer(val_batches=...)"
            )
        batches = _Batches([train_dataloader], self) if train_dataloader is not None else None
        with self._epoch_pass():
            bal.epoch_end(self._protocol_model(), epoch, batches, val)

    # ---------------------------------------------------------------- checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The model's weights without the balancers' entries (safetensors stores tensors only), and the balancers'
        state_dict() beside them in BALANCER_STATE_NAME."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self._protocol_model()
        names = [n for n, _ in _balancers(model)]
        if state_dict is None:
            state_dict = self.model.state_dict()
        super()._save(output_dir, state_dict=_without_balancers(state_dict, names))
        if self.args.should_save:
            torch.save(balancer_states(model), os.path.join(output_dir, BALANCER_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self.model if model is None else model
        with _balancer_loads_deferred(target):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_balancer_states(self._protocol_model(target), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        with _balancer_loads_deferred(self.model):
            super()._load_best_model()
        if self.state.best_model_checkpoint is not None:
            load_balancer_states(self._protocol_model(), self.state.best_model_checkpoint)
