"""MMPareto numerics (issue 19): the per-tensor norm ||h_T|| without cancellation (against float64), exactly opposite
gradients (the documented fallback and flag 2), non-finite gradients (zero, flag 1). Every case runs on the
reference backend (reference lane: the list op and the balancer's flat CPU path) and on the Triton kernels (triton
lane, `-m triton`)."""

from __future__ import annotations

import pytest
import torch

from mmkernels import reference as R
from mmkernels.mmpareto import MMParetoLayout, mmpareto_combine_, mmpareto_combine_flat_

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("triton", id="triton", marks=[pytest.mark.triton, pytest.mark.backend("triton")]),
]
PATHS = ["list", "flat"]


def combine(gm, gu, path, device, **kw):
    """The public op on copies (path "list": mmpareto_combine_; "flat": the balancer's flat-buffer entry point)."""
    gm = [[t.to(device) for t in grp] for grp in gm]
    gu = [[t.to(device).clone() for t in grp] for grp in gu]
    if path == "list":
        stats = mmpareto_combine_(gm, gu, **kw)
        return [[t.cpu() for t in grp] for grp in gu], stats
    layout = MMParetoLayout(gu)
    fm, fu = layout.empty_flats(device), layout.empty_flats(device)
    for flats, lists in ((fm, gm), (fu, gu)):
        for v, g in zip(sum(layout.views(flats), []), sum(lists, [])):
            v.copy_(g)
    stats = mmpareto_combine_flat_(layout, fm, fu, **kw)
    return [[t.cpu() for t in grp] for grp in layout.views(fu)], stats


def near_opposite(n=4096, cos=-0.99993, seed=0):
    """fp32 g_m, g_u of one tensor with cos(g_m, g_u) = `cos` (the Pareto point nearly cancels), and an agreeing
    second encoder."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    z -= (z @ x) / (x @ x) * x  # z orthogonal to x, same norm
    z *= x.norm() / z.norm()
    s = (1 - cos * cos) ** 0.5
    y = 1.3 * (cos * x + s * z)
    e = torch.randn(5, generator=g)
    return [[x.float()], [e]], [[y.float()], [e + 0.1]]


def as64(lists):
    return [[t.double() for t in grp] for grp in lists]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rescale", ["per_tensor", "global"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_near_cancellation_matches_float64(backend, rescale, path, device):
    """cos = -0.99993: ||h|| is about 1e-2 of ||g_m||; rebuilt from fp32 inner products it lost 1.3e-3 relative. The
    fp32 result must match the float64 combination of the same fp32 inputs to about fp32 rounding."""
    gm, gu = near_opposite()
    want, wstats = R.mmpareto_combine(as64(gm), as64(gu), rescale=rescale)
    out, stats = combine(gm, gu, path, device, rescale=rescale)
    assert wstats["conflict"].tolist() == [True, False]
    got, w = out[0][0].double(), want[0][0]
    assert abs(got.norm() / w.norm() - 1) < 1e-6
    assert (got - w).norm() / w.norm() < 1e-6
    assert stats["flag"].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_small_tensors_in_ordinary_conflicts_match_float64(backend, device):
    """82 small tensors (2..9 elements) over 6 conflicting encoders: every tensor's norm to 2e-6 of float64."""
    g = torch.Generator().manual_seed(11)
    gm, gu = [], []
    for k in range(6):
        shapes = [(int(torch.randint(2, 10, (1,), generator=g)),) for _ in range(14 if k < 4 else 13)]
        m = [torch.randn(s, generator=g) for s in shapes]
        gm.append(m)
        gu.append([torch.randn(s, generator=g) - 1.2 * x for s, x in zip(shapes, m)])
    assert sum(map(len, gm)) == 82
    want, wstats = R.mmpareto_combine(as64(gm), as64(gu))
    assert bool(wstats["conflict"].all())
    out, _ = combine(gm, gu, "flat", device)
    for got, w in zip(sum(out, []), sum(want, [])):
        assert abs(got.double().norm() / w.norm() - 1) < 2e-6


@pytest.mark.parametrize("lam", [0.5, 1.0, 0.3])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rescale", ["per_tensor", "global"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exactly_opposite_gradients_fall_back_to_the_sum(backend, rescale, path, lam, device):
    """g_u = -lam g_m (B = 1, C = 2 gives this): the Pareto point is 0 and any restored magnitude would point along
    rounding noise. Documented fallback: gamma (g_m + g_u), flag 2; the other encoder is untouched."""
    x = torch.tensor([0.7, -1.9, 0.25, 3.1, -0.4])
    gm = [[x.clone(), 2 * x[:3]], [x[:2].clone()]]
    gu = [[-lam * x, -lam * 2 * x[:3]], [x[:2] + 1]]
    want_other, _ = R.mmpareto_combine([[x[:2].clone()]], [[x[:2] + 1]], rescale=rescale)
    out, stats = combine(gm, gu, path, device, gamma=1.5, rescale=rescale)
    for got, m, u in zip(out[0], gm[0], gu[0]):
        torch.testing.assert_close(got, 1.5 * (m + u), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1][0], want_other[0][0])
    assert stats["flag"].item() == 2.0
    assert stats["conflict"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_gradients_never_reach_the_output(backend, path, device):
    """NaN or Inf in an encoder's g_m or g_u: that encoder's gradient is 0 (nothing non-finite is written), flag 1;
    the other encoders are combined as usual."""
    nan, inf = float("nan"), float("inf")
    gm = [[torch.tensor([nan, 1.0]), torch.ones(3)], [torch.tensor([1.0, 2.0])], [torch.ones(2)]]
    gu = [[torch.tensor([1.0, 1.0]), torch.ones(3)], [torch.tensor([-1.0, -0.5])], [torch.tensor([inf, 0.0])]]
    want, _ = R.mmpareto_combine([gm[1]], [gu[1]])
    out, stats = combine(gm, gu, path, device)
    for t in out[0] + out[2]:
        assert torch.equal(t, torch.zeros_like(t))
    torch.testing.assert_close(out[1][0], want[0][0])
    assert stats["flag"].item() == 1.0


@pytest.mark.parametrize("summed", [False, True])
def test_flat_cpu_buckets_do_not_change_the_result(monkeypatch, summed):
    """The flat CPU path works bucket by bucket (runs of tensors of one dtype, at most BUCKET elements): a layout cut
    into many buckets (two dtypes, a NaN encoder, tensors larger than a bucket) gives bit for bit what one bucket
    per dtype gives, and what the list op gives."""
    import mmkernels.mmpareto as mp

    g = torch.Generator().manual_seed(3)
    shapes = [
        [((7, 5), torch.float32), ((300,), torch.float32), ((4,), torch.float64)],
        [((9,), torch.float32), ((13, 11), torch.float64)],
        [((6,), torch.float32)],
    ]
    gm = [[torch.randn(s, generator=g).to(dt) for s, dt in enc] for enc in shapes]
    gu = [[-0.7 * t + 0.2 * torch.randn(t.shape, generator=g).to(t.dtype) for t in enc] for enc in gm]
    gm[2][0][3] = float("nan")

    def run():
        layout = MMParetoLayout(gu)
        fm, fu = layout.empty_flats("cpu"), layout.empty_flats("cpu")
        for v, t in zip(sum(layout.views(fm), []), sum(gm, [])):
            v.copy_(t)
        for v, a, b in zip(sum(layout.views(fu), []), sum(gm, []), sum(gu, [])):
            v.copy_(a + b if summed else b)
        stats = mmpareto_combine_flat_(layout, fm, fu, summed=summed)
        return fu, stats, len(layout.buckets())

    whole, stats, n_whole = run()
    monkeypatch.setattr(mp, "BUCKET", 40)
    cut, cut_stats, n_cut = run()
    assert (n_whole, n_cut) == (5, 6)  # runs of one dtype in layout order; the 300 tensor alone
    for a, b in zip(whole, cut):
        assert torch.equal(a, b)
    for k in ("cos", "weights", "conflict", "flag"):
        assert torch.equal(stats[k], cut_stats[k])
    assert stats["flag"].item() == 1.0
    listed, _ = combine(gm, [[t.clone() for t in enc] for enc in gu], "list", "cpu")
    flat = MMParetoLayout(gu).views(whole)
    for a, b in zip(sum(listed, []), sum(flat, [])):
        torch.testing.assert_close(a, b)  # float64 tensors: the same terms, summed in another order
