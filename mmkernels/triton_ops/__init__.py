"""Triton kernels (one file per op: coefficients.py, grad_tap.py, modality_drop.py).

Each file imports triton at its top, so import them lazily (the public modules mmkernels/coefficients.py and
mmkernels/taps.py do, only when the Triton backend is chosen): `import mmkernels` works without Triton.
"""
