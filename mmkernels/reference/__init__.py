"""Pure-PyTorch reference of every mmkernels op: the oracle the Triton kernels and the C++/CUDA extension are tested
against. One module per method family; this package re-exports them all (mmkernels.reference.X).

Conventions (docs/architecture.md, docs/methods/):
- M modalities (2..8), B rows, C classes. Per-modality inputs are a list of M tensors or one stacked tensor [M, ...].
- Any float dtype in, fp32 accumulation (fp64 inputs are accumulated in fp64). Statistics (scores, ratios,
  coefficients, flags, running state) come back as fp32 tensors on the input's device.
- Everything is vectorised over rows (no Python loop over the batch) and nothing reads a device value on the host:
  no `.item()`, no Python branch on a tensor value; data-dependent choices use `torch.where`. One exception, by
  design: valuation.modality_gaps_exact counts in exact rational arithmetic on the host, once per epoch.
- No argument validation beyond what is needed to compute: the public ops validate at their boundary.

Modules: coefficients (OGM-GE, OGM, OPM, AGM, MLB: scores, ratios, coefficients, the pipeline), olm, shapley (AGM),
unimodal (unimodal logits from a fused head), philox, noise (OGM-GE's GE), taps (OPM's drop, the gradient tap),
pmr, mmpareto, valuation; _common holds the shared constants and dtype helpers.

Papers (one page per method under docs/methods/): TPAMI = Wei et al. 2024 (OPM/OGM), AGM = Li et al. ICCV 2023,
MLB = Kontras et al., OLM = Zong et al.; the OGM-GE coefficient follows the authors' CVPR 2022 code
(docs/methods/ogm_ge.md).
"""

from __future__ import annotations

from . import coefficients, mmpareto, noise, olm, philox, pmr, shapley, taps, unimodal, valuation
from ._common import GE_STD_EPS, LOG_PROB_FLOOR, OLM_EPS, PROB_FLOOR  # noqa: F401
from .coefficients import *  # noqa: F401,F403
from .mmpareto import *  # noqa: F401,F403
from .noise import *  # noqa: F401,F403
from .olm import *  # noqa: F401,F403
from .philox import *  # noqa: F401,F403
from .shapley import *  # noqa: F401,F403
from .taps import *  # noqa: F401,F403
from .unimodal import *  # noqa: F401,F403
from .pmr import *  # noqa: F401,F403
from .valuation import *  # noqa: F401,F403

__all__ = [
    name
    for module in (coefficients, olm, shapley, unimodal, philox, noise, taps, pmr, mmpareto, valuation)
    for name in module.__all__
]
