"""The fused coefficient kernel as the custom op `mmkernels::balance_coefficients` under torch.compile.

Triton lane (TRITON_INTERPRET=1 on CPU tensors, or CUDA). The compiled function must trace to ONE opaque call
of the op (fullgraph=True: no graph break into the launcher's workspace cache) and give the eager numbers,
including AGM's running state mutated in place over several steps.
"""

import pytest
import torch

from mmkernels import reference as R
from mmkernels.coefficients import balance_coefficients

pytestmark = [
    pytest.mark.triton,
    pytest.mark.backend("triton"),
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]  # numpy, interpreter

OP = "mmkernels.balance_coefficients"


def _batch(M, B, C, device, seed):
    g = torch.Generator().manual_seed(seed)
    sharp = torch.linspace(0.5, 2.0, M).view(M, 1, 1)  # modality-dependent sharpness: ratios away from 1
    x = torch.randn(M, B, C, generator=g) * 2.0 * sharp
    y = torch.randint(0, C, (B,), generator=g)
    y[1] = -100
    return x.to(device), y.to(device)


def _recording_aot_eager(graphs):
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return aot_eager(gm, example_inputs)

    return backend


def _assert_same(got: dict, want: dict, msg):
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == torch.float32 and got[key].shape == want[key].shape, (msg, key)
        torch.testing.assert_close(
            got[key], want[key], rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{msg} {key}: {m}"
        )


@pytest.mark.parametrize(
    "method,hp",
    [("ogm", {"alpha": 0.6, "z": "sigmoid"}), ("agm", {"alpha": 1.5, "clip": 2.0}), ("agm", {"alpha": 0.7})],
)
def test_compiled_matches_eager(method, hp, device):
    torch._dynamo.reset()
    M, B, C = 3, 24, 7
    graphs = []

    def step(x, y, s_hat, steps):
        state = {"s_hat": s_hat, "steps": steps} if method == "agm" else None
        out = balance_coefficients(x.permute(1, 0, 2), y, method, state=state, **hp)  # a [B, M, C] buffer: any strides
        return out["coefficients"] * 2.0, out  # an op after the custom op, in the same graph

    compiled = torch.compile(step, fullgraph=True, backend=_recording_aot_eager(graphs))
    st_e, st_c = R.new_agm_state(M, device), R.new_agm_state(M, device)
    for i in range(3):  # AGM: step 0 has no history, steps 1 and 2 read and update the running means
        x, y = _batch(M, B, C, device, seed=40 + i)
        x = x.permute(1, 0, 2).contiguous()  # [B, M, C]
        want2, want = step(x, y, st_e["s_hat"], st_e["steps"])
        got2, got = compiled(x, y, st_c["s_hat"], st_c["steps"])
        _assert_same(got, want, f"{method} step {i}")
        torch.testing.assert_close(got2, want2, rtol=0, atol=0)
        assert got["flag"].item() == 0
        assert torch.equal(st_c["s_hat"], st_e["s_hat"]) and torch.equal(st_c["steps"], st_e["steps"]), i
    if method == "agm":
        assert st_c["steps"].item() == 3.0 and st_c["s_hat"].abs().sum().item() > 0
        assert not torch.allclose(got["coefficients"], torch.ones(M, device=device))  # kappa moved away from neutral
    # the eager Triton path agrees with the reference too (so both sides above ran the real kernel)
    want_ref = R.balance_coefficients_ref(x.permute(1, 0, 2), y, method, **hp)
    torch.testing.assert_close(got["scores"], want_ref["scores"], rtol=2e-5, atol=1e-6)
    assert len(graphs) == 1, graphs  # one graph, compiled once
    assert graphs[0].count(OP) == 1, graphs[0]  # the whole kernel is one opaque call


def test_compiled_without_state_and_list_input(device):
    # AGM with state=None (throw-away history inside the op) and a list of M tensors (stacked before the op)
    torch._dynamo.reset()
    graphs = []
    x, y = _batch(2, 9, 5, device, seed=3)

    def fn(a, b, y):
        return balance_coefficients([a, b], y, "agm", alpha=1.2)

    got = torch.compile(fn, fullgraph=True, backend=_recording_aot_eager(graphs))(x[0], x[1], y)
    _assert_same(got, fn(x[0], x[1], y), "agm state=None")
    assert graphs[0].count(OP) == 1


@pytest.mark.parametrize("method", ["agm", "mlb"])
def test_opcheck(method, device):
    M, B, C = 3, 10, 6
    x, y = _batch(M, B, C, device, seed=5)
    state = R.new_agm_state(M, device)
    state["s_hat"].copy_(torch.tensor([1.2, 0.9, 1.5]))
    state["steps"].fill_(2.0)
    s_hat, steps = (state["s_hat"], state["steps"]) if method == "agm" else (None, None)
    args = (
        x.transpose(1, 2).contiguous().transpose(1, 2),
        y,
        s_hat,
        steps,
        method,
        -100,
        1.3,
        0.5,
        0.5,
        2.5,
        1.0 if method == "agm" else None,
        "tanh",
        "ratio",
    )
    # test_autograd_registration is left out: the op is never differentiated (balance_coefficients passes
    # detached logits; the outputs are statistics), so it has no autograd formula to check.
    torch.library.opcheck(
        torch.ops.mmkernels.balance_coefficients.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_op_schema():
    schema = str(torch.ops.mmkernels.balance_coefficients.default._schema)
    assert schema == (
        "mmkernels::balance_coefficients(Tensor logits, Tensor labels, Tensor(a2!)? s_hat, "
        "Tensor(a3!)? steps, str method, SymInt ignore_index, float alpha, float q_base, float lam, "
        "float beta_max, float? clip, str z, str ratio, SymInt tie=0) -> Tensor"
    ), schema
