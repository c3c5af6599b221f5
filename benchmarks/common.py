"""Side-by-side timing: candidates run interleaved, round after round (`compare`, by median; `take_turns`
for long runs, in an order that reverses each round)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(fns: dict[str, Callable[[], object]], device: torch.device, rounds: int = 15,
            warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, measured interleaved so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def take_turns(arms: dict, rounds: int) -> dict[str, list]:
    """Each arm (a callable) `rounds` times, the order reversed every other round (A B C D, then
    D C B A, ...): for runs too long to repeat many times (whole trainings, load phases), where
    `compare`'s many short rounds do not fit. A machine whose speed drifts during the runs moves
    every arm alike: over two rounds, each arm's mean sits at the same point in time."""
    names = list(arms)
    out: dict[str, list] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            out[n].append(arms[n]())
    return out
