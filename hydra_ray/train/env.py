"""Where the training loop runs: rank, world, device, collectives and how reports leave it.

The loop is written against `Env` only, so the same code runs as a Ray Train worker
(`ray_train_env`), in-process for one-worker runs, smoke runs and Tune trials (`Env()`), and
in tests with a gloo group of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist


@dataclass
class Env:
    """Rank/world, device, and how reports are made."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[..., None] | None = None  # (metrics, checkpoint_dir or None, step) -> None
    ray_checkpoints: bool = False  # True: checkpoints travel through report(); else written in place
    # Run the process-group paths (DDP, the expert all-to-all, gathers) even with one rank, as the
    # GPU check does on its one GPU with an NCCL group of world size 1.
    group_of_one: bool = False

    @property
    def distributed(self) -> bool:
        return (self.world > 1 or self.group_of_one) and dist.is_initialized()

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if not self.distributed:
            return t
        if t.device != self.device and self.device.type == "cuda":  # NCCL reduces CUDA tensors only
            on = t.to(self.device)
            dist.all_reduce(on, op=op)
            t.copy_(on)
        else:
            dist.all_reduce(t, op=op)
        return t

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (a CPU tensor too: it travels through the device under NCCL)."""
        return self._reduce(t, dist.ReduceOp.SUM)

    def all_max(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.MAX)

    def from_rank0(self, value: int) -> int:
        """Rank 0's `value` on every rank."""
        if not self.distributed:
            return value
        t = torch.tensor([value if self.rank == 0 else -(1 << 62)], dtype=torch.int64)
        return int(self.all_max(t).item())

    def all_finite(self, *values: torch.Tensor) -> bool:
        """Whether every value is finite on every rank (one agreed decision)."""
        bad = torch.tensor([0.0 if all(bool(torch.isfinite(v).all()) for v in values) else 1.0])
        return self.all_max(bad).item() == 0.0


def ray_train_env(use_gpu: bool) -> Env:
    import ray.train
    import ray.train.torch

    from hydra_ray import checkpoint as ckpt

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def report(metrics, ckpt_dir, step):
        from ray.train import Checkpoint

        if ckpt_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(ckpt_dir)) if ctx.get_world_rank() == 0
                             else None, checkpoint_dir_name=f"checkpoints/{ckpt.step_dir_name(step)}")

    return Env(ctx.get_world_rank(), ctx.get_world_size(), device, report=report, ray_checkpoints=True)
