"""pytest plugin: one JSON line per test (and per benchmark, with its statistics) appended as each test ends,
so a run killed by a timeout keeps everything measured before it.

    MMKERNELS_JSONL=results.jsonl PYTHONPATH=benchmarks python3 -m pytest -p _jsonl ...

A test line: {"kind": "test", "nodeid", "outcome", "duration", "stage", "longrepr" (failures, shortened)}.
A benchmark line: {"kind": "benchmark", ...} in pytest-benchmark's own JSON layout (name, fullname, group,
params, extra_info, stats), which benchmarks/render.py reads like a --benchmark-json file.
"""

from __future__ import annotations

import json
import os
import time

import pytest

_STAT_KEYS = ("min", "max", "mean", "stddev", "median", "iqr", "rounds", "ops")


def _write(record: dict) -> None:
    path = os.environ.get("MMKERNELS_JSONL")
    if not path:
        return
    record.setdefault("stage", os.environ.get("MMKERNELS_STAGE", ""))
    record.setdefault("time", time.time())
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()


def _benchmark_record(item) -> dict | None:
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    meta = getattr(fixture, "stats", None) if fixture is not None else None
    stats = getattr(meta, "stats", None)
    if stats is None or not getattr(stats, "data", None):
        return None
    return {
        "kind": "benchmark",
        "name": item.name,
        "fullname": item.nodeid,
        "group": getattr(fixture, "group", None) or getattr(meta, "group", None),
        "params": getattr(item, "callspec", None) and {k: str(v) for k, v in item.callspec.params.items()},
        "extra_info": dict(getattr(fixture, "extra_info", {}) or {}),
        "stats": {**{k: getattr(stats, k, None) for k in _STAT_KEYS}, "iterations": getattr(meta, "iterations", None)},
    }


_IN_WORKER = False


def pytest_configure(config):
    global _IN_WORKER
    _IN_WORKER = hasattr(config, "workerinput")  # a pytest-xdist worker: its controller writes the test lines


def pytest_runtest_logreport(report):
    """Test lines, written by the process that reports (under xdist the controller, which also reports a test
    whose worker crashed)."""
    if _IN_WORKER or not (report.when == "call" or report.outcome != "passed"):
        return
    rec = {
        "kind": "test",
        "nodeid": report.nodeid,
        "outcome": report.outcome,
        "when": report.when,
        "duration": round(report.duration, 4),
    }
    if report.outcome == "failed":
        rec["longrepr"] = str(report.longrepr)[-2000:]
    elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        rec["reason"] = str(report.longrepr[-1])[:300]
    _write(rec)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Benchmark lines, written by the process that ran the benchmark (it holds the statistics)."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.outcome == "passed":
        bench = _benchmark_record(item)
        if bench is not None:
            _write(bench)
