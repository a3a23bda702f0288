"""The demo's progress bar: tqdm on stderr (in place on a terminal); without a terminal, one line per run."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    """total_steps training steps over all runs; `start_run(label)`, `advance()` per step, `end_run()`, `close()`."""

    def __init__(self, total_steps: int, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(
            total=max(total_steps, 1),
            file=self.stream,
            unit="step",
            dynamic_ncols=True,
            disable=not self.tty,
            mininterval=0.2,
        )
        self.done, self.total, self.label = 0, max(total_steps, 1), ""

    def start_run(self, label: str):
        self.label = label
        self.bar.set_description(label, refresh=False)

    def advance(self, n: int = 1):
        self.done += n
        self.bar.update(n)

    def end_run(self):
        if not self.tty:  # a log file: one line per finished run
            elapsed = self.bar.format_dict["elapsed"]
            self.stream.write(f"{100 * self.done / self.total:5.1f}%  {elapsed:5.0f}s elapsed  {self.label}\n")
            self.stream.flush()

    def close(self):
        self.bar.close()
