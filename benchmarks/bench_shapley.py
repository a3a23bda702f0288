"""Benchmark of AGM's Shapley forwards (docs/methods/agm.md) on a ResNet-18 audio-visual(-third) model, M = 2 and 3.

- ext: shapley_masked_batch builds the 2^M - 2 muted copies in one launch, the model runs once on them (eval mode,
  as the authors) and once on the full input (train mode), shapley_responses combines all 2^M - 1 outputs into phi
  with kappa applied in its backward; then loss on sum_m phi_m and backward.
- authors: 2^M - 2 sequential muted full-model forwards (zeroed inputs, eval mode, autograd on), phi from a Python
  sum over subsets, kappa by gradient hooks on phi_m; same loss and backward.
- combine only: shapley_responses vs reference.shapley_combine on [2^M - 1, B, C] outputs.
GPU only (skipped, but collectable, on CPU). SHAPES: (batch, audio [C, H, W], visual [C, H, W]).
"""

import pytest
import torch
import torch.nn.functional as F

from _common import timed
from authors_style import shapley_phis, subset_values

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

MODALITIES = [2, 3]
SHAPES = [(16, (1, 128, 128), (3, 112, 112))]
FULL_SHAPES = [(64, (1, 257, 299), (3, 224, 224))]
NUM_CLASSES = 31
COMBINE_SHAPES = [(2, 256, 1000), (3, 256, 1000), (6, 64, 1000)]
STEP_TIMING = dict(rounds=10, iterations=2, warmup=2, warmup_rounds=1)  # a whole training step per call


def _model_and_inputs(M, shape, device="cuda"):
    from mmkernels.demo.models import ConcatClassifier, ResNet18Encoder

    batch, audio, visual = shape
    in_shapes = [audio, visual, visual][:M]
    torch.manual_seed(0)
    model = ConcatClassifier([ResNet18Encoder(s[0]) for s in in_shapes], NUM_CLASSES).to(device)
    inputs = [torch.randn((batch,) + s, device=device) for s in in_shapes]
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    return model, inputs, y


def ext_step(model, inputs, y, kappa):
    from mmkernels.shapley import shapley_masked_batch, shapley_responses

    M, B = len(inputs), inputs[0].shape[0]
    full = model(inputs)
    model.eval()
    muted = model(shapley_masked_batch(inputs))  # one forward over all 2^M - 2 muted subsets
    model.train()
    values = torch.cat([muted, full]).view(2**M - 1, B, -1)
    phi = shapley_responses(values, kappa)
    loss = F.cross_entropy(phi.sum(0), y)
    loss.backward()
    return loss.detach()


def authors_step(model, inputs, y, kappa):
    phis = shapley_phis(subset_values(model, inputs), len(inputs))
    for phi, k in zip(phis, kappa):
        phi.register_hook(lambda g, k=k: g * k)
    loss = F.cross_entropy(sum(phis), y)
    loss.backward()
    return loss.detach()


@pytest.fixture(
    params=SHAPES
    + [pytest.param(s, marks=pytest.mark.skipif("not config.getoption('--bench-full')")) for s in FULL_SHAPES],
    ids=lambda s: f"B{s[0]}",
)
def shape(request):
    return request.param


@pytest.mark.parametrize("M", MODALITIES)
def test_bench_shapley_step_ext(benchmark, M, shape):
    model, inputs, y = _model_and_inputs(M, shape)
    kappa = torch.linspace(0.5, 1.5, M, device="cuda")
    benchmark.group = f"shapley step M={M} B={shape[0]}"
    timed(benchmark, lambda: (model.zero_grad(set_to_none=True), ext_step(model, inputs, y, kappa)), **STEP_TIMING)


@pytest.mark.parametrize("M", MODALITIES)
def test_bench_shapley_step_authors(benchmark, M, shape):
    model, inputs, y = _model_and_inputs(M, shape)
    kappa = torch.linspace(0.5, 1.5, M).tolist()
    benchmark.group = f"shapley step M={M} B={shape[0]}"
    timed(benchmark, lambda: (model.zero_grad(set_to_none=True), authors_step(model, inputs, y, kappa)), **STEP_TIMING)


@pytest.mark.parametrize("shape", COMBINE_SHAPES, ids=lambda s: f"M{s[0]}-B{s[1]}-C{s[2]}")
def test_bench_combine_ext(benchmark, shape):
    from mmkernels.shapley import shapley_responses

    M, B, C = shape
    v = torch.randn(2**M - 1, B, C, device="cuda")
    benchmark.group = f"shapley combine {shape}"
    timed(benchmark, lambda: shapley_responses(v), rounds=30, iterations=5, warmup=2, warmup_rounds=1)


@pytest.mark.parametrize("shape", COMBINE_SHAPES, ids=lambda s: f"M{s[0]}-B{s[1]}-C{s[2]}")
def test_bench_combine_reference(benchmark, shape):
    from mmkernels import reference

    M, B, C = shape
    v = torch.randn(2**M - 1, B, C, device="cuda")
    benchmark.group = f"shapley combine {shape}"
    timed(benchmark, lambda: reference.shapley_combine(v), rounds=30, iterations=5, warmup=2, warmup_rounds=1)
