"""Step and section timers that never synchronise inside the step: perf_counter on CPU, CUDA events on a GPU
(read back once, after training)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StepTimer:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.steps = []  # CPU: seconds; CUDA: (start, end) event pairs
        self.sections = []  # same, for the balancing sections
        self._enabled = True

    def _mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    @contextmanager
    def step(self):
        start = self._mark()
        yield
        end = self._mark()
        if self._enabled:
            self.steps.append((start, end))

    @contextmanager
    def balancing(self):
        """Wraps the parts of a step that only the balancing method adds (scores, coefficients, taps, drops, extra
        head passes, gradient modulation)."""
        start = self._mark()
        yield
        end = self._mark()
        if self._enabled:
            self.sections.append((start, end))

    def skip(self, skip: bool):
        self._enabled = not skip

    def _total_ms(self, pairs):
        if self.cuda:
            torch.cuda.synchronize()  # sync-ok: after training, to read the events
            return sum(a.elapsed_time(b) for a, b in pairs)
        return 1000.0 * sum(b - a for a, b in pairs)

    def summary(self):
        n = max(len(self.steps), 1)
        step_ms = self._total_ms(self.steps) / n
        bal_ms = self._total_ms(self.sections) / n
        return {
            "ms_per_step": step_ms,
            "balance_ms_per_step": bal_ms,
            "balance_share": (bal_ms / step_ms) if step_ms > 0 else 0.0,
        }
