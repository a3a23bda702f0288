"""mmkernels: fused kernels and a torch.autograd API for balanced multimodal learning.

`import mmkernels` never fails for a missing extension, Triton or GPU: what is missing is recorded,
warned about once when first needed, and reported by `mmkernels.env_report()`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import reference  # noqa: F401  (the pure-PyTorch oracle)
from ._backend import backend_for, ext_available, triton_available  # noqa: F401
from .coefficients import METHOD_DEFAULTS, CoefficientPlan, balance_coefficients  # noqa: F401
from .taps import drop_uniforms, grad_tap, modality_drop  # noqa: F401
from .noise import cov_noise_tap, ge_isotropic_, sample_cov_noise  # noqa: F401
from .shapley import shapley_masked_batch, shapley_responses  # noqa: F401
from .mmpareto import MMParetoLayout, mmpareto_combine_, mmpareto_combine_flat_  # noqa: F401
from .valuation import sample_valuation, valuation_subset_logits  # noqa: F401
from .pmr import new_refresh_buffers, pmr_class_sums_, pmr_loss, pmr_refresh_, pmr_update_prototypes_  # noqa: F401
from . import api  # noqa: F401  (python_api/, installed as mmkernels.api)
from . import metrics  # noqa: F401  (offline diagnostics: unimodal accuracy, imbalance, AGM competition strength)
from .api import *  # noqa: F401,F403  (the balancers and unimodal-logit helpers)


def env_report(file=None) -> str:
    """Print (and return) the versions and the availability of every backend, with the reason for each missing piece."""
    import os
    import sys

    import torch

    from ._backend import forced_backend

    lines = [
        f"mmkernels {__version__}",
        f"python {sys.version.split()[0]}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda})",
    ]
    ok, why = triton_available()
    lines.append(f"triton: {'yes' if ok else 'no'} - {why}")
    ok, why = ext_available()
    lines.append(f"extension mmkernels._C: {'yes' if ok else 'no'} - {why}")
    try:
        n = torch.cuda.device_count()
        gpu = f"{n} visible: " + ", ".join(torch.cuda.get_device_name(i) for i in range(n)) if n else "none visible"
    except Exception as exc:  # a broken driver must not break the report
        gpu = f"query failed: {exc!r}"
    lines.append(f"CUDA devices: {gpu}")
    lines.append(
        f"MMKERNELS_BACKEND: {forced_backend() or 'auto'}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
    )
    text = "\n".join(lines)
    print(text, file=file or sys.stdout)
    return text
