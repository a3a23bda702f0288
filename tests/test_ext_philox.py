"""Philox4x32-10 and the normal transform of csrc/philox.h, checked bit for bit against a Python transcription
(written here from the algorithm description, not in the library) and the Random123 known-answer vectors."""
import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.ext

MASK = 0xFFFFFFFF


def philox4x32_10_py(counter, key):
    """Salmon et al. (SC 2011): 10 rounds of (hi(M0 c0), lo(M0 c0)), (hi(M1 c2), lo(M1 c2)) mixing, key bumped by
    the Weyl constants between rounds."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK, (p0 >> 32) ^ c3 ^ k1, p0 & MASK
    return c0, c1, c2, c3


def stream_words_py(seed, ctr):
    """The documented layout: key = (seed lo, seed hi), counter = (ctr lo, ctr hi, 0, 0)."""
    ctr &= 2 ** 64 - 1
    return philox4x32_10_py((ctr & MASK, ctr >> 32, 0, 0), (seed & MASK, seed >> 32))


def normals_py(words):
    """Box-Muller in double: u = (x + 0.5) / 2^32; (r cos 2 pi u1, r sin 2 pi u1, r' cos 2 pi u3, r' sin 2 pi u3)."""
    u = [(x + 0.5) * 2.0 ** -32 for x in words]
    out = []
    for a, b in ((u[0], u[1]), (u[2], u[3])):
        r, th = math.sqrt(-2.0 * math.log(a)), 6.283185307179586 * b
        out += [r * math.cos(th), r * math.sin(th)]
    return [float(np.float32(v)) for v in out]


KAT = [  # Random123 kat_vectors, philox4x32 10 rounds: counter, key, output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK,) * 4, (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.fixture(scope="module")
def C():
    from mmkernels._backend import load_ext

    return load_ext()


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answers(C, counter, key, expected):
    assert tuple(philox4x32_10_py(counter, key)) == expected  # the transcription itself
    assert tuple(C.philox4x32_10(list(counter), list(key))) == expected  # the header's block function


@pytest.mark.parametrize("seed,offset", [(0, 0), (1234, 5), (2 ** 40 + 7, 2 ** 32 - 3), (2 ** 63 - 1, 2 ** 63 - 2)])
def test_stream_words_match_transcription(C, seed, offset):
    words = C.philox_words(seed, offset, 6).tolist()  # crosses the 32-bit counter carry for the third case
    assert words == [list(stream_words_py(seed, offset + i)) for i in range(6)]


def test_normals_match_transcription(C):
    got = C.philox_normals(99, 2 ** 33 - 2, 5, torch.device("cpu")).tolist()
    want = [normals_py(stream_words_py(99, 2 ** 33 - 2 + i)) for i in range(5)]
    assert got == want  # glibc double log/cos/sin on both sides: bit-identical


def test_normals_same_on_device(C, device):
    cpu = C.philox_normals(7, 11, 4096, torch.device("cpu"))
    dev = C.philox_normals(7, 11, 4096, torch.device(device)).cpu()
    # double Box-Muller rounded once to float: CUDA's libm may differ from glibc in the last double bit only
    assert torch.equal(cpu, dev) or (cpu - dev).abs().max().item() <= 4.8e-7 * cpu.abs().max().item()


def test_normal_statistics(C):
    """200k normals from one stream: moments, independence of the four slots and of two streams, KS distance."""
    n = 50_000
    z = C.philox_normals(2024, 0, n, torch.device("cpu")).double()  # [n, 4]
    flat = z.flatten()
    N = flat.numel()
    assert abs(flat.mean().item()) < 5 / math.sqrt(N)
    assert abs(flat.var().item() - 1) < 5 * math.sqrt(2 / N)
    corr = torch.corrcoef(z.t())
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max().item() < 5 / math.sqrt(n)
    other = C.philox_normals(2024, n, n, torch.device("cpu")).double()  # the next n counters: an independent block
    assert abs(torch.corrcoef(torch.stack([z[:, 0], other[:, 0]]))[0, 1].item()) < 5 / math.sqrt(n)
    s = flat.sort().values
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    emp = torch.arange(1, N + 1, dtype=torch.float64) / N
    ks = torch.maximum((emp - cdf).abs(), (emp - 1 / N - cdf).abs()).max().item()
    assert ks < 1.95 / math.sqrt(N)  # 99.9% Kolmogorov-Smirnov bound


def test_seeds_give_different_streams(C):
    a = C.philox_words(1, 0, 64)
    b = C.philox_words(2, 0, 64)
    c = C.philox_words(1, 64, 64)
    assert not (a == b).any() and not (a == c).any()
