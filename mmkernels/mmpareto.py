"""MMPareto's gradient combination (Wei & Hu, ICML 2024): per encoder, the min-norm (Pareto) weights
of the multimodal and the unimodal gradient on conflict, magnitude restored, gamma (default 1.5) on top.

mmpareto_combine_(grads_mm, grads, *, gamma=1.5, rescale="per_tensor") -> stats
    Lists of tensors, K encoders (2..8): grads_mm[k][i] = g_m of encoder k's tensor i, grads[k][i] = g_u (same shape);
    grads is overwritten with the combined gradient. Any memory layout; on CUDA the tensors are packed into one flat
    buffer per dtype and copied back (two extra passes): the balancer (mmkernels.api.MMPareto) owns flat buffers and
    calls mmpareto_combine_flat_ instead.
MMParetoLayout(params) / mmpareto_combine_flat_(layout, flats_mm, flats, ...)
    The tensors of K encoders laid end to end in one flat buffer per dtype; the block tables of the kernels are built
    once and uploaded once per device.

Backends: Triton on CUDA tensors (3 launches: reduce, finalize, write; mmkernels/triton_ops/mmpareto.py), the
reference math (mmkernels.reference.mmpareto_*) elsewhere: on flat CPU buffers float64 dots and a write per tensor
(in buckets of up to BUCKET elements, no host read), on lists the reference itself. Every backend takes the inner
products, weights and scales in float64 and forms the combination in float64 (rounded once), so ||h_T|| keeps its
digits when the Pareto point nearly cancels. Statistics: cos [K], weights [K, 2] (w_m, w_u), conflict [K] (1. where the
Pareto rule acted), flag [] (1.: an encoder's inner products were not finite, its gradient is 0; else 2.: a Pareto point
vanished (exactly opposite gradients), that tensor fell back to gamma (g_m + g_u); see mmkernels.reference.mmpareto),
fp32 on the grads' device.
No host sync on any path.
"""

from __future__ import annotations


import torch

from . import reference
from ._backend import backend_for
from ._validate import check_choice, check_float, check_num_modalities, check_real

RESCALE = reference.MMPARETO_RESCALE
_BACKENDS = ("reference", "triton")
BUCKET = 1 << 20  # elements per CPU work unit (two float64 scratch vectors of this size: 16 MiB)


def _check_gamma_rescale(gamma, rescale) -> None:
    check_real(gamma, "gamma", low=0.0, low_open=True)
    check_choice(rescale, RESCALE, "rescale")


class MMParetoLayout:
    """Where each encoder tensor lives in the flat buffers: one buffer per dtype ("group"), tensors end to end.

    params: K lists of tensors (or shapes with dtypes: anything with .shape, .dtype, .numel()). Tensor index t runs
    over encoders then tensors (params[0][0], params[0][1], ..., params[1][0], ...).
    Attributes: groups (list of dtypes), numel[g], slots[t] = (group, offset, numel, shape), encoder_of[t].
    """

    def __init__(self, params):
        self.num_encoders = len(params)
        self.dtypes: list = []
        self.numel: list = []
        self.slots: list = []
        self.encoder_of: list = []
        for k, group in enumerate(params):
            for p in group:
                if p.dtype not in self.dtypes:
                    self.dtypes.append(p.dtype)
                    self.numel.append(0)
                g = self.dtypes.index(p.dtype)
                n = p.numel()
                self.slots.append((g, self.numel[g], n, tuple(p.shape)))
                self.numel[g] += n
                self.encoder_of.append(k)
        self._tables: dict = {}

    @property
    def num_tensors(self) -> int:
        return len(self.slots)

    def views(self, flats) -> list:
        """K lists of views of the flat buffers flats[g], shaped like the tensors."""
        out = [[] for _ in range(self.num_encoders)]
        for (g, off, n, shape), k in zip(self.slots, self.encoder_of):
            out[k].append(flats[g][off : off + n].view(shape))
        return out

    def empty_flats(self, device) -> list:
        return [torch.zeros(n, dtype=dt, device=device) for dt, n in zip(self.dtypes, self.numel)]

    def buckets(self) -> list:
        """The CPU path's work units: runs of consecutive tensors of one dtype group (end to end in its buffer) of at
        most BUCKET elements together; a larger tensor is a bucket alone. Each: (group, start, stop, tensor indices,
        spans [(lo, hi)] in bucket-local offsets)."""
        if "buckets" not in self._tables:
            out = []
            for t, (g, off, n, _) in enumerate(self.slots):
                if not out or out[-1][0] != g or out[-1][2] != off or out[-1][2] - out[-1][1] + n > BUCKET:
                    out.append([g, off, off, [], []])
                cur = out[-1]
                cur[3].append(t)
                cur[4].append((off - cur[1], off - cur[1] + n))
                cur[2] = off + n
            self._tables["buckets"] = [tuple(b) for b in out]
        return self._tables["buckets"]

    def scratch(self, device) -> tuple:
        """Two float64 vectors of the largest bucket's size on `device` (the CPU path's work space; made once)."""
        key = ("scratch", str(device))
        if key not in self._tables:
            n = max((b[2] - b[1] for b in self.buckets()), default=0)
            self._tables[key] = tuple(torch.empty(n, dtype=torch.float64, device=device) for _ in range(2))
        return self._tables[key]

    def tables(self, device, chunk: int) -> dict:
        """Block tables of the Triton kernels on `device` (built and uploaded once per device)."""
        key = (str(device), chunk)
        if key not in self._tables:
            self._tables[key] = self._build_tables(torch.device(device), chunk)
        return self._tables[key]

    def _build_tables(self, device, chunk: int) -> dict:
        per_group = [([], [], []) for _ in self.dtypes]
        t_blk0, t_nblk, base = [], [], 0
        blocks_of_tensor = []
        for t, (g, off, n, _) in enumerate(self.slots):
            starts = list(range(off, off + n, chunk))
            blocks_of_tensor.append((g, starts, off + n, t))
        # blocks are numbered group by group so that each group's launch writes a contiguous range of partials
        gbase, groups = [], []
        for g in range(len(self.dtypes)):
            gbase.append(base)
            start, end, tensor = per_group[g]
            for gg, starts, stop, t in blocks_of_tensor:
                if gg != g:
                    continue
                while len(t_blk0) <= t:
                    t_blk0.append(0)
                    t_nblk.append(0)
                t_blk0[t], t_nblk[t] = base + len(start), len(starts)
                for s in starts:
                    start.append(s)
                    end.append(min(s + chunk, stop))
                    tensor.append(t)
            base += len(start)
        for g in range(len(self.dtypes)):
            start, end, tensor = per_group[g]
            groups.append(
                (
                    torch.tensor(start, dtype=torch.int64).to(device),
                    torch.tensor(end, dtype=torch.int64).to(device),
                    torch.tensor(tensor, dtype=torch.int32).to(device),
                    gbase[g],
                )
            )
        return {
            "groups": groups,
            "t_blk0": torch.tensor(t_blk0, dtype=torch.int32).to(device),
            "t_nblk": torch.tensor(t_nblk, dtype=torch.int32).to(device),
            "t_enc": torch.tensor(self.encoder_of, dtype=torch.int32).to(device),
            "num_tensors": self.num_tensors,
            "num_encoders": self.num_encoders,
            "num_blocks": base,
            "max_nblk": max(t_nblk, default=0),
            "lengths": [
                torch.tensor([n for gg, _, n, _ in self.slots if gg == g], dtype=torch.int64).to(device)
                for g in range(len(self.dtypes))
            ],
            "order": [
                torch.tensor([t for t, s in enumerate(self.slots) if s[0] == g], dtype=torch.int64).to(device)
                for g in range(len(self.dtypes))
            ],
            "encoder_of": torch.tensor(self.encoder_of, dtype=torch.int64).to(device),
            "tau": torch.tensor(
                [reference.mmpareto_vanish_tol(self.dtypes[g]) for g, *_ in self.slots], dtype=torch.float64
            ).to(device),
        }


def _flat_torch(
    layout: MMParetoLayout,
    flats_mm,
    flats,
    tables: dict,
    gamma: float,
    rescale: str,
    summed: bool = False,
    reduce=None,
) -> dict:
    """The reference math on flat buffers, bucket by bucket (MMParetoLayout.buckets): g_m and g_u copied into two
    float64 scratch vectors (one copy each per bucket), three float64 dots per tensor; then g_u <- s_m g_m + s_u g_u
    formed in float64 and stored, rounded once. A non-finite encoder gets scales 0 and its 0 * NaN / 0 * Inf values
    are set to 0 (finite inner products imply finite values, so nothing else is touched). No host read. summed:
    flats hold g_m + g_u; g_u is their difference (taken in float64, exact for fp32/fp16/bf16).
    reduce: None, or a function summing the [T, 3] float64 inner products in place over the ranks that hold the
    other shards of every tensor (FSDP2): the scales are then those of the full tensors, applied to this shard."""
    device = flats[0].device
    sx, sy = layout.scratch(device)
    buckets = layout.buckets()

    def load(bucket):
        g, start, stop, _, spans = bucket
        x, y = sx[: stop - start], sy[: stop - start]
        x.copy_(flats_mm[g][start:stop])
        y.copy_(flats[g][start:stop])
        if summed:
            y.sub_(x)
        return x, y, [x[lo:hi] for lo, hi in spans], [y[lo:hi] for lo, hi in spans]

    abc = torch.empty((layout.num_tensors, 3), dtype=torch.float64, device=device)
    loaded = None
    for bucket in buckets:
        loaded = load(bucket)
        for t, xt, yt in zip(bucket[3], loaded[2], loaded[3]):
            row = abc[t]
            torch.dot(xt, xt, out=row[0])
            torch.dot(xt, yt, out=row[1])
            torch.dot(yt, yt, out=row[2])
    if reduce is not None:
        reduce(abc)
    res = reference.mmpareto_scales(
        abc, tables["encoder_of"], layout.num_encoders, gamma=gamma, rescale=rescale, tau=tables["tau"]
    )
    keep = res.pop("keep")
    s_m, s_u = (v.unbind() for v in torch.where(keep.unsqueeze(1), res.pop("scale"), 0.0).unbind(1))
    for bucket in buckets:
        g, start, stop, tensors = bucket[:4]
        _, y, xs, ys = loaded if len(buckets) == 1 else load(bucket)  # one bucket: still in the scratch
        torch._foreach_mul_(ys, [s_u[t] for t in tensors])
        torch._foreach_addcmul_(ys, xs, [s_m[t] for t in tensors])
        flats[g][start:stop].copy_(y.nan_to_num_(nan=0.0))
    return {
        "cos": res["cos"],
        "weights": res["weights"],
        "conflict": res["conflict"].to(torch.float32),
        "flag": res["flag"],
    }


def mmpareto_combine_flat_(
    layout: MMParetoLayout,
    flats_mm,
    flats,
    *,
    gamma: float = reference.MMPARETO_GAMMA,
    rescale: str = "per_tensor",
    summed: bool = False,
) -> dict:
    """flats_mm[g], flats[g]: contiguous 1-D buffers [layout.numel[g]] of dtype layout.dtypes[g] holding g_m and g_u
    of every tensor (layout order); flats[g] is overwritten with the combined gradient. summed=True: flats[g] holds
    g_m + g_u (the gradient of the summed loss) and g_u is recovered as the difference. Returns the statistics."""
    _check_gamma_rescale(gamma, rescale)
    if len(flats_mm) != len(layout.dtypes) or len(flats) != len(layout.dtypes):
        raise ValueError(f"flats_mm and flats must hold one buffer per dtype group ({len(layout.dtypes)})")
    for g, (fm, fu) in enumerate(zip(flats_mm, flats)):
        for name, f in (("flats_mm", fm), ("flats", fu)):
            if f.dtype != layout.dtypes[g] or f.dim() != 1 or f.numel() != layout.numel[g] or not f.is_contiguous():
                raise ValueError(
                    f"{name}[{g}] must be a contiguous 1-D {layout.dtypes[g]} buffer of "
                    f"{layout.numel[g]} elements, got {f.dtype} {tuple(f.shape)}"
                )
            if f.device != flats[0].device:
                raise ValueError(f"{name}[{g}] is on {f.device} but flats[0] is on {flats[0].device}")
    return _combine_flat(layout, flats_mm, flats, gamma, rescale, summed=bool(summed))


def _combine_flat(layout, flats_mm, flats, gamma, rescale, *, summed: bool = False, reduce=None) -> dict:
    """reduce (FSDP2 shards, see _flat_torch) takes the torch path: the inner products are reduced between the two
    passes."""
    device = flats[0].device
    if reduce is not None:
        return _flat_torch(layout, flats_mm, flats, layout.tables(device, 1 << 62), gamma, rescale, summed, reduce)
    use_triton = backend_for(*flats, op="mmpareto_combine", available=_BACKENDS) == "triton" and all(
        f.dtype != torch.float64 for f in flats
    )
    if use_triton:
        from .triton_ops.mmpareto import CHUNK, mmpareto_combine_triton

        return mmpareto_combine_triton(
            flats_mm, flats, layout.tables(device, CHUNK), gamma=gamma, rescale=rescale, summed=summed
        )
    return _flat_torch(layout, flats_mm, flats, layout.tables(device, 1 << 62), gamma, rescale, summed)


_LAYOUTS: dict = {}


def _layout_of(grads) -> MMParetoLayout:
    """One layout (and one upload of its block tables per device) per distinct structure of shapes and dtypes."""
    key = tuple(tuple((tuple(g.shape), g.dtype) for g in group) for group in grads)
    if key not in _LAYOUTS:
        if len(_LAYOUTS) > 64:
            _LAYOUTS.clear()
        _LAYOUTS[key] = MMParetoLayout(grads)
    return _LAYOUTS[key]


def _check_lists(grads_mm, grads) -> None:
    for name, x in (("grads_mm", grads_mm), ("grads", grads)):
        if not isinstance(x, (list, tuple)):
            raise TypeError(
                f"{name} must be a list of K lists of tensors (one list per encoder), got {type(x).__name__}"
            )
    check_num_modalities(len(grads_mm), "len(grads_mm) (number of encoders)")
    if len(grads) != len(grads_mm):
        raise ValueError(f"grads must have one list per encoder like grads_mm ({len(grads_mm)}), got {len(grads)}")
    device = None
    for k, (gm, gu) in enumerate(zip(grads_mm, grads)):
        if isinstance(gm, torch.Tensor) or isinstance(gu, torch.Tensor) or len(gm) != len(gu) or not len(gm):
            raise ValueError(f"grads_mm[{k}] and grads[{k}] must be non-empty lists of the same length")
        for i, (a, b) in enumerate(zip(gm, gu)):
            check_float(a, f"grads_mm[{k}][{i}]")
            check_float(b, f"grads[{k}][{i}]")
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(
                    f"grads_mm[{k}][{i}] and grads[{k}][{i}] must match in shape and dtype, got "
                    f"{tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}"
                )
            device = device or a.device
            if a.device != device or b.device != device:
                raise ValueError(
                    f"grads_mm[{k}][{i}] / grads[{k}][{i}] are on {a.device} / {b.device}, "
                    f"expected every gradient on {device}"
                )


def mmpareto_combine_(grads_mm, grads, *, gamma: float = reference.MMPARETO_GAMMA, rescale: str = "per_tensor") -> dict:
    """In place: grads[k][i] <- MMPareto's gradient of encoder k's tensor i (module docstring). Returns the statistics
    {"cos" [K], "weights" [K, 2], "conflict" [K], "flag" []} fp32. gamma > 0; rescale "per_tensor" (authors') or
    "global"."""
    _check_lists(grads_mm, grads)
    _check_gamma_rescale(gamma, rescale)
    flat_u = [g for group in grads for g in group]
    if backend_for(*flat_u, op="mmpareto_combine", available=_BACKENDS) == "triton" and all(
        g.dtype != torch.float64 for g in flat_u
    ):
        layout = _layout_of(grads)

        def pack(lists):
            return [
                torch.cat([g.reshape(-1) for group in lists for g in group if g.dtype == dt]) for dt in layout.dtypes
            ]

        fm, fu = pack(grads_mm), pack(grads)
        stats = _combine_flat(layout, fm, fu, gamma, rescale)
        torch._foreach_copy_(flat_u, [v for group in layout.views(fu) for v in group])
        return stats
    out, stats = reference.mmpareto_combine(grads_mm, grads, gamma=gamma, rescale=rescale)  # float64 inside
    torch._foreach_copy_(flat_u, [g for group in out for g in group])
    return {
        "cos": stats["cos"],
        "weights": stats["weights"],
        "conflict": stats["conflict"].to(torch.float32),
        "flag": stats["flag"],
    }
