"""Every copy of the coefficient methods' identity, defaults and ranges agrees with mmkernels/_methods.py.

The copies: the METHODS tuples and METHOD_DEFAULTS of the op (mmkernels/coefficients.py), the Triton launcher's
method ids (mmkernels/triton_ops/coefficients.py, read from its source so the lane needs no Triton), the C++ enum
CoeffMethod (csrc/coefficients_math.h, parsed), the reference's formula defaults, the balancers' constructor
defaults (inspect.signature) and the ranges mmkernels._validate enforces.
"""

import ast
import inspect
import os
import re

import pytest

import mmkernels
from mmkernels import _methods, _validate, coefficients, reference
from mmkernels.api import AGM, MLB, OGM, OGMGE, OPM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BALANCERS = {"OGMGE": OGMGE, "OGM": OGM, "OPM": OPM, "AGM": AGM, "MLB": MLB}


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def test_table_is_well_formed():
    ids = [m.kernel_id for m in _methods.COEFFICIENT_METHODS]
    assert ids == list(range(len(ids)))  # dense ids: the kernels branch on them
    assert len(set(_methods.METHODS)) == len(_methods.METHODS)
    for m in _methods.COEFFICIENT_METHODS:
        assert set(m.defaults) <= set(_methods.UNUSED_DEFAULTS), m.name
        assert os.path.exists(os.path.join(ROOT, m.doc)), m.doc


def test_op_reads_the_table():
    assert coefficients.METHODS == _methods.METHODS
    assert dict(coefficients._METHOD_ID) == dict(_methods.KERNEL_IDS)
    assert mmkernels.METHOD_DEFAULTS == _methods.METHOD_DEFAULTS
    assert reference.METHOD_DEFAULTS == _methods.METHOD_DEFAULTS


def test_triton_launcher_reads_the_table():
    src = _read("mmkernels/triton_ops/coefficients.py")
    tree = ast.parse(src)
    assigned = {
        t.id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    # the launcher must take METHODS and the ids from the table, not spell them out again
    assert ast.unparse(assigned["METHODS"]) == "_methods.METHODS"
    assert ast.unparse(assigned["_METHOD_ID"]) == "_methods.KERNEL_IDS"
    # every `METHOD == n` branch of the kernel names an id of the table
    used = {int(n) for n in re.findall(r"\bMETHOD\s*==\s*(\d+)", src)}
    assert used and used <= set(_methods.KERNEL_IDS.values())


def test_cpp_enum_matches_the_table():
    src = _read("csrc/coefficients_math.h")
    body = re.search(r"enum\s+CoeffMethod\s*:\s*int\s*\{([^}]*)\}", src)
    assert body, "enum CoeffMethod not found in csrc/coefficients_math.h"
    entries = dict(re.findall(r"k(\w+)\s*=\s*(\d+)", body.group(1)))
    camel = {name: "".join(part.capitalize() for part in name.split("_")) for name in _methods.METHODS}
    assert {camel[n]: str(i) for n, i in _methods.KERNEL_IDS.items()} == entries


@pytest.mark.parametrize("method", [m for m in _methods.COEFFICIENT_METHODS if m.balancer], ids=lambda m: m.name)
def test_balancer_defaults_match_the_table(method):
    params = inspect.signature(BALANCERS[method.balancer].__init__).parameters
    for name, value in method.defaults.items():
        if name in params:
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (method.balancer, name)
            assert params[name].default == value, (method.balancer, name, params[name].default, value)
    assert BALANCERS[method.balancer].method == method.name


def test_reference_formula_defaults_match_the_table():
    def d(fn, name):
        return inspect.signature(fn).parameters[name].default

    assert d(reference.ogm_ge_coefficients, "alpha") == _methods.default("ogm_ge", "alpha")
    assert d(reference.ogm_coefficients, "alpha") == _methods.default("ogm", "alpha")
    assert d(reference.opm_drop_probability, "q_base") == _methods.default("opm", "q_base")
    assert d(reference.opm_drop_probability, "lam") == _methods.default("opm", "lam")
    assert d(reference.agm_kappa, "alpha") == _methods.default("agm", "alpha")
    assert d(reference.mlb_coefficients, "alpha") == _methods.default("mlb", "alpha")
    assert d(reference.mlb_coefficients, "beta_max") == _methods.default("mlb", "beta_max")


def _inside(value, rng):
    low, high, low_open, high_open, allow_none = rng
    if value is None:
        return allow_none
    ok_low = low is None or (value > low if low_open else value >= low)
    ok_high = high is None or (value < high if high_open else value <= high)
    return ok_low and ok_high


def test_validate_uses_the_table_ranges():
    assert _validate.HYPERPARAMETER_RANGES is _methods.HYPERPARAMETER_RANGES
    for m in _methods.COEFFICIENT_METHODS:  # every default lies inside its range
        for name, value in m.defaults.items():
            if name in _methods.HYPERPARAMETER_RANGES:
                assert _inside(value, _methods.HYPERPARAMETER_RANGES[name]), (m.name, name, value)


@pytest.mark.parametrize("name", sorted(_methods.HYPERPARAMETER_RANGES))
def test_validate_enforces_each_range_edge(name):
    low, high, low_open, high_open, allow_none = _methods.HYPERPARAMETER_RANGES[name]
    probes = [v for v in (low, high) if v is not None]
    probes += [low - 1e-3] if low is not None else []
    probes += [high + 1e-3] if high is not None else []
    probes += [None] + ([1e6] if high is None else [])
    for v in probes:
        if _inside(v, (low, high, low_open, high_open, allow_none)):
            _validate.check_hyperparameter(v, name)
        else:
            with pytest.raises((ValueError, TypeError), match=name):
                _validate.check_hyperparameter(v, name)


def test_op_choices_match_the_table():
    for key in ("z", "ratio"):
        for bad in ("nope",):
            with pytest.raises(ValueError, match=key):
                coefficients._check_hyperparameters_uncached("ogm", {key: bad})
        for good in _methods.CHOICES[key]:
            coefficients._check_hyperparameters_uncached("ogm", {key: good})
    for tie in _methods.CHOICES["tie"]:
        coefficients._check_hyperparameters_uncached("ogm_ge", {"tie": tie})
    with pytest.raises(ValueError, match="tie"):
        coefficients._check_hyperparameters_uncached("ogm_ge", {"tie": 2})
