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
    assert bal.phi.abs().sum() == 0   # rows() starts the next pass from scratch


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


def test_value_has_no_host_reads():
    from test_sync_free import SyncGuard

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
