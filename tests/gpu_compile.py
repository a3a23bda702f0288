"""Compile every Triton kernel specialization our launchers produce, for real NVIDIA GPUs, on a machine without one.

The CPU `triton` lane runs the kernels in the Triton interpreter, which never runs the compiler: a kernel it accepts
may still fail to compile for a GPU. Here a stand-in Triton driver reports only a compile target (GPUTarget("cuda",
90, 32) for Hopper, ("cuda", 80, 32) for Ampere), every launch becomes a compile (JITFunction.run with warmup=True:
compile, no launch), and the launchers of mmkernels/triton_ops are called on CPU tensors shaped, strided, aligned and
typed like those of the tests and benchmarks (LAUNCH PLAN below), so exactly the specializations they launch are
compiled. For each compiled kernel: registers and spill bytes from ptxas's own report (Triton runs `ptxas -v`;
TRITON_DUMP_PTXAS_LOG=1 makes it print the report), shared memory and warps from Triton's metadata.

Usage: python tests/gpu_compile.py [--targets 90,80] [--jobs 2]
One worker process per target (each with a fresh TRITON_CACHE_DIR, so everything really compiles). Prints a table per
target and a summary line; exits 1 on a compile error, any register spill, or shared memory over 48 KiB.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMEM_LIMIT = 48 * 1024  # bytes of static shared memory a kernel may use without opting in to more


# ================================================================================== compile without a GPU
class TargetOnlyDriver:
    """Stands in for Triton's CUDA driver: a target, device 0 and stream 0; nothing here can load or launch."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


@contextlib.contextmanager
def compile_instead_of_launch(compiled: list):
    """Every Triton launch compiles only (warmup=True) and appends (kernel, ptxas report) to `compiled`."""
    from triton.runtime.jit import JITFunction

    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        report = io.StringIO()
        with contextlib.redirect_stdout(report):  # ptxas's -v report, printed by Triton under TRITON_DUMP_PTXAS_LOG
            kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((kernel, report.getvalue()))
        return kernel

    JITFunction.run = compile_only
    try:
        yield
    finally:
        JITFunction.run = launch


@contextlib.contextmanager
def fake_process_group():
    """torch.distributed looks initialised and all_reduce does nothing: the launcher takes its sync=True path."""
    import torch.distributed as dist

    saved = dist.is_available, dist.is_initialized, dist.all_reduce
    dist.is_available, dist.is_initialized = (lambda: True), (lambda: True)
    dist.all_reduce = lambda *args, **kwargs: None
    try:
        yield
    finally:
        dist.is_available, dist.is_initialized, dist.all_reduce = saved


# ======================================================================================== LAUNCH PLAN
# One call per distinct specialization of the tests (tests/test_*_triton.py, the CUDA steps of
# tests/test_sync_free_cuda.py, the Triton cases of tests/test_reliability.py; not the shapes Hypothesis draws in
# tests/test_properties.py) and of benchmarks/bench_coefficients.py and bench_taps.py, plus the dtypes the API
# accepts that no test launches (marked "api"). Triton specializes on dtypes, constexprs, num_warps, 16-byte pointer
# alignment, and per integer argument on == 1, % 16 == 0 and 32 vs 64 bits; the block sizes follow from the shapes.
# Tensors are CPU tensors from torch.empty (nothing is written or read); shapes only matter through the above.
# Checked against a recording of every launcher call those tests make (run in the interpreter, replayed through
# Triton's binder): the same set of specializations, and no call below that adds none. A new test shape, dtype or
# layout that changes a specialization needs its call here.
COEF_ALL = (
    "ogm_ge",
    "ogm",
    "ogm:sigmoid",
    "ogm:difference",
    "opm",
    "opm:sigmoid:difference",
    "agm",
    "agm:clip",
    "mlb",
)  # the nine constexpr variants of test_coefficients_triton.py's HP
COEF_DEFAULTS = ("ogm_ge", "ogm", "opm", "agm", "mlb")  # methods with default options


def _strided(shape, stride, dtype, *, misaligned=False):
    """torch.empty with these strides; misaligned: its data pointer one element past a 16-byte boundary."""
    import torch

    span = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    return torch.empty(span + 1, dtype=dtype).as_strided(shape, stride, 1 if misaligned else 0)


def _logits(m, b, c, dtype, layout):
    """[M, B, C] logits. Layouts: mbc contiguous; bmc a [B, M, C] buffer; mcb a [M, C, B] buffer; c2 every other
    class; row1 rows 1.. of [M, B + 1, C]; expand one modality repeated (stride 0)."""
    strides = {
        "mbc": (b * c, c, 1),
        "bmc": (c, m * c, 1),
        "mcb": (c * b, 1, b),
        "c2": (2 * b * c, 2 * c, 2),
        "expand": (0, c, 1),
    }
    if layout == "row1":
        return _strided((m, b + 1, c), ((b + 1) * c, c, 1), dtype)[:, 1:]
    return _strided((m, b, c), strides[layout], dtype)


def coef_call(m, b, c, variant, *, dtype="float32", layout="mbc", labels="int64", sync=False):
    """balance_coefficients_launch as mmkernels.balance_coefficients calls it; variant 'method[:sigmoid][:difference]
    [:clip][:tie1]'. labels 'int64', 'int32' or 'int64+1' (a slice from element 1: misaligned)."""
    import torch

    from mmkernels.triton_ops.coefficients import balance_coefficients_launch

    method, *opts = variant.split(":")
    x = _logits(m, b, c, getattr(torch, dtype), layout)
    y = (
        torch.empty(b + 1, dtype=getattr(torch, labels.split("+")[0]))[1:]
        if "+1" in labels
        else torch.empty(b, dtype=getattr(torch, labels))
    )
    state = (torch.empty(m), torch.empty(())) if method == "agm" else (None, None)
    tie = {"tie": 1} if "tie1" in opts else {}  # ogm_ge's tie rule: an int argument, specialized when it is 1
    with fake_process_group() if sync else contextlib.nullcontext():
        balance_coefficients_launch(
            x,
            y,
            *state,
            method,
            ignore_index=-100,
            alpha=1.0,
            q_base=0.5,
            lam=0.5,
            beta_max=2.0,
            clip=0.05 if "clip" in opts else None,
            z="sigmoid" if "sigmoid" in opts else "tanh",
            ratio="difference" if "difference" in opts else "ratio",
            sync=sync,
            **tie,
        )


def grad_scale_call(shape, stride, dtype, k, *, misaligned=False):
    """grad_scale_triton(grad, k, k_value); k 'value' (a number) or the dtype of a 0-dim tensor ('float32+1':
    misaligned, e.g. one coefficient of balance_coefficients' output)."""
    import torch

    from mmkernels.triton_ops.grad_tap import grad_scale_triton

    grad = _strided(shape, stride, getattr(torch, dtype), misaligned=misaligned)
    k_tensor = None if k == "value" else _strided((), (), getattr(torch, k.split("+")[0]), misaligned="+1" in k)
    grad_scale_triton(grad, k_tensor, 0.5)


def drop_call(b, d, dtype, *, rescale=0, offset=0, seed=11, m_base=0, widths=None, layout="contiguous", mx=1):
    """modality_drop_apply_triton on x [Mx, B, D] = modalities m_base.. of len(widths), as mmkernels.modality_drop
    calls it (a list of M features: one call per modality, Mx = 1, m_base = its index; a stacked tensor: one call).
    Layouts: contiguous; b-major (a [B, Mx, D] buffer); zeros (an expanded gradient: strides 0); second-half (the
    last D of rows 2D wide, as the gradient of a concatenation). widths default: M = max(Mx, 2) modalities of D."""
    import torch

    from mmkernels.triton_ops.modality_drop import modality_drop_apply_triton

    strides = {"contiguous": (b * d, d, 1), "b-major": (d, mx * d, 1), "zeros": (0, 0, 0)}
    if layout == "second-half":
        x = _strided((mx, b, 2 * d), (2 * b * d, 2 * d, 1), getattr(torch, dtype))[..., d:]
    else:
        x = _strided((mx, b, d), strides[layout], getattr(torch, dtype))
    widths = list(widths or (d,) * max(mx, 2))
    q = torch.empty(len(widths), dtype=torch.float32)
    modality_drop_apply_triton(x, q, seed, offset, m_base, widths, rescale, 1.0)


def uniforms_call(seed, offset):
    """drop_uniforms_triton as tests/test_philox_triton.py calls it (3 modalities, 700 rows)."""
    import torch

    from mmkernels.triton_ops.modality_drop import drop_uniforms_triton

    drop_uniforms_triton(seed, offset, 3, 700, torch.device("cpu"))


def _options(kw: dict) -> str:
    return "".join(f" {k}={v}" for k, v in kw.items())


def _coefficient_plan():
    plan = []

    def add(note, m, b, c, variants, **kw):
        for v in variants:
            plan.append((f"coef {v} M={m} B={b} C={c}{_options(kw)} [{note}]", lambda v=v: coef_call(m, b, c, v, **kw)))

    for m, b, c in [
        (2, 1, 1),
        (3, 7, 6),
        (5, 64, 31),
        (8, 1000, 6),
        (2, 64, 309),
        (3, 1000, 31),
        (8, 7, 1000),
        (2, 7, 4097),
        (5, 1, 309),
        (3, 64, 1000),
        (2, 1000, 1),
        (8, 64, 6),
    ]:
        add("fp32 grid", m, b, c, COEF_ALL)
    for m, b, c in [(3, 64, 31), (2, 1000, 309), (8, 7, 4097)]:
        add("fp16", m, b, c, COEF_ALL, dtype="float16")
    for layout in ("bmc", "c2"):  # contiguous: as the grid's (5, 64, 31)
        add("layouts", 3, 64, 31, COEF_ALL, layout=layout)
    add("ignore_index", 3, 63, 31, COEF_ALL, layout="row1", labels="int64+1")
    add("ignored rows dropped", 3, 42, 31, ["mlb"])
    add("underflow", 2, 4, 2, ["ogm_ge", "ogm", "opm", "mlb", "ogm:difference"])
    add("kappa overflow", 2, 7, 6, ["agm", "agm:clip"], layout="expand")
    for phase_variant in ("ogm", "agm", "mlb"):
        add("sync PHASE 1 + 2", 3, 64, 31, [phase_variant], sync=True)
    add("torch.compile", 3, 24, 7, ["ogm:sigmoid", "agm:clip", "agm"], layout="bmc")
    add("torch.compile list", 2, 9, 5, ["agm"])
    add("opcheck", 3, 10, 6, ["agm:clip", "mlb"], layout="mcb")
    for dtype in ("float32", "float16"):
        add("edges C=65536", 2, 2, 65536, COEF_DEFAULTS, dtype=dtype)
    add("edges B=65536", 2, 65536, 2, COEF_DEFAULTS)
    add("sync-free steps", 2, 16, 4, ["ogm_ge", "ogm", "opm", "agm", "agm:clip", "mlb"])
    add("sync-free balance_coefficients", 2, 64, 10, COEF_DEFAULTS)
    add("reliability: out-of-range labels", 2, 12, 4, COEF_DEFAULTS)
    add("reliability: no grad, tie rules", 2, 12, 5, ["ogm_ge", "ogm", "opm", "mlb", "ogm_ge:tie1"])  # agm: (2, 9, 5)
    for b in (32, 256, 4096):  # M = 4 and C = 1000: as the grid's
        add("bench", 2, b, 6, ["ogm", "agm"])
    for dtype in ("bfloat16", "float64"):
        add("api", 4, 256, 1000, COEF_ALL, dtype=dtype)
    add("api int32 labels", 4, 256, 1000, COEF_ALL, labels="int32")
    return plan


def _grad_scale_plan():
    plan = []

    def add(note, shape, stride, dtype, k, **kw):
        plan.append(
            (
                f"grad_scale {dtype} {shape} k={k}{_options(kw)} [{note}]",
                lambda: grad_scale_call(shape, stride, dtype, k, **kw),
            )
        )

    for dtype in ("float32", "float16"):
        for k in ("float32", "value"):
            add("grad_tap layouts", (37,), (1,), dtype, k)
    add("through a graph", (16, 6), (6, 1), "float32", "float32")
    add("fp64", (300,), (1,), "float64", "float64")
    add("sync-free steps", (16, 6), (6, 1), "float32", "float32+1")
    add("bench", (64, 512), (512, 1), "bfloat16", "float32")  # every bench shape: n % 16 == 0; fp32: as above
    return plan


def _drop_plan():
    plan = []

    def add(note, b, d, dtype="float32", **kw):
        plan.append((f"drop {dtype} B={b} D={d}{_options(kw)} [{note}]", lambda: drop_call(b, d, dtype, **kw)))

    for dtype in ("float32", "float16"):
        for rescale in (0, 1, 2):
            for offset in (5, 2**33 + 17):
                for m_base, d in ((0, 5), (1, 6), (2, 1)):
                    add(
                        "forward/backward", 9, d, dtype, rescale=rescale, offset=offset, m_base=m_base, widths=(5, 6, 1)
                    )
    add("stacked [B, M, D] buffer", 4, 16, rescale=1, mx=3, layout="b-major", widths=(16, 16, 16))
    for m_base, d in ((0, 5), (1, 6), (2, 1)):
        add("q detached: zero-stride gradient", 9, d, layout="zeros", m_base=m_base, widths=(5, 6, 1))
        add("reproducible", 64, d, m_base=m_base, widths=(5, 6, 1))
    for m_base in (0, 1, 2):
        add("statistics", 4000, 1, rescale=2, m_base=m_base, widths=(1, 1, 1))
    for m_base in (0, 1):
        add("p_exe gate", 4, 1, rescale=1, m_base=m_base, widths=(1, 1))
    for rescale in (0, 1, 2):
        for m_base, d in ((0, 5), (1, 6), (2, 1)):
            add("philox parity", 16, d, rescale=rescale, offset=2**32 - 20, m_base=m_base, widths=(5, 6, 1))
    for m_base in (0, 1):
        add("sync-free steps", 16, 6, rescale=1, m_base=m_base, widths=(6, 6))
    for offset in (0, 2**33):
        add(
            "sync-free steps: concatenation's gradient",
            16,
            6,
            rescale=1,
            offset=offset,
            m_base=1,
            widths=(6, 6),
            layout="second-half",
        )
    for d in (1, 3):  # B = 65536 is the same specialization (B % 16 == 0, BLOCK_B = 128)
        add("narrow rows", 4096, d)
    for dtype in ("float32", "bfloat16"):  # (4096, 4096), (64, 512, 14, 14) and M = 4: as (256, 2048) and M = 2
        for b, d in ((64, 512), (256, 2048)):
            add("bench", b, d, dtype, mx=2)
    add("api fp64", 64, 512, "float64")
    return plan


def _uniforms_plan():
    return [
        (f"drop_uniforms seed={seed} offset={offset}", lambda seed=seed, offset=offset: uniforms_call(seed, offset))
        for seed, offset in ((0, 0), (11, 2**33 + 17), (2**31 + 5, 2**31 - 10), (2**40 + 7, 2**32 - 3))
    ]


# the test modules that carry their kernels' launch plan, next to the tests it mirrors: gpu_compile_plan() ->
# [(label, call)]
PLAN_MODULES = (
    ("test_pmr_triton", "gpu_compile_plan"),
    ("test_mmpareto_triton", "gpu_compile_plan"),
    ("test_valuation_triton", "gpu_compile_plan"),
)


def _method_plans() -> list:
    """The launch plans of the PMR, MMPareto and valuation kernels (a missing module is an error, not a skip)."""
    import importlib

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    plan = []
    for name, attr in PLAN_MODULES:
        plan += getattr(importlib.import_module(name), attr)()
    return plan


def launch_plan() -> list:
    """[(label, call)]: each call runs one launcher (a sync=True coefficient call launches twice)."""
    return _coefficient_plan() + _grad_scale_plan() + _drop_plan() + _uniforms_plan() + _method_plans()


# ================================================================================ one target, one process
def _ptxas_usage(report: str):
    """(registers, spill store bytes, spill load bytes) from ptxas -v output, or None when there is none."""
    regs = [int(n) for n in re.findall(r"Used (\d+) registers", report)]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if not regs:
        return None
    return max(regs), sum(int(s) for s, _ in spills), sum(int(lo) for _, lo in spills)


def _param_tokens(kernel) -> list:
    """[(name, token, declared constexpr)] for each kernel parameter: its specialization as Triton keyed it."""
    src = kernel.src
    constants = {path[0]: value for path, value in src.constants.items()}
    aligned = {path[0] for path, attr in src.attrs.items() if ["tt.divisibility", 16] in attr}
    out = []
    for i, p in enumerate(src.fn.params):
        kind = src.signature[p.name]
        if kind == "constexpr":
            token = str(constants[i])
        elif kind.startswith("*"):
            token = kind[1:] + ("" if i in aligned else "(unaligned)")
        elif kind[0] in "iu":
            token = kind + ("%16" if i in aligned else "")
        else:
            token = kind
        out.append((p.name, token, p.is_constexpr))
    return out


def _row(kernel, report: str, label: str) -> dict:
    usage = _ptxas_usage(report)
    return dict(
        kernel=kernel.name,
        params=_param_tokens(kernel),
        warps=kernel.metadata.num_warps,
        smem=kernel.metadata.shared,
        regs=usage and usage[0],
        spill_st=usage and usage[1],
        spill_ld=usage and usage[2],
        label=label,
    )


def _error_text(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: " + "\n    ".join(lines[-12:])


def compile_for_target(arch: int, cache_dir: str) -> dict:
    """Worker: compile the whole plan for GPUTarget('cuda', arch, 32); rows deduplicated by the kernel's hash."""
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, ROOT)
    import triton
    from triton.backends.compiler import GPUTarget

    triton.runtime.driver.set_active(TargetOnlyDriver(GPUTarget("cuda", arch, 32)))
    start = time.time()
    rows, errors, calls = {}, [], 0
    for label, call in launch_plan():
        compiled = []
        try:
            with compile_instead_of_launch(compiled):
                call()
        except Exception as exc:  # a compile error (or a launcher that cannot run here): named, then go on
            errors.append((label, _error_text(exc)))
        calls += 1
        for kernel, report in compiled:
            if kernel is not None and kernel.hash not in rows:
                rows[kernel.hash] = _row(kernel, report, label)
    return dict(
        arch=arch,
        rows=list(rows.values()),
        errors=errors,
        calls=calls,
        seconds=time.time() - start,
        triton=triton.__version__,
    )


# ============================================================================================== report
def _spec_text(row: dict, varying: set) -> str:
    """Declared constexprs, plus the other parameters whose specialization differs between this kernel's rows."""
    return " ".join(f"{name}={token}" for name, token, is_constexpr in row["params"] if is_constexpr or name in varying)


def _varying_params(rows: list) -> dict:
    by_kernel = {}
    for row in rows:
        for name, token, _ in row["params"]:
            by_kernel.setdefault(row["kernel"], {}).setdefault(name, set()).add(token)
    return {k: {n for n, tokens in params.items() if len(tokens) > 1} for k, params in by_kernel.items()}


def problems_of(result: dict) -> list:
    out = [f"sm_{result['arch']}: compile error in [{label}]\n    {text}" for label, text in result["errors"]]
    for row in result["rows"]:
        where = f"sm_{result['arch']} {row['kernel']} [{row['label']}]"
        if row["regs"] is None:
            out.append(f"{where}: no ptxas report")
        elif row["spill_st"] or row["spill_ld"]:
            out.append(f"{where}: spills {row['spill_st']} B stored / {row['spill_ld']} B loaded")
        if row["smem"] > SMEM_LIMIT:
            out.append(f"{where}: {row['smem']} B of shared memory > {SMEM_LIMIT}")
    return out


def print_table(result: dict) -> None:
    rows = sorted(result["rows"], key=lambda r: (r["kernel"], [t for _, t, _ in r["params"]], r["warps"]))
    varying = _varying_params(rows)
    print(
        f"\n== GPUTarget('cuda', {result['arch']}, 32): {len(rows)} specializations from {result['calls']} launcher "
        f"calls, compiled in {result['seconds']:.0f} s (triton {result['triton']})"
    )
    print(f"{'kernel':<28} {'regs':>4} {'spill st/ld':>11} {'smem':>6} {'warps':>5}  specialization")
    for r in rows:
        spill = "?" if r["regs"] is None else f"{r['spill_st']}/{r['spill_ld']}"
        print(
            f"{r['kernel']:<28} {r['regs'] if r['regs'] is not None else '?':>4} {spill:>11} {r['smem']:>6} "
            f"{r['warps']:>5}  {_spec_text(r, varying[r['kernel']])}"
        )


def summary_line(results: list, seconds: float, n_problems: int) -> str:
    rows = [r for res in results for r in res["rows"]]
    per_target = ", ".join(f"sm_{res['arch']}: {len(res['rows'])}" for res in results)
    regs = max((r["regs"] or 0 for r in rows), default=0)
    spilling = sum(1 for r in rows if r["spill_st"] or r["spill_ld"])
    errors = sum(len(res["errors"]) for res in results)
    smem = max((r["smem"] for r in rows), default=0)
    verdict = "" if n_problems == 0 else f"{n_problems} PROBLEMS (listed above): "
    return (
        f"{verdict}{len(rows)} specializations ({per_target}), max regs {regs}, {spilling} spills, "
        f"max smem {smem} B, {errors} compile errors, in {seconds:.0f} s"
    )


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="90,80", help="compute capabilities, comma separated (default 90,80)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.targets.split(",")]
    os.environ.pop("TRITON_INTERPRET", None)  # the workers inherit the environment: compile, never interpret
    start = time.time()
    cache_root = tempfile.mkdtemp(prefix="mmkernels-gpu-compile-")
    try:
        with ProcessPoolExecutor(
            max_workers=max(1, min(args.jobs, len(archs))), mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            results = list(pool.map(compile_for_target, archs, [os.path.join(cache_root, f"sm{a}") for a in archs]))
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    problems = []
    for result in results:
        print_table(result)
        problems += problems_of(result)
    if problems:
        print("\n== problems")
        print("\n".join(problems))
    print()
    print(summary_line(results, time.time() - start, len(problems)), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
