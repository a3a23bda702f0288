"""MMPareto balancer (Wei & Hu, ICML 2024): Pareto-combined encoder gradients of the multimodal and
the unimodal losses, magnitude restored."""

from __future__ import annotations

import torch

from mmkernels import _validate
from mmkernels.mmpareto import MMParetoLayout, _check_gamma_rescale, _combine_flat
from mmkernels.reference import MMPARETO_GAMMA

from . import _dtensor, protocol
from ._base import Balancer, masked_mean_ce


class MMPareto(Balancer):
    """Per encoder k, g_m = grad of the multimodal loss and g_u = grad of k's unimodal loss; on conflict (cos <= 0)
    the encoder's gradient becomes the min-norm combination 2 (w_m g_m + w_u g_u), rescaled per tensor to at least the
    norm of g_m + g_u, times gamma; without conflict gamma (g_m + g_u). Heads and fusion get the plain gradient of
    L_mm + sum_k L_k (no gamma).

        bal = MMPareto(2, params=[enc_a.parameters(), enc_v.parameters()])
        feats = [enc_a(xa), enc_v(xv)]
        loss_mm = F.cross_entropy(fusion(feats), y)
        losses = [F.cross_entropy(head_a(feats[0]), y), F.cross_entropy(head_v(feats[1]), y)]
        opt.zero_grad(); bal.backward(loss_mm, losses); opt.step(); bal.step()

    backward(): L_mm.backward (the encoders' gradients are copied into one stash buffer per dtype), sum_k L_k.backward
    (each unimodal loss should reach only its own encoder), then one fused op combines the two in place (3 launches
    on CUDA, no host sync). Outside the window, when disabled, in eval mode: (L_mm + sum_k L_k).backward().
    After backward() the encoders' .grad are views of a flat buffer the balancer owns (a parameter no loss reaches
    raises). Arguments: params: M iterables of encoder tensors (no tensor in two encoders; leave heads out);
    gamma > 0 (1.5, the authors'); rescale "per_tensor" (authors': one r per tensor) or "global" (one per encoder).
    Statistics: `ratios` = cos per encoder, `coefficients` = w_m per encoder (0.5 without conflict), `weights` [M, 2],
    `scores` = 1. where the Pareto rule acted (conflict), flag 1 if an encoder's inner products were not finite
    (its gradient is 0: nothing non-finite reaches a parameter), else 2 if a Pareto point vanished (below).
    DDP (sync, default: when a process group with > 1 rank is up): DistributedDataParallel allows one backward per
    forward, so there g_m comes from torch.autograd.grad (no DDP hook), is averaged by one all_reduce per dtype
    buffer, and ONE backward of L_mm + sum_k L_k (averaged by DDP) follows; the kernels take g_u = that - g_m. Every
    rank combines the same rank-averaged g_m and g_u, so the replicas stay equal. (g_u as a difference carries the
    rounding of the summed gradient: fine in fp32, coarse for bf16 gradients.)
    FSDP2 / HSDP (fully_shard, DTensor parameters): two backwards as in one process (FSDP2 reduce-scatters each), the
    local shards of g_m and g_u in the balancer's buffers, the per-tensor inner products [T, 3] (fp64) all-reduced
    over the shard group before the scales (one collective, 24 T bytes), the combination written into the shards'
    .grad (which stay FSDP2's DTensors, not views of the buffer).
    Gradient accumulation: one backward() per micro-batch, each followed by bal.step() (the step counter, and so a
    unit="step" window, counts micro-batches), optimizer.step() after the last. Each backward() combines its own
    micro-batch's g_m and g_u and ADDS the result to what .grad already held, so the accumulated .grad is the sum
    of the per-micro-batch combinations (not the combination of the summed gradients: the Pareto weights are
    per micro-batch, as with a smaller batch). The held gradient is moved aside (no copy when .grad are the
    balancer's views) and added back after the combine. Statistics are the last micro-batch's. Under DDP every
    micro-batch all-reduces its g_m: do not wrap the backward in no_sync().
    Non-finite g_m or g_u in an encoder: its gradient is 0 for this micro-batch and flag = 1; exactly opposite
    g_m and g_u (the Pareto point vanishes): gamma (g_m + g_u) for those tensors and flag = 2
    (mmkernels._ref_mmpareto, "Degenerate cases").
    """

    method = "mmpareto"
    neutral = 0.5

    def __init__(
        self, num_modalities: int, *, params, gamma: float = MMPARETO_GAMMA, rescale: str = "per_tensor", **kwargs
    ):
        super().__init__(num_modalities, **kwargs)
        _check_gamma_rescale(gamma, rescale)
        self.gamma, self.rescale = float(gamma), rescale
        self._params = self._check_params(params)
        self._shard_group = _dtensor.common_shard_group(self._params)
        self._layout = MMParetoLayout([[_dtensor.local(p.detach()) for p in group] for group in self._params])
        self._flats = self._stash = self._held = self._gu = None
        self._gu_views = None
        self._gu_step = -1  # step whose unimodal gradients the protocol's hook has captured
        self._capturing = False
        self._views = self._stash_views = self._held_views = None
        m = self.num_modalities
        self._stats["weights"] = torch.full((m, 2), 0.5)
        self._stats["scores"] = torch.zeros(m)

    def _check_params(self, params) -> list:
        m = self.num_modalities
        if not isinstance(params, (list, tuple)) or len(params) != m:
            got = len(params) if isinstance(params, (list, tuple)) else type(params).__name__
            raise ValueError(f"params must be a list of num_modalities={m} iterables of encoder tensors, got {got}")
        groups, seen, device = [], {}, None
        for k, group in enumerate(params):
            ts = [group] if isinstance(group, torch.Tensor) else list(group)
            if not ts:
                raise ValueError(f"params[{k}] is empty: list encoder {k}'s parameter tensors")
            for i, t in enumerate(ts):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"params[{k}][{i}] must be a tensor, got {type(t).__name__}")
                _dtensor.check_sharding(t, f"params[{k}][{i}]")
                _validate.check_float(t, f"params[{k}][{i}]")
                if not t.requires_grad:
                    raise ValueError(f"params[{k}][{i}] does not require grad: list only trained encoder tensors")
                if id(t) in seen:
                    raise ValueError(
                        f"params[{k}][{i}] is also params{list(seen[id(t)])}: a tensor may belong to one encoder only"
                    )
                seen[id(t)] = (k, i)
                device = device or t.device
                if t.device != device:
                    raise ValueError(f"params[{k}][{i}] is on {t.device} but params[0][0] is on {device}")
            groups.append(ts)
        return groups

    # ---------------------------------------------------------------- statistics
    @property
    def cos(self) -> torch.Tensor:
        """cos(g_m, g_u) per encoder of the last combined step, [M] fp32 (0 when a gradient is zero)."""
        return self._stats["ratios"]

    @property
    def weights(self) -> torch.Tensor:
        """(w_m, w_u) per encoder of the last combined step, [M, 2] fp32."""
        return self._stats["weights"]

    def _move(self, device) -> None:
        super()._move(device)
        self._gu = self._gu_views = None
        self._gu_step = -1
        self._flats = self._stash = self._views = self._stash_views = None
        self._held = self._held_views = None

    def _hparams_state(self) -> dict:
        return {**super()._hparams_state(), "gamma": self.gamma, "rescale": self.rescale}

    # ---------------------------------------------------------------- the protocol
    def objective(self, model, logits, feats, labels):
        """The protocol's hook 4: L = CE(f) + sum_k CE(u_k), u = the model's unimodal logits (differentiable). One
        backward of L (any trainer's); when backward reaches L, a hook takes the encoders' share of sum_k CE(u_k),
        g_u, with the same incoming gradient (loss scaling, accumulation) and adds it to a buffer; so after the
        step's last backward, .grad = g_m + g_u summed over the micro-batches, and before_optimizer_step() combines
        g_m = .grad - g_u and g_u: the combination of the accumulated gradients, as with one large batch."""
        u = protocol.unimodal_logits(model, feats, detach=False)
        mm = masked_mean_ce(logits, labels, self.ignore_index)
        uni = masked_mean_ce(u[0], labels, self.ignore_index)
        for m in range(1, self.num_modalities):
            uni = uni + masked_mean_ce(u[m], labels, self.ignore_index)
        total = mm + uni
        if self.active and torch.is_grad_enabled() and total.requires_grad:
            if self._shard_group is not None:
                raise NotImplementedError(
                    "MMPareto under FSDP2 (sharded params) is run by bal.backward(multimodal_loss, unimodal_losses), "
                    "not through bal(model, inputs, labels)"
                )
            self._hook_unimodal(total, uni, self._step)
        return total, u

    @torch.compiler.disable
    def _hook_unimodal(self, total, uni, step: int) -> None:
        """Registered outside any compiled graph (a graph break under torch.compile): the hook runs a reentrant
        autograd.grad, which a compiled region cannot hold."""
        total.register_hook(lambda g: self._capture_unimodal(uni, g, step))

    def _capture_unimodal(self, uni, grad, step: int) -> None:
        """Inside the backward of L: g_u of the encoders' tensors (the same incoming gradient as L's), added to the
        buffer (reentrant autograd.grad; the outer backward then goes on over the retained graph)."""
        if self._capturing:  # a compiled graph holds L and sum_k L_k together: the inner backward passes L again
            return
        params = [p for group in self._params for p in group]
        self._capturing = True
        try:
            g_u = torch.autograd.grad(uni, params, grad_outputs=grad, retain_graph=True, allow_unused=True)
        finally:
            self._capturing = False
        device = params[0].device
        self._to_device(device)
        if self._gu is None:
            self._gu = self._layout.empty_flats(device)
            self._gu_views = [v for group in self._layout.views(self._gu) for v in group]
        if self._gu_step != step:
            for b in self._gu:
                b.zero_()
            self._gu_step = step
        reached = [(v, g) for g, v in zip(g_u, self._gu_views) if g is not None]
        if reached:
            torch._foreach_add_([v for v, _ in reached], [_dtensor.local(g) for _, g in reached])
        self._backward_step = self._step

    def before_optimizer_step(self, grad_divisor=None) -> None:
        """The protocol's hook 5: combine the accumulated g_m = .grad - g_u and g_u (above) into .grad. Call it on the
        gradients as backward left them, or pass grad_divisor: what they were divided by since (GradScaler's scale
        after unscale_, a device tensor or a number). Under DDP g_u is averaged over the ranks (one all_reduce per
        dtype buffer), as DDP averaged .grad."""
        super().before_optimizer_step(grad_divisor)
        if self._gu_step != self._step or not self.active:
            return
        device = self._params[0][0].device
        self._ensure_buffers(device)
        params = [p for group in self._params for p in group]
        for i, p in enumerate(params):
            if p.grad is None:
                k, j = self._position(i)
                raise RuntimeError(
                    f"params[{k}][{j}] received no gradient from the multimodal loss nor from the "
                    f"unimodal losses: remove it from params= (or check that its encoder is used)"
                )
        if self._sync():
            world = torch.distributed.get_world_size()
            for b in self._gu:
                torch.distributed.all_reduce(b)
                b.div_(world)
        grads = [p.grad for p in params]
        with torch.no_grad():
            torch._foreach_copy_(self._stash_views, grads)  # g_m + g_u (as .grad holds them)
            torch._foreach_copy_(self._views, self._gu_views)
            if grad_divisor is not None:
                for b in self._flats:
                    b.div_(grad_divisor)
            torch._foreach_sub_(self._stash_views, self._views)  # g_m
            stats = _combine_flat(self._layout, self._stash, self._flats, self.gamma, self.rescale)
            torch._foreach_copy_(grads, self._views)
        self._gu_step = -1
        self._store_combine(stats)

    # ---------------------------------------------------------------- the step
    def _check_losses(self, multimodal_loss, unimodal_losses) -> list:
        _validate.check_float(multimodal_loss, "multimodal_loss")
        if multimodal_loss.numel() != 1:
            raise ValueError(f"multimodal_loss must be a scalar, got shape {tuple(multimodal_loss.shape)}")
        if isinstance(unimodal_losses, torch.Tensor):
            raise TypeError(
                f"unimodal_losses must be a list of num_modalities={self.num_modalities} scalar losses, got one tensor"
            )
        if not isinstance(unimodal_losses, (list, tuple)) or len(unimodal_losses) != self.num_modalities:
            got = len(unimodal_losses) if isinstance(unimodal_losses, (list, tuple)) else type(unimodal_losses).__name__
            raise ValueError(
                f"unimodal_losses must be a list of num_modalities={self.num_modalities} scalar losses, got {got}"
            )
        for m, loss in enumerate(unimodal_losses):
            _validate.check_float(loss, f"unimodal_losses[{m}]")
            if loss.numel() != 1:
                raise ValueError(f"unimodal_losses[{m}] must be a scalar, got shape {tuple(loss.shape)}")
            if loss.device != multimodal_loss.device:
                raise ValueError(
                    f"unimodal_losses[{m}] is on {loss.device} but multimodal_loss on {multimodal_loss.device}"
                )
        if not multimodal_loss.requires_grad:
            raise ValueError("multimodal_loss does not require grad (computed under no_grad?)")
        return list(unimodal_losses)

    def backward(self, multimodal_loss: torch.Tensor, unimodal_losses, *, retain_graph: bool = False) -> None:
        """Both backwards and the combination (class docstring). Call once per step (per micro-batch when
        accumulating: the result is added to what .grad holds)."""
        losses = self._check_losses(multimodal_loss, unimodal_losses)
        self._roll_over()
        if self._backward_step == self._step:
            raise RuntimeError(
                f"MMPareto.backward() was called twice in step {self._step}; call bal.step() after "
                f"optimizer.step() (or pass optimizer= to the constructor)"
            )
        uni = losses[0]
        for loss in losses[1:]:
            uni = uni + loss
        if not (self.active and torch.is_grad_enabled()):
            (multimodal_loss + uni).backward(retain_graph=retain_graph)
            self._backward_step = self._step
            return
        device = self._params[0][0].device
        self._to_device(device)
        if self._shard_group is not None:
            stats = self._backward_sharded(multimodal_loss, uni, retain_graph, device)
        else:
            stats = self._backward_replicated(multimodal_loss, uni, retain_graph, device)
        self._backward_step = self._step
        self._store_combine(stats)

    def _store_combine(self, stats: dict) -> None:
        """The combine op's statistics as the balancer's: scores = conflict, ratios = cos, coefficients = w_m."""
        w = stats["weights"]
        self._stats = {
            "scores": stats["conflict"],
            "ratios": stats["cos"],
            "coefficients": w[:, 0],
            "weights": w,
            "flag": stats["flag"],
        }

    def _backward_replicated(self, multimodal_loss, uni, retain_graph: bool, device) -> dict:
        """One process or DDP: .grad become views of the flat buffer (class docstring)."""
        held = self._hold_accumulated(device)
        if self._sync():
            self._backward_summed(multimodal_loss, uni, retain_graph, device)
            stats = _combine_flat(self._layout, self._stash, self._flats, self.gamma, self.rescale, summed=True)
        else:
            multimodal_loss.backward(retain_graph=True)
            missing = self._stash_grads(device)
            uni.backward(retain_graph=retain_graph)
            self._adopt_grads(missing)
            stats = _combine_flat(self._layout, self._stash, self._flats, self.gamma, self.rescale)
        if held is not None:  # gradient accumulation: this micro-batch's combination + what .grad held
            torch._foreach_add_(self._flats, held)
        return stats

    def _backward_sharded(self, multimodal_loss, uni, retain_graph: bool, device) -> dict:
        """FSDP2: .grad are DTensors FSDP2 reduce-scatters (averaged over ranks) after each backward. L_mm.backward,
        its local shards -> the stash; sum_k L_k.backward, its local shards -> the flat buffer; the per-tensor inner
        products [T, 3] are all-reduced over the shard group (one collective), the combination is applied to the
        local shards and written into .grad (plus what .grad held before: gradient accumulation)."""
        self._ensure_buffers(device)
        params = [p for group in self._params for p in group]
        held = [None if p.grad is None else _dtensor.local(p.grad).clone() for p in params]
        for p in params:
            p.grad = None
        multimodal_loss.backward(retain_graph=True)
        self._copy_local_grads(params, self._stash_views)
        mm_grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        uni.backward(retain_graph=retain_graph)
        self._copy_local_grads(params, self._views)
        for i, p in enumerate(params):
            if p.grad is None and mm_grads[i] is None:
                k, j = self._position(i)
                raise RuntimeError(
                    f"params[{k}][{j}] received no gradient from the multimodal loss nor from the "
                    f"unimodal losses: remove it from params= (or check that its encoder is used)"
                )
            if p.grad is None:
                p.grad = mm_grads[i]
        stats = _combine_flat(
            self._layout,
            self._stash,
            self._flats,
            self.gamma,
            self.rescale,
            reduce=lambda abc: _dtensor.all_reduce_stats(abc, self._shard_group),
        )
        with torch.no_grad():
            for p, v, h in zip(params, self._views, held):
                g = _dtensor.local(p.grad)
                g.copy_(v) if h is None else torch.add(v, h, out=g)
        return stats

    @staticmethod
    def _copy_local_grads(params, views) -> None:
        with torch.no_grad():
            for p, v in zip(params, views):
                v.copy_(_dtensor.local(p.grad)) if p.grad is not None else v.zero_()

    def _backward_summed(self, multimodal_loss, uni, retain_graph: bool, device) -> None:
        """The distributed path (DDP allows one backward per forward): g_m of the encoders by autograd.grad (no DDP
        hook fires), averaged over ranks by one all_reduce per dtype buffer; then ONE backward of L_mm + sum_k L_k,
        which DDP averages as usual (the heads' gradient is final); the kernels take g_u = that - g_m."""
        self._ensure_buffers(device)
        params = [p for group in self._params for p in group]
        g_mm = torch.autograd.grad(multimodal_loss, params, retain_graph=True, allow_unused=True)
        reached = [(v, g) for g, v in zip(g_mm, self._stash_views) if g is not None]
        if reached:
            torch._foreach_copy_([v for v, _ in reached], [g for _, g in reached])
        for g, v in zip(g_mm, self._stash_views):
            if g is None:
                v.zero_()
        world = torch.distributed.get_world_size()
        for s in self._stash:
            torch.distributed.all_reduce(s)
            s.div_(world)
        (multimodal_loss + uni).backward(retain_graph=retain_graph)
        self._adopt_grads(range(len(params)))

    def _hold_accumulated(self, device):
        """Move what the encoders' .grad hold (earlier micro-batches) aside, so that the backwards below see only this
        micro-batch's g_m and g_u; returns the held buffers (one per dtype) or None when every .grad is None.
        When every .grad is a view of the flat buffer, the buffers swap roles (no copy); otherwise one copy.
        Leaves every encoder .grad None."""
        params = [p for group in self._params for p in group]
        grads = [p.grad for p in params]
        if all(g is None for g in grads):
            return None
        self._ensure_buffers(device)
        if self._held is None:
            self._held = self._layout.empty_flats(device)
            self._held_views = [v for group in self._layout.views(self._held) for v in group]
        if all(g is v for g, v in zip(grads, self._views)):
            self._flats, self._held = self._held, self._flats
            self._views, self._held_views = self._held_views, self._views
        else:
            reached = [(v, g) for g, v in zip(grads, self._held_views) if g is not None]
            torch._foreach_copy_([v for v, _ in reached], [g for _, g in reached])
            for g, v in zip(grads, self._held_views):
                if g is None:
                    v.zero_()
        for p in params:
            p.grad = None
        return self._held

    def _ensure_buffers(self, device) -> None:
        if self._flats is None:
            self._flats = self._layout.empty_flats(device)
            self._stash = self._layout.empty_flats(device)
            self._views = [v for group in self._layout.views(self._flats) for v in group]
            self._stash_views = [v for group in self._layout.views(self._stash) for v in group]

    def _stash_grads(self, device) -> list:
        """After the multimodal backward: g_m -> the stash buffer; .grad <- zeroed views of the flat buffer (the
        unimodal backward accumulates into them). Returns the tensors the multimodal loss did not reach."""
        self._ensure_buffers(device)
        params = [p for group in self._params for p in group]
        grads = [p.grad for p in params]
        if all(g is v for g, v in zip(grads, self._views)):  # the user zeroed in place: one copy per buffer
            for s, f in zip(self._stash, self._flats):
                s.copy_(f)
        else:
            reached = [(v, g) for g, v in zip(grads, self._stash_views) if g is not None]
            if reached:
                torch._foreach_copy_([v for v, _ in reached], [g for _, g in reached])
            for g, v in zip(grads, self._stash_views):
                if g is None:
                    v.zero_()
        for f in self._flats:
            f.zero_()
        missing = []
        for i, (p, g, v) in enumerate(zip(params, grads, self._views)):
            if g is None:
                missing.append(i)  # left None: the unimodal backward tells whether any loss reaches it
            elif g is not v:
                p.grad = v
        return missing

    def _adopt_grads(self, missing) -> None:
        """Tensors `missing` (indices) had no .grad before the last backward: move what it left into the flat buffer."""
        params = [p for group in self._params for p in group]
        for i in missing:
            p = params[i]
            if p.grad is self._views[i]:
                continue
            if p.grad is None:
                k, j = self._position(i)
                raise RuntimeError(
                    f"params[{k}][{j}] received no gradient from the multimodal loss nor from the "
                    f"unimodal losses: remove it from params= (or check that its encoder is used)"
                )
            self._views[i].copy_(p.grad)
            p.grad = self._views[i]

    def _position(self, i: int) -> tuple:
        for k, group in enumerate(self._params):
            if i < len(group):
                return k, i
            i -= len(group)
        raise IndexError(i)
