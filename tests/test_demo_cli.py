"""The demo's command line and report conventions: --help shows every default and where the demo writes, the
verdict column gives no verdict below 3 seeds, and the progress bar (tqdm) writes one line per run to a log."""

import io

import pytest
from tqdm import tqdm

from mmkernels.demo.cli import build_parser
from mmkernels.demo.progress import Progress
from mmkernels.demo.report import MIN_SEEDS_FOR_VERDICT, _verdict


def test_help_shows_defaults_and_the_output_folder():
    text = build_parser().format_help()
    assert "(default: mmkernels_demo_out)" in text and "results.json" in text and "demo.png" in text
    assert "(default: synthetic)" in text and "(default: 64)" in text and "(default: sgd)" in text


def test_help_as_a_subcommand_shows_defaults_too(capsys):
    from mmkernels.__main__ import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "(default: mmkernels_demo_out)" in capsys.readouterr().out


def _row(method, fused, sd, seeds, probe):
    return {"method": method, "fused": (fused, sd), "seeds": list(range(seeds)), "probe": [(0.9, 0.0), (probe, 0.0)]}


@pytest.mark.parametrize("seeds", [1, 2])
def test_no_verdict_below_three_seeds(seeds):
    joint = _row("joint", 0.80, 0.0, seeds, 0.50)
    better = _row("mlb", 0.95, 0.0, seeds, 0.70)  # +15 pts: "helps" if one trusted a single seed
    verdict = _verdict(better, joint, [joint, better], ["audio", "visual"])
    assert verdict.endswith(f"({seeds} seed{'s' if seeds > 1 else ''}: no verdict)"), verdict
    assert "+15.0 pts fused" in verdict and "helps" not in verdict


def test_verdict_from_three_seeds():
    assert MIN_SEEDS_FOR_VERDICT == 3
    joint = _row("joint", 0.80, 0.01, 3, 0.50)
    rows = {
        "helps": _row("a", 0.95, 0.01, 3, 0.7),
        "hurts": _row("b", 0.60, 0.01, 3, 0.4),
        "no clear gain": _row("c", 0.805, 0.02, 3, 0.5),
    }
    for tag, row in rows.items():
        assert _verdict(row, joint, [joint, row], ["audio", "visual"]).endswith(f": {tag}")


def test_progress_writes_one_line_per_run_without_a_terminal():
    log = io.StringIO()
    bar = Progress(20, stream=log)
    for label in ("joint seed 0", "mlb seed 0"):
        bar.start_run(label)
        for _ in range(10):
            bar.advance()
        bar.end_run()
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].strip().startswith("50.0%") and lines[1].endswith("mlb seed 0")
    assert isinstance(bar.bar, tqdm) and bar.done == 20  # the well-kept library draws it
