"""PMR ops (docs/methods/pmr.md): the prototype loss with its statistics, and the prototype refresh.

pmr_loss(features, prototypes, labels, alpha=): distances, softmax over classes, scores s_m, PCE_m, coefficients
  c_m and the loss sum_m c_m PCE_m, differentiable in the features (ONE Triton launch forward, one backward).
pmr_class_sums_ / pmr_refresh_ / pmr_update_prototypes_: the per-epoch refresh (index_add by label, counts, mean,
  EMA), in place.

Validation happens here, once; then the backend (mmkernels._backend.backend_for): the Triton kernels of
mmkernels/triton_ops/pmr.py on CUDA tensors, the reference (mmkernels/reference/pmr.py) elsewhere. Under torch.compile
the Triton path goes through the custom ops `mmkernels::pmr_forward` / `mmkernels::pmr_backward` (fake implementations
given); eager calls the launchers directly. Modalities of different widths D_m are zero-padded to max D_m (exact:
mmkernels/reference/pmr.py docstring); the padded prototype tensor [M, C, D] is what the balancer keeps.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .reference import pmr as R
from ._backend import backend_for
from ._validate import as_modality_list, check_ignore_index, check_labels, check_real

_OPS = ("reference", "triton")


# --------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("mmkernels::pmr_forward", mutates_args=())
def pmr_forward_op(
    z: torch.Tensor, protos: torch.Tensor, labels: torch.Tensor, alpha: float, ignore_index: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward (one launch): z [M, B, D], protos [M, C, D] -> (out fp32 [4M + 3], lse fp32 [M, B], loss [])."""
    from .triton_ops.pmr import pmr_forward_launch

    return pmr_forward_launch(z, protos, labels, alpha=alpha, ignore_index=ignore_index)


@pmr_forward_op.register_fake
def _pmr_forward_fake(z, protos, labels, alpha, ignore_index):
    m, b = z.shape[0], z.shape[1]
    return (
        z.new_empty(4 * m + 3, dtype=torch.float32),
        z.new_empty((m, b), dtype=torch.float32),
        z.new_empty((), dtype=torch.float32),
    )


@torch.library.custom_op("mmkernels::pmr_backward", mutates_args=())
def pmr_backward_op(
    grad: torch.Tensor,
    z: torch.Tensor,
    protos: torch.Tensor,
    labels: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    """Triton backward: dL/dz [M, B, D] (z's dtype, contiguous)."""
    from .triton_ops.pmr import pmr_backward_launch

    return pmr_backward_launch(grad, z, protos, labels, out, lse, ignore_index=ignore_index)


@pmr_backward_op.register_fake
def _pmr_backward_fake(grad, z, protos, labels, out, lse, ignore_index):
    return z.new_empty(z.shape)


def _split(out: torch.Tensor, m: int) -> dict:
    return {
        "scores": out[:m],
        "pce": out[m : 2 * m],
        "ratios": out[2 * m : 3 * m],
        "coefficients": out[3 * m : 4 * m],
        "flag": out[4 * m + 1],
    }


# --------------------------------------------------------------------------------------------- autograd
class _PMRLoss(torch.autograd.Function):
    """loss = sum_m c_m PCE_m (c detached); backward: dL/dz only (prototypes are constants)."""

    @staticmethod
    def forward(ctx, z, protos, labels, alpha, ignore_index, backend, distributed, group):
        ctx.ignore_index, ctx.backend, ctx.alpha = ignore_index, backend, alpha
        if backend == "triton":
            if torch.compiler.is_compiling():
                out, lse, loss = torch.ops.mmkernels.pmr_forward(z, protos, labels, alpha, ignore_index)
            else:
                from .triton_ops.pmr import pmr_forward_launch

                out, lse, loss = pmr_forward_launch(
                    z, protos, labels, alpha=alpha, ignore_index=ignore_index, sync=distributed, group=group
                )
            ctx.save_for_backward(z, protos, labels, out, lse)
            ctx.mark_non_differentiable(out)
            return loss, out
        s, pce, count = R.pmr_sums(z, protos, labels, ignore_index=ignore_index)
        local = count
        if distributed:
            packed = torch.cat([s, count.view(1)])
            torch.distributed.all_reduce(packed, group=group)
            s, count = packed[:-1], packed[-1]
        res = R.pmr_from_sums_ref(s, pce, count, alpha=alpha, local_count=local)
        out = torch.cat(
            [
                res["scores"],
                res["pce"],
                res["ratios"],
                res["coefficients"],
                res["loss"].to(torch.float32).view(1),
                res["flag"].view(1),
                res["count"].view(1),
            ]
        )
        ctx.save_for_backward(z, protos, labels, out, None)
        ctx.mark_non_differentiable(out)
        return res["loss"], out

    @staticmethod
    def backward(ctx, grad_loss, _grad_out):
        z, protos, labels, out, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        m = z.shape[0]
        if ctx.backend == "triton":
            g = grad_loss.reshape(()).contiguous()
            if torch.compiler.is_compiling():
                dz = torch.ops.mmkernels.pmr_backward(g, z, protos, labels, out, lse, ctx.ignore_index)
            else:
                from .triton_ops.pmr import pmr_backward_launch

                dz = pmr_backward_launch(g, z, protos, labels, out, lse, ignore_index=ctx.ignore_index)
        else:
            coef = (out[3 * m : 4 * m] != 0).to(grad_loss.dtype) * ctx.alpha  # alpha unrounded (fp64 gradcheck)
            dz = R.pmr_backward_ref(grad_loss, z, protos, labels, coef, out[4 * m + 2], ignore_index=ctx.ignore_index)
        return dz, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------- validation
def _features(features, prototypes, labels, name: str = "features"):
    """-> (z [M, B, D] padded, protos [M, C, D] padded and detached)."""
    xs, _ = as_modality_list(features, name)
    ps, _ = as_modality_list(prototypes, "prototypes", same_dtype=False)
    m = len(xs)
    if len(ps) != m:
        raise ValueError(f"prototypes must hold one [C, D_m] tensor per modality ({m}), got {len(ps)}")
    c = ps[0].shape[0] if ps[0].dim() == 2 else -1
    for i, (x, p) in enumerate(zip(xs, ps)):
        if x.dim() != 2:
            raise ValueError(f"{name}[{i}] must have shape [B, D_{i}], got {tuple(x.shape)}")
        if p.dim() != 2 or p.shape[0] != c or p.shape[1] != x.shape[1]:
            raise ValueError(
                f"prototypes[{i}] must have shape [C, D_{i}] = [{c}, {x.shape[1]}] (C classes, the "
                f"width of {name}[{i}]), got {tuple(p.shape)}"
            )
        if p.device != x.device:
            raise ValueError(f"prototypes[{i}] is on {p.device} but {name}[{i}] is on {x.device}")
    if c < 1:
        raise ValueError(f"prototypes must hold at least one class, got C = {c}")
    check_labels(labels, xs[0].shape[0], xs[0].device)
    z = features if isinstance(features, torch.Tensor) else R.pmr_pad(xs)
    protos = (prototypes if isinstance(prototypes, torch.Tensor) else R.pmr_pad(ps)).detach()
    return z, protos


def pmr_loss(
    features,
    prototypes,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    ignore_index: int = -100,
    sync: bool = False,
    group=None,
) -> dict:
    """PMR's prototype loss of one batch (docs/methods/pmr.md), without a host sync.

    features: a list of M (2..8) tensors [B, D_m] (the pooled encoder outputs z_m; widths may differ) or one tensor
      [M, B, D]; float, any strides. prototypes: a list of M tensors [C, D_m] or one [M, C, D] (constants).
    labels: int [B]; rows equal to ignore_index count nowhere. alpha >= 0.
    Returns dict(loss [] = sum_m c_m PCE_m, differentiable in the features (fp32; fp64 for fp64 features on the
    reference backend), scores [M] = sum_i p_m[i, y_i], pce [M] = mean_i -log p_m[i, y_i], ratios [M] =
    s_m / max_{j != m} s_j, coefficients [M] = alpha * 1[s_m < max_j s_j] (detached), flag [] (0 ok, 1 a non-finite
    score or PCE: coefficients and loss 0, 2 no valid row)); statistics are fp32 device tensors.
    sync: under torch.distributed, the score sums and the valid-row count are all-reduced (over `group`) before the
    coefficients are formed (identical on every rank); the PCE stays a mean over this rank's rows (like the CE).
    A label outside [0, C) that is not ignore_index gives NaN for its modality's statistics (flag 1).
    """
    z, protos = _features(features, prototypes, labels)
    check_real(alpha, "alpha", low=0.0)
    check_ignore_index(ignore_index)
    distributed = bool(sync) and torch.distributed.is_available() and torch.distributed.is_initialized()
    backend = backend_for(z, op="pmr_loss", available=_OPS)
    apply = _PMRLoss.apply
    if backend != "triton" and _OLD_DYNAMO and torch.compiler.is_compiling():
        apply = _apply_eager  # torch < 2.12: dynamo traced this Function's reference path with a zero dL/dz
    loss, out = apply(z, protos, labels, float(alpha), int(ignore_index), backend, distributed, group)
    return {"loss": loss, **_split(out, z.shape[0])}


_OLD_DYNAMO = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 12)


@torch.compiler.disable
def _apply_eager(*args):
    """_PMRLoss on the reference backend outside the compiled graph (one graph break): torch 2.11's dynamo gave the
    traced Function a zero gradient (tests/test_compile_protocol_api.py)."""
    return _PMRLoss.apply(*args)


# --------------------------------------------------------------------------------------------- refresh
def new_refresh_buffers(num_modalities: int, num_classes: int, width: int, device=None) -> tuple:
    """(sums fp32 [M, C, D], counts fp32 [M + 1, C + 1]) zeroed: the accumulators of a refresh. counts[m, k]: rows of
    class k summed for modality m; counts[m, C]: rows of modality m skipped because a feature was NaN/Inf;
    counts[M, 0]: the kernel's ticket slot (not a count)."""
    return (
        torch.zeros(num_modalities, num_classes, width, dtype=torch.float32, device=device),
        torch.zeros(num_modalities + 1, num_classes + 1, dtype=torch.float32, device=device),
    )


def refresh_skipped(counts: torch.Tensor) -> torch.Tensor:
    """Rows skipped per modality (a NaN/Inf feature) in the refresh that filled `counts` (new_refresh_buffers): a
    view [M] of the device tensor (no sync)."""
    return counts[:-1, -1]


def _check_prototypes(prototypes) -> None:
    if not isinstance(prototypes, torch.Tensor) or prototypes.dim() != 3 or not prototypes.is_floating_point():
        raise ValueError(
            "prototypes must be one float tensor [M, C, D] (the padded prototypes), got "
            f"{tuple(prototypes.shape) if isinstance(prototypes, torch.Tensor) else type(prototypes).__name__}"
        )


def _check_buffers(prototypes: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
    _check_prototypes(prototypes)
    m, c, d = prototypes.shape
    for name, t, shape in (("sums", sums, (m, c, d)), ("counts", counts, (m + 1, c + 1))):
        if (
            not isinstance(t, torch.Tensor)
            or t.dtype != torch.float32
            or tuple(t.shape) != shape
            or not t.is_contiguous()
            or t.device != prototypes.device
        ):
            raise ValueError(
                f"{name} must be a contiguous float32 tensor of shape {list(shape)} on "
                f"{prototypes.device} (see new_refresh_buffers)"
            )


def pmr_class_sums_(
    features, labels: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, *, ignore_index: int = -100
) -> None:
    """sums[m, k] += sum of the rows of class k of features m, counts[k] += their number (in place, no sync).
    features: a list of M [N, D_m] or one [M, N, D] (D_m <= the buffers' D: zero-padded); sums/counts from
    new_refresh_buffers. Ignored rows count nowhere; so do out-of-range labels (the balancer rejects them on CPU). A
    row of modality m with a NaN/Inf feature is skipped for m and counted in counts[m, C] (refresh_skipped)."""
    if not isinstance(sums, torch.Tensor) or sums.dim() != 3:
        raise ValueError("sums must be a float32 tensor [M, C, D] (see new_refresh_buffers)")
    _check_buffers(sums, sums, counts)
    xs, _ = as_modality_list(features, "features")
    m, c, d = sums.shape
    if len(xs) != m or any(x.dim() != 2 or x.shape[1] > d for x in xs):
        raise ValueError(f"features must be {m} tensors [N, D_m] with D_m <= {d}, got {[tuple(x.shape) for x in xs]}")
    check_labels(labels, xs[0].shape[0], xs[0].device)
    check_ignore_index(ignore_index)
    z = R.pmr_pad(xs if not isinstance(features, torch.Tensor) else features).detach()
    if z.shape[2] < d:
        z = torch.nn.functional.pad(z, (0, d - z.shape[2]))
    if z.shape[1] == 0:
        return
    if backend_for(z, op="pmr_refresh", available=_OPS) == "triton":
        from .triton_ops.pmr import pmr_accumulate_launch

        pmr_accumulate_launch(z, labels, sums, counts, sums, ignore_index=ignore_index)
        return
    s, n, skipped = R.pmr_class_sums(z, labels, c, ignore_index=ignore_index)
    sums += s.to(torch.float32)
    counts[:m, :c] += n.to(torch.float32)
    counts[:m, c] += skipped.to(torch.float32)


def pmr_refresh_(prototypes: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, *, mu: float, first: bool) -> None:
    """prototypes [M, C, D] <- mean (first) or (1 - mu) mean + mu prototypes, mean = sums / counts per class; a class
    with count 0 keeps its prototype, a non-finite prototype entry of a counted class becomes the mean
    (docs/methods/pmr.md). In place, one launch on CUDA, no sync."""
    _check_buffers(prototypes, sums, counts)
    check_real(mu, "mu", low=0.0, high=1.0)
    if backend_for(prototypes, op="pmr_refresh", available=_OPS) == "triton":
        from .triton_ops.pmr import pmr_refresh_launch

        pmr_refresh_launch(sums, counts, prototypes, mu=float(mu), first=bool(first))
        return
    m, c = prototypes.shape[:2]
    prototypes.copy_(R.pmr_refresh_ref(sums, counts[:m, :c], prototypes, mu=float(mu), first=bool(first)))


def pmr_update_prototypes_(
    prototypes: torch.Tensor,
    features,
    labels: torch.Tensor,
    *,
    mu: float,
    first: bool,
    ignore_index: int = -100,
    sync: bool = False,
    group=None,
) -> torch.Tensor:
    """A whole refresh from one set of rows (features [M, N, D] or a list of M [N, D_m]): class sums, counts, mean
    and EMA into prototypes [M, C, D] in place. Triton: ONE launch (sync under torch.distributed: accumulate,
    all-reduce sums and counts, refresh). Returns the rows skipped per modality [M] fp32 (NaN/Inf features; a
    device tensor, no sync)."""
    _check_prototypes(prototypes)
    check_real(mu, "mu", low=0.0, high=1.0)
    m, c, d = prototypes.shape
    sums, counts = new_refresh_buffers(m, c, d, prototypes.device)
    distributed = bool(sync) and torch.distributed.is_available() and torch.distributed.is_initialized()
    xs, _ = as_modality_list(features, "features")
    on_triton = backend_for(prototypes, op="pmr_refresh", available=_OPS) == "triton"
    if (
        on_triton
        and not distributed
        and len(xs) == m
        and all(x.dim() == 2 and x.shape[1] <= d for x in xs)
        and xs[0].shape[0] > 0
    ):
        check_labels(labels, xs[0].shape[0], xs[0].device)
        check_ignore_index(ignore_index)
        z = R.pmr_pad(features if isinstance(features, torch.Tensor) else xs).detach()
        if z.shape[2] < d:
            z = torch.nn.functional.pad(z, (0, d - z.shape[2]))
        from .triton_ops.pmr import pmr_accumulate_launch

        pmr_accumulate_launch(
            z,
            labels,
            sums,
            counts,
            prototypes,
            ignore_index=ignore_index,
            finalize=True,
            mu=float(mu),
            first=bool(first),
        )
        return refresh_skipped(counts)
    pmr_class_sums_(features, labels, sums, counts, ignore_index=ignore_index)
    if distributed:
        torch.distributed.all_reduce(sums, group=group)
        torch.distributed.all_reduce(counts, group=group)
    pmr_refresh_(prototypes, sums, counts, mu=mu, first=first)
    return refresh_skipped(counts)
