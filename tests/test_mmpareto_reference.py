"""MMPareto reference math (Wei & Hu, ICML 2024): a hand-derived worked example, a literal loop transcription on
random inputs, the Pareto property, degenerate inputs; and the public op on CPU (reference lane)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmkernels import reference as R
from mmkernels.mmpareto import MMParetoLayout, mmpareto_combine_, mmpareto_combine_flat_


def _t(*v):
    return torch.tensor(v, dtype=torch.float32)


def worked_example():
    """A hand-derived example: audio (two tensors) conflicts, visual does not."""
    gm = [[_t(1, 0), _t(1)], [_t(1, 1), _t(0)]]
    gu = [[_t(-1, 2), _t(0)], [_t(1, 0), _t(1)]]
    return gm, gu


@pytest.mark.parametrize(
    "rescale,audio",
    [
        ("per_tensor", [(1.34164, 2.68328), (2.0,)]),
        ("global", [(1.11803, 2.23607), (2.23607,)]),
    ],
)
def test_worked_example(rescale, audio):
    gm, gu = worked_example()
    out, stats = R.mmpareto_combine(gm, gu, rescale=rescale)
    for got, want in zip(out[0], audio):
        torch.testing.assert_close(got, _t(*want), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1][0], _t(3, 1.5))
    torch.testing.assert_close(out[1][1], _t(1.5))
    torch.testing.assert_close(stats["cos"], _t(-1 / math.sqrt(10), 0.5))  # a=2, b=-1, c=5; visual 1/sqrt(2*2)
    torch.testing.assert_close(stats["weights"], torch.tensor([[2 / 3, 1 / 3], [0.5, 0.5]]))
    assert stats["conflict"].tolist() == [True, False] and stats["flag"].item() == 0.0


@pytest.mark.parametrize("rescale", ["per_tensor", "global"])
def test_worked_example_through_the_public_op(rescale):
    gm, gu = worked_example()
    want, _ = R.mmpareto_combine(gm, gu, rescale=rescale)
    stats = mmpareto_combine_(gm, gu, rescale=rescale)  # in place into gu
    for a, b in zip(sum(want, []), sum(gu, [])):
        torch.testing.assert_close(b, a)
    assert stats["conflict"].tolist() == [1.0, 0.0]


def literal(grads_mm, grads_uni, gamma=1.5, rescale="per_tensor"):
    """Our own loop transcription of the weight and restore rules on Python floats (fp64), encoder by encoder and
    tensor by tensor."""
    out = []
    for gms, gus in zip(grads_mm, grads_uni):
        fm = [[float(v) for v in g.reshape(-1)] for g in gms]
        fu = [[float(v) for v in g.reshape(-1)] for g in gus]
        a = sum(x * x for t in fm for x in t)
        b = sum(x * y for tm, tu in zip(fm, fu) for x, y in zip(tm, tu))
        c = sum(y * y for t in fu for y in t)
        cos = b / math.sqrt(a * c)
        if cos > 0:
            out.append([[gamma * (x + y) for x, y in zip(tm, tu)] for tm, tu in zip(fm, fu)])
            continue
        if b >= a:
            wm = 0.999
        elif b >= c:
            wm = 0.001
        else:
            wm = (c - b) / (a + c - 2 * b)
        wu = 1 - wm
        hs = [[2 * (wm * x + wu * y) for x, y in zip(tm, tu)] for tm, tu in zip(fm, fu)]
        sums = [[x + y for x, y in zip(tm, tu)] for tm, tu in zip(fm, fu)]
        norm = lambda v: math.sqrt(sum(x * x for x in v))  # noqa: E731
        if rescale == "global":
            r = norm(sum(sums, [])) / norm(sum(hs, []))
            rs = [r] * len(hs)
        else:
            rs = [norm(s) / norm(h) for s, h in zip(sums, hs)]
        out.append([[gamma * max(1.0, r) * x for x in h] for h, r in zip(hs, rs)])
    return out


def _random_grads(seed, k, conflict_every=2, min_rows=1):
    g = torch.Generator().manual_seed(seed)
    gm, gu = [], []
    for e in range(k):
        shapes = [
            (int(torch.randint(min_rows, 6, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g)))
            for _ in range(int(torch.randint(1, 4, (1,), generator=g)))
        ]
        m = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        u = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        sign = -1.5 if e % conflict_every == 0 else 3.0  # conflict (u partly opposite to m) or agreement
        u = [x + sign * y for x, y in zip(u, m)]
        gm.append(m)
        gu.append(u)
    return gm, gu


@pytest.mark.parametrize("rescale", ["per_tensor", "global"])
@pytest.mark.parametrize("seed,k", [(0, 2), (1, 3), (2, 5), (3, 8)])
def test_reference_matches_the_literal_loop(seed, k, rescale):
    gm, gu = _random_grads(seed, k)
    out, stats = R.mmpareto_combine(gm, gu, gamma=1.3, rescale=rescale)
    want = literal(gm, gu, gamma=1.3, rescale=rescale)
    for e in range(k):
        for got, w in zip(out[e], want[e]):
            torch.testing.assert_close(got.reshape(-1), torch.tensor(w, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert stats["conflict"].tolist() == [e % 2 == 0 for e in range(k)]  # both branches exercised


def test_weight_rule_branches():
    """Rows: no conflict; b >= a (with cos <= 0 only when a = 0); b >= c (c = 0); orthogonal; the closed form."""
    a, b, c = _t(1, 0, 4, 1, 2), _t(0.5, 0, 0, 0, -1), _t(1, 3, 0, 3, 5)
    cos, wm, conflict, finite = R.mmpareto_weights(a, b, c)
    assert conflict.tolist() == [False, True, True, True, True] and finite.all()
    torch.testing.assert_close(wm, _t(0.5, 0.999, 0.001, 3 / 4, 6 / 9))
    torch.testing.assert_close(cos, _t(0.5, 0, 0, 0, -1 / math.sqrt(10)))


def _inner(x, y):
    return float(sum((a.double() * b.double()).sum() for a, b in zip(x, y)))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 3.0))
def test_pareto_direction_does_not_increase_either_loss(seed, gamma):
    """rescale="global": on conflict the combined gradient has a non-negative inner product with both g_m and g_u
    (a descent direction for both objectives: the min-norm element of the segment, times one positive factor);
    without conflict it is gamma (g_m + g_u). At least 3 elements per tensor: with exactly opposite gradients (one
    element) the min-norm point is 0 and the restored magnitude amplifies rounding noise of either sign."""
    gm, gu = _random_grads(seed, 2, conflict_every=1, min_rows=3)
    out, stats = R.mmpareto_combine(gm, gu, gamma=gamma, rescale="global")
    for e in range(2):
        if stats["conflict"][e]:
            scale = math.sqrt(_inner(gm[e], gm[e]) * _inner(gu[e], gu[e]))
            assert _inner(out[e], gm[e]) >= -1e-9 * scale
            assert _inner(out[e], gu[e]) >= -1e-9 * scale
        else:
            for o, x, y in zip(out[e], gm[e], gu[e]):
                torch.testing.assert_close(o, gamma * (x + y))


def test_per_tensor_rescale_can_leave_the_pareto_cone():
    """The authors' per-tensor restore scales each tensor by its own max(1, r_T): the encoder-wide direction is no
    longer the min-norm one and may conflict with g_u (the reason to offer rescale="global"). Found by a search over
    small integer gradients: a = 17, b = -12, c = 9, w_m = 0.42; tensor 2 is enlarged by r = 1.26, tensor 1 not."""
    gm = [[_t(-3.0, 2.0), _t(2.0, 0.0)], [_t(1.0)]]
    gu = [[_t(2.0, -1.0), _t(-2.0, 0.0)], [_t(1.0)]]
    out_t, st = R.mmpareto_combine(gm, gu, rescale="per_tensor")
    out_g, _ = R.mmpareto_combine(gm, gu, rescale="global")
    assert st["conflict"][0]
    assert _inner(out_g[0], gm[0]) >= 0 and _inner(out_g[0], gu[0]) >= 0
    assert _inner(out_t[0], gu[0]) < -1.0


@pytest.mark.parametrize("case", ["both zero", "g_m zero", "g_u zero", "opposite"])
def test_degenerate_gradients_stay_finite(case):
    x = _t(1.0, -2.0)
    gm, gu = {"both zero": (0 * x, 0 * x), "g_m zero": (0 * x, x), "g_u zero": (x, 0 * x), "opposite": (x, -x)}[case]
    out, stats = R.mmpareto_combine([[gm], [x]], [[gu], [x]])
    assert torch.isfinite(out[0][0]).all() and torch.isfinite(stats["cos"]).all()
    assert stats["flag"].item() == (2.0 if case == "opposite" else 0.0)
    if case == "opposite":  # w = (1/2, 1/2): h = 0, the vanished-point fallback gamma (g_m + g_u) = 0, flag 2
        torch.testing.assert_close(out[0][0], torch.zeros(2))
    else:  # one gradient zero (or both): gamma (g_m + g_u), as documented
        torch.testing.assert_close(out[0][0], 1.5 * (gm + gu))
    assert stats["cos"][0].item() == (-1.0 if case == "opposite" else 0.0)


def test_nonfinite_gradient_sets_the_flag_and_zeroes_the_encoder():
    gm = [[_t(float("inf"), 1.0)], [_t(1.0)]]
    gu = [[_t(-1.0, 1.0)], [_t(-1.0)]]
    out, stats = R.mmpareto_combine(gm, gu)
    assert stats["flag"].item() == 1.0 and stats["conflict"].tolist() == [False, True]
    torch.testing.assert_close(stats["weights"][0], torch.tensor([0.5, 0.5]))
    assert torch.equal(out[0][0], torch.zeros(2))  # nothing non-finite is written: the encoder's gradient is 0


@pytest.mark.parametrize("summed", [False, True])
@pytest.mark.parametrize("rescale", ["per_tensor", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_flat_cpu_path_matches_the_reference(dtype, rescale, summed):
    """summed=True (the DDP path): the buffer holds g_m + g_u; the result is the same combination."""
    gm, gu = _random_grads(7, 3)
    gm = [[t.to(dtype) for t in grp] for grp in gm]
    gu = [[t.to(dtype) for t in grp] for grp in gu]
    gu[1].append(torch.zeros(0, dtype=dtype))  # an empty tensor
    gm[1].append(torch.zeros(0, dtype=dtype))
    want, wstats = R.mmpareto_combine(gm, gu, rescale=rescale)
    layout = MMParetoLayout(gu)
    fm, fu = layout.empty_flats("cpu"), layout.empty_flats("cpu")
    for v, g in zip(sum(layout.views(fm), []), sum(gm, [])):
        v.copy_(g)
    for v, g, x in zip(sum(layout.views(fu), []), sum(gu, []), sum(gm, [])):
        v.copy_(g + x if summed else g)
    if summed:  # the reference on the g_u the buffer can hold: (g_m + g_u) rounded to its dtype, minus g_m
        gu = [[(v.double() - x.double()) for v, x in zip(vs, xs)] for vs, xs in zip(layout.views(fu), gm)]
        want, wstats = R.mmpareto_combine([[x.double() for x in xs] for xs in gm], gu, rescale=rescale)
    stats = mmpareto_combine_flat_(layout, fm, fu, rescale=rescale, summed=summed)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    for got, w in zip(sum(layout.views(fu), []), sum(want, [])):
        torch.testing.assert_close(got.double(), w.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(stats["cos"], wstats["cos"], rtol=1e-5, atol=1e-6)
    assert stats["cos"].dtype == torch.float32 and stats["weights"].shape == (3, 2)


def test_mixed_dtypes_in_one_call():
    gm, gu = worked_example()
    gm[1] = [t.double() for t in gm[1]]
    gu[1] = [t.double() for t in gu[1]]
    want, _ = R.mmpareto_combine(worked_example()[0], worked_example()[1])
    layout = MMParetoLayout(gu)
    assert layout.dtypes == [torch.float32, torch.float64]
    mmpareto_combine_(gm, gu)
    torch.testing.assert_close(gu[0][0], want[0][0])
    torch.testing.assert_close(gu[1][0], want[1][0].double())


@pytest.mark.parametrize(
    "bad,err",
    [
        (lambda gm, gu: (gm[:1], gu[:1]), ValueError),
        (lambda gm, gu: (gm, gu[:1]), ValueError),
        (lambda gm, gu: (gm, [[gu[0][0].double(), gu[0][1]], gu[1]]), ValueError),
        (lambda gm, gu: (gm, [[gu[0][0].int(), gu[0][1]], gu[1]]), TypeError),
        (lambda gm, gu: (gm, [[], []]), ValueError),
        (lambda gm, gu: (torch.zeros(2, 2), gu), TypeError),
    ],
)
def test_public_op_rejects_bad_input_and_changes_nothing(bad, err):
    gm, gu = worked_example()
    before = [t.clone() for t in sum(gu, [])]
    with pytest.raises(err):
        mmpareto_combine_(*bad(gm, gu))
    for a, b in zip(before, sum(gu, [])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [{"gamma": 0.0}, {"gamma": float("nan")}, {"rescale": "per_encoder"}])
def test_public_op_rejects_bad_hyperparameters(kw):
    gm, gu = worked_example()
    with pytest.raises(ValueError, match=next(iter(kw))):
        mmpareto_combine_(gm, gu, **kw)
