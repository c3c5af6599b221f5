"""Step-time breakdown: named sections that synchronise the device and add up wall time, off
unless a benchmark turns them on (`hydra-ray bench train`).

Process-wide (`TIMERS`), like torch's own profiler state: the training loop times its forward,
backward, optimizer and data sections, and the dispatch ops (kernels/, parallel/dispatch.py)
time themselves in forward and backward without the loop having to reach inside autograd.
Sections may nest (dispatch runs inside forward and backward); each reports its own total.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class Timers:
    def __init__(self) -> None:
        self.enabled = False
        self.device: torch.device | None = None
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0

    def enable(self, device: torch.device | None = None) -> None:
        self.enabled, self.device = True, device
        self.reset()

    def disable(self) -> None:
        self.enabled = False

    def reset(self) -> None:
        self.totals.clear()
        self.steps = 0

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def section(self, name: str):
        if not self.enabled:
            yield
            return
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - t0

    def take(self) -> dict[str, float] | None:
        """Mean seconds per step of each section since the last call (None when off)."""
        if not self.enabled:
            return None
        out = {k: v / max(self.steps, 1) for k, v in sorted(self.totals.items())}
        self.reset()
        return out


TIMERS = Timers()
