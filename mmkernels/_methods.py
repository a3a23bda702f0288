"""The one table of the coefficient methods: name, kernel id, default hyperparameters, ranges.

Everything else reads from here: `mmkernels.coefficients.METHODS` and `METHOD_DEFAULTS`, the Triton launcher's
method ids (`mmkernels/triton_ops/coefficients.py`), the ranges `mmkernels._validate` enforces, and the balancers'
constructor defaults (`python_api/`). The C++ enum `CoeffMethod` in `csrc/coefficients_math.h` cannot import Python;
`tests/test_methods_table.py` parses it and checks it against `KERNEL_IDS`, together with every other copy.

Defaults. The papers leave the modulation strength alpha free (TPAMI Eq. 11 and MLB Eq. 7: alpha > 0, "a
hyper-parameter"; TPAMI Fig. 9 and Sec. 4.5.3 sweep it). The number we ship is the one the authors run on CREMA-D,
the data set all of these papers share: alpha = 0.8 for OGM-GE, OGM and MLB. AGM's alpha = 1 keeps Eq. 8 as
printed. OPM's q_base = lam = 0.5 and MLB's beta_max = 2 are the authors' values. See docs/methods/*.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional, Tuple

# name: (low, high, low_open, high_open, None allowed); None = unbounded on that side.
HYPERPARAMETER_RANGES: Mapping[str, tuple] = MappingProxyType(
    {
        "alpha": (0.0, None, False, False, False),  # alpha < 0 would turn suppression into amplification (k > 1)
        "q_base": (0.0, 1.0, True, True, False),  # TPAMI Eq. 8: a drop probability
        "lam": (0.0, None, False, False, False),  # TPAMI Eq. 8: q grows with the discrepancy
        "beta_max": (1.0, None, False, False, False),  # MLB Eq. 6: beta >= 1 keeps k >= 1 for the lagging modality
        "clip": (0.0, None, True, False, True),  # AGM: an upper clamp on the exponent, > 0 (None: no clamp)
    }
)
CHOICES: Mapping[str, tuple] = MappingProxyType(
    {
        "z": ("tanh", "sigmoid"),  # TPAMI Tab. 15: the squashing function z
        "ratio": ("ratio", "difference"),  # TPAMI Tab. 15: ratio of score sums, or 1 + difference of batch means
        "tie": (0, 1),  # the modality an exact M = 2 tie suppresses (authors' OGM-GE rule)
    }
)


@dataclass(frozen=True)
class CoefficientMethod:
    """One row: `name` (the `method` string), `kernel_id` (the Triton constexpr METHOD and the C++ CoeffMethod
    value), `defaults` (every hyperparameter the method accepts), `balancer` (the python_api class that uses it,
    or None), `doc` (its docs/ page)."""

    name: str
    kernel_id: int
    defaults: Mapping[str, object] = field(default_factory=dict)
    balancer: Optional[str] = None
    doc: str = ""


ALPHA_CREMAD = 0.8  # the authors' CREMA-D setting (OGM-GE README, MLB scripts); the papers fix no value

COEFFICIENT_METHODS: Tuple[CoefficientMethod, ...] = (
    CoefficientMethod(
        "ogm_ge", 0, MappingProxyType({"alpha": ALPHA_CREMAD, "tie": 0}), "OGMGE", "docs/methods/ogm_ge.md"
    ),
    CoefficientMethod(
        "ogm", 1, MappingProxyType({"alpha": ALPHA_CREMAD, "z": "tanh", "ratio": "ratio"}), "OGM", "docs/methods/ogm.md"
    ),
    CoefficientMethod(
        "opm",
        2,
        MappingProxyType({"q_base": 0.5, "lam": 0.5, "z": "tanh", "ratio": "ratio"}),
        "OPM",
        "docs/methods/opm.md",
    ),
    CoefficientMethod("agm", 3, MappingProxyType({"alpha": 1.0, "clip": None}), "AGM", "docs/methods/agm.md"),
    CoefficientMethod(
        "mlb", 4, MappingProxyType({"alpha": ALPHA_CREMAD, "beta_max": 2.0}), "MLB", "docs/methods/mlb.md"
    ),
)

METHODS: Tuple[str, ...] = tuple(m.name for m in COEFFICIENT_METHODS)
KERNEL_IDS: Mapping[str, int] = MappingProxyType({m.name: m.kernel_id for m in COEFFICIENT_METHODS})
METHOD_DEFAULTS = {m.name: dict(m.defaults) for m in COEFFICIENT_METHODS}  # a plain dict: the public, documented form
# Values for the hyperparameters a method does not take (the kernels have one argument list for all methods).
UNUSED_DEFAULTS: Mapping[str, object] = MappingProxyType(
    {"alpha": 1.0, "q_base": 0.5, "lam": 0.5, "beta_max": 2.0, "clip": None, "z": "tanh", "ratio": "ratio", "tie": 0}
)


def default(method: str, name: str):
    """The default of hyperparameter `name` of `method` (KeyError if the method does not take it)."""
    return METHOD_DEFAULTS[method][name]
