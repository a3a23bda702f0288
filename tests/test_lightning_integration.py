"""PyTorch Lightning integration (issue 18, item 5): mmkernels.integrations.lightning.BalancerCallback runs every
balancer with a LightningModule in automatic optimization, against the real `lightning` package: every balancer,
gradient accumulation equal to one large batch (the step counter counting optimizer steps), bf16-mixed, a GradScaler
(grad_divisor), validation in eval mode, checkpoint/resume bit-identical, DDP on 2 CPU processes (gloo)."""

from __future__ import annotations

import copy
import os
import socket
import sys

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mmkernels.api as api  # noqa: E402
from mmkernels.api.protocol import split_batch  # noqa: E402
from mmkernels.integrations.lightning import BalancerCallback, find_balancer  # noqa: E402

from _api_models import C, IN_DIMS, TinyModel  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
    pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*"),
]

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


def dataset(seed: int = 0, n: int = N):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    xs = [torch.randn(n, IN_DIMS[m], generator=g) + (2.0 - m) * F.one_hot(y, C)[:, :1].float() for m in range(M)]
    return torch.utils.data.TensorDataset(*xs, y)


def collate(items):
    """(x_1, ..., x_M, y) items -> the protocol's batch (inputs, labels)."""
    data = torch.utils.data.default_collate(items)
    return list(data[:-1]), data[-1]


def make_balancer(kind: str, module, opt, rows=None):
    enc = [list(e.parameters()) for e in module.encoders]
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


class Lit(pl.LightningModule):
    """The protocol's model as a LightningModule: encoders and fuse of TinyModel, the balancer as a submodule, the
    optimizer built in __init__ (MLB(modulate="update") takes it as optimizer=) and returned by
    configure_optimizers."""

    def __init__(self, kind: str, *, batch_size: int = B, data_seed: int = 0, lr: float = 0.1, shuffle=False):
        super().__init__()
        tiny = TinyModel(M, seed=0)
        self.encoders, self.head = tiny.encoders, tiny.head
        self.kind, self.batch_size, self.shuffle = kind, batch_size, shuffle
        self.train_set = dataset(data_seed)
        self.val_set = dataset(data_seed + 100, n=24)
        self.rows = api.ValuationDataset(self.train_set, M) if kind.endswith("valuation") else None
        self.opt = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)
        self.balancer = make_balancer(kind, self, self.opt, self.rows)
        self.seen = {"train": [], "val": []}  # (balancer.training, balancer.step_count) per batch

    def fuse(self, feats):
        return self.head(torch.cat(list(feats), 1))

    def training_step(self, batch, batch_idx):
        inputs, labels, extras = split_batch(batch)
        self.seen["train"].append((self.balancer.training, self.balancer.step_count))
        return self.balancer(self, inputs, labels, **extras).loss

    def validation_step(self, batch, batch_idx):
        inputs, labels, extras = split_batch(batch)
        self.seen["val"].append((self.balancer.training, self.balancer.step_count))
        return self.balancer(self, inputs, labels, **extras).loss

    def configure_optimizers(self):
        return self.opt

    def train_dataloader(self):
        if self.rows is not None:
            return torch.utils.data.DataLoader(
                self.rows, batch_size=self.batch_size, collate_fn=api.ValuationDataset.collate
            )
        sampler = None  # under DDP: rank r gets rows r, r + 2, ... in order (Lightning's own sampler shuffles)
        if torch.distributed.is_initialized():
            sampler = torch.utils.data.DistributedSampler(self.train_set, shuffle=False)
        return torch.utils.data.DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=self.shuffle, sampler=sampler, collate_fn=collate
        )

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_set, batch_size=12, collate_fn=collate)


def trainer(**kw) -> pl.Trainer:
    opts = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[BalancerCallback()],
    )
    opts.update(kw)
    return pl.Trainer(**opts)


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


# ----------------------------------------------------------------------------------------------- (a) every balancer
@pytest.mark.parametrize("kind", KINDS)
def test_every_balancer_runs_through_the_callback(kind):
    reload = 1 if kind.endswith("valuation") else 0
    lit = Lit(kind)
    trainer(max_epochs=2, reload_dataloaders_every_n_epochs=reload, limit_val_batches=1).fit(lit)
    bal = lit.balancer
    steps = len(lit.seen["train"])  # one optimizer step per batch; the valuation's epoch 1 serves copies too
    assert steps == 2 * N // B or (kind.endswith("valuation") and steps > 2 * N // B)
    assert bal.step_count == steps and bal.skipped_steps == 0 and bal.epoch == 1
    assert torch.isfinite(bal.coefficients).all() and bal.coefficients.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in lit.parameters())
    if kind.endswith("valuation"):
        assert len(lit.rows) >= N  # epoch 1's rows were installed after epoch 0's valuation


# ----------------------------------------------------------------------------------------------- (b) accumulation
@pytest.mark.parametrize("kind", ["ogm_params", "mmpareto", "ogm"])
def test_accumulation_equals_one_large_batch(kind):
    """accumulate_grad_batches=2 over micro-batches of 6 = one step on each concatenated batch of 12; the balancer's
    step counter counts optimizer steps."""
    small, large = Lit(kind, batch_size=B // 2), Lit(kind, batch_size=B)
    trainer(max_epochs=1, accumulate_grad_batches=2, limit_val_batches=0).fit(small)
    trainer(max_epochs=1, limit_val_batches=0).fit(large)
    assert small.balancer.step_count == large.balancer.step_count == N // B
    assert small.balancer.micro_batches == 2 and large.balancer.micro_batches == 1
    assert_states_equal(state(small), state(large), exact=False, msg=kind)


# ----------------------------------------------------------------------------------------------- (c) precision
@pytest.mark.parametrize("kind", ["ogm_ge", "pmr", "mmpareto", "olm"])
def test_bf16_mixed_runs(kind):
    lit = Lit(kind)
    trainer(max_epochs=1, precision="bf16-mixed", limit_val_batches=1).fit(lit)
    assert lit.balancer.step_count == N // B
    assert torch.isfinite(lit.balancer.coefficients).all()
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in lit.parameters())


def test_grad_scaler_passes_its_scale_as_grad_divisor():
    """fp16 autocast with a GradScaler on CPU (Lightning's MixedPrecision plugin): before_optimizer_step gets the
    scaler's scale tensor after unscale_, and MMPareto's combination equals the generic loop with the same scaler."""
    from lightning.pytorch.plugins import MixedPrecision

    lit = Lit("mmpareto")
    seen = []
    original = lit.balancer.before_optimizer_step

    def spy(grad_divisor=None):
        seen.append(grad_divisor)
        original(grad_divisor=grad_divisor)

    lit.balancer.before_optimizer_step = spy
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer(max_epochs=1, plugins=[plugin], limit_val_batches=0).fit(lit)
    assert len(seen) == N // B and all(d is scaler._scale for d in seen)

    twin = Lit("mmpareto")
    twin_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for batch in twin.train_dataloader():
        with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
            api.train_step(twin, twin.balancer, twin.opt, [batch], scaler=twin_scaler)
    del lit.balancer.before_optimizer_step
    assert_states_equal(state(lit), state(twin), exact=False, msg="GradScaler")


# ----------------------------------------------------------------------------------------------- (d) validation
def test_validation_switches_the_balancer_to_eval_and_back():
    lit = Lit("ogm_ge")
    trainer(max_epochs=2, num_sanity_val_steps=1, val_check_interval=2).fit(lit)
    assert lit.seen["val"] and all(not training for training, _ in lit.seen["val"])
    assert all(training for training, _ in lit.seen["train"])
    assert [s for _, s in lit.seen["train"]] == list(range(2 * N // B))  # validation counted no step
    assert lit.balancer.training and lit.balancer.step_count == 2 * N // B


# ----------------------------------------------------------------------------------------------- (e) resume
@pytest.mark.parametrize("kind", ["ogm_ge", "pmr", "mmpareto", "olm", "sample_valuation"])
def test_checkpoint_resume_is_bit_identical(kind, tmp_path):
    """fit 2 epochs, save, resume for 1 more = 3 epochs straight: parameters, optimizer-driven balancer state, step
    and epoch counters equal bit for bit."""
    reload = 1 if kind.endswith("valuation") else 0
    kw = dict(reload_dataloaders_every_n_epochs=reload, limit_val_batches=1)
    straight = Lit(kind)
    trainer(max_epochs=3, **kw).fit(straight)

    first = Lit(kind)
    t = trainer(max_epochs=2, **kw)
    t.fit(first)
    ckpt = tmp_path / "two_epochs.ckpt"
    t.save_checkpoint(ckpt)
    resumed = Lit(kind)
    if resumed.rows is not None:  # the rows served are data-pipeline state, restored by the user's DataModule
        resumed.rows.load_state_dict(first.rows.state_dict())
    trainer(max_epochs=3, **kw).fit(resumed, ckpt_path=ckpt)

    assert resumed.balancer.step_count == straight.balancer.step_count >= 3 * N // B
    assert resumed.balancer.epoch == straight.balancer.epoch == 2
    assert_states_equal(state(resumed), state(straight), msg=kind)
    momenta = [
        (resumed.opt.state[p], straight.opt.state[q]) for p, q in zip(resumed.parameters(), straight.parameters())
    ]
    assert all(torch.equal(a["momentum_buffer"], b["momentum_buffer"]) for a, b in momenta)


def test_resume_from_the_checkpoint_saved_at_validation_end(tmp_path):
    """ModelCheckpoint(save_on_train_epoch_end=False) saves at the end of validation, which Lightning runs before
    on_train_epoch_end; the callback ran epoch_end (OLM refits w) on the epoch's last training batch, before
    validation, so epoch 1's checkpoint holds it, and resuming from it (Lightning re-runs no hook of epoch 1 that
    the callback uses) gives the straight run bit for bit."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    straight = Lit("olm")
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, save_on_train_epoch_end=False)
    trainer(max_epochs=3, limit_val_batches=1, enable_checkpointing=True, callbacks=[BalancerCallback(), saver]).fit(
        straight
    )
    resumed = Lit("olm")
    trainer(max_epochs=3, limit_val_batches=1).fit(resumed, ckpt_path=tmp_path / f"epoch=1-step={2 * N // B}.ckpt")
    assert_states_equal(state(resumed), state(straight), msg="olm")


# ----------------------------------------------------------------------------------------------- errors
class NoBalancer(Lit):
    def __init__(self):
        super().__init__("ogm")
        del self.balancer


class TwoBalancers(Lit):
    def __init__(self):
        super().__init__("ogm")
        self.other = api.MLB(M)


class NoFuse(Lit):
    fuse = None

    def __init__(self):
        super().__init__("ogm")


class Manual(Lit):
    def __init__(self):
        super().__init__("ogm")
        self.automatic_optimization = False


def test_no_balancer_or_several_are_refused_clearly():
    with pytest.raises(ValueError, match="holds no mmkernels balancer"):
        trainer(max_steps=1).fit(NoBalancer())
    with pytest.raises(ValueError, match="holds 2 balancers .*balancer, other.*name="):
        trainer(max_steps=1).fit(TwoBalancers())
    two = TwoBalancers()
    assert find_balancer(two, "other") is two.other
    trainer(max_steps=1, limit_val_batches=0, callbacks=[BalancerCallback(name="balancer")]).fit(two)
    assert two.balancer.step_count == 1 and two.other.step_count == 0
    with pytest.raises(TypeError, match="model contract.*encoders.*fuse"):
        trainer(max_steps=1).fit(NoFuse())
    with pytest.raises(RuntimeError, match="automatic optimization"):
        trainer(max_steps=1).fit(Manual())


def test_valuation_rows_need_the_dataloader_reloaded():
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        trainer(max_steps=1).fit(Lit("sample_valuation"))


def test_olm_takes_held_out_batches_from_the_callback_or_says_what_it_needs():
    lit = Lit("olm")
    with pytest.raises(ValueError, match="val_dataloader and a validation_step.*BalancerCallback\\(val_batches"):
        trainer(max_epochs=1, limit_val_batches=0).fit(lit)
    lit, twin = Lit("olm"), Lit("olm")
    held_out = list(lit.val_dataloader())
    trainer(max_epochs=1, limit_val_batches=0, callbacks=[BalancerCallback(val_batches=held_out)]).fit(lit)
    trainer(max_epochs=1).fit(twin)  # the same batches from the trainer's validation dataloader
    assert_states_equal(state(lit), state(twin), msg="olm")


def test_import_error_names_the_extra(monkeypatch):
    """Without lightning: `import mmkernels.integrations` works, the lightning module says what to install."""
    import importlib

    import mmkernels

    monkeypatch.setitem(sys.modules, "lightning", None)  # None in sys.modules: the import raises ImportError
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "mmkernels.integrations")
    monkeypatch.delitem(sys.modules, "mmkernels.integrations.lightning")
    monkeypatch.setattr(mmkernels, "integrations", mmkernels.integrations)  # restored afterwards
    importlib.import_module("mmkernels.integrations")
    with pytest.raises(ImportError, match=r"pip install mmkernels\[lightning\]"):
        importlib.import_module("mmkernels.integrations.lightning")


# ----------------------------------------------------------------------------------------------- (f) DDP
DDP_KINDS = ("ogm_params", "mlb_update", "mmpareto")


def _ddp_worker(rank: int, world: int, port: int, outdir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), NODE_RANK="0", LOCAL_RANK=str(rank)
    )
    os.environ["RANK"] = str(rank)
    torch.set_num_threads(1)
    out = {}
    for kind in DDP_KINDS:
        lit = Lit(kind, batch_size=B // 2)  # 2 ranks x 2 micro-batches of 6 rows: 24 rows per optimizer step
        trainer(
            strategy="ddp",
            devices=world,
            use_distributed_sampler=False,
            max_epochs=1,
            accumulate_grad_batches=2,
            limit_val_batches=0,
        ).fit(lit)
        out[kind] = state(lit)
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_cpu_processes(tmp_path):
    """strategy="ddp", 2 gloo ranks, accumulate_grad_batches=2: the replicas stay equal and equal one process on the
    whole batch (parameter-mode OGM, MLB(modulate="update"), MMPareto)."""
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (
        torch.load(tmp_path / "rank0.pt", weights_only=False),
        torch.load(tmp_path / "rank1.pt", weights_only=False),
    )
    for kind in DDP_KINDS:
        assert_states_equal(r0[kind], r1[kind], msg=f"{kind}: replicas diverged")
        single = Lit(kind, batch_size=2 * B)
        trainer(max_epochs=1, limit_val_batches=0).fit(single)
        assert single.balancer.step_count == N // (2 * B)
        assert_states_equal(r0[kind], state(single), exact=False, msg=f"{kind}: DDP vs one process")
