"""A refresh with non-finite rows (docs/methods/pmr.md), shared by the reference and the Triton lanes
(tests/test_pmr_reference.py, tests/test_pmr_triton.py): the same scenario and checks on either backend."""

from __future__ import annotations

import torch

from mmkernels import reference as R
from mmkernels.pmr import new_refresh_buffers, pmr_class_sums_, pmr_refresh_, pmr_update_prototypes_


def poisoned_refresh(device):
    """z [2, 9, 5] with a NaN entry in row 2 of modality 0 and an Inf in row 6 of modality 1; old prototypes with a
    NaN entry (class 1 of modality 0)."""
    g = torch.Generator().manual_seed(11)
    z = torch.randn(2, 9, 5, generator=g)
    y = torch.tensor([0, 1, 1, 2, 0, 1, 2, 2, -100])
    z[0, 2, 3] = float("nan")
    z[1, 6, 0] = float("inf")
    old = torch.randn(2, 3, 5, generator=g)
    old[0, 1, 4] = float("nan")
    return z.to(device), y.to(device), old.to(device)


def check_refresh_skips_nonfinite_rows(first: bool, device) -> None:
    """A row holding a NaN/Inf feature is skipped for its modality only (the other modality keeps it), counted in
    counts[m, C]; a non-finite old prototype entry becomes the class mean; one launch and accumulate + refresh
    agree with the reference, and the reference with the mean of the finite rows."""
    z, y, old = poisoned_refresh(device)
    want = old.clone()
    for m, bad in ((0, 2), (1, 6)):
        for k in range(3):
            rows = [i for i in range(9) if y[i].item() == k and i != bad]
            mean = z[m, rows].mean(0)
            ema = torch.where(torch.isfinite(old[m, k]), 0.7 * mean + 0.3 * old[m, k], mean)
            want[m, k] = mean if first else ema
    ref = R.pmr_prototypes_ref(z, y, old, mu=0.3, first=first)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-6)
    one = old.clone()
    skipped = pmr_update_prototypes_(one, z, y, mu=0.3, first=first)
    torch.testing.assert_close(one, want, rtol=1e-5, atol=1e-6)
    assert skipped.tolist() == [1.0, 1.0]
    two = old.clone()
    sums, counts = new_refresh_buffers(2, 3, 5, device)
    pmr_class_sums_(z[:, :4], y[:4], sums, counts)
    pmr_class_sums_(list(z[:, 4:]), y[4:], sums, counts)
    pmr_refresh_(two, sums, counts, mu=0.3, first=first)
    torch.testing.assert_close(two, want, rtol=1e-5, atol=1e-6)
    assert counts[:2, 3].tolist() == [1.0, 1.0] and counts[0, :3].tolist() == [2.0, 2.0, 3.0]
