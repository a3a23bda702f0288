"""Sample-level and modality-level valuation balancers (Wei, Feng, Wang, Hu, CVPR 2024;
docs/methods/sample_valuation.md) and the dataset wrapper that serves each epoch's rows (originals plus
single-modality copies) with a per-row keep-mask."""

from __future__ import annotations

import math

import torch

from mmkernels import _validate, reference
from mmkernels.reference import valuation as _ref_valuation
from mmkernels.valuation import VALUES, check_subset_logits, sample_valuation, valuation_subset_logits

from . import protocol
from ._base import Balancer, check_int, check_label_values, check_real


def apply_keep(feats, keep: torch.Tensor) -> list:
    """feats[m] where keep[:, m], else zeros: the per-row keep-mask of ValuationDataset applied to M features [B, ...]
    (copy rows keep one modality; the others are zeroed, as the authors zero pooled features). keep: [B, M] bool or
    0/1 float. A select, not a product: a dropped row holding inf/NaN becomes zeros, not NaN."""
    xs = list(feats)
    if keep.dim() != 2 or keep.shape != (xs[0].shape[0], len(xs)):
        raise ValueError(f"keep must have shape [B, M] = [{xs[0].shape[0]}, {len(xs)}], got {tuple(keep.shape)}")
    kept = keep != 0
    zero = [torch.zeros((), dtype=x.dtype, device=x.device) for x in xs]
    return [torch.where(kept[:, m].view((-1,) + (1,) * (x.dim() - 1)), x, zero[m]) for m, x in enumerate(xs)]


def check_sample_indices(index: torch.Tensor, num_samples: int, name: str = "index") -> None:
    """Dataset indices in [0, num_samples). Checked on CPU tensors only (a host read, no device sync), as
    check_label_values; on a device an index out of range is dropped by value() and sets the flag instead."""
    if index.device.type != "cpu" or index.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (index < 0) | (index >= num_samples)
    if bool(bad.any()):  # sync-ok: CPU tensor, no device involved
        i = int(bad.nonzero()[0, 0])  # sync-ok: CPU tensor, error path
        raise ValueError(
            f"{name} (the dataset indices of the rows) must lie in [0, num_samples={num_samples}); "
            f"{name}[{i}] = {int(index[i])}"
        )  # sync-ok: error path


def _check_rows(index, keep, num_modalities: int, num_samples: int, name: str) -> None:
    """index [R] integer in [0, num_samples) and keep [R, M] bool (CPU or device; read on the host, between epochs)."""
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32) or index.dim() != 1:
        raise ValueError(
            f"{name} index must be an integer (int64) tensor [R], got "
            f"{tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__}"
        )
    if not isinstance(keep, torch.Tensor) or keep.shape != (index.shape[0], num_modalities):
        raise ValueError(
            f"{name} index [R] and keep [R, {num_modalities}] expected, got {tuple(index.shape)} and "
            f"{tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__}"
        )
    check_sample_indices(index.cpu(), num_samples, f"{name} index")  # sync-ok: once per epoch, between epochs


class ValuationDataset(torch.utils.data.Dataset):
    """Wraps a map-style dataset: row r is (dataset[index[r]], keep[r], index[r]) with keep [M] bool (all True for the
    originals) and index the original sample's position (what SampleValuation.value() needs).

    set_rows(index, keep) installs an epoch's rows (from SampleValuation.rows()); shuffle with the DataLoader. Until
    then the rows are the originals; originals() is a second wrapper over the originals only (the valuation pass)."""

    def __init__(self, dataset, num_modalities: int):
        self.dataset = dataset
        self.num_modalities = int(num_modalities)
        n = len(dataset)
        self.index = torch.arange(n)
        self.keep = torch.ones(n, self.num_modalities, dtype=torch.bool)

    def set_rows(self, index: torch.Tensor, keep: torch.Tensor) -> None:
        _check_rows(index, keep, self.num_modalities, len(self.dataset), "set_rows:")
        self.index, self.keep = index.cpu().long(), keep.cpu().bool()  # sync-ok: once per epoch, between epochs

    def state_dict(self) -> dict:
        """The current rows (index, keep) and the sizes they belong to: a resume serves the same epoch."""
        return {
            "num_modalities": self.num_modalities,
            "num_samples": len(self.dataset),
            "index": self.index.clone(),
            "keep": self.keep.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict(); every entry is checked first (a rejected state changes nothing)."""
        keys = ("num_modalities", "num_samples", "index", "keep")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise ValueError(f"state must be a dict with the entries {list(keys)} (ValuationDataset.state_dict())")
        for k, want in (("num_modalities", self.num_modalities), ("num_samples", len(self.dataset))):
            if state[k] != want:
                raise ValueError(f"state[{k!r}] = {state[k]!r}, this dataset has {k}={want}")
        if not isinstance(state["keep"], torch.Tensor) or state["keep"].dtype != torch.bool:
            raise ValueError("state['keep'] must be a bool tensor [R, M]")
        _check_rows(state["index"], state["keep"], self.num_modalities, len(self.dataset), "state:")
        index, keep = state["index"].cpu(), state["keep"].cpu()  # sync-ok: a resume, between epochs
        self.index, self.keep = index.long().clone(), keep.clone()

    def __len__(self) -> int:
        return self.index.shape[0]

    def __getitem__(self, r: int):
        i = int(self.index[r])
        return self.dataset[i], self.keep[r], i

    @staticmethod
    def collate(items) -> tuple:
        """collate_fn for a DataLoader over this dataset whose base items are (x_1, ..., x_M, y): the protocol's
        batch (inputs [M tensors], labels, {"keep": [B, M] bool, "index": [B] int64})."""
        data, keep, index = torch.utils.data.default_collate(items)
        return list(data[:-1]), data[-1], {"keep": keep, "index": index}

    def originals(self) -> "ValuationDataset":
        """The originals only (every modality kept), e.g. for the valuation pass."""
        return ValuationDataset(self.dataset, self.num_modalities)


class SampleValuation(Balancer):
    """Sample-level valuation: after each epoch e >= start - 1 a no-grad pass over the training set values every
    sample's modalities (Shapley values of v(S) = |S| 1[argmax f_S = y]); epoch e + 1 trains on the originals plus,
    per sample and modality, 1 / 2 / 3 copies keeping only that modality when phi is in (0.4, 1) / (-0.1, 0.4) /
    below -0.1.

        bal = SampleValuation(2, num_samples=len(train_set))            # start=5: the authors' warm-up
        rows = ValuationDataset(train_set, 2)                            # items (x_a, x_v, y)
        for epoch in range(epochs):
            for (xa, xv, y), keep, _ in DataLoader(rows, batch_size=64, shuffle=True):
                feats = apply_keep([enc_a(xa), enc_v(xv)], keep)         # copies keep one modality
                F.cross_entropy(head(feats), y).backward(); ...
            if bal.values_after(epoch):                                  # e >= start - 1
                with torch.no_grad():                                    # eval mode, train augmentations
                    for (xa, xv, y), _, i in DataLoader(rows.originals(), batch_size=256):
                        bal.value(bal.subset_logits([enc_a(xa), enc_v(xv)], head), y, i)
            rows.set_rows(*bal.rows(epoch + 1))

    Arguments: num_samples N; start (warm-up epochs, default 5); value "authors" or "toolkit" (v(S) = 1[correct]).
    Labels (int64 or int32) must lie in [0, C) or equal ignore_index (checked on CPU tensors, ValueError naming
    `labels`); rows labelled ignore_index are not valued (no copies). The dataset indices must lie in [0, N) (checked
    on CPU tensors; on a device a row out of range is dropped and the flag set). A rejected call changes nothing.
    Statistics: scores = mean phi per modality over the valued samples, ratios = 1 - scores (gap), coefficients =
    number of copies per modality, all [M] fp32; `phi` [M, N]; flag = 1 when the pass met a non-finite logit (that
    row counted as wrong, docs/methods/sample_valuation.md). Under torch.distributed (sync) the per-sample values
    are summed over ranks (each rank values its shard), so every rank builds the same rows.
    """

    method = "sample_valuation"
    neutral = 0.0

    def __init__(
        self,
        num_modalities: int,
        num_samples: int,
        *,
        start: int = 5,
        value: str = "authors",
        rows: "ValuationDataset | None" = None,
        **kwargs,
    ):
        kwargs.setdefault("unit", "epoch")
        if kwargs["unit"] != "epoch":
            raise ValueError(f"unit must be 'epoch' for {type(self).__name__} (rows are rebuilt per epoch)")
        super().__init__(num_modalities, start=start, **kwargs)
        check_int(num_samples, "num_samples", minimum=1)
        _validate.check_choice(value, VALUES, "value")
        if rows is not None and (not isinstance(rows, ValuationDataset) or len(rows.dataset) != num_samples):
            raise ValueError(
                f"rows must be the ValuationDataset over the num_samples={num_samples} training samples, got "
                f"{type(rows).__name__}"
            )
        self._rows_dataset = rows
        self.num_samples, self.value_rule = int(num_samples), value
        self._fact = math.factorial(self.num_modalities)
        # fp32 accumulators: sums of M! phi (integers, exact below 2^24), valuation counts, the pass's flag
        self._scaled_sum = torch.zeros(self.num_modalities, self.num_samples, dtype=torch.float32)
        self._count = torch.zeros(self.num_samples, dtype=torch.float32)
        self._nonfinite = torch.zeros((), dtype=torch.float32)

    def _move(self, device) -> None:
        super()._move(device)
        self._scaled_sum, self._count, self._nonfinite = (t.to(self._device) for t in self._accumulators())

    def _accumulators(self) -> tuple:
        return self._scaled_sum, self._count, self._nonfinite

    def _hparams_state(self) -> dict:
        return {**super()._hparams_state(), "num_samples": self.num_samples, "value": self.value_rule}

    def _extra_tensors(self) -> dict:
        return {"scaled_phi_sum": self._scaled_sum, "count": self._count, "nonfinite": self._nonfinite}

    def _upgrade_state(self, state: dict) -> dict:
        """Earlier releases kept phi_sum (sums of phi) instead of sums of M! phi: converted exactly (M! phi are
        integers; the rounding recovers them while |phi_sum| M! < 2^22) with no non-finite row recorded."""
        t = state.get("tensors")
        if not isinstance(t, dict) or "phi_sum" not in t or "scaled_phi_sum" in t:
            return state
        old = t["phi_sum"]
        if not isinstance(old, torch.Tensor) or not old.is_floating_point() or old.is_meta:
            return state  # _check_state names what is wrong
        tensors = {k: v for k, v in t.items() if k != "phi_sum"}
        tensors["scaled_phi_sum"] = torch.round(old.float() * self._fact)
        tensors.setdefault("nonfinite", torch.zeros((), dtype=torch.float32))
        return {**state, "tensors": tensors}

    def _load_extra_tensors(self, tensors: dict) -> None:
        self._scaled_sum, self._count, self._nonfinite = (
            tensors[k].float() for k in ("scaled_phi_sum", "count", "nonfinite")
        )

    @property
    def phi(self) -> torch.Tensor:
        """Per-sample Shapley values of the last valuation pass [M, N] fp32 (mean over a sample's valuations; 0 for
        samples not valued)."""
        return self._scaled_sum / (self._fact * self._count.clamp(min=1))

    def values_after(self, epoch: int) -> bool:
        """Whether the valuation pass should run after `epoch` (its rows feed epoch + 1, inside the window; -1: before
        the first epoch)."""
        check_int(epoch, "epoch", minimum=-1)
        return self.enabled and self.in_window(epoch + 1)

    # ---------------------------------------------------------------- the protocol
    def transform_features(self, model, feats, labels, keep=None, index=None) -> list:
        """The protocol's hook 2: the batch's keep-mask (ValuationDataset.collate puts keep and index in the
        batch's extras); copies keep one modality, the others zeroed."""
        return feats if keep is None else apply_keep(feats, keep)

    def epoch_end(self, model, epoch: int, batches=None, val_batches=None) -> None:
        """The protocol's hook 7: when values_after(epoch), value the originals among `batches` (rows whose keep-mask
        keeps every modality; no grad, eval mode); then install the rows of epoch + 1 in the ValuationDataset given
        as rows= (when given)."""
        if self.values_after(epoch):
            if batches is None:
                raise ValueError(f"{type(self).__name__}.epoch_end needs batches= (with keep and index extras)")
            wanted = self._valued_indices(epoch)
            with torch.no_grad(), protocol.eval_mode(model):
                for batch in batches:
                    inputs, labels, extras = protocol.split_batch(batch)
                    if "index" not in extras or "keep" not in extras:
                        raise ValueError(
                            "the valuation pass needs each batch's dataset indices and keep-mask: build the "
                            "DataLoader with collate_fn=ValuationDataset.collate"
                        )
                    index, keep = extras["index"], extras["keep"]
                    valued = keep.all(1)
                    if wanted is not None:
                        valued &= torch.isin(index, wanted.to(index.device))
                    labels = torch.where(valued.to(labels.device), labels, torch.full_like(labels, self.ignore_index))
                    feats = self.encode(model, protocol.check_inputs(inputs, self.num_modalities))
                    self.value(self.subset_logits(feats, model.fuse), labels, index.to(labels.device))
        rows = self.rows(epoch + 1)
        if self._rows_dataset is not None:
            self._rows_dataset.set_rows(*rows)

    def _valued_indices(self, epoch: int):
        """The dataset indices the pass after `epoch` values (None: every original)."""
        return None

    @staticmethod
    def subset_logits(feats, head, *, fill=None) -> torch.Tensor:
        """[2^M - 1, B, C]: head on all non-empty feature subsets (mmkernels.valuation.valuation_subset_logits)."""
        return valuation_subset_logits(feats, head, fill=fill)

    def reset(self) -> None:
        """Forget the previous pass (called by rows(); call it before a pass to value from scratch)."""
        for t in self._accumulators():
            t.zero_()

    def value(self, subset_logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> dict:
        """Value one batch: subset outputs [2^M - 1, B, C], labels [B], dataset indices [B] (int64 or int32).
        Everything is checked before anything is written. No host sync (the value checks read CPU tensors only)."""
        m = check_subset_logits(subset_logits, labels)
        if m != self.num_modalities:
            raise ValueError(f"subset_logits holds {m} modalities, num_modalities={self.num_modalities}")
        _validate.check_labels(index, subset_logits.shape[1], subset_logits.device, "index")
        check_label_values(labels, subset_logits.shape[2], self.ignore_index)
        check_sample_indices(index, self.num_samples)
        self._to_device(subset_logits.device)
        res = sample_valuation(subset_logits, labels, value=self.value_rule)
        self._accumulate(res, labels, index)
        return res

    def _accumulate(self, res: dict, labels: torch.Tensor, index: torch.Tensor) -> None:
        """Adds M! phi (recovered exactly: |M! phi| < 2^22) and a count per valued row; rows labelled ignore_index or
        (on a device) indexed out of range add nothing, the latter setting the flag. fp32 throughout (autocast too)."""
        idx = index.long()
        in_range = (idx >= 0) & (idx < self.num_samples)
        counted = (in_range & (labels.long() != self.ignore_index)).to(torch.float32)
        idx = torch.where(in_range, idx, torch.zeros_like(idx))
        scaled = torch.round(res["phi"].to(torch.float32) * self._fact) * counted
        self._scaled_sum.index_add_(1, idx, scaled)
        self._count.index_add_(0, idx, counted)
        bad = torch.maximum(res["flag"].to(torch.float32), (~in_range).any().to(torch.float32))
        torch.maximum(self._nonfinite, bad, out=self._nonfinite)

    def _gathered(self):
        if self._sync():
            torch.distributed.all_reduce(self._scaled_sum)
            torch.distributed.all_reduce(self._count)
            torch.distributed.all_reduce(self._nonfinite, op=torch.distributed.ReduceOp.MAX)

    def rows(self, epoch: int):
        """The rows of `epoch` (index [R], keep [R, M], on the balancer's device; R read on the host: one sync per
        epoch): originals plus the copies of the last valuation when `epoch` is in the window, else the originals."""
        check_int(epoch, "epoch")
        self._gathered()
        valued = self._count > 0
        # thresholds compared exactly: 10 M! phi count against (-1, 4, 10) M! count (integers in fp32)
        copies = _ref_valuation._copies_of_scaled(self._scaled_sum, self._fact * self._count) * valued.view(1, -1)
        if not (self.enabled and self.in_window(epoch)):
            copies = torch.zeros_like(copies)
        self._record(self.phi, valued, copies)
        out = reference.valuation_rows(copies)
        self.reset()
        return out

    def _record(self, phi, valued, copies) -> None:
        n = valued.sum().clamp(min=1)
        mean = (phi * valued).sum(1) / n
        self._stats = {
            "scores": mean.float(),
            "ratios": (1 - mean).float(),
            "coefficients": copies.sum(1).float(),
            "flag": self._nonfinite.clone(),
        }


class ModalityValuation(SampleValuation):
    """Modality-level valuation: gap_m = 1 - mean phi_m over floor(fraction N) samples drawn with replacement
    (valuation_indices(epoch); draws not valued are left out of the mean); p = (2/3) d alpha with d = mean over pairs
    |gap_m - gap_j| (curve "tanh": tanh of it, "square": ((2/3) d)^1.5 alpha); the next epoch gets floor(p N) extra
    rows, drawn with replacement, keeping only the largest-gap modality. floor(p N) is counted in exact rational
    arithmetic (M! phi are integers: no row lost to fp32 rounding when p N is an integer). rate="toolkit": the
    toolkit's p = (2/3) sum over ordered pairs |gap_m - gap_j| / (M - 1) (alpha unused). Draws come from a generator
    seeded by (seed, epoch): every rank draws the same.
    Statistics: scores = mean phi, ratios = gaps [M], coefficients = p on the kept modality, 0 elsewhere."""

    method = "modality_valuation"

    def __init__(
        self,
        num_modalities: int,
        num_samples: int,
        *,
        alpha: float = 1.0,
        curve: str = "linear",
        rate: str = "authors",
        fraction: float = 0.2,
        **kwargs,
    ):
        super().__init__(num_modalities, num_samples, **kwargs)
        check_real(alpha, "alpha", low=0.0)
        _validate.check_choice(curve, _ref_valuation.CURVES, "curve")
        _validate.check_choice(rate, ("authors", "toolkit"), "rate")
        check_real(fraction, "fraction", low=0.0, high=1.0, low_open=True)
        self.alpha, self.curve, self.rate, self.fraction = float(alpha), curve, rate, float(fraction)

    def _hparams_state(self) -> dict:
        return {
            **super()._hparams_state(),
            "alpha": self.alpha,
            "curve": self.curve,
            "rate": self.rate,
            "fraction": self.fraction,
        }

    def _generator(self, epoch: int, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch * 2 + salt) % (2**63))

    def _draws(self, epoch: int) -> torch.Tensor:
        k = max(1, int(self.fraction * self.num_samples))
        return torch.randint(0, self.num_samples, (k,), generator=self._generator(epoch, 0))

    def _valued_indices(self, epoch: int):
        return self.valuation_indices(epoch).unique()

    def valuation_indices(self, epoch: int) -> torch.Tensor:
        """The floor(fraction N) sample indices (with replacement, CPU int64) valued after `epoch`."""
        check_int(epoch, "epoch")
        return self._draws(epoch)

    def rows(self, epoch: int):
        """Originals plus floor(p N) extra rows keeping the largest-gap modality (when `epoch` is in the window)."""
        check_int(epoch, "epoch")
        self._gathered()
        draws = self._draws(epoch - 1).to(self._device)
        # the exact count needs the integer sums on the host: once per epoch, between epochs
        sums = self._scaled_sum[:, draws].round().cpu()  # sync-ok: between epochs
        counts = self._count[draws].round().cpu()  # sync-ok: between epochs
        gaps = _ref_valuation.modality_gaps_exact(sums, counts, self._fact)
        n_extra, p, keep = _ref_valuation.modality_extra_rows(
            gaps, self.num_samples, alpha=self.alpha, curve=self.curve, rate=self.rate
        )
        if not (self.enabled and self.in_window(epoch)):
            n_extra = 0
        extra = torch.randint(0, self.num_samples, (n_extra,), generator=self._generator(epoch, 1)).to(self._device)
        copies = torch.zeros(self.num_modalities, self.num_samples, dtype=torch.long, device=self._device)
        out = reference.valuation_rows(copies, extra_index=extra, extra_modality=keep)
        ratios = torch.tensor([float(g) for g in gaps], dtype=torch.float32, device=self._device)
        coef = torch.zeros(self.num_modalities, dtype=torch.float32, device=self._device)
        coef[keep] = p
        self._stats = {"scores": 1 - ratios, "ratios": ratios, "coefficients": coef, "flag": self._nonfinite.clone()}
        self.reset()
        return out
