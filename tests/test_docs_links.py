"""The repository stands on its own: no file cites a document or path outside it, and every path it names exists.

Scanned: every file git knows (tracked, or new and not ignored) ending in .py .md .h .cpp .cu .sh .toml .ini .txt,
one test per file. Flagged:
- the internal notes that are not part of the repository (design notes, method notes, reference notes) and the
  shared folder they live in;
- absolute paths of a build machine or a home directory;
- relative markdown links, `docs/...` mentions and repository paths (`mmkernels/...`, `tests/...`, ...) that name a
  file or folder that does not exist.
Raw logs under benchmarks/results/ (.txt, .jsonl: recorded tool output, e.g. a debugger backtrace) are not
documentation and are skipped; their README and tables are scanned.
"""

from __future__ import annotations

import functools
import glob
import itertools
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_EXT = (".py", ".md", ".h", ".cpp", ".cu", ".sh", ".toml", ".ini", ".txt")
SKIP_PREFIXES = ("benchmarks/results/",)  # recorded raw output; *.md there is still scanned
# Built from pieces so that this file does not flag itself.
_NOTES = ("DESI" + "GN", "METHODS" + "_NEXT", "REFERENCE" + "_NOTES")
OUTSIDE = [
    (re.compile(r"\b(?:" + "|".join(_NOTES) + r")\b(?:\.md)?"), "an internal note that is not in the repository"),
    (re.compile(r"\.\./" + "shared\\b"), "a folder outside the repository"),
    (re.compile(r"(?<![\w.])/" + "work/"), "an absolute path of a build machine"),
    (re.compile(r"(?<![\w.])(?:/home/[A-Za-z0-9_.-]+|/ro" + r"ot/|/Users/[A-Za-z0-9_.-]+)"), "an absolute home path"),
]
TOP_DIRS = ("mmkernels", "python_api", "csrc", "tests", "benchmarks", "scripts", "examples", "docs", ".ci")
# A repository path: a top folder, then path characters; brace lists and globs are expanded below.
REPO_PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(d) for d in TOP_DIRS) + r")/[\w.*{},/-]*[\w*}/])")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
# Paths that exist only once installed: python_api/ is the package mmkernels.api (setup.py's package_dir).
INSTALLED = {"mmkernels/api"}


@functools.lru_cache(maxsize=1)
def repo_files() -> tuple:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    return tuple(sorted(f for f in out if f and os.path.exists(os.path.join(ROOT, f))))


def scanned_files() -> list:
    return [
        f for f in repo_files() if f.endswith(TEXT_EXT) and not (f.startswith(SKIP_PREFIXES) and not f.endswith(".md"))
    ]


def _expand_braces(path: str) -> list:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return list(
        itertools.chain.from_iterable(
            _expand_braces(path[: m.start()] + alt + path[m.end() :]) for alt in m.group(1).split(",")
        )
    )


def _exists(rel: str) -> bool:
    rel = rel.rstrip("/")
    for candidate in _expand_braces(rel):
        full = os.path.join(ROOT, candidate)
        if any(c in candidate for c in "*?["):
            if not glob.glob(full):
                return False
        elif not os.path.exists(full):
            return False
    return True


def problems_in(rel: str) -> list:
    """[(line number, what, text)] for one file."""
    with open(os.path.join(ROOT, rel), encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    found = []
    for no, line in enumerate(lines, 1):
        for pattern, why in OUTSIDE:
            for m in pattern.finditer(line):
                found.append((no, why, m.group(0)))
        if rel.endswith(".md"):
            for m in MD_LINK.finditer(line):
                target = m.group(1).split("#")[0]
                if not target or re.match(r"^[a-z]+:", target):
                    continue
                if not os.path.exists(os.path.normpath(os.path.join(ROOT, os.path.dirname(rel), target))):
                    found.append((no, "a markdown link to a missing file", target))
        for m in REPO_PATH.finditer(line):
            path = m.group(1).rstrip(".,;:")
            if path not in INSTALLED and not _exists(path):
                found.append((no, "a repository path that does not exist", path))
    return found


def test_the_scan_sees_the_repository():
    files = scanned_files()
    assert "README.md" in files and "mmkernels/reference/__init__.py" in files and "tests/test_docs_links.py" in files
    # the checks themselves work: a made-up note, path and link are each caught
    top, missing = "mmkernels", "no" + "pe"  # split so that the scan of this file does not see made-up paths
    assert _exists(top + "/{coefficients,taps}.py") and not _exists(top + "/{coefficients,%s}.py" % missing)
    assert _exists("benchmarks/results/*/benchmarks.md") and not _exists("docs" + "/methods/%s.md" % missing)
    assert problems_in("docs/architecture.md") == []
    assert problems_in("tests/test_docs_links.py") == []  # the patterns above are built so as not to match here


@pytest.mark.parametrize("rel", scanned_files())
def test_no_reference_outside_the_repository(rel):
    found = problems_in(rel)
    assert not found, f"{rel}:\n" + "\n".join(f"  line {no}: {why}: {text!r}" for no, why, text in found)
