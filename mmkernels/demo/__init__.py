"""The demo of `python -m mmkernels demo`: a synthetic audio-visual set that reproduces modality imbalance and UCI
Multiple Features (6 real views, mfeat.py), the training loop that runs joint training and each balancing method
through the public API for any number of views, the diagnostics of mmkernels.metrics, and the report."""

from .data import make_dataset  # noqa: F401
