"""gpu-compile launch plan of MMPareto's kernels (tests/gpu_compile.py loads it): one call of the launcher
mmpareto_combine_triton per layout of tests/test_triton_mmpareto.py, tests/test_mmpareto_numerics.py and of the
balancer tests on CUDA, with both
rescale modes (the finalize's GLOBAL constexpr). Specializations come from the dtype of each group's flat buffers,
GLOBAL, SUMMED (the DDP path: the buffer holds g_m + g_u), and the integer arguments (blk_base, T, K, max_nblk:
== 1, % 16 == 0); tensors are CPU torch.empty."""
from __future__ import annotations


def _call(shapes, dtypes, rescale, summed=False):
    import torch

    from mmkernels.mmpareto import MMParetoLayout
    from mmkernels.triton_ops.mmpareto import CHUNK, mmpareto_combine_triton

    params = [[torch.empty(s, dtype=getattr(torch, dtypes[k % len(dtypes)])) for s in group]
              for k, group in enumerate(shapes)]
    layout = MMParetoLayout(params)
    fm, fu = layout.empty_flats("cpu"), layout.empty_flats("cpu")
    mmpareto_combine_triton(fm, fu, layout.tables("cpu", CHUNK), gamma=1.5, rescale=rescale, summed=summed)


LAYOUTS = {  # name: (shapes per encoder, dtype per encoder, cycled)
    "odd sizes": ([[(7,), (3, 5)], [(1,), (33, 2)]], ("float32",)),
    "3 blocks": ([[(20000,), (5,)], [(9000,)], [(17, 3)]], ("float32",)),
    "3 blocks fp16": ([[(20000,), (5,)], [(9000,)], [(17, 3)]], ("float16",)),
    "3 blocks bf16": ([[(20000,), (5,)], [(9000,)], [(17, 3)]], ("bfloat16",)),
    "8 encoders": ([[(3,), (2, 2)], [(5,)], [(1,)], [(6, 1)], [(9,)], [(2,)], [(4, 4)], [(11,)]], ("float32",)),
    "many tensors": ([[(i % 7 + 1,) for i in range(70)], [(i % 5 + 2,) for i in range(30)]], ("float32",)),
    "worked example": ([[(2,), (1,)], [(2,), (1,)]], ("float32",)),
    "degenerate": ([[(4,)], [(4,)], [(4,)]], ("float32",)),
    "mixed dtypes": ([[(5,), (3,)], [(7,)], [(2, 2)]], ("float32", "float16")),
    "flat path": ([[(3, 4), (4,)], [(9000,)]], ("float32",)),
    "nonfinite": ([[(2,)], [(2,)]], ("float32",)),
    "tiny model M=2": ([[(6, 5), (6,)], [(6, 3), (6,)]], ("float32",)),
    "tiny model M=3": ([[(6, 5), (6,)], [(6, 3), (6,)], [(6, 4), (6,)]], ("float32",)),
    "numerics near cancellation": ([[(4096,)], [(5,)]], ("float32",)),   # tests/test_mmpareto_numerics.py
    "numerics 82 small tensors": ([[(5,)] * 14, [(5,)] * 14, [(5,)] * 14, [(5,)] * 14, [(5,)] * 13, [(5,)] * 13],
                                  ("float32",)),
    "numerics opposite": ([[(5,), (3,)], [(2,)]], ("float32",)),
    "numerics nonfinite": ([[(2,), (3,)], [(2,)], [(2,)]], ("float32",)),
    "bench resnet18-like bf16": ([[(64, 1, 7, 7)] + [(64, 64, 3, 3)] * 4 + [(128, 64, 3, 3), (128,)],
                                  [(64, 3, 7, 7)] + [(64, 64, 3, 3)] * 4 + [(128, 128, 3, 3), (128,)]], ("bfloat16",)),
}


def plan() -> list:
    out = []
    for name, (shapes, dtypes) in LAYOUTS.items():
        for rescale in ("per_tensor", "global"):
            out.append((f"mmpareto {name} {'/'.join(dtypes)} rescale={rescale}",
                        lambda s=shapes, d=dtypes, r=rescale: _call(s, d, r)))
    for name in ("flat path", "tiny model M=2", "bench resnet18-like bf16"):   # SUMMED: the DDP path
        shapes, dtypes = LAYOUTS[name]
        for rescale in ("per_tensor", "global"):
            out.append((f"mmpareto {name} {'/'.join(dtypes)} rescale={rescale} summed (DDP)",
                        lambda s=shapes, d=dtypes, r=rescale: _call(s, d, r, summed=True)))
    return out
