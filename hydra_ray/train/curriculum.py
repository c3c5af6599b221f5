"""The curriculum as pure functions of the step: features, MoD capacity warm-up, learning rate.

Everything a step does is derived from the step number and the config, never from history, so
a run resumed from a checkpoint (or restarted after a failure) makes exactly the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hydra_ray.config import HydraConfig, PhaseConfig


@dataclass(frozen=True)
class StepPlan:
    phase: PhaseConfig
    phase_index: int
    mor: bool
    mod: bool
    moe: bool
    routing: str
    mod_capacity: float
    lr: float


def phase_index(cfg: HydraConfig, step: int) -> int:
    for i, p in enumerate(cfg.curriculum.phases):
        if step < p.until_step:
            return i
    return len(cfg.curriculum.phases) - 1


def mod_capacity(cfg: HydraConfig, step: int) -> float:
    """MoD capacity anneals linearly from 1.0 to its target over `capacity_warmup_steps` after the
    step where MoD switched on (the start of the current unbroken run of MoD phases)."""
    phases = cfg.curriculum.phases
    i = phase_index(cfg, step)
    if not phases[i].mod:
        return 1.0
    while i > 0 and phases[i - 1].mod:
        i -= 1
    on = phases[i - 1].until_step if i > 0 else 0
    target, warm = cfg.model.mod.capacity, cfg.model.mod.capacity_warmup_steps
    if warm <= 0:
        return target
    frac = min(1.0, (step - on + 1) / warm)
    return 1.0 - frac * (1.0 - target)


def lr_at(cfg: HydraConfig, step: int, total: int) -> float:
    t = cfg.train
    if step < t.warmup_steps:
        base = (step + 1) / t.warmup_steps
    elif t.schedule == "constant":
        base = 1.0
    elif t.schedule == "wsd":  # warmup - stable - decay over the last 20% of the run
        decay_start = max(t.warmup_steps, int(0.8 * total))
        base = 1.0 if step < decay_start else \
            1.0 - (1.0 - t.min_lr_ratio) * (step - decay_start) / max(1, total - decay_start)
    else:
        progress = (step - t.warmup_steps) / max(1, total - t.warmup_steps)
        base = t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.lr * base


def plan(cfg: HydraConfig, step: int, total: int) -> StepPlan:
    i = phase_index(cfg, step)
    p = cfg.curriculum.phases[i]
    return StepPlan(p, i, p.mor, p.mod, p.moe, p.routing, mod_capacity(cfg, step),
                    lr_at(cfg, step, total) * p.lr_scale)


def segments(cfg: HydraConfig, start: int, end: int) -> list[tuple[int, int, int]]:
    """Contiguous (seq_len, first step, end step) ranges of [start, end): one dataset each."""
    out: list[list[int]] = []
    for s in range(start, end):
        L = cfg.curriculum.phases[phase_index(cfg, s)].seq_len or cfg.model.seq_len
        if out and out[-1][0] == L:
            out[-1][2] = s + 1
        else:
            out.append([L, s, s + 1])
    return [tuple(x) for x in out]


def compressed(cfg: HydraConfig, steps: int) -> HydraConfig:
    """The same curriculum squeezed (or stretched) into `steps` steps, for the smoke run: phase
    ends, LR warm-up and MoD capacity warm-up scale with it; every phase keeps at least one step."""
    phases, total, n = cfg.curriculum.phases, cfg.curriculum.total_steps, len(cfg.curriculum.phases)
    if steps < n:
        raise ValueError(f"steps ({steps}) must be at least the number of phases ({n})")
    out = cfg.model_copy(deep=True)
    prev = 0
    for i, (p, q) in enumerate(zip(phases, out.curriculum.phases)):
        q.until_step = prev = min(max(round(p.until_step * steps / total), prev + 1), steps - (n - 1 - i))
    out.train.warmup_steps = round(cfg.train.warmup_steps * steps / total)
    out.model.mod.capacity_warmup_steps = round(cfg.model.mod.capacity_warmup_steps * steps / total)
    return out
