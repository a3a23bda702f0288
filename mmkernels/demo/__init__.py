"""The demo of `python -m mmkernels demo`: a synthetic audio-visual set that reproduces modality imbalance, the
training loop that runs joint training and each balancing method through the public API, and the report."""
from .data import make_dataset  # noqa: F401
