"""Triton lane: MMPareto's three kernels (reduce, finalize, write) against the reference (TRITON_INTERPRET=1 on CPU,
or CUDA). Shapes: odd sizes, a tensor spanning several blocks, many tensors (more than one finalize tile), M = 2..8
encoders, both rescale modes, fp32/fp16/bf16, mixed dtypes (two groups), the balancer's flat path.
Every case here has its launcher specialization in the gpu-compile plan at the end of this file."""

import pytest
import torch

from mmkernels import reference as R
from mmkernels.mmpareto import MMParetoLayout, mmpareto_combine_, mmpareto_combine_flat_

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")]

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MMKERNELS_BACKEND", "triton")


def grads(shapes, dtype, device, seed=0):
    """K encoders of tensors; even encoders conflict (g_u partly opposite to g_m), odd ones agree."""
    g = torch.Generator().manual_seed(seed)
    gm, gu = [], []
    for k, group in enumerate(shapes):
        m = [torch.randn(s, generator=g) for s in group]
        u = [torch.randn(s, generator=g) + (-0.8 if k % 2 == 0 else 0.8) * x for s, x in zip(group, m)]
        gm.append([x.to(dtype).to(device) for x in m])
        gu.append([x.to(dtype).to(device) for x in u])
    return gm, gu


def check(gm, gu, rescale, dtype, gamma=1.5):
    want, wstats = R.mmpareto_combine(gm, gu, gamma=gamma, rescale=rescale)
    out = [[t.clone() for t in group] for group in gu]
    stats = mmpareto_combine_(gm, out, gamma=gamma, rescale=rescale)
    rtol, atol = TOL[dtype]
    for got, w in zip(sum(out, []), sum(want, [])):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), w.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(stats["cos"], wstats["cos"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats["weights"], wstats["weights"], rtol=1e-4, atol=1e-5)
    assert stats["conflict"].tolist() == wstats["conflict"].float().tolist()
    assert stats["flag"].item() == 0.0


SHAPES = {
    "worked-like odd sizes": [[(7,), (3, 5)], [(1,), (33, 2)]],
    "a tensor over 3 blocks": [[(20000,), (5,)], [(9000,)], [(17, 3)]],
    "8 encoders": [[(3,), (2, 2)], [(5,)], [(1,)], [(6, 1)], [(9,)], [(2,)], [(4, 4)], [(11,)]],
    "many tensors": [[(i % 7 + 1,) for i in range(70)], [(i % 5 + 2,) for i in range(30)]],
}


@pytest.mark.parametrize("rescale", ["per_tensor", "global"])
@pytest.mark.parametrize("case", list(SHAPES))
def test_parity_fp32(case, rescale, device):
    gm, gu = grads(SHAPES[case], torch.float32, device)
    check(gm, gu, rescale, torch.float32)


@pytest.mark.parametrize("rescale", ["per_tensor", "global"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_parity_half_precision(dtype, rescale, device):
    gm, gu = grads(SHAPES["a tensor over 3 blocks"], dtype, device, seed=3)
    check(gm, gu, rescale, dtype)


def test_worked_example(device):
    t = lambda *v: torch.tensor(v, device=device)  # noqa: E731
    gm = [[t(1.0, 0.0), t(1.0)], [t(1.0, 1.0), t(0.0)]]
    gu = [[t(-1.0, 2.0), t(0.0)], [t(1.0, 0.0), t(1.0)]]
    mmpareto_combine_(gm, gu)
    torch.testing.assert_close(gu[0][0].cpu(), torch.tensor([1.34164, 2.68328]), atol=1e-5, rtol=0)
    torch.testing.assert_close(gu[0][1].cpu(), torch.tensor([2.0]))
    torch.testing.assert_close(gu[1][0].cpu(), torch.tensor([3.0, 1.5]))


def test_mixed_dtypes_two_groups(device):
    gm, gu = grads([[(5,), (3,)], [(7,)], [(2, 2)]], torch.float32, device, seed=5)
    gm[1] = [x.half() for x in gm[1]]
    gu[1] = [x.half() for x in gu[1]]
    want, _ = R.mmpareto_combine(gm, gu)
    mmpareto_combine_(gm, gu)
    for got, w in zip(sum(gu, []), sum(want, [])):
        torch.testing.assert_close(got.float(), w.float(), rtol=2e-3, atol=2e-3)


def test_degenerate_zero_gradients_stay_finite(device):
    z = torch.zeros(4, device=device)
    x = torch.arange(4.0, device=device)
    gm, gu = [[z.clone()], [x.clone()], [x.clone()]], [[z.clone()], [z.clone()], [-x]]
    want, _ = R.mmpareto_combine(gm, gu)
    stats = mmpareto_combine_(gm, gu)
    assert all(torch.isfinite(t).all() for t in sum(gu, [])) and torch.isfinite(stats["cos"]).all()
    for got, w in zip(sum(gu, []), sum(want, [])):
        torch.testing.assert_close(got, w)


def test_nonfinite_gradient_flags(device):
    gm = [[torch.tensor([float("nan"), 1.0], device=device)], [torch.ones(2, device=device)]]
    gu = [[torch.ones(2, device=device)], [-torch.ones(2, device=device) * 0.5]]
    stats = mmpareto_combine_(gm, gu)
    assert stats["flag"].item() == 1.0 and stats["conflict"].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("summed", [False, True])
@pytest.mark.parametrize("rescale", ["per_tensor", "global"])
def test_flat_path_as_the_balancer_calls_it(rescale, summed, device):
    """summed=True: the DDP path, the buffer holds g_m + g_u."""
    gm, gu = grads([[(3, 4), (4,)], [(9000,)]], torch.float32, device, seed=9)
    want, _ = R.mmpareto_combine(gm, gu, rescale=rescale)
    layout = MMParetoLayout(gu)
    fm, fu = layout.empty_flats(device), layout.empty_flats(device)
    for flats, lists in ((fm, gm), (fu, gu)):
        for v, g in zip(sum(layout.views(flats), []), sum(lists, [])):
            v.copy_(g)
    if summed:
        fu = [u + m for u, m in zip(fu, fm)]
    for _ in range(2):  # twice: the cached tables are reused
        fu2 = [f.clone() for f in fu]
        mmpareto_combine_flat_(layout, fm, fu2, rescale=rescale, summed=summed)
        for got, w in zip(sum(layout.views(fu2), []), sum(want, [])):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [2, 3])
def test_balancer_on_the_triton_backend(m, device):
    """MMPareto.backward() through the Triton kernels gives the reference gradients (the tiny model of
    tests/test_mmpareto_api.py)."""
    from test_mmpareto_api import Net, data, expected_grads

    from mmkernels.api.mmpareto import MMPareto

    net = Net(m).to(device)
    xs, y = data(m)
    xs, y = [x.to(device) for x in xs], y.to(device)
    want, stats = expected_grads(net, xs, y)
    bal = MMPareto(m, params=[e.parameters() for e in net.encoders])
    for _ in range(2):  # second step: .grad are the balancer's views (zeroed in place)
        for p in net.parameters():
            if p.grad is not None:
                p.grad.zero_()
        bal.backward(*net.losses(xs, y))
        for name, p in net.named_parameters():
            torch.testing.assert_close(p.grad, want[id(p)], msg=name, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bal.cos, stats["cos"], rtol=1e-5, atol=1e-6)
        bal.step()


# ---------------------------------------- gpu-compile plan
# gpu-compile launch plan of MMPareto's kernels (tests/gpu_compile.py loads it): one call of the launcher
# mmpareto_combine_triton per layout of tests/test_mmpareto_triton.py, tests/test_mmpareto_numerics.py and of the
# balancer tests on CUDA, with both
# rescale modes (the finalize's GLOBAL constexpr). Specializations come from the dtype of each group's flat buffers,
# GLOBAL, SUMMED (the DDP path: the buffer holds g_m + g_u), and the integer arguments (blk_base, T, K, max_nblk:
# == 1, % 16 == 0); tensors are CPU torch.empty.
def _plan_call(shapes, dtypes, rescale, summed=False):
    import torch

    from mmkernels.mmpareto import MMParetoLayout
    from mmkernels.triton_ops.mmpareto import CHUNK, mmpareto_combine_triton

    params = [
        [torch.empty(s, dtype=getattr(torch, dtypes[k % len(dtypes)])) for s in group] for k, group in enumerate(shapes)
    ]
    layout = MMParetoLayout(params)
    fm, fu = layout.empty_flats("cpu"), layout.empty_flats("cpu")
    mmpareto_combine_triton(fm, fu, layout.tables("cpu", CHUNK), gamma=1.5, rescale=rescale, summed=summed)


PLAN_LAYOUTS = {  # name: (shapes per encoder, dtype per encoder, cycled)
    "odd sizes": ([[(7,), (3, 5)], [(1,), (33, 2)]], ("float32",)),
    "3 blocks": ([[(20000,), (5,)], [(9000,)], [(17, 3)]], ("float32",)),
    "3 blocks fp16": ([[(20000,), (5,)], [(9000,)], [(17, 3)]], ("float16",)),
    "3 blocks bf16": ([[(20000,), (5,)], [(9000,)], [(17, 3)]], ("bfloat16",)),
    "8 encoders": ([[(3,), (2, 2)], [(5,)], [(1,)], [(6, 1)], [(9,)], [(2,)], [(4, 4)], [(11,)]], ("float32",)),
    "many tensors": ([[(i % 7 + 1,) for i in range(70)], [(i % 5 + 2,) for i in range(30)]], ("float32",)),
    "worked example": ([[(2,), (1,)], [(2,), (1,)]], ("float32",)),
    "degenerate": ([[(4,)], [(4,)], [(4,)]], ("float32",)),
    "mixed dtypes": ([[(5,), (3,)], [(7,)], [(2, 2)]], ("float32", "float16")),
    "flat path": ([[(3, 4), (4,)], [(9000,)]], ("float32",)),
    "nonfinite": ([[(2,)], [(2,)]], ("float32",)),
    "tiny model M=2": ([[(6, 5), (6,)], [(6, 3), (6,)]], ("float32",)),
    "tiny model M=3": ([[(6, 5), (6,)], [(6, 3), (6,)], [(6, 4), (6,)]], ("float32",)),
    "numerics near cancellation": ([[(4096,)], [(5,)]], ("float32",)),  # tests/test_mmpareto_numerics.py
    "numerics 82 small tensors": (
        [[(5,)] * 14, [(5,)] * 14, [(5,)] * 14, [(5,)] * 14, [(5,)] * 13, [(5,)] * 13],
        ("float32",),
    ),
    "numerics opposite": ([[(5,), (3,)], [(2,)]], ("float32",)),
    "numerics nonfinite": ([[(2,), (3,)], [(2,)], [(2,)]], ("float32",)),
    "bench resnet18-like bf16": (
        [
            [(64, 1, 7, 7)] + [(64, 64, 3, 3)] * 4 + [(128, 64, 3, 3), (128,)],
            [(64, 3, 7, 7)] + [(64, 64, 3, 3)] * 4 + [(128, 128, 3, 3), (128,)],
        ],
        ("bfloat16",),
    ),
}


def gpu_compile_plan() -> list:
    out = []
    for name, (shapes, dtypes) in PLAN_LAYOUTS.items():
        for rescale in ("per_tensor", "global"):
            out.append(
                (
                    f"mmpareto {name} {'/'.join(dtypes)} rescale={rescale}",
                    lambda s=shapes, d=dtypes, r=rescale: _plan_call(s, d, r),
                )
            )
    for name in ("flat path", "tiny model M=2", "bench resnet18-like bf16"):  # SUMMED: the DDP path
        shapes, dtypes = PLAN_LAYOUTS[name]
        for rescale in ("per_tensor", "global"):
            out.append(
                (
                    f"mmpareto {name} {'/'.join(dtypes)} rescale={rescale} summed (DDP)",
                    lambda s=shapes, d=dtypes, r=rescale: _plan_call(s, d, r, summed=True),
                )
            )
    return out
