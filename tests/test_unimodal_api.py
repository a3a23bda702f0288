"""Unimodal-logit helpers (issue 5, item 2)."""

from __future__ import annotations

import torch

import mmkernels.api as api


def test_concat_bias_split_sums_to_the_head():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(5, 3, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)]
    head = torch.nn.Linear(9, 6)
    u = api.concat_unimodal_logits(feats, head)
    assert u.shape == (3, 5, 6) and not u.requires_grad
    torch.testing.assert_close(u.sum(0), head(torch.cat(feats, 1)).detach())  # TPAMI Eq. 6: b/M each
    torch.testing.assert_close(u[1], (feats[1] @ head.weight[:, 3:7].t() + head.bias / 3).detach())
    u2 = api.concat_unimodal_logits(feats, (head.weight, head.bias), gamma=[1.0, 0.0, 0.0], detach=False)
    assert u2.requires_grad
    torch.testing.assert_close(u2[0], feats[0] @ head.weight[:, :3].t() + head.bias)


def test_summation_and_zero_out():
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g)]
    heads = [torch.nn.Linear(3, 2), torch.nn.Linear(5, 2)]
    u = api.summation_unimodal_logits(feats, heads)
    torch.testing.assert_close(u[1], heads[1](feats[1]))
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
    calls = []

    def head(fs):
        calls.append(fs[0].shape[0])
        return mlp(torch.cat(fs, 1))

    z = api.zero_out_unimodal_logits(head, feats)
    assert calls == [8]  # one batched call of M * B rows
    torch.testing.assert_close(z[0], mlp(torch.cat([feats[0], torch.zeros(4, 5)], 1)))
    torch.testing.assert_close(z[1], mlp(torch.cat([torch.zeros(4, 3), feats[1]], 1)))
