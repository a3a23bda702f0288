"""Hugging Face transformers integration (issue 18, item 6): mmkernels.integrations.hf.BalancedTrainer runs every
balancer with the real transformers.Trainer on CPU: every balancer, gradient accumulation equal to one large batch
(the step counter counting optimizer updates), before_optimizer_step before the Trainer's gradient clipping, resume
from a checkpoint bit-identical (mid-epoch and at an epoch's end), the balancer in eval mode during evaluation,
checkpoints (the balancers' state beside the safetensors weights), clear errors."""

from __future__ import annotations

import copy
import math
import os
import sys

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mmkernels.api as api  # noqa: E402
from mmkernels.integrations.hf import (  # noqa: E402
    BALANCER_STATE_NAME,
    BalancedTrainer,
    EpochRows,
    ProtocolCollator,
    load_checkpoint,
)

from _api_models import C, IN_DIMS, TinyModel  # noqa: E402

M, N, B = 3, 48, 12

KINDS = (
    "ogm_ge",
    "ogm_ge_official",
    "ogm",
    "ogm_params",
    "opm",
    "agm",
    "mlb",
    "mlb_update",
    "olm",
    "pmr",
    "mmpareto",
    "sample_valuation",
    "modality_valuation",
)


def tensors(seed: int = 0, n: int = N):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    xs = [torch.randn(n, IN_DIMS[m], generator=g) + (2.0 - m) * F.one_hot(y, C)[:, :1].float() for m in range(M)]
    return xs, y


class DictData(torch.utils.data.Dataset):
    """Items {"inputs_0": x_0, ..., "inputs_{M-1}": x_{M-1}, "labels": y} (the default key layout)."""

    def __init__(self, seed: int = 0, n: int = N):
        self.xs, self.y = tensors(seed, n)

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {**{f"inputs_{m}": x[i] for m, x in enumerate(self.xs)}, "labels": self.y[i]}


def make_balancer(kind: str, net, opt, rows=None):
    enc = [list(e.parameters()) for e in net.encoders]
    return {
        "ogm_ge": lambda: api.OGMGE(M, seed=1),
        "ogm_ge_official": lambda: api.OGMGE(M, official=True, params=enc, seed=1),
        "ogm": lambda: api.OGM(M, alpha=2.0),
        "ogm_params": lambda: api.OGM(M, alpha=2.0, params=enc),
        "opm": lambda: api.OPM(M, seed=1),
        "agm": lambda: api.AGM(M),
        "mlb": lambda: api.MLB(M),
        "mlb_update": lambda: api.MLB(M, alpha=2.0, params=enc, modulate="update", optimizer=opt),
        "olm": lambda: api.OLM(M),
        "pmr": lambda: api.PMR(M, num_classes=C),
        "mmpareto": lambda: api.MMPareto(M, params=enc),
        "sample_valuation": lambda: api.SampleValuation(M, N, start=1, rows=rows),
        "modality_valuation": lambda: api.ModalityValuation(M, N, start=1, rows=rows),
    }[kind]()


class Net(nn.Module):
    """The protocol's model: TinyModel's encoders and head, the balancer as a submodule, the optimizer built here
    (MLB(modulate="update") takes it as optimizer=) and given to the Trainer."""

    def __init__(self, kind: str, *, lr: float = 0.1, rows=None):
        super().__init__()
        tiny = TinyModel(M, seed=0)
        self.encoders, self.head = tiny.encoders, tiny.head
        self.opt = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)
        self.balancer = make_balancer(kind, self, self.opt, rows)

    def fuse(self, feats):
        return self.head(torch.cat(list(feats), 1))


class Spy(BalancedTrainer):
    """Records, per compute_loss: training or evaluation, the balancer's mode, grad mode, step counter and batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        xs, y, _ = self.protocol_batch(inputs)
        bal = self.balancer
        self.seen.append(
            dict(
                phase="train" if model.training else "eval",
                bal_training=bal.training,
                grad=torch.is_grad_enabled(),
                step=bal.step_count,
                batch=([x.clone() for x in xs], y.clone()),
            )
        )
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def trainer(net, out, *, cls=BalancedTrainer, train=None, eval_dataset=None, callbacks=None, extra=None, **kw):
    opts = dict(
        output_dir=str(out),
        per_device_train_batch_size=B,
        per_device_eval_batch_size=12,
        num_train_epochs=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        lr_scheduler_type="constant",
        dataloader_pin_memory=False,
        max_grad_norm=0.0,
        seed=0,
    )
    opts.update(kw)
    return cls(
        model=net,
        args=TrainingArguments(**opts),
        train_dataset=DictData() if train is None else train,
        eval_dataset=eval_dataset,
        optimizers=(net.opt, None),
        callbacks=callbacks,
        **(extra or {}),
    )


def state(module) -> dict:
    return {
        k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
        for k, v in module.state_dict().items()
    }


def assert_states_equal(a: dict, b: dict, *, exact: bool = True, msg: str = "") -> None:
    assert a.keys() == b.keys(), msg
    for k in a:
        if isinstance(a[k], torch.Tensor):
            if exact:
                assert torch.equal(a[k], b[k]), f"{msg}: {k}"
            else:
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{msg}: {k}")
        else:
            assert a[k] == b[k], f"{msg}: {k}"


class StopAfterEpochs(TrainerCallback):
    """Ends the training after n epochs (an iterable dataset runs until max_steps otherwise)."""

    def __init__(self, n: int):
        self.n, self.done = n, 0

    def on_epoch_end(self, args, state, control, **kwargs):
        self.done += 1
        if self.done >= self.n:
            control.should_training_stop = True


# ----------------------------------------------------------------------------------------------- (a) every balancer
@pytest.mark.parametrize("kind", KINDS)
def test_every_balancer_runs_through_the_trainer(kind, tmp_path):
    """2 epochs, then save_model() and load_checkpoint() into a fresh model: the same parameters and balancer state.
    The valuation balancers serve their rows through EpochRows (an iterable epoch whose length changes)."""
    valuation = kind.endswith("valuation")
    kw = {}
    if valuation:
        xs, y = tensors()
        rows = api.ValuationDataset(torch.utils.data.TensorDataset(*xs, y), M)
        net = Net(kind, rows=rows)
        kw = dict(
            train=EpochRows(rows, seed=3),
            data_collator=ProtocolCollator(api.ValuationDataset.collate),
            max_steps=100,
            callbacks=[StopAfterEpochs(2)],
        )
    else:
        net = Net(kind)
        kw = dict(num_train_epochs=2)
    extra = {"data_collator": kw.pop("data_collator")} if "data_collator" in kw else None
    t = trainer(net, tmp_path / "run", eval_dataset=DictData(100, 24), extra=extra, **kw)
    t.train()
    bal = net.balancer
    steps = t.state.global_step
    assert steps == 2 * N // B or (valuation and steps > 2 * N // B)
    assert bal.step_count == steps and bal.skipped_steps == 0 and bal.epoch == 1
    assert torch.isfinite(bal.coefficients).all() and bal.coefficients.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in net.parameters())
    if valuation:
        assert len(rows) >= N  # the rows of epoch 1 (and 2) were installed after each valuation

    t.save_model(str(tmp_path / "saved"))
    assert os.path.isfile(tmp_path / "saved" / BALANCER_STATE_NAME)
    fresh = Net(kind, rows=api.ValuationDataset(rows.dataset, M) if valuation else None)
    load_checkpoint(fresh, str(tmp_path / "saved"))
    assert_states_equal(state(fresh), state(net), msg=kind)


# ----------------------------------------------------------------------------------------------- (b) accumulation
@pytest.mark.parametrize("kind", ["ogm_params", "mmpareto", "ogm"])
def test_accumulation_equals_one_large_batch(kind, tmp_path):
    """gradient_accumulation_steps=2 over micro-batches of 6 = one step on each concatenated batch of 12 (the
    Trainer's sampler draws the same order for both); the balancer's step counter counts optimizer updates."""
    small, large = Net(kind), Net(kind)
    ts = trainer(small, tmp_path / "small", per_device_train_batch_size=B // 2, gradient_accumulation_steps=2)
    tl = trainer(large, tmp_path / "large")
    ts.train()
    tl.train()
    assert ts.state.global_step == tl.state.global_step == N // B
    assert small.balancer.step_count == large.balancer.step_count == N // B
    assert small.balancer.micro_batches == 2 and large.balancer.micro_batches == 1
    assert_states_equal(state(small), state(large), exact=False, msg=kind)


@pytest.mark.parametrize("kind", ["ogm_params", "mmpareto"])
def test_the_trainer_clips_the_modulated_gradients(kind, tmp_path):
    """max_grad_norm > 0: the Trainer clips after before_optimizer_step, so its run equals the protocol's loop
    bal(...) -> backward -> before_optimizer_step -> clip -> step on the same batches."""
    net, twin = Net(kind), Net(kind)
    t = trainer(net, tmp_path / "run", cls=Spy, max_grad_norm=0.05)
    t.train()
    batches = [r["batch"] for r in t.seen]
    assert len(batches) == N // B
    for xs, y in batches:
        out = twin.balancer(twin, xs, y)
        out.loss.backward()
        twin.balancer.before_optimizer_step()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05)
        twin.opt.step()
        twin.opt.zero_grad(set_to_none=True)
        twin.balancer.step()
    assert_states_equal(state(net), state(twin), exact=False, msg=kind)


# ----------------------------------------------------------------------------------------------- (c) resume
RESUME_KINDS = ("ogm_ge", "pmr", "mmpareto", "olm", "mlb_update")


@pytest.mark.parametrize("kind", RESUME_KINDS)
def test_checkpoint_resume_is_bit_identical(kind, tmp_path):
    """3 epochs of 4 steps (shuffled, evaluated every 3 steps), checkpoints every 2 steps; resuming from step 6 (mid
    epoch 1) and from step 8 (epoch 1's end) gives the straight run bit for bit: parameters, balancer state (step
    and epoch counters included) and the optimizer's momenta."""
    kw = dict(num_train_epochs=3, eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=2)
    straight = Net(kind)
    trainer(straight, tmp_path / "straight", eval_dataset=DictData(100, 24), **kw).train()
    assert straight.balancer.step_count == 3 * N // B and straight.balancer.epoch == 2
    for k in (6, 8):
        resumed = Net(kind)
        t = trainer(resumed, tmp_path / f"resumed{k}", eval_dataset=DictData(100, 24), **kw)
        t.train(resume_from_checkpoint=str(tmp_path / "straight" / f"checkpoint-{k}"))
        assert resumed.balancer.step_count == 3 * N // B and resumed.balancer.epoch == 2
        assert_states_equal(state(resumed), state(straight), msg=f"{kind}, resumed from step {k}")
        momenta = [
            (resumed.opt.state[p], straight.opt.state[q]) for p, q in zip(resumed.parameters(), straight.parameters())
        ]
        assert all(torch.equal(a["momentum_buffer"], b["momentum_buffer"]) for a, b in momenta)


def test_checkpoint_layout(tmp_path):
    """model.safetensors holds the model without the balancer (safetensors stores tensors only, a balancer's state
    has the "_extra_state" dict); mmkernels_balancers.pt holds the balancer's state_dict()."""
    import safetensors.torch

    net = Net("pmr")
    trainer(net, tmp_path, max_steps=2, save_strategy="steps", save_steps=2).train()
    ckpt = tmp_path / "checkpoint-2"
    weights = safetensors.torch.load_file(str(ckpt / "model.safetensors"))
    assert not any(k.startswith("balancer.") for k in weights)
    assert set(weights) == {k for k in net.state_dict() if not k.startswith("balancer.")}
    saved = torch.load(ckpt / BALANCER_STATE_NAME, weights_only=True)
    assert set(saved) == {"balancer"} and saved["balancer"]["_extra_state"]["step"] == 2


# ----------------------------------------------------------------------------------------------- (d) evaluation
def test_the_balancer_follows_eval_during_evaluation(tmp_path):
    """Evaluation (every 2 steps, and evaluate()/predict() afterwards) runs the balancer in eval mode under no_grad:
    its step counter and state do not move; training resumes in training mode."""
    net = Net("ogm_ge")
    t = trainer(
        net, tmp_path, cls=Spy, eval_dataset=DictData(100, 24), num_train_epochs=2, eval_strategy="steps", eval_steps=2
    )
    t.train()
    train = [r for r in t.seen if r["phase"] == "train"]
    evals = [r for r in t.seen if r["phase"] == "eval"]
    assert len(evals) == 4 * 2  # 4 evaluations of 2 batches
    assert all(not r["bal_training"] and not r["grad"] for r in evals)
    assert all(r["bal_training"] and r["grad"] for r in train)
    assert [r["step"] for r in train] == list(range(2 * N // B))  # evaluation counted no step
    assert net.balancer.step_count == 2 * N // B  # (the Trainer leaves the model in eval mode after a last evaluation)

    before = state(net)
    metrics = t.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    pred = t.predict(DictData(100, 24))
    assert pred.predictions.shape == (24, C) and pred.label_ids.shape == (24,)
    assert_states_equal(state(net), before, msg="evaluation changed the model or the balancer")


# ----------------------------------------------------------------------------------------------- keys and errors
def test_input_keys_and_labels_key(tmp_path):
    """Other column names through input_keys / labels_key; the rest of a batch is not the balancer's."""

    class Named(DictData):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {"audio": item["inputs_0"], "video": item["inputs_1"], "text": item["inputs_2"], "y": item["labels"]}

    net, twin = Net("ogm"), Net("ogm")
    trainer(
        net, tmp_path / "a", train=Named(), extra=dict(input_keys=["audio", "video", "text"], labels_key="y")
    ).train()
    trainer(twin, tmp_path / "b").train()
    assert_states_equal(state(net), state(twin), msg="renamed keys")
    with pytest.raises(KeyError, match="lacks \\['inputs_0', 'inputs_1', 'inputs_2', 'labels'\\].*input_keys="):
        trainer(Net("ogm"), tmp_path / "c", train=Named(), remove_unused_columns=False).train()


def test_no_balancer_or_several_are_refused_clearly(tmp_path):
    bare = Net("ogm")
    del bare.balancer
    with pytest.raises(ValueError, match="holds no mmkernels balancer"):
        trainer(bare, tmp_path)
    two = Net("ogm")
    two.other = api.MLB(M)
    with pytest.raises(ValueError, match="holds 2 balancers .*balancer, other.*balancer_name="):
        trainer(two, tmp_path)
    trainer(two, tmp_path, max_steps=1, extra=dict(balancer_name="balancer")).train()
    assert two.balancer.step_count == 1 and two.other.step_count == 0
    no_fuse = Net("ogm")
    no_fuse.fuse = None
    with pytest.raises(TypeError, match="model contract.*encoders.*fuse"):
        trainer(no_fuse, tmp_path)


def test_olm_needs_held_out_batches(tmp_path):
    with pytest.raises(ValueError, match="eval_dataset.*val_batches"):
        trainer(Net("olm"), tmp_path).train()
    net, twin = Net("olm"), Net("olm")
    xs, y = tensors(100, 24)
    held_out = [([x[i : i + 12] for x in xs], y[i : i + 12]) for i in (0, 12)]
    trainer(net, tmp_path / "a", extra=dict(val_batches=held_out)).train()
    trainer(twin, tmp_path / "b", eval_dataset=DictData(100, 24)).train()  # the same batches from the eval dataset
    assert_states_equal(state(net), state(twin), msg="olm")


def test_valuation_rows_need_an_iterable_epoch(tmp_path):
    xs, y = tensors()
    rows = api.ValuationDataset(torch.utils.data.TensorDataset(*xs, y), M)
    net = Net("sample_valuation", rows=rows)
    collate = dict(data_collator=ProtocolCollator(api.ValuationDataset.collate))
    with pytest.raises(ValueError, match="EpochRows"):
        trainer(net, tmp_path, train=rows, extra=collate).train()


def test_balancer_optimizer_must_be_the_trainers(tmp_path):
    net = Net("mlb_update")
    t = trainer(net, tmp_path)
    t.optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="another optimizer than the Trainer's"):
        t.train()


def test_import_error_names_the_extra(monkeypatch):
    """Without transformers: `import mmkernels.integrations` works, the hf module says what to install."""
    import importlib

    import mmkernels

    monkeypatch.setitem(sys.modules, "transformers", None)  # None in sys.modules: the import raises ImportError
    monkeypatch.delitem(sys.modules, "mmkernels.integrations")
    monkeypatch.delitem(sys.modules, "mmkernels.integrations.hf")
    monkeypatch.setattr(mmkernels, "integrations", mmkernels.integrations)  # restored afterwards
    importlib.import_module("mmkernels.integrations")
    with pytest.raises(ImportError, match=r"pip install mmkernels\[hf\]"):
        importlib.import_module("mmkernels.integrations.hf")


# ----------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("kind", ["ogm_ge", "pmr", "mmpareto", "olm"])
def test_bf16_runs(kind, tmp_path):
    """bf16=True on CPU: the balancer's forward runs under the accelerator's autocast (compute_loss and the epoch
    hooks' passes); fp32 parameters and statistics stay finite."""
    net = Net(kind)
    t = trainer(net, tmp_path, bf16=True, eval_dataset=DictData(100, 24))
    seen = []
    net.encoders[0].register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    t.train()
    assert net.balancer.step_count == N // B and torch.bfloat16 in seen
    assert torch.isfinite(net.balancer.coefficients).all()
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in net.parameters())


def test_grad_scaler_runs_before_the_unscale(tmp_path):
    """fp16 with a GradScaler (accelerate enables it on GPUs only; here the CPU scaler is set on the accelerator by
    hand): before_optimizer_step runs on the still-scaled gradients with grad_divisor=None, before the Trainer's
    unscale_ and clipping, and MMPareto equals the generic train_step (which unscales first and passes the scale)
    bit for bit (the scale is a power of two)."""
    net = Net("mmpareto")
    seen = []
    original = net.balancer.before_optimizer_step

    def spy(grad_divisor=None):
        seen.append(grad_divisor)
        original(grad_divisor=grad_divisor)

    net.balancer.before_optimizer_step = spy
    t = trainer(net, tmp_path, cls=Spy, fp16=True)
    t.accelerator.native_amp = True  # what accelerate sets for fp16 on a GPU
    t.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    t.train()
    del net.balancer.before_optimizer_step
    assert seen == [None] * (N // B) and t.accelerator.scaler.get_scale() == 2.0**10

    twin = Net("mmpareto")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for r in t.seen:
        with torch.autocast("cpu", dtype=torch.float16):
            api.train_step(twin, twin.balancer, twin.opt, [r["batch"]], scaler=scaler)
    assert_states_equal(state(net), state(twin), msg="GradScaler")


# ----------------------------------------------------------------------------------------------- DDP
DDP_KINDS = ("ogm_params", "mmpareto")


class DDPNet(Net):
    """Under DistributedDataParallel the module's forward runs the balancer (DDP syncs a forward it runs)."""

    def forward(self, inputs, labels, **extras):
        return self.balancer(self, inputs, labels, **extras)


def _ddp_worker(rank: int, world: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE="2")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    out = {}
    for kind in DDP_KINDS:
        net = DDPNet(kind)
        t = trainer(
            net,
            os.path.join(outdir, kind),
            per_device_train_batch_size=B // 2,  # 2 ranks x 2 micro-batches of 6 rows: 24 rows per optimizer step
            gradient_accumulation_steps=2,
            ddp_find_unused_parameters=False,
        )
        assert isinstance(t.args.world_size, int) and t.args.world_size == world
        t.train()
        assert isinstance(t.model_wrapped, torch.nn.parallel.DistributedDataParallel)
        out[kind] = state(net)
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))


def test_ddp_on_two_cpu_processes(tmp_path):
    """2 CPU processes (gloo), gradient_accumulation_steps=2: the replicas stay equal and equal one process on the
    whole batch (the accelerate sampler gives the ranks alternate batches of one shuffled order)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers start with transformers imported (spawn would import it again in each, seconds on 2 cores)
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for kind in DDP_KINDS:
        assert_states_equal(r0[kind], r1[kind], msg=f"{kind}: replicas diverged")
        single = Net(kind)
        trainer(single, tmp_path / f"single_{kind}", per_device_train_batch_size=2 * B).train()
        assert single.balancer.step_count == N // (2 * B)
        assert_states_equal(r0[kind], state(single), exact=False, msg=f"{kind}: DDP vs one process")
