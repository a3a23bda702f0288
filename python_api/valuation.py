"""Sample-level and modality-level valuation balancers (Wei, Feng, Wang, Hu, CVPR 2024; docs/methods/sample_valuation.md) and the dataset
wrapper that serves each epoch's rows (originals plus single-modality copies) with a per-row keep-mask."""
from __future__ import annotations

import torch

from mmkernels import _validate, reference
from mmkernels.valuation import VALUES, check_subset_logits, sample_valuation, valuation_subset_logits

from ._base import Balancer, check_int, check_real


def apply_keep(feats, keep: torch.Tensor) -> list:
    """feats[m] * keep[:, m]: the per-row keep-mask of ValuationDataset applied to M features [B, ...] (copy rows keep
    one modality; the others are zeroed, as the authors zero pooled features). keep: [B, M] bool or float."""
    xs = list(feats)
    if keep.dim() != 2 or keep.shape != (xs[0].shape[0], len(xs)):
        raise ValueError(f"keep must have shape [B, M] = [{xs[0].shape[0]}, {len(xs)}], got {tuple(keep.shape)}")
    return [x * keep[:, m].to(x.dtype).view((-1,) + (1,) * (x.dim() - 1)) for m, x in enumerate(xs)]


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
        if index.dim() != 1 or keep.shape != (index.shape[0], self.num_modalities):
            raise ValueError(f"index [R] and keep [R, {self.num_modalities}] expected, got {tuple(index.shape)} and "
                             f"{tuple(keep.shape)}")
        self.index, self.keep = index.cpu(), keep.cpu().bool()  # sync-ok: once per epoch, between epochs (not a step)

    def __len__(self) -> int:
        return self.index.shape[0]

    def __getitem__(self, r: int):
        i = int(self.index[r])
        return self.dataset[i], self.keep[r], i

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
    Statistics: scores = mean phi per modality over the valued samples, ratios = 1 - scores (gap), coefficients =
    number of copies per modality, all [M] fp32; `phi` [M, N]. Under torch.distributed (sync) the per-sample values
    are summed over ranks (each rank values its shard), so every rank builds the same rows.
    """

    method = "sample_valuation"
    neutral = 0.0

    def __init__(self, num_modalities: int, num_samples: int, *, start: int = 5, value: str = "authors", **kwargs):
        kwargs.setdefault("unit", "epoch")
        if kwargs["unit"] != "epoch":
            raise ValueError(f"unit must be 'epoch' for {type(self).__name__} (rows are rebuilt per epoch)")
        super().__init__(num_modalities, start=start, **kwargs)
        check_int(num_samples, "num_samples", minimum=1)
        _validate.check_choice(value, VALUES, "value")
        self.num_samples, self.value_rule = int(num_samples), value
        self._phi_sum = torch.zeros(self.num_modalities, self.num_samples)
        self._count = torch.zeros(self.num_samples)

    def _move(self, device) -> None:
        super()._move(device)
        self._phi_sum, self._count = self._phi_sum.to(self._device), self._count.to(self._device)

    def _hparams_state(self) -> dict:
        return {**super()._hparams_state(), "num_samples": self.num_samples, "value": self.value_rule}

    def _extra_tensors(self) -> dict:
        return {"phi_sum": self._phi_sum, "count": self._count}

    def _load_extra_tensors(self, tensors: dict) -> None:
        self._phi_sum, self._count = tensors["phi_sum"], tensors["count"]

    @property
    def phi(self) -> torch.Tensor:
        """Per-sample Shapley values of the last valuation pass [M, N] fp32 (0 for samples not valued)."""
        return self._phi_sum / self._count.clamp(min=1)

    def values_after(self, epoch: int) -> bool:
        """Whether the valuation pass should run after `epoch` (its rows feed epoch + 1, inside the window)."""
        return self.enabled and self.in_window(epoch + 1)

    @staticmethod
    def subset_logits(feats, head, *, fill=None) -> torch.Tensor:
        """[2^M - 1, B, C]: head on all non-empty feature subsets (mmkernels.valuation.valuation_subset_logits)."""
        return valuation_subset_logits(feats, head, fill=fill)

    def reset(self) -> None:
        """Forget the previous pass (called by rows(); call it before a pass to value from scratch)."""
        self._phi_sum.zero_()
        self._count.zero_()

    def value(self, subset_logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> dict:
        """Value one batch: subset outputs [2^M - 1, B, C], labels [B], dataset indices [B] int64. No host sync."""
        m = check_subset_logits(subset_logits, labels)
        if m != self.num_modalities:
            raise ValueError(f"subset_logits holds {m} modalities, num_modalities={self.num_modalities}")
        _validate.check_labels(index, subset_logits.shape[1], subset_logits.device, "index")
        self._to_device(subset_logits.device)
        res = sample_valuation(subset_logits, labels, value=self.value_rule)
        self._phi_sum.index_add_(1, index.long(), res["phi"])
        self._count.index_add_(0, index.long(), torch.ones_like(res["phi"][0]))
        return res

    def _gathered(self):
        if self._sync():
            torch.distributed.all_reduce(self._phi_sum)
            torch.distributed.all_reduce(self._count)

    def rows(self, epoch: int):
        """The rows of `epoch` (index [R], keep [R, M], on the balancer's device; R read on the host: one sync per
        epoch): originals plus the copies of the last valuation when `epoch` is in the window, else the originals."""
        self._gathered()
        phi = self.phi
        valued = self._count > 0
        copies = reference.valuation_copies(phi) * valued.view(1, -1)
        if not (self.enabled and self.in_window(epoch)):
            copies = torch.zeros_like(copies)
        self._record(phi, valued, copies)
        out = reference.valuation_rows(copies)
        self.reset()
        return out

    def _record(self, phi, valued, copies) -> None:
        n = valued.sum().clamp(min=1)
        mean = (phi * valued).sum(1) / n
        self._stats = {"scores": mean.float(), "ratios": (1 - mean).float(),
                       "coefficients": copies.sum(1).float(), "flag": torch.zeros((), device=phi.device)}


class ModalityValuation(SampleValuation):
    """Modality-level valuation: gap_m = 1 - mean phi_m over floor(fraction N) samples drawn with replacement
    (valuation_indices(epoch)); p = (2/3) d alpha with d = mean over pairs |gap_m - gap_j| (curve "tanh": tanh of it,
    "square": ((2/3) d)^1.5 alpha); the next epoch gets floor(p N) extra rows, drawn with replacement, keeping only the
    largest-gap modality. rate="toolkit": the toolkit's p = (2/3) sum over ordered pairs |gap_m - gap_j| / (M - 1)
    (alpha unused). Draws come from a generator seeded by (seed, epoch): every rank draws the same.
    Statistics: scores = mean phi, ratios = gaps [M], coefficients = p on the kept modality, 0 elsewhere."""

    method = "modality_valuation"

    def __init__(self, num_modalities: int, num_samples: int, *, alpha: float = 1.0, curve: str = "linear",
                 rate: str = "authors", fraction: float = 0.2, **kwargs):
        super().__init__(num_modalities, num_samples, **kwargs)
        check_real(alpha, "alpha", low=0.0)
        _validate.check_choice(curve, reference._ref_valuation.CURVES, "curve")
        _validate.check_choice(rate, ("authors", "toolkit"), "rate")
        check_real(fraction, "fraction", low=0.0, high=1.0, low_open=True)
        self.alpha, self.curve, self.rate, self.fraction = float(alpha), curve, rate, float(fraction)

    def _hparams_state(self) -> dict:
        return {**super()._hparams_state(), "alpha": self.alpha, "curve": self.curve, "rate": self.rate,
                "fraction": self.fraction}

    def _generator(self, epoch: int, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch * 2 + salt) % (2 ** 63))

    def valuation_indices(self, epoch: int) -> torch.Tensor:
        """The floor(fraction N) sample indices (with replacement, CPU int64) valued after `epoch`."""
        k = max(1, int(self.fraction * self.num_samples))
        return torch.randint(0, self.num_samples, (k,), generator=self._generator(epoch, 0))

    def rows(self, epoch: int):
        """Originals plus floor(p N) extra rows keeping the largest-gap modality (when `epoch` is in the window)."""
        self._gathered()
        phi = self.phi
        draws = self.valuation_indices(epoch - 1).to(phi.device)
        gaps = reference.modality_gaps(phi, draws)
        p, keep = reference.modality_rate(gaps, alpha=self.alpha, curve=self.curve, rate=self.rate)
        active = self.enabled and self.in_window(epoch)
        n_extra = int(torch.floor(p * self.num_samples)) if active else 0  # sync-ok: once per epoch, between epochs
        extra = torch.randint(0, self.num_samples, (n_extra,), generator=self._generator(epoch, 1)).to(phi.device)
        copies = torch.zeros(self.num_modalities, self.num_samples, dtype=torch.long, device=phi.device)
        out = reference.valuation_rows(copies, extra_index=extra, extra_modality=keep)
        coef = torch.zeros(self.num_modalities, device=phi.device).index_fill(0, keep.view(1), 1.0) * p
        self._stats = {"scores": (1 - gaps).float(), "ratios": gaps.float(), "coefficients": coef.float(),
                       "flag": torch.zeros((), device=phi.device)}
        self.reset()
        return out
