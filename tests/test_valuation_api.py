"""SampleValuation / ModalityValuation balancers, ValuationDataset and apply_keep on a tiny model (reference lane)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from mmkernels import reference as R
from mmkernels.api.valuation import ModalityValuation, SampleValuation, ValuationDataset, apply_keep

N, C, M = 24, 3, 2


def setup(seed=0):
    torch.manual_seed(seed)
    encs = nn.ModuleList([nn.Linear(4, 5), nn.Linear(3, 5)])
    head = nn.Linear(10, C)
    xs = [torch.randn(N, 4), torch.randn(N, 3)]
    y = torch.randint(0, C, (N,))
    return encs, head, xs, y


def fuse(head):
    return lambda feats: head(torch.cat(list(feats), 1))


def value_all(bal, encs, head, xs, y, batch=10):
    with torch.no_grad():
        for s in range(0, N, batch):
            i = torch.arange(s, min(s + batch, N))
            feats = [e(x[i]) for e, x in zip(encs, xs)]
            bal.value(bal.subset_logits(feats, fuse(head)), y[i], i)


def reference_copies(encs, head, xs, y):
    with torch.no_grad():
        feats = [e(x) for e, x in zip(encs, xs)]
        f = torch.stack([head(torch.cat([feats[0] * (s & 1), feats[1] * (s >> 1 & 1)], 1)) for s in (1, 2, 3)])
    return R.sample_valuation(f, y)


def test_sample_valuation_rows_follow_the_reference():
    encs, head, xs, y = setup()
    bal = SampleValuation(M, N, start=1)
    assert not bal.values_after(-1) and bal.values_after(0)
    value_all(bal, encs, head, xs, y)
    want = reference_copies(encs, head, xs, y)
    torch.testing.assert_close(bal.phi, want["phi"])
    idx, keep = bal.rows(1)
    w_idx, w_keep = R.valuation_rows(want["copies"])
    assert torch.equal(idx, w_idx) and torch.equal(keep, w_keep)
    assert idx.shape[0] == N + int(want["copies"].sum())
    assert int(want["copies"].sum()) > 0, "the test would prove nothing"
    torch.testing.assert_close(bal.coefficients, want["copies"].sum(1).float())
    torch.testing.assert_close(bal.scores, want["phi"].mean(1))
    assert bal.phi.abs().sum() == 0  # rows() starts the next pass from scratch


def test_outside_the_window_only_originals():
    encs, head, xs, y = setup()
    bal = SampleValuation(M, N, start=5)
    value_all(bal, encs, head, xs, y)
    idx, keep = bal.rows(3)
    assert idx.tolist() == list(range(N)) and keep.all()


def test_unvalued_samples_get_no_copies():
    encs, head, xs, y = setup()
    bal = SampleValuation(M, N, start=0)
    with torch.no_grad():
        i = torch.arange(5)
        bal.value(bal.subset_logits([e(x[i]) for e, x in zip(encs, xs)], fuse(head)), y[i], i)
    idx, _ = bal.rows(1)
    assert set(idx[N:].tolist()) <= set(range(5))


def test_modality_valuation_rows():
    encs, head, xs, y = setup(1)
    bal = ModalityValuation(M, N, start=1, alpha=1.0, seed=3)
    draws = bal.valuation_indices(0)
    assert draws.shape == (int(0.2 * N),) and torch.equal(draws, bal.valuation_indices(0))
    with torch.no_grad():
        feats = [e(x[draws]) for e, x in zip(encs, xs)]
        bal.value(bal.subset_logits(feats, fuse(head)), y[draws], draws)
    idx, keep = bal.rows(1)
    phi = reference_copies(encs, head, xs, y)["phi"]
    gaps = 1 - phi[:, draws].mean(1)
    p, m = R.modality_rate(gaps)
    assert idx.shape[0] == N + math.floor(p.item() * N)
    assert keep[N:].tolist() == [[j == m.item() for j in range(M)]] * (idx.shape[0] - N)
    torch.testing.assert_close(bal.ratios, gaps)


def test_dataset_wrapper_and_keep_mask():
    data = [(torch.tensor([float(i)]), i % C) for i in range(N)]
    ds = ValuationDataset(data, M)
    assert len(ds) == N and ds[3][1].tolist() == [True, True] and ds[3][2] == 3
    ds.set_rows(torch.tensor([0, 5, 5]), torch.tensor([[True, True], [True, False], [False, True]]))
    assert len(ds) == 3 and ds[2][0][0].item() == 5.0 and ds[2][1].tolist() == [False, True] and ds[2][2] == 5
    assert len(ds.originals()) == N and ds.originals()[7][2] == 7
    with pytest.raises(ValueError, match="keep"):
        ds.set_rows(torch.tensor([0]), torch.ones(1, 3, dtype=torch.bool))
    feats = [torch.ones(3, 2), torch.ones(3, 4, 2)]
    out = apply_keep(feats, torch.tensor([[True, True], [True, False], [False, True]]))
    assert out[0][:, 0].tolist() == [1, 1, 0] and out[1][:, 0, 0].tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="keep"):
        apply_keep(feats, torch.ones(3, 3))


def test_state_dict_resume():
    encs, head, xs, y = setup()
    bal = SampleValuation(M, N, start=1)
    value_all(bal, encs, head, xs, y)
    state = bal.state_dict()
    bal2 = SampleValuation(M, N, start=1)
    bal2.load_state_dict(state)
    assert torch.equal(bal2.phi, bal.phi)
    assert all(torch.equal(a, b) for a, b in zip(bal.rows(1), bal2.rows(1)))
    with pytest.raises(ValueError, match="hyperparameters"):
        SampleValuation(M, N, start=2).load_state_dict(state)


def test_state_dict_of_the_previous_release_loads():
    """The previous release stored phi_sum (sums of phi), not sums of M! phi: such a state still loads (converted
    exactly) and gives the same phi and rows; the caller's dict is not modified."""
    encs, head, xs, y = setup()
    bal = SampleValuation(M, N, start=1)
    value_all(bal, encs, head, xs, y)
    state = bal.state_dict()
    tensors = {k: v for k, v in state.items() if k not in ("_extra_state", "scaled_phi_sum", "nonfinite")}
    old = {**state["_extra_state"], "version": 1, "tensors": tensors}  # the layout of that release
    old["tensors"]["phi_sum"] = bal.phi * bal._count.clamp(min=1)
    keys = set(old["tensors"])
    bal2 = SampleValuation(M, N, start=1)
    bal2.load_state_dict(old)
    assert set(old["tensors"]) == keys
    assert torch.equal(bal2.phi, bal.phi)
    assert all(torch.equal(a, b) for a, b in zip(bal.rows(1), bal2.rows(1)))


def test_errors():
    with pytest.raises(ValueError, match="num_samples"):
        SampleValuation(M, 0)
    with pytest.raises(ValueError, match="value"):
        SampleValuation(M, N, value="paper")
    with pytest.raises(ValueError, match="unit"):
        SampleValuation(M, N, unit="step")
    with pytest.raises(ValueError, match="curve"):
        ModalityValuation(M, N, curve="cubic")
    with pytest.raises(ValueError, match="alpha"):
        ModalityValuation(M, N, alpha=-1.0)
    bal = SampleValuation(3, N)
    f = torch.zeros(3, 4, C)
    with pytest.raises(ValueError, match="3 modalities|holds 2"):
        bal.value(f, torch.zeros(4, dtype=torch.long), torch.arange(4))
    assert bal.phi.abs().sum() == 0


def test_value_has_no_host_reads(monkeypatch):
    """The value checks on CPU tensors (labels in [0, C), indices in [0, N)) read the host on purpose, as
    check_label_values does for every balancer (no device involved): replaced by no-ops, as in
    tests/test_sync_free.py."""
    from mmkernels.api import valuation as api_valuation
    from test_sync_free import SyncGuard

    monkeypatch.setattr(api_valuation, "check_label_values", lambda *a, **k: None)
    monkeypatch.setattr(api_valuation, "check_sample_indices", lambda *a, **k: None)
    encs, head, xs, y = setup()
    bal = SampleValuation(M, N, start=1)
    value_all(bal, encs, head, xs, y)
    with SyncGuard() as guard:
        value_all(bal, encs, head, xs, y)
    assert not guard.violations


def test_end_to_end_epochs_with_a_dataloader():
    """The class docstring's loop: 3 epochs, valuation after epochs 0 and 1 (start=1), copies served as rows with
    their keep-mask; the number of rows of epoch e + 1 is N plus the copies the valuation after epoch e found."""
    from torch.utils.data import DataLoader

    encs, head, xs, y = setup(2)
    train = [(xs[0][i], xs[1][i], y[i]) for i in range(N)]
    rows = ValuationDataset(train, M)
    bal = SampleValuation(M, N, start=1)
    opt = torch.optim.SGD(list(encs.parameters()) + list(head.parameters()), lr=0.1)
    sizes = []
    for epoch in range(3):
        sizes.append(len(rows))
        for (xa, xv, yb), keep, _ in DataLoader(rows, batch_size=8, shuffle=True):
            feats = apply_keep([encs[0](xa), encs[1](xv)], keep)
            opt.zero_grad()
            nn.functional.cross_entropy(fuse(head)(feats), yb).backward()
            opt.step()
        if bal.values_after(epoch):
            with torch.no_grad():
                for (xa, xv, yb), _, i in DataLoader(rows.originals(), batch_size=10):
                    bal.value(bal.subset_logits([encs[0](xa), encs[1](xv)], fuse(head)), yb, i)
            expected = N + int(R.valuation_copies(bal.phi).sum())
        else:
            expected = N
        rows.set_rows(*bal.rows(epoch + 1))
        assert len(rows) == expected
    assert sizes[0] == N and max(sizes[1:]) > N


# ----------------------------------------------------------------------------------------------- issue 19
def state_equal(a: dict, b: dict) -> bool:
    """Two balancer state_dicts hold the same entries and bit-identical tensors."""
    ta, tb = ({k: v for k, v in s.items() if k != "_extra_state"} for s in (a, b))
    return (
        a["_extra_state"] == b["_extra_state"] and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    )


def one_batch(seed=0, b=6):
    encs, head, xs, y = setup(seed)
    i = torch.arange(b)
    with torch.no_grad():
        f = SampleValuation.subset_logits([e(x[i]) for e, x in zip(encs, xs)], fuse(head))
    return f, y[i].clone(), i


@pytest.mark.parametrize("bad", [C, -1, 100])
def test_cpu_label_out_of_range_raises_naming_labels(bad):
    f, y, i = one_batch()
    y[2] = bad
    bal = SampleValuation(M, N, start=0)
    before = bal.state_dict()
    with pytest.raises(ValueError, match=r"labels.*\[0, 3\)"):
        bal.value(f, y, i)
    assert state_equal(bal.state_dict(), before)


def test_ignore_index_rows_get_no_copies():
    encs, head, xs, y = setup()
    y = y.clone()
    ignored = torch.arange(0, N, 3)
    y[ignored] = -100
    bal = SampleValuation(M, N, start=0)
    value_all(bal, encs, head, xs, y)
    idx, _ = bal.rows(1)
    copied = set(idx[N:].tolist())
    assert copied and not copied & set(ignored.tolist())
    assert bal.coefficients.sum() == idx.shape[0] - N
    custom = SampleValuation(M, N, start=0, ignore_index=2)  # any ignore_index, also one inside [0, C)
    value_all(custom, encs, head, xs, torch.where(y == -100, 2, y))
    assert not set(custom.rows(1)[0][N:].tolist()) & set(torch.nonzero(y == -100).flatten().tolist())


@pytest.mark.parametrize("bad", [N, N + 5, -1])
def test_rejected_index_writes_nothing_and_a_retry_counts_once(bad):
    f, y, i = one_batch()
    bal = SampleValuation(M, N, start=0)
    before = bal.state_dict()
    with pytest.raises(ValueError, match=rf"indices.*num_samples={N}"):
        bal.value(f, y, torch.tensor([0, 1, 2, bad, 4, 5]))
    assert state_equal(bal.state_dict(), before)
    bal.value(f, y, i)
    fresh = SampleValuation(M, N, start=0)
    fresh.value(f, y, i)
    assert state_equal(bal.state_dict(), fresh.state_dict())


def test_device_index_out_of_range_is_dropped_and_flagged(monkeypatch):
    """Off the CPU the index range is not read on the host (a sync): such a row adds nothing and sets the flag. Shown
    on CPU with the host check replaced by a no-op."""
    from mmkernels.api import valuation as api_valuation

    monkeypatch.setattr(api_valuation, "check_sample_indices", lambda *a, **k: None)
    f, y, i = one_batch()
    bal = SampleValuation(M, N, start=0)
    bal.value(f, y, torch.tensor([0, 1, 2, N + 3, 4, -2]))
    assert bal._count.tolist() == [1.0, 1.0, 1.0, 0.0, 1.0] + [0.0] * (N - 5)
    bal.rows(1)
    assert bal.flag.item() == 1.0


def test_apply_keep_selects_so_dropped_nonfinite_rows_are_zeros():
    nan, inf = float("nan"), float("inf")
    feats = [torch.tensor([[nan, 1.0], [inf, 2.0], [3.0, -inf]], requires_grad=True), torch.full((3, 2), nan)]
    keep = torch.tensor([[False, False], [False, True], [True, False]])
    out = apply_keep(feats, keep)
    assert out[0][:2].tolist() == [[0.0, 0.0], [0.0, 0.0]] and out[0][2].tolist() == [3.0, -inf]
    assert out[1][[0, 2]].tolist() == [[0.0, 0.0], [0.0, 0.0]] and out[1][1].isnan().all()
    out[0][2, 0].backward()
    assert feats[0].grad.tolist() == [[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]
    assert apply_keep([torch.ones(2, 1)], torch.tensor([[1.0], [0.0]]))[0].tolist() == [[1.0], [0.0]]


@pytest.mark.parametrize("extra", [-1, 1, -6])
def test_head_with_the_wrong_number_of_rows(extra):
    encs, head, xs, y = setup()
    feats = [e(x[:6]) for e, x in zip(encs, xs)]
    bad = lambda fs: torch.cat([fuse(head)(fs), torch.zeros(max(extra, 0), C)])[: 18 + extra]  # noqa: E731
    with pytest.raises(ValueError, match=r"head must return.*\[3 \* 6 = 18, C\]"):
        SampleValuation.subset_logits(feats, bad)
    with pytest.raises(ValueError, match="head must return"):
        SampleValuation.subset_logits(feats, lambda fs: torch.zeros(18))


def test_int32_labels_and_indices_as_int64():
    """As every balancer (check_labels, check_label_values): int32 labels and indices are accepted and checked
    like int64 ones; the rows are the same."""
    encs, head, xs, y = setup()
    a, b = SampleValuation(M, N, start=0), SampleValuation(M, N, start=0)
    with torch.no_grad():
        feats = [e(x) for e, x in zip(encs, xs)]
        f = a.subset_logits(feats, fuse(head))
    a.value(f, y, torch.arange(N))
    b.value(f, y.int(), torch.arange(N, dtype=torch.int32))
    assert state_equal(a.state_dict(), b.state_dict())
    assert all(torch.equal(u, v) for u, v in zip(a.rows(1), b.rows(1)))
    bad = y.int()
    bad[0] = C
    with pytest.raises(ValueError, match="labels"):
        b.value(f, bad, torch.arange(N, dtype=torch.int32))
    with pytest.raises(ValueError, match="indices"):
        b.value(f, y.int(), torch.arange(1, N + 1, dtype=torch.int32))
    with pytest.raises(TypeError, match="labels"):
        b.value(f, y.short(), torch.arange(N))


@pytest.mark.parametrize("cls", [SampleValuation, ModalityValuation])
def test_autocast_bf16(cls):
    """Under torch.autocast (CPU, bf16) the head returns bf16 logits; the accumulators stay fp32 and the values are
    those of the op on the same logits."""
    encs, head, xs, y = setup()
    bal = cls(M, N, start=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = [e(x) for e, x in zip(encs, xs)]
        f = bal.subset_logits(feats, fuse(head))
        assert f.dtype == torch.bfloat16
        bal.value(f, y, torch.arange(N))
    assert bal.phi.dtype == torch.float32
    torch.testing.assert_close(bal.phi, R.sample_valuation(f, y)["phi"], atol=0, rtol=0)
    idx, keep = bal.rows(1)
    assert idx.shape[0] >= N and keep.dtype == torch.bool and bal.scores.dtype == torch.float32


def test_nonfinite_features_set_the_flag():
    """A NaN encoder output: the subsets holding it count as wrong, phi stays finite, the pass's flag is 1 (and a
    clean pass after rows() clears it)."""
    encs, head, xs, y = setup()
    bal = SampleValuation(M, N, start=0)
    with torch.no_grad():
        feats = [e(x) for e, x in zip(encs, xs)]
        feats[1][3] = float("nan")
        f = bal.subset_logits(feats, fuse(head))
        bal.value(f, y, torch.arange(N))
    assert torch.isfinite(bal.phi).all()
    torch.testing.assert_close(bal.phi, R.sample_valuation(f, y)["phi"], atol=0, rtol=0)
    bal.rows(1)
    assert bal.flag.item() == 1.0 and bal.nonfinite.item()
    value_all(bal, encs, head, xs, y)
    bal.rows(2)
    assert bal.flag.item() == 0.0


def half_patterns(n, seed):
    """Per sample (v({a}), v({v}), v({a, v})) correctness bits for M = 2: phi are multiples of 1/2."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (3, n), generator=g).bool()


def logits_of(bits):
    """[3, B, 2] logits, label 0: subset S is correct exactly where bits[S - 1]."""
    return torch.stack([bits.float(), torch.full(bits.shape, 0.5)], dim=2)


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_modality_valuation_counts_extra_rows_exactly(fraction):
    """floor(p N) of ModalityValuation against Fractions on a grid of N and phi patterns (the draws valued as drawn,
    repeats included); the grid holds cases where p N is an integer (5 divides N), which fp32 counted one row short."""
    from fractions import Fraction

    integer_cases = 0
    for n in range(5, 41, 5):
        for seed in range(6):
            bal = ModalityValuation(M, n, start=0, fraction=fraction, seed=seed)
            draws = bal.valuation_indices(0)
            bits = half_patterns(n, seed)
            bal.value(logits_of(bits[:, draws]), torch.zeros(draws.shape[0], dtype=torch.long), draws)
            v = bits[:, draws].long().tolist()
            phi = [(Fraction(a + 2 * av - b, 2), Fraction(b + 2 * av - a, 2)) for a, b, av in zip(*v)]
            gaps = [1 - sum(p[j] for p in phi) / len(phi) for j in range(2)]
            exact = Fraction(2, 3) * abs(gaps[0] - gaps[1]) * n
            integer_cases += exact.denominator == 1 and exact > 0
            idx, keep = bal.rows(1)
            assert idx.shape[0] - n == math.floor(exact), (n, seed)
    assert integer_cases > 0, "the grid would prove nothing"


def test_modality_valuation_leaves_unvalued_draws_out():
    bal = ModalityValuation(M, N, start=0, seed=1)
    draws = bal.valuation_indices(0)
    bits = torch.zeros(3, N, dtype=torch.bool)
    bits[0] = bits[2] = True  # phi = (3/2, 1/2) where valued
    first = draws[:2]
    assert not torch.isin(draws, first).all(), "every draw valued: the test would prove nothing"
    bal.value(logits_of(bits[:, first]), torch.zeros(2, dtype=torch.long), first)
    bal.rows(1)
    assert bal.ratios.tolist() == [-0.5, 0.5]  # the mean over the valued draws only


def run_epochs(rows, bal, model, opt, epochs, first=0):
    encs, head, xs, y = model
    for epoch in range(first, epochs):
        for (xa, xv, yb), keep, _ in torch.utils.data.DataLoader(rows, batch_size=8, shuffle=True):
            opt.zero_grad()
            nn.functional.cross_entropy(fuse(head)(apply_keep([encs[0](xa), encs[1](xv)], keep)), yb).backward()
            opt.step()
        if bal.values_after(epoch):
            with torch.no_grad():
                for (xa, xv, yb), _, i in torch.utils.data.DataLoader(rows.originals(), batch_size=10):
                    bal.value(bal.subset_logits([encs[0](xa), encs[1](xv)], fuse(head)), yb, i)
        rows.set_rows(*bal.rows(epoch + 1))


@pytest.mark.parametrize("cls", [SampleValuation, ModalityValuation])
def test_dataset_resume_is_bit_identical(cls):
    """Stop after epoch 1, save the model, optimizer, balancer, ValuationDataset and RNG, rebuild everything, load,
    run epoch 2: the same parameters, bit for bit, as the uninterrupted 3 epochs."""

    def build():
        model = setup(2)
        train = [(model[2][0][i], model[2][1][i], model[3][i]) for i in range(N)]
        params = list(model[0].parameters()) + list(model[1].parameters())
        kw = dict(alpha=20.0, fraction=0.5) if cls is ModalityValuation else {}
        return model, ValuationDataset(train, M), cls(M, N, start=1, **kw), torch.optim.SGD(params, lr=0.1)

    torch.manual_seed(7)
    model, rows, bal, opt = build()
    run_epochs(rows, bal, model, opt, 3)
    want = [p.detach().clone() for p in list(model[0].parameters()) + list(model[1].parameters())]

    torch.manual_seed(7)
    model, rows, bal, opt = build()
    run_epochs(rows, bal, model, opt, 2)
    assert len(rows) > N, "no copies: the test would prove nothing"
    saved = {
        "enc": model[0].state_dict(),
        "head": model[1].state_dict(),
        "opt": opt.state_dict(),
        "bal": bal.state_dict(),
        "rows": rows.state_dict(),
        "rng": torch.get_rng_state(),
    }
    model, rows, bal, opt = build()
    model[0].load_state_dict(saved["enc"]), model[1].load_state_dict(saved["head"])
    opt.load_state_dict(saved["opt"]), bal.load_state_dict(saved["bal"]), rows.load_state_dict(saved["rows"])
    torch.set_rng_state(saved["rng"])
    run_epochs(rows, bal, model, opt, 3, first=2)
    got = [p.detach() for p in list(model[0].parameters()) + list(model[1].parameters())]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_dataset_load_state_dict_rejects_and_changes_nothing():
    data = [(torch.tensor([float(i)]), i % C) for i in range(N)]
    ds = ValuationDataset(data, M)
    ds.set_rows(torch.tensor([0, 5, 5]), torch.tensor([[True, True], [True, False], [False, True]]))
    good = ds.state_dict()
    other = ValuationDataset(data, M)
    bad_states = [
        ({**good, "num_modalities": 3}, "num_modalities"),
        ({**good, "num_samples": N + 1}, "num_samples"),
        ({**good, "index": torch.tensor([0, 5, N])}, "indices"),
        ({**good, "index": torch.tensor([0.0, 5.0, 5.0])}, "index"),
        ({**good, "keep": good["keep"][:2]}, "keep"),
        ({**good, "keep": good["keep"].float()}, "keep"),
        ({k: v for k, v in good.items() if k != "index"}, "index"),
        ([1, 2], "dict"),
    ]
    for state, match in bad_states:
        with pytest.raises(ValueError, match=match):
            other.load_state_dict(state)
        assert len(other) == N and other.keep.all() and torch.equal(other.index, torch.arange(N))
    other.load_state_dict(good)
    assert torch.equal(other.index, ds.index) and torch.equal(other.keep, ds.keep)
    good["index"][0] = 7  # a copy: the saved state does not alias
    assert other.index[0] == 0
    with pytest.raises(ValueError, match="indices"):
        ds.set_rows(torch.tensor([N]), torch.ones(1, M, dtype=torch.bool))
