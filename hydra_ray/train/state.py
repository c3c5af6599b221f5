"""The training state around the model: the optimizer and its parameter groups, gradient
clipping over expert-parallel ranks, and the checkpoint round trip of model + optimizer + RNG
(full tensors with global expert indices, so any worker count resumes any checkpoint)."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch

from hydra_ray import checkpoint as ckpt
from hydra_ray.config import HydraConfig, dump_config
from hydra_ray.models import HydraLM
from hydra_ray.parallel.dispatch import expert_shard
from hydra_ray.parallel.parallelize import expert_param_names, gather_expert_state, gather_experts
from hydra_ray.train.env import Env


def build_optimizer(model: HydraLM, cfg: HydraConfig) -> torch.optim.AdamW:
    """AdamW with a group per (dense / router / expert) x (decayed / not): routers and experts
    take their own LR scale (`lr_scale`, applied by the loop at every step)."""
    scales = {"dense": 1.0, "router": cfg.model.moe.router_lr_scale, "expert": cfg.model.moe.expert_lr_scale}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((model.param_category(name), p.dim() >= 2), []).append(p)
    param_groups = [{"params": ps, "weight_decay": cfg.train.weight_decay if decay else 0.0,
                     "lr_scale": scales[cat], "name": f"{cat}{'' if decay else '_nodecay'}"}
                    for (cat, decay), ps in sorted(groups.items())]
    return torch.optim.AdamW(param_groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=1e-8)


def clip_grad_norm(model: HydraLM, max_norm: float, env: Env) -> tuple[float, float]:
    """(global gradient norm, norm after clipping). Expert gradients are counted once, from the
    rank that owns them; dense gradients are the same on every rank after DDP's all-reduce."""
    experts = set(expert_param_names(model)) if env.distributed else set()
    dense, owned = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (owned if name in experts else dense).append(p.grad.detach())

    def sq(gs: list[torch.Tensor]) -> torch.Tensor:  # on the device: one host sync per step, not one per tensor
        if not gs:
            return torch.zeros((), dtype=torch.float64)
        return torch.stack(torch._foreach_norm(gs)).double().pow(2).sum().cpu()

    grads = dense + owned
    dense_sq, expert_sq = sq(dense), sq(owned)
    env.all_sum(expert_sq.view(1))
    norm = math.sqrt(float(dense_sq + expert_sq))
    coef = min(1.0, max_norm / (norm + 1e-6)) if math.isfinite(norm) else 1.0
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)
    return norm, min(norm, max_norm) if math.isfinite(norm) else norm


def _gather_optimizer(model: HydraLM, opt, env: Env) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    local = ckpt.optimizer_tensors(opt, names)
    if env.distributed:
        experts = set(expert_param_names(model))
        for key in sorted(local):
            if key.rpartition("::")[0] in experts and local[key].dim() > 0:
                local[key] = gather_experts(local[key], model.cfg.moe.num_experts)
    return local


def _expert_slices(model: HydraLM, env: Env) -> dict[str, slice]:
    """Global expert rows of this rank's shard, per expert parameter (nothing to cut on one rank)."""
    if not env.distributed:
        return {}
    lo, n = expert_shard(model.cfg.moe.num_experts, env.rank, env.world)
    return {name: slice(lo, lo + n) for name in expert_param_names(model)}


def restore(model: HydraLM, opt, loaded: ckpt.Loaded, env: Env) -> None:
    """Load a full checkpoint into a (possibly expert-sharded) model and its optimizer."""
    slices = _expert_slices(model, env)
    state = {k: (v[slices[k]] if k in slices else v) for k, v in loaded.model.items()}
    model.load_state_dict(state)
    if opt is not None:
        opt.state.clear()
        ckpt.load_optimizer_tensors(opt, dict(model.named_parameters()), loaded.optimizer, slices)
    set_rng_state(loaded.trainer_state)


def rng_state() -> dict[str, list[int]]:
    """The random generators a step draws from: the CPU's, and the current CUDA device's once CUDA
    is in use (MoE router jitter on a GPU draws from it), so that a resumed run draws what an
    uninterrupted one would."""
    out = {"rng": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_rng"] = torch.cuda.get_rng_state().tolist()
    return out


def set_rng_state(trainer_state: dict) -> None:
    """Put back what `rng_state` saved. A CUDA state means nothing to a machine without CUDA (a
    GPU run resumed on CPUs), which keeps its own."""
    if "rng" in trainer_state:
        torch.set_rng_state(torch.tensor(trainer_state["rng"], dtype=torch.uint8))
    if "cuda_rng" in trainer_state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(trainer_state["cuda_rng"], dtype=torch.uint8))


def save(model: HydraLM, opt, env: Env, cfg: HydraConfig, run_dir: str, step: int, phase: str, metrics: dict,
         tokenizer_json: bytes | None = None) -> Path | None:
    """Every rank gathers (collectives); rank 0 writes. In-process the checkpoint goes straight
    into the run; on Ray Train it is written to a temporary folder that `Env.report` hands over
    (returned, for the caller to remove once reported)."""
    state = gather_expert_state(model)
    opt_state = _gather_optimizer(model, opt, env)
    trainer_state = {"step": step, "phase": phase, "data_position": step * cfg.train.batch_size,
                     "global_batch": cfg.train.batch_size, "world_size": env.world,
                     **rng_state(), "metrics": metrics}
    parts = dict(model_state=state, opt_state=opt_state, trainer_state=trainer_state,
                 config_yaml=dump_config(ckpt.portable_config(cfg) if tokenizer_json is not None else cfg),
                 tokenizer_json=tokenizer_json)
    if env.rank != 0:
        return None
    if not env.ray_checkpoints:
        ckpt.save_local(run_dir, step, cfg.train.keep_checkpoints, **parts)
        return None
    tmp = Path(tempfile.mkdtemp(prefix=f"hydra-ckpt-{step}-"))
    try:
        return ckpt.write(tmp, **parts)
    except BaseException:  # a failed write leaves no copy of the weights in /tmp
        shutil.rmtree(tmp, ignore_errors=True)
        raise
