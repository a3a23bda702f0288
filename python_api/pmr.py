"""PMR balancer: Prototypical Modal Rebalance (Fan et al., CVPR 2023; docs/methods/pmr.md, the authors' code)."""

from __future__ import annotations

import torch

from mmkernels import _validate
from mmkernels.pmr import (
    new_refresh_buffers,
    pmr_class_sums_,
    pmr_loss,
    pmr_refresh_,
    pmr_update_prototypes_,
    refresh_skipped,
)
from mmkernels.reference.pmr import pmr_pad

from . import protocol
from ._base import Balancer, check_int, check_label_values, check_real, masked_mean_ce


class PMR(Balancer):
    """Prototype cross-entropy (PCE) on the weaker modalities, so extra gradient reaches only their encoders.

    Each modality m keeps class prototypes P_m [C, D_m], refreshed once per epoch by a no-grad pass over a subset
    of the training batches (authors: the first 10 %): P_m = class mean (first refresh), then
    (1 - mu) mean + mu P_m; a class absent from the subset keeps its prototype. Per step, over the valid rows:
    d = ||z_m,i - P_m[k]||, p = softmax(-d), s_m = sum_i p[i, y_i], PCE_m = mean_i -log p[i, y_i],
    c_m = alpha * 1[s_m < max_j s_j] (M = 2: the authors' switch on rho = s_0 / s_1, tie -> (0, 0); M > 2: the
    natural extension), and `loss()` returns sum_m c_m PCE_m (0 outside the window) to add to the fused CE:

        bal = PMR(2, num_classes=C, alpha=1.0, mu=0.2, end=100, unit="epoch")
        for epoch in range(E):
            bal.set_epoch(epoch)
            model.eval(); bal.begin_refresh()
            with torch.no_grad():
                for i, (xa, xv, y) in enumerate(loader):
                    if i >= max(1, len(loader) // 10): break
                    bal.refresh([enc_a(xa), enc_v(xv)], y)
            bal.end_refresh(); model.train()
            for xa, xv, y in loader:
                za, zv = enc_a(xa), enc_v(xv)
                loss = F.cross_entropy(head(za, zv), y) + bal.loss([za, zv], y)
                opt.zero_grad(); loss.backward(); opt.step(); bal.step()

    Arguments: num_modalities (2..8); num_classes C; alpha >= 0 (default 1.0, the authors' argparse default; their
    scripts use 2.0, 1.0 for CG-MNIST; the toolkit 0.6); mu in [0, 1] (default 0.2, argparse; scripts 0, toolkit
    0.5); plus the Balancer window (authors: epochs 0..100, scripts end 70, toolkit 0..80; pass unit="epoch" and call
    set_epoch), enabled, ignore_index, sync, optimizer. official=True follows the authors' refresh schedule: their
    second refresh (after epoch 0, called with epoch 0) is a plain class mean too, so the EMA starts at the third
    (default: at the second, as the paper's Eq. 9 reads). A refresh skips, per modality, the rows whose features hold
    a NaN/Inf (`refresh_skipped` counts them), and a prototype entry that is not finite is replaced by the class
    mean when its class is refreshed. Statistics: scores, ratios (s_m / max_{j != m} s_j), coefficients (c_m), pce,
    flag, nonfinite, prototypes, refresh_skipped.
    Under torch.distributed (sync): the score sums and the valid-row count are all-reduced in loss(), the prototype
    sums and counts in end_refresh()/update_prototypes(); every rank must make the same calls (an empty batch too).
    """

    method = "pmr"
    neutral = 0.0  # c = 0: no PCE term

    def __init__(self, num_modalities: int, *, num_classes: int, alpha: float = 1.0, mu: float = 0.2, **kwargs):
        super().__init__(num_modalities, **kwargs)
        check_int(num_classes, "num_classes", minimum=1)
        check_real(alpha, "alpha", low=0.0)
        check_real(mu, "mu", low=0.0, high=1.0)
        self.num_classes, self.alpha, self.mu = int(num_classes), float(alpha), float(mu)
        self._pce = torch.zeros(self.num_modalities)
        self._protos: torch.Tensor | None = None  # [M, C, max D_m] fp32, zero-padded
        self._widths: list[int] | None = None
        self.refreshes = 0  # completed prototype refreshes
        self._acc = None  # (sums, counts) during a refresh pass
        self._refreshing = False
        self._pass_widths: list[int] | None = None
        self._refresh_skipped = torch.zeros(self.num_modalities)

    # ---------------------------------------------------------------- statistics
    @property
    def pce(self) -> torch.Tensor:
        """PCE_m of the last observed batch, [M] fp32 (read-only)."""
        return self._pce

    @property
    def refresh_skipped(self) -> torch.Tensor:
        """Rows of the last refresh skipped per modality because a feature was NaN/Inf, [M] fp32 (device, no sync)."""
        return self._refresh_skipped

    @property
    def prototypes(self) -> list | None:
        """The M prototype tensors [C, D_m] fp32 (views of the device state; None before the first refresh)."""
        if self._protos is None:
            return None
        return [self._protos[m, :, :w] for m, w in enumerate(self._widths)]

    def _move(self, device) -> None:
        super()._move(device)
        self._pce = self._pce.to(self._device)
        self._refresh_skipped = self._refresh_skipped.to(self._device)
        if self._protos is not None:
            self._protos = self._protos.to(self._device)
        if self._acc is not None:
            self._acc = tuple(t.to(self._device) for t in self._acc)

    # ---------------------------------------------------------------- validation
    def _check_features(self, features, labels, name: str = "features") -> list:
        xs = self._check_list(features, name)
        for m, x in enumerate(xs):
            if x.dim() != 2:
                raise ValueError(f"{name}[{m}] must have shape [B, D_{m}] (pooled features), got {tuple(x.shape)}")
            if x.shape[1] < 1:
                raise ValueError(f"{name}[{m}] must have at least one feature column, got shape {tuple(x.shape)}")
        if self._widths is not None:
            widths = [x.shape[1] for x in xs]
            if widths != self._widths:
                raise ValueError(f"{name} widths {widths} differ from the prototypes' widths {self._widths}")
        _validate.check_labels(labels, xs[0].shape[0], xs[0].device, "labels")
        check_label_values(labels, self.num_classes, self.ignore_index)
        return xs

    # ---------------------------------------------------------------- prototype refresh
    def begin_refresh(self) -> None:
        """Start a refresh pass (no-grad, eval-mode encoders; authors: before every epoch, over the first
        floor(n_batches / 10) batches)."""
        self._refreshing = True
        self._acc = None

    def refresh(self, features, labels: torch.Tensor) -> None:
        """Add one batch of the refresh pass: features a list of M [B, D_m] (detached) and labels [B]."""
        if not self._refreshing:
            raise RuntimeError("PMR.refresh() outside a refresh pass: call begin_refresh() first")
        xs = self._check_features(features, labels)
        self._to_device(xs[0].device)
        if self._acc is None:
            widths = [x.shape[1] for x in xs]
            self._acc = new_refresh_buffers(self.num_modalities, self.num_classes, max(widths), self._device)
            self._pass_widths = widths
        elif [x.shape[1] for x in xs] != self._pass_widths:
            raise ValueError(f"features widths {[x.shape[1] for x in xs]} differ from this pass's {self._pass_widths}")
        with torch.no_grad():
            pmr_class_sums_([x.detach() for x in xs], labels, *self._acc, ignore_index=self.ignore_index)

    def end_refresh(self) -> None:
        """Finish the pass: (all-reduce the class sums and counts under sync,) then P = mean on the first refresh,
        else (1 - mu) mean + mu P; a class with no row keeps its prototype. No host sync."""
        if not self._refreshing:
            raise RuntimeError("PMR.end_refresh() without begin_refresh()")
        if self._acc is None:
            if self._protos is None:
                raise RuntimeError(
                    "PMR.end_refresh(): the first refresh saw no batch; call refresh(features, labels) "
                    "at least once (on every rank) before end_refresh()"
                )
            self._acc = new_refresh_buffers(*self._protos.shape, self._device)  # this rank saw no batch
            self._pass_widths = self._widths
        sums, counts = self._acc
        if self._sync():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        self._apply_refresh(lambda protos, first: pmr_refresh_(protos, sums, counts, mu=self.mu, first=first))
        self._refresh_skipped = refresh_skipped(counts).clone()
        self._refreshing, self._acc = False, None

    def update_prototypes(self, features, labels: torch.Tensor) -> None:
        """A whole refresh from one set of rows (e.g. the concatenated subset): one launch on CUDA without sync."""
        if self._refreshing:
            raise RuntimeError("PMR.update_prototypes() inside a refresh pass; call end_refresh() first")
        xs = self._check_features(features, labels)
        self._to_device(xs[0].device)
        self._pass_widths = [x.shape[1] for x in xs]
        z = [x.detach() for x in xs]
        skipped = self._apply_refresh(
            lambda protos, first: pmr_update_prototypes_(
                protos, z, labels, mu=self.mu, first=first, ignore_index=self.ignore_index, sync=self._sync()
            )
        )
        self._refresh_skipped = skipped.clone()

    def _apply_refresh(self, run):
        first = self._protos is None
        plain = first or (self.official and self.refreshes < 2)  # the authors' second refresh: a plain mean too
        protos = (
            torch.zeros(self.num_modalities, self.num_classes, max(self._pass_widths), device=self._device)
            if first
            else self._protos
        )
        with torch.no_grad():
            out = run(protos, plain)
        self._protos, self._widths = protos, list(self._pass_widths)
        self.refreshes += 1
        return out

    # ---------------------------------------------------------------- training step
    def loss(self, features, labels: torch.Tensor) -> torch.Tensor:
        """sum_m c_m PCE_m of this step (observes the batch; 0 outside the window, disabled or in eval mode), to add
        to the user's CE. features: the M pooled encoder outputs [B, D_m] (with grad: the term's gradient reaches
        z_m only; c and the prototypes are constants). Call once per step, after at least one refresh."""
        xs = self._check_features(features, labels)
        modulate = self.in_window()
        if not (self.enabled and self.training) or (self._protos is None and not modulate):
            return torch.zeros((), device=xs[0].device)
        if self._protos is None:
            raise RuntimeError(
                "PMR.loss() before any prototype exists: run a refresh first (begin_refresh(), "
                "refresh(...), end_refresh(), or update_prototypes(...))"
            )
        if self._refreshing:
            raise RuntimeError("PMR.loss() inside a refresh pass; call end_refresh() first")
        if xs[0].device != self._device:
            raise ValueError(f"features are on {xs[0].device} but the prototypes are on {self._device}")
        self._begin_observe("loss")
        res = pmr_loss(
            pmr_pad(xs),
            self._protos,
            labels,
            alpha=self.alpha if modulate else 0.0,
            ignore_index=self.ignore_index,
            sync=self._sync(),
        )
        self._stats = {k: res[k] for k in ("scores", "ratios", "coefficients", "flag")}
        self._pce = res["pce"]
        self._mark_on_backward(xs)
        return res["loss"]

    def objective(self, model, logits, feats, labels):
        """The protocol's hook 4: the fused cross-entropy plus sum_m c_m PCE_m (loss())."""
        return masked_mean_ce(logits, labels, self.ignore_index) + self.loss(feats, labels), None

    def epoch_start(self, model, epoch: int, batches=None) -> None:
        """The protocol's hook 6: set_epoch, then (when `batches` is given) refresh the prototypes from its first
        max(1, floor(len / 10)) batches, no grad, eval mode (the authors' schedule)."""
        super().epoch_start(model, epoch, batches)
        if batches is None:
            return
        if not hasattr(batches, "__len__"):
            raise TypeError("PMR.epoch_start: batches must have a length (a DataLoader or a list)")
        n = max(1, len(batches) // 10)
        with torch.no_grad(), protocol.eval_mode(model):
            self.begin_refresh()
            for i, batch in enumerate(batches):
                if i >= n:
                    break
                inputs, labels, _ = protocol.split_batch(batch)
                self.refresh(self.encode(model, protocol.check_inputs(inputs, self.num_modalities)), labels)
            self.end_refresh()

    # ---------------------------------------------------------------- state
    def _hyperparameters(self) -> dict:
        return {"alpha": self.alpha, "mu": self.mu, "num_classes": self.num_classes}

    def _extra_tensors(self) -> dict:
        return {"pce": self._pce}

    def _load_extra_tensors(self, tensors: dict) -> None:
        self._pce = tensors["pce"]

    _optional_tensors = ("prototypes",)  # absent before the first refresh

    def _device_state(self) -> dict:
        """The common state plus the prototypes [M, C, D] (after the first refresh). Save between refresh passes
        (the accumulators of an open pass are not saved)."""
        state = super()._device_state()
        if self._protos is not None:
            state["prototypes"] = self._protos
        return state

    def _host_state(self) -> dict:
        return {"widths": None if self._widths is None else list(self._widths), "refreshes": self.refreshes}

    def _load_state(self, state: dict, strict: bool) -> None:
        if not isinstance(state, dict) or any(k not in state for k in ("widths", "refreshes")):
            raise ValueError("state must be a PMR state_dict() (with the prototypes' 'widths' and 'refreshes')")
        tensors = dict(state.get("tensors") or {})
        protos, widths = tensors.pop("prototypes", None), state["widths"]
        check_int(state["refreshes"], "state['refreshes']")
        if protos is not None:
            m, c = self.num_modalities, self.num_classes
            if (
                not isinstance(protos, torch.Tensor)
                or protos.dtype != torch.float32
                or protos.dim() != 3
                or tuple(protos.shape[:2]) != (m, c)
            ):
                raise ValueError(
                    f"state['prototypes'] must be a float32 tensor [{m}, {c}, D], got "
                    f"{getattr(protos, 'dtype', type(protos).__name__)} "
                    f"{tuple(protos.shape) if isinstance(protos, torch.Tensor) else ''}"
                )
            if protos.is_meta:
                raise ValueError(
                    "state['prototypes'] is a meta tensor (no data); load a state_dict saved with its "
                    "values (e.g. torch.load(..., map_location='cpu'))"
                )
            if not isinstance(widths, list) or len(widths) != m or max(widths) != protos.shape[2]:
                raise ValueError(
                    f"state['widths'] must list {m} widths whose maximum is {protos.shape[2]}, got {widths!r}"
                )
        elif widths is not None:
            raise ValueError("state has prototype widths but no 'prototypes' tensor")
        state = {**state, "tensors": tensors}
        self._check_state(self._upgrade_state(state), strict)  # everything checked before anything changes
        new_protos = None if protos is None else protos.to(self._device).clone()
        super()._load_state(state, strict)
        self._protos = new_protos
        self._widths = None if widths is None else list(widths)
        self.refreshes = int(state["refreshes"])
        self._refreshing, self._acc = False, None
