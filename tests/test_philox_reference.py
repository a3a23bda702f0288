"""The reference's Philox4x32-10 (mmkernels.reference.philox_*) on its own (reference lane): the block function
against the Random123 known answers, the stream layout (key and counter from seed and a 64-bit position, carries
and the 2^64 wrap) and the two transforms (the extension's Box-Muller, Triton's uint -> float) against scalar
transcriptions written here from csrc/philox.h and triton/language/random.py. The reference against the extension
is in test_philox_ext.py, against Triton in test_philox_triton.py."""

import math

import numpy as np
import pytest
import torch

from mmkernels import reference as R
from mmkernels.noise import cov_noise_normals, cov_noise_tap, ge_isotropic_

MASK = 0xFFFFFFFF

KAT = [  # Random123 kat_vectors, philox4x32 10 rounds: counter, key, output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK,) * 4, (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

# (seed, offset): small; the low counter word carrying into the high one; seeds with a high key word; the 2^64 wrap
STREAMS = [(0, 0), (1234, 5), (2**40 + 7, 2**32 - 3), (2**63 - 1, 2**63 - 2), (5, 2**63 - 1)]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_block_function_known_answers(counter, key, expected):
    assert tuple(R.philox4x32_10(torch.tensor(counter), key).tolist()) == expected


def test_block_function_is_vectorised_over_counters():
    counters = torch.tensor([c for c, _, _ in KAT[:1]] * 3 + [KAT[1][0]])
    out = R.philox4x32_10(counters, (0, 0)).tolist()
    assert out[:3] == [list(KAT[0][2])] * 3 and out[3] != out[0]


@pytest.mark.parametrize("seed,offset", STREAMS)
def test_stream_layout(seed, offset):
    """key = (seed lo, seed hi), counter = (ctr lo, ctr hi, 0, 0), ctr = offset + i mod 2^64."""
    n = 6
    words = R.philox_words(seed, offset, n)
    assert words.dtype == torch.int64 and words.shape == (n, 4)
    ctrs = [(offset + i) % 2**64 for i in range(n)]
    counters = torch.tensor([[c & MASK, c >> 32, 0, 0] for c in ctrs])
    assert torch.equal(words, R.philox4x32_10(counters, (seed & MASK, seed >> 32)))
    assert int(words.min()) >= 0 and int(words.max()) <= MASK


def box_muller_py(words):
    """csrc/philox.h in Python doubles (C library log/cos/sin), each value rounded once to float."""
    u = [(x + 0.5) * 2.0**-32 for x in words]
    out = []
    for a, b in ((u[0], u[1]), (u[2], u[3])):
        r, th = math.sqrt(-2.0 * math.log(a)), 6.283185307179586 * b
        out += [r * math.cos(th), r * math.sin(th)]
    return [float(np.float32(v)) for v in out]


@pytest.mark.parametrize("seed,offset", STREAMS[1:4])
def test_normals_are_the_extensions_box_muller(seed, offset):
    z = R.philox_normals(seed, offset, 64)
    assert z.dtype == torch.float32 and z.shape == (64, 4)
    words = R.philox_words(seed, offset, 64).tolist()
    assert z.tolist() == [box_muller_py(w) for w in words]


def triton_uniform_np(word0: np.ndarray) -> np.ndarray:
    """triton/language/random.py uint_to_uniform_float: the uint32 read as int32 x, ~x where x < 0, times the fp32
    constant 4.6566127342e-10 in fp32."""
    x = word0.astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


@pytest.mark.parametrize("seed,offset", STREAMS)
def test_uniforms_are_tritons_transform(seed, offset):
    u = R.philox_uniforms_triton(seed, offset, 256)
    want = triton_uniform_np(R.philox_words(seed, offset, 256)[:, 0].numpy())
    assert u.dtype == torch.float32 and np.array_equal(u.numpy(), want)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0


def test_uniform_statistics():
    u = R.philox_uniforms_triton(77, 3, 100_000).double()
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    hist = torch.histc(u, bins=10, min=0.0, max=1.0)
    assert (hist - n / 10).abs().max().item() < 5 * math.sqrt(n / 10)


def test_ge_normals_layout():
    """Element j of tensor t: slot (base_t + j) % 4 of position offset + (base_t + j) // 4, base_t padded to 4."""
    numels = [5, 8, 1, 3]
    got = R.philox_ge_normals(numels, 3, 10)
    z = R.philox_normals(3, 10, 2 + 2 + 1 + 1)
    assert [g.numel() for g in got] == numels
    assert torch.equal(got[0], z[0:2].flatten()[:5]) and torch.equal(got[1], z[2:4].flatten())
    assert torch.equal(got[2], z[4, :1]) and torch.equal(got[3], z[5, :3])


# ------------------------------------------------------------------------------------ the reference backend's draws
@pytest.fixture
def ref_backend(monkeypatch):
    monkeypatch.setenv("MMKERNELS_BACKEND", "reference")


def test_reference_backend_draws_philox(ref_backend):
    z = cov_noise_normals(9, seed=7, offset=2**32 - 4)
    assert torch.equal(z, R.philox_normals(7, 2**32 - 4, 9)[:, 0])
    x = torch.randn(9, 3, requires_grad=True)
    g = torch.randn(9, 3)
    cov_noise_tap(x, 0.5, sigma=0.25, seed=7, offset=2**32 - 4).backward(g)
    assert torch.equal(x.grad, R.cov_noise_tap_backward(g, 0.5, z, sigma=0.25))
    grads = [torch.randn(3, 3), torch.randn(2)]
    want = R.ge_isotropic(
        grads, [0.5, 1.5], [n.view(t.shape) for n, t in zip(R.philox_ge_normals([9, 2], 4, 6), grads)]
    )
    ge_isotropic_(grads, torch.tensor([0.5, 1.5]), seed=4, offset=6)
    assert all(torch.equal(a, b) for a, b in zip(grads, want))
