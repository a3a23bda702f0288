"""Philox4x32-10 and the normal transform of csrc/philox.h, checked bit for bit against the Random123 known-answer
vectors and the reference's PyTorch transcription (mmkernels.reference.philox_*, itself checked against the known
answers and scalar transcriptions in test_philox_reference.py); and the noise ops on the reference backend giving
the extension's results (the same normals, so the same noise)."""

import math

import pytest
import torch

from mmkernels import reference as R
from mmkernels.noise import cov_noise_normals, cov_noise_tap, ge_isotropic_, sample_cov_noise
from test_philox_reference import KAT, STREAMS

pytestmark = pytest.mark.ext


@pytest.fixture(scope="module")
def C():
    from mmkernels._backend import load_ext

    return load_ext()


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answers(C, counter, key, expected):
    assert tuple(C.philox4x32_10(list(counter), list(key))) == expected  # the header's block function


@pytest.mark.parametrize("seed,offset", STREAMS)
def test_stream_words_match_reference(C, seed, offset):
    words = C.philox_words(seed, offset, 6)  # crosses the 32-bit counter carry and the 2^64 wrap
    assert torch.equal(words, R.philox_words(seed, offset, 6))


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in fp32 units in the last place (same-sign finite floats: their int32 bit patterns are ordered)."""
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


@pytest.mark.parametrize(
    "seed,offset,n", [(99, 2**33 - 2, 5), (2024, 7, 100_000), (2**63 - 1, 2**63 - 50_000, 100_000)]
)
def test_reference_normals_equal_extension_normals(C, device, seed, offset, n):
    """The reference's float64 Box-Muller rounded once to fp32 gives the extension's normals: bit-identical in every
    measurement (16M of 16M on CPU); the documented bound is 1 fp32 ulp, where torch's and the C/CUDA library's
    double log/cos/sin round differently right at an fp32 rounding tie (about 1 in 10^8)."""
    ext = C.philox_normals(seed, offset, n, torch.device(device)).cpu()
    ref = R.philox_normals(seed, offset, n, device).cpu()
    assert ref.shape == ext.shape == (n, 4)
    ulps = ulp_distance(ref, ext)
    assert int(ulps.max()) <= 1 and int((ulps > 0).sum()) <= max(1, ref.numel() // 100_000)
    if device == "cpu":
        assert torch.equal(ref, ext)


def test_reference_ge_normals_follow_the_extension_layout(C, device):
    numels = [5, 8, 1, 3, 4097]
    got = R.philox_ge_normals(numels, 3, 2**32 - 1, device)
    base = 0
    for n, z in zip(numels, got):
        count = (n + 3) // 4
        want = C.philox_normals(3, 2**32 - 1 + base // 4, count, torch.device(device)).flatten()[:n]
        assert torch.equal(z, want)
        base += 4 * count


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


# ------------------------------------------------------------------------------ the reference backend = the extension
def on_backend(monkeypatch, backend, fn):
    monkeypatch.setenv("MMKERNELS_BACKEND", backend)
    return fn()


# The normals are the same on both backends; what follows the draw is each backend's arithmetic: the extension's
# double-accumulated mean of z and std of g (and its fp32 row factor for fp64 tensors) against the reference's
# fp32 (fp64) torch reductions, a difference of a few fp32 ulps (measured: fp16/bf16 and most fp32 results bit-equal).
TOL = {torch.float32: 1e-6, torch.float64: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_reference_backend_gives_the_extension_noise(monkeypatch, device, dtype):
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(37, 5, generator=gen).to(device=device, dtype=dtype)
    g = torch.randn(37, 5, generator=gen).to(device=device, dtype=dtype)
    G = torch.randn(37, 11, generator=gen).to(device=device, dtype=dtype)
    grads0 = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in [(4, 5), (7,), (3, 3, 3)]]
    k = torch.tensor([0.5, 2.0], device=device)

    def tap():
        x = x0.clone().requires_grad_()
        cov_noise_tap(x, torch.tensor(0.7, device=device), sigma=0.5, seed=42, offset=2**32 - 9).backward(g)
        return x.grad

    def ge():
        grads = [t.clone() for t in grads0]
        return ge_isotropic_(grads, k, seed=9, offset=3, group_index=[0, 1, 0])

    def run(backend):
        return on_backend(
            monkeypatch,
            backend,
            lambda: (
                cov_noise_normals(37, seed=42, offset=2**32 - 9, device=device),
                tap(),
                sample_cov_noise(G, seed=4, offset=9),
                ge(),
            ),
        )

    z_ref, tap_ref, h_ref, ge_ref = run("reference")
    z_ext, tap_ext, h_ext, ge_ext = run("ext")
    assert torch.equal(z_ref, z_ext)
    tol = TOL[dtype]
    torch.testing.assert_close(tap_ref, tap_ext, rtol=tol, atol=tol)
    torch.testing.assert_close(h_ref, h_ext, rtol=tol, atol=tol)
    for a, b in zip(ge_ref, ge_ext):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------ the vectorised CPU path (csrc/philox_vec_cpu.h)
# 16 counters per vector step, the rest (tails, thread-chunk edges) on the scalar header code: the normals must be
# the reference's (bit-equal here, documented bound 1 fp32 ulp) at every block edge and across the 2^32 counter carry
# inside one vector block.
@pytest.mark.parametrize("n", [1, 15, 16, 17, 31, 33, 4095, 4097, 8193])
@pytest.mark.parametrize("offset", [0, 2**32 - 5, 2**33 - 17, 2**63 - 9000])
def test_vector_normals_match_reference_at_block_edges(C, n, offset):
    ext = C.philox_normals(12345, offset, n, torch.device("cpu"))
    ref = R.philox_normals(12345, offset, n, "cpu")
    ulps = ulp_distance(ref, ext)
    assert int(ulps.max()) <= 1 and int((ulps > 0).sum()) <= max(1, ref.numel() // 100_000)
    assert torch.equal(ref, ext)  # measured bit-equal on CPU (SLEEF's 1-ulp double log/sincos, as torch's own)


def _ge_expected(orig, k, std, normals):
    """k g + (std + 1e-8) n with the extension's std and the reference's normals, rounded as ge_update (fp32)."""
    out = []
    for o, s, n in zip(orig, std.tolist(), normals):
        scale = torch.tensor(s + 1e-8, dtype=torch.float32)
        out.append(o * torch.tensor(k, dtype=torch.float32) + scale * n.view_as(o))
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_ge_vector_path_uses_the_reference_normals(C, threads):
    """ge_isotropic_ on CPU: sizes around the vector width (64 elements = 16 counters), the normal buffer (2048) and
    the chunk (65536), tensor bases that are not multiples of the vector width, a 1-element tensor; same bits for
    1 or 2 threads."""
    sizes = [1, 3, 4, 5, 63, 64, 65, 2047, 2049, 65535, 65537, 70001]
    gen = torch.Generator().manual_seed(3)
    orig = [torch.randn(s, generator=gen) * 0.01 for s in sizes]
    grads = [g.clone() for g in orig]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        C.ge_isotropic_(grads, torch.full((len(sizes),), 0.75), [], 2**40 + 1, 2**32 - 300)  # the twin itself
    finally:
        torch.set_num_threads(prev)
    normals = R.philox_ge_normals(sizes, 2**40 + 1, 2**32 - 300, "cpu")
    for g, want in zip(grads, _ge_expected(orig, 0.75, C.ge_tensor_std(orig), normals)):
        ulps = ulp_distance(g.abs(), want.abs())
        assert int(ulps.max()) <= 2 and int((ulps > 0).sum()) <= max(1, g.numel() // 100_000)
        assert torch.equal(g, want)


def test_ge_result_does_not_depend_on_the_thread_count(C):
    gen = torch.Generator().manual_seed(4)
    orig = [torch.randn(s, generator=gen) for s in (200_003, 65536 * 3 + 1, 7)]
    outs = []
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            grads = [g.clone() for g in orig]
            C.ge_isotropic_(grads, torch.tensor([0.5, 1.5, 1.0]), [], 1, 0)
            outs.append(grads + [C.ge_tensor_std(orig)])
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("B", [1, 15, 16, 17, 33, 257])
def test_tap_normals_vector_path_match_reference(C, B):
    """The covariance tap draws only n0 (a cos-only vector path, csrc/philox_vec_cpu.h philox_normal0_block): with
    grad = 1, k = 0, sigma = 1 its backward returns z_i - mean(z), against the reference's normals."""
    offset = 2**32 - 7  # the counter carry lands inside the first vector block
    out = C.cov_noise_tap_backward(torch.ones(B, 1), torch.tensor(0.0), 1.0, 5, offset)[:, 0]
    z = R.philox_normals(5, offset, B, "cpu")[:, 0]
    mean = z.double().mean().float()  # the twin's mean: a double sum, rounded once
    want = torch.tensor(0.0) + 1.0 * (z - mean)
    ulps = ulp_distance(out.abs(), want.abs())
    assert int(ulps.max()) <= 1
    assert torch.equal(out, want)


_ISA_SCRIPT = r"""
import torch
from mmkernels import reference as R
from mmkernels._backend import load_ext
from mmkernels.coefficients import balance_coefficients
C = load_ext()
for n, off in [(1, 0), (17, 2 ** 32 - 5), (4097, 2 ** 33 - 17)]:
    assert torch.equal(C.philox_normals(9, off, n, torch.device("cpu")), R.philox_normals(9, off, n, "cpu")), n
B = 37
tap = C.cov_noise_tap_backward(torch.ones(B, 1), torch.tensor(0.0), 1.0, 5, 2 ** 32 - 7)[:, 0]
z = R.philox_normals(5, 2 ** 32 - 7, B, "cpu")[:, 0]
assert torch.equal(tap, torch.tensor(0.0) + 1.0 * (z - z.double().mean().float()))
sizes = [1, 5, 63, 70001]
orig = [torch.randn(s, generator=torch.Generator().manual_seed(s)) for s in sizes]
grads = [g.clone() for g in orig]
C.ge_isotropic_(grads, torch.full((4,), 0.75), [], 3, 11)
std = C.ge_tensor_std(orig)
for g, o, s, n in zip(grads, orig, std.tolist(), R.philox_ge_normals(sizes, 3, 11, "cpu")):
    assert torch.equal(g, o * torch.tensor(0.75) + torch.tensor(s + 1e-8, dtype=torch.float32) * n)
x = torch.randn(3, 50, 1000, generator=torch.Generator().manual_seed(1))
y = torch.randint(0, 1000, (50,), generator=torch.Generator().manual_seed(2))
x[1, 4, 7] = float("nan")
y[4] = -100
for method in ("ogm", "agm", "mlb"):
    got, want = balance_coefficients(x, y, method), R.balance_coefficients_ref(x, y, method)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=2e-5, atol=1e-6)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_every_cpu_path_gives_the_reference_numbers(isa):
    """The AVX-512, AVX2 and scalar CPU paths (pinned with MMKERNELS_CPU_ISA in a fresh process; a CPU without an
    ISA runs the next lower one): the reference's normals bit for bit, and the coefficients."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MMKERNELS_CPU_ISA": isa, "MMKERNELS_BACKEND": "ext"}
    run = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@pytest.mark.ext
@pytest.mark.parametrize("seed, offset", [(0, 0), (11, 2**33 + 17), (2**40 + 7, 2**32 - 3)])
def test_drop_uniforms_on_cpu_from_the_twin_equal_the_reference(seed, offset, monkeypatch):
    """The CPU drop takes its Philox words from the C++ twin: the same uniforms as the transcription, bit for bit."""
    from mmkernels import reference
    from mmkernels.taps import drop_uniforms

    monkeypatch.delenv("MMKERNELS_BACKEND", raising=False)
    u, gate = drop_uniforms(seed, offset, 3, 700)
    want = reference.philox_uniforms_triton(seed, offset, 3 * 700 + 1)
    assert torch.equal(u.flatten(), want[:-1]) and torch.equal(gate, want[-1])
