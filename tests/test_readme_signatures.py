"""Every signature README.md shows agrees with the code: the same parameters, the same defaults, the same
keyword-only marker.

A signature is an inline code span `name(params)` whose name is a public object of `mmkernels` (or
`mmkernels.api`) and whose parameter list parses as a Python parameter list once shape notes (`x [M, B]`) and
parenthetical remarks are removed. Calls in examples (`balance_coefficients(..., "ogm_ge", tie=1)`) do not parse
as parameter lists, or show only keywords, and are not signatures. `M` stands for `num_modalities`; a trailing
`...` means "more parameters, not shown". Every bold heading `**`name(...)`**` must be a signature.
"""

import ast
import inspect
import os
import re

import pytest

import mmkernels
import mmkernels.api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPAN = re.compile(r"(\*\*)?`((?:mmkernels\.(?:api\.)?)?([A-Za-z_][A-Za-z0-9_]*)\((.*?)\))`(\*\*)?")
ALIASES = {"M": "num_modalities"}
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _resolve(name):
    for mod in (mmkernels, mmkernels.api):
        obj = getattr(mod, name, None)
        if obj is not None and callable(obj):
            return obj
    return None


def _signature(obj) -> inspect.Signature:
    """The call signature a user sees: a class's __init__ without self (a balancer's metaclass hides it)."""
    if inspect.isclass(obj):
        sig = inspect.signature(obj.__init__)
        return sig.replace(parameters=list(sig.parameters.values())[1:])
    return inspect.signature(obj)


def _clean(params: str) -> str:
    params = re.sub(r"(?<=[\w\]])\s+\[[^\]]*\]", "", params)  # shape notes: `features [M, B, D]`
    params = re.sub(r"\s+\([^()]*\)", "", params)  # remarks: `(zero-padded)`
    return params


def _parse(params: str):
    """[(name, kind 'pos'|'kw', default or inspect._empty)], ellipsis flag; or None if not a parameter list."""
    text = _clean(params)
    elided = bool(re.search(r"(^|,)\s*\.\.\.\s*$", text))
    if elided:
        text = re.sub(r"(^|,)\s*\.\.\.\s*$", "", text)
    try:
        fn = ast.parse(f"def f({text}): pass").body[0]
    except SyntaxError:
        return None
    a = fn.args
    out = []
    pos = a.posonlyargs + a.args
    pos_defaults = [inspect.Parameter.empty] * (len(pos) - len(a.defaults)) + list(a.defaults)
    for arg, d in zip(pos, pos_defaults):
        out.append((arg.arg, "pos", d))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append((arg.arg, "kw", inspect.Parameter.empty if d is None else d))
    has_star = a.vararg is not None or bool(a.kwonlyargs)
    has_kwargs = a.kwarg is not None
    return out, elided, has_star, has_kwargs


def _literal(node):
    if node is inspect.Parameter.empty:
        return node
    return ast.literal_eval(node)


def readme_signatures():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    found = []
    for no, line in enumerate(lines, 1):
        for m in SPAN.finditer(line):
            bold, text, name, params = bool(m.group(1) and m.group(5)), m.group(2), m.group(3), m.group(4)
            obj = _resolve(name)
            if obj is None:
                continue
            parsed = _parse(params)
            if not bold and (parsed is None or not parsed[0] or parsed[0][0][2] is not inspect.Parameter.empty):
                continue  # an example call (`OPM(official=True)`), not a signature: those start with a name
            found.append(pytest.param(no, text, obj, parsed, id=f"L{no}:{name}"))
    return found


def test_the_readme_shows_signatures():
    names = {p.values[1].split("(")[0].split(".")[-1] for p in readme_signatures()}
    assert {"balance_coefficients", "OGMGE", "OPM", "AGM", "MLB", "OLM", "PMR", "MMPareto"} <= names


def _named(obj, name):
    """Parameter `name` of obj, following **kwargs into the base classes' __init__ (balancers pass them on)."""
    params = _signature(obj).parameters
    if name in params:
        return params[name]
    if inspect.isclass(obj) and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for base in obj.__mro__[1:]:
            if "__init__" in vars(base):
                sig = inspect.signature(base.__init__).parameters
                if name in sig and sig[name].kind is not inspect.Parameter.VAR_KEYWORD:
                    return sig[name]
    return None


def _kind(p):
    return "pos" if p.kind in POSITIONAL else "kw" if p.kind is inspect.Parameter.KEYWORD_ONLY else "var"


@pytest.mark.parametrize("no,text,obj,parsed", readme_signatures())
def test_readme_signature_matches_the_code(no, text, obj, parsed):
    assert parsed is not None, f"README.md line {no}: `{text}` is not a parameter list"
    params, elided, _, _ = parsed
    real = _signature(obj).parameters
    real_pos = [p for p in real.values() if p.kind in POSITIONAL]
    problems = []
    for i, (name, kind, default) in enumerate(params):
        if kind == "pos" and default is inspect.Parameter.empty:
            # a required positional parameter: matched by position (the README may say B for batch)
            if i >= len(real_pos) or real_pos[i].default is not inspect.Parameter.empty:
                problems.append(
                    f"{name}: shown as required positional parameter {i + 1}, the code has "
                    f"{real_pos[i].name + ' with a default' if i < len(real_pos) else 'no such parameter'}"
                )
            continue
        p = _named(obj, ALIASES.get(name, name))
        if p is None:
            problems.append(f"{name}: no such parameter (the code has {list(real)})")
            continue
        if _kind(p) != kind:
            problems.append(
                f"{name}: shown {'positional' if kind == 'pos' else 'keyword-only'}, "
                f"the code has it {p.kind.description}"
            )
        try:
            shown = _literal(default)
        except ValueError:
            problems.append(f"{name}: the default shown is not a literal")
            continue
        if shown != p.default:
            problems.append(f"{name}: default shown {shown!r}, the code's {p.default!r}")
    shown_names = {ALIASES.get(n, n) for n, _, _ in params}
    n_pos_shown = sum(1 for _, k, _ in params if k == "pos")
    if not elided:
        for i, p in enumerate(real_pos):
            if p.default is inspect.Parameter.empty and i >= n_pos_shown:
                problems.append(f"{p.name}: a required positional parameter of the code, not shown")
        for p in real.values():
            if (
                p.kind is inspect.Parameter.KEYWORD_ONLY
                and p.default is inspect.Parameter.empty
                and p.name not in shown_names
            ):
                problems.append(f"{p.name}: a required keyword of the code, not shown")
    assert not problems, f"README.md line {no}: `{text}`\n  " + "\n  ".join(problems)


def test_readme_method_defaults_match_the_table():
    """The defaults listed under balance_coefficients are the table's (mmkernels/_methods.py)."""
    from mmkernels import _methods

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("- `method` and hyperparameters")
    block = " ".join(text[start : text.index("- Returns", start)].split())
    chunks = re.split(r'`"(' + "|".join(_methods.METHODS) + r')"`', block)
    shown = {chunks[i]: chunks[i + 1] for i in range(1, len(chunks) - 1, 2)}
    assert set(shown) == set(_methods.METHODS)
    for method, chunk in shown.items():
        pairs = dict(re.findall(r"\b(\w+)=([\w.\"]+)", chunk))
        defaults = _methods.METHOD_DEFAULTS[method]
        checked = [k for k in pairs if k in defaults]
        assert checked, (method, chunk)
        for k in checked:
            assert ast.literal_eval(pairs[k]) == defaults[k], (method, k, pairs[k], defaults[k])
