"""Single-process curriculum smoke run: the tiny mode of training, with no Ray and no data pipeline.

It walks a config's curriculum phases in one process on the built-in tiny corpus (byte-level,
random windows per domain, no Ray Data), switching features on exactly as the phases say, and
prints the loss per phase. It exists so `make demo` and tests can exercise the whole
model path in seconds; the real trainer (Ray Train, checkpoints, metrics) is hydra_ray.train.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from hydra_ray.config import HydraConfig, PhaseConfig
from hydra_ray.data import builtin
from hydra_ray.train.curriculum import plan
from hydra_ray.models import HydraLM


@dataclass
class SmokeBatches:
    """Random windows of seq_len + 1 bytes per sequence, each tagged with its domain id."""

    cfg: HydraConfig
    seed: int = 0

    def __post_init__(self) -> None:
        self.domains = self.cfg.model.domains
        self.data = {d: torch.frombuffer(bytearray("".join(builtin.documents(d, "tiny", self.seed)).encode()),
                                         dtype=torch.uint8).long()
                     for d in self.domains if d in builtin.DOMAINS}
        if not self.data:
            raise ValueError(f"the smoke corpus has none of the domains {self.domains}")
        self.gen = torch.Generator().manual_seed(self.seed)

    def batch(self, batch_size: int, seq_len: int, mixture: dict[str, float] | None):
        mixture = mixture or self.cfg.data.mixture
        names = [d for d in self.data if mixture.get(d, 0.0) > 0]
        weights = torch.tensor([mixture[d] for d in names], dtype=torch.float)
        pick = torch.multinomial(weights, batch_size, replacement=True, generator=self.gen)
        xs, doms = [], []
        for i in pick.tolist():
            buf = self.data[names[i]]
            s = int(torch.randint(0, len(buf) - seq_len - 1, (1,), generator=self.gen))
            xs.append(buf[s : s + seq_len + 1])
            doms.append(self.domains.index(names[i]))
        x = torch.stack(xs)
        dom = torch.tensor(doms)[:, None].expand(batch_size, seq_len)
        return x[:, :-1], x[:, 1:], dom


def compress(phases: list[PhaseConfig], steps: int) -> list[PhaseConfig]:
    """The phase of each of `steps` steps when the curriculum is squeezed (or stretched) into them;
    every phase keeps at least one step."""
    total, n = phases[-1].until_step, len(phases)
    if steps < n:
        raise ValueError(f"steps ({steps}) must be at least the number of phases ({n})")
    ends, prev = [], 0
    for i, p in enumerate(phases):
        end = min(max(round(p.until_step * steps / total), prev + 1), steps - (n - 1 - i))
        ends.append(end)
        prev = end
    return [phases[sum(step >= e for e in ends)] for step in range(steps)]


def run_smoke(cfg: HydraConfig, steps: int | None = None, seed: int = 0, log=print) -> dict[str, float]:
    """Train `cfg.model` through the curriculum in-process; returns the mean CE per phase."""
    torch.manual_seed(seed)
    model = HydraLM(cfg.model)
    data = SmokeBatches(cfg, seed)
    total = cfg.curriculum.total_steps
    steps = total if steps is None else steps
    scale = total / steps  # a shorter smoke run walks the same phases, compressed
    schedule = compress(cfg.curriculum.phases, steps)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                            betas=tuple(cfg.train.betas))
    per_phase: dict[str, list[float]] = {}
    phases = cfg.curriculum.phases
    current, t0 = None, time.time()
    for step in range(steps):
        phase = schedule[step]
        if phase is not current:
            current, smoke_start = phase, step
            i = phases.index(phase)
            real_start = phases[i - 1].until_step if i else 0
            log(f"[smoke] step {step:4d}  phase {phase.name:<11} mor={phase.mor} mod={phase.mod} "
                f"moe={phase.moe} routing={phase.routing}")
        # the step of the real curriculum this smoke step stands for: features, MoD warm-up and LR
        # come from the trainer's own plan
        real = min(phase.until_step - 1, real_start + round((step - smoke_start) * scale))
        p = plan(cfg, real, total)
        model.set_features(mor=p.mor, mod=p.mod, moe=p.moe, routing=p.routing,
                           mod_capacity=p.mod_capacity if p.mod else None)
        for g in opt.param_groups:
            g["lr"] = p.lr
        x, y, dom = data.batch(cfg.train.batch_size, phase.seq_len or cfg.model.seq_len, phase.mixture)
        out = model(x, y, dom)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        for layer in model.moe_layers():
            layer.balance_step()
        if not math.isfinite(out.loss.item()):
            raise RuntimeError(f"non-finite loss at smoke step {step}")
        per_phase.setdefault(phase.name, []).append(out.ce.item())
    means = {k: sum(v) / len(v) for k, v in per_phase.items()}
    log(f"[smoke] {steps} steps in {time.time() - t0:.1f}s; mean CE per phase: "
        + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    return means
