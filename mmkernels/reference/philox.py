"""Philox4x32-10 streams addressed by (seed, offset), as the Triton and CUDA kernels draw them
(docs/architecture.md)."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "philox4x32_10",
    "philox_words",
    "philox_normals",
    "philox_ge_normals",
    "philox_uniforms_triton",
    "uniforms_from_words",
]


# ---------------------------------------------------------------------------------- Philox (docs/architecture.md)
# Counter-based Philox4x32-10 (Salmon, Moraes, Dror, Shaw, SC 2011), the one random source of
# every backend. Stream layout (csrc/philox.h, and Triton's tl.randint with a 64-bit offset):
#   key = (seed & 0xffffffff, seed >> 32); counter of position ctr = (ctr & 0xffffffff, ctr >> 32, 0, 0), ctr mod 2^64.
# Words are held in int64 tensors in [0, 2^32); a 32 x 32 -> 64-bit product is formed from 32 x 16-bit pieces
# (each < 2^48), so nothing overflows int64. Vectorised over counters; the only loop is over the 10 rounds.
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key schedule (Weyl constants)
_MASK32 = 0xFFFFFFFF
_TWO_M32 = 2.0**-32
_TRITON_UNIFORM_SCALE = 4.6566127342e-10  # triton/language/random.py uint_to_uniform_float (as fp32)


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of the 64-bit product a * b, a a 32-bit constant, b int64 words in [0, 2^32)."""
    t = a * (b >> 16)  # < 2^48: the product is t * 2^16 + s
    s = a * (b & 0xFFFF)  # < 2^48
    r = ((t & 0xFFFF) << 16) + s  # < 2^49: the low 48 bits' worth
    return (t >> 16) + (r >> 32), r & _MASK32


def philox4x32_10(counters: torch.Tensor, key) -> torch.Tensor:
    """Philox4x32-10 block function: counters int64 [..., 4] (words in [0, 2^32)), key (k0, k1) 32-bit ints.
    Returns the 4 output words, int64 [..., 4]. Checked against the Random123 known-answer vectors."""
    c0, c1, c2, c3 = (counters[..., j].to(torch.int64) for j in range(4))
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox_words(seed: int, offset: int, n: int, device=None) -> torch.Tensor:
    """int64 [n, 4]: the Philox words of stream positions offset .. offset + n - 1 (mod 2^64) for `seed`
    (the layout above; the same words as mmkernels._C.philox_words and Triton's tl.randint4x(seed, offset + i))."""
    seed, offset = int(seed), int(offset)
    i = torch.arange(n, dtype=torch.int64, device=device)  # n < 2^63
    low = (i & _MASK32) + (offset & _MASK32)  # < 2^33: carry into the high word
    c0 = low & _MASK32
    c1 = ((i >> 32) + ((offset >> 32) & _MASK32) + (low >> 32)) & _MASK32
    zero = torch.zeros_like(c0)
    return philox4x32_10(torch.stack([c0, c1, zero, zero], dim=-1), ((seed & _MASK32), (seed >> 32) & _MASK32))


def _box_muller(a: torch.Tensor, b: torch.Tensor):
    """Two N(0, 1) from two words, in float64 then rounded once to fp32 (csrc/philox.h box_muller):
    u = (x + 0.5) / 2^32 in (0, 1); r = sqrt(-2 ln u_a), theta = 2 pi u_b; (r cos theta, r sin theta)."""
    ua = (a.to(torch.float64) + 0.5) * _TWO_M32
    ub = (b.to(torch.float64) + 0.5) * _TWO_M32
    r = torch.sqrt(-2.0 * torch.log(ua))
    theta = 6.283185307179586 * ub
    return (r * torch.cos(theta)).to(torch.float32), (r * torch.sin(theta)).to(torch.float32)


def philox_normals(seed: int, offset: int, n: int, device=None) -> torch.Tensor:
    """fp32 [n, 4]: the four Box-Muller normals (n0, n1, n2, n3) of Philox positions offset .. offset + n - 1, those of
    the extension (mmkernels._C.philox_normals; n0 = (words 0, 1) cos, n1 = sin, n2 / n3 from words 2, 3).
    The double-precision log/cos/sin of torch and of the C library may differ in the last double bit, so a value can
    in principle differ by 1 fp32 ulp where the double lands within an ulp of a rounding tie (about 1 in 10^8);
    tests find them bit-identical. The covariance tap's z_i is column 0 (position offset + i)."""
    w = philox_words(seed, offset, n, device)
    n0, n1 = _box_muller(w[:, 0], w[:, 1])
    n2, n3 = _box_muller(w[:, 2], w[:, 3])
    return torch.stack([n0, n1, n2, n3], dim=1)


def philox_ge_normals(numels: Sequence[int], seed: int, offset: int, device=None) -> list:
    """The normals of ge_isotropic_ (csrc/ge_isotropic.cpp): element j of tensor t is slot (base_t + j) % 4 of
    position offset + (base_t + j) // 4, base_t = sum_{s<t} 4 ceil(numel_s / 4). Returns T flat fp32 tensors;
    the call consumes sum_t ceil(numel_t / 4) positions."""
    counts = [(int(n) + 3) // 4 for n in numels]
    z = philox_normals(seed, offset, sum(counts), device)  # [sum counts, 4], one draw for all tensors
    return [blk.reshape(-1)[: int(n)] for blk, n in zip(z.split(counts), numels)]


def philox_uniforms_triton(seed: int, offset: int, n: int, device=None) -> torch.Tensor:
    """fp32 [n]: Triton's tl.rand(seed, offset + i), i < n (triton/language/random.py): word 0 of the position,
    read as int32 x, x' = x if x >= 0 else ~x (in [0, 2^31)), u = fp32(x') * fp32(4.6566127342e-10), in [0, 1)."""
    return uniforms_from_words(philox_words(seed, offset, n, device)[:, 0])


def uniforms_from_words(x: torch.Tensor) -> torch.Tensor:
    """tl.rand's fp32 uniforms from Philox word 0 (int64 [n] holding uint32 values): see philox_uniforms_triton."""
    x = torch.where(x >= 2**31, _MASK32 - x, x)  # ~x of the int32 reading, for x < 0
    scale = torch.tensor(_TRITON_UNIFORM_SCALE, dtype=torch.float32, device=x.device)
    return x.to(torch.float32) * scale
