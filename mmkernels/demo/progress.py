"""A dependency-free progress bar (stderr): redraws in place on a terminal, one line per run otherwise."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total_steps: int, stream=None, width: int = 30):
        self.total = max(total_steps, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.width = width
        self.t0 = time.perf_counter()
        self.label = ""
        self._last_draw = 0.0

    def start_run(self, label: str):
        self.label = label

    def advance(self, n: int = 1):
        self.done += n
        now = time.perf_counter()
        if self.tty and now - self._last_draw > 0.1:
            self._draw(now, end="\r")
            self._last_draw = now

    def end_run(self):
        self._draw(time.perf_counter(), end="\r" if self.tty else "\n")

    def _draw(self, now, end):
        frac = min(self.done / self.total, 1.0)
        filled = int(self.width * frac)
        elapsed = now - self.t0
        eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {100 * frac:5.1f}%  {elapsed:5.0f}s elapsed, "
                f"eta {eta:4.0f}s  {self.label}")
        self.stream.write(line.ljust(100) + end)
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
