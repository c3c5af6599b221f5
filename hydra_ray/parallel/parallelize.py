"""Spread a model over workers from outside: shard experts (expert parallel), replicate the rest (DDP).

Design choices
- Nothing model-specific: any module with an `experts` submodule (parameters stacked along a
  leading expert dimension) and a `dispatcher` attribute is an expert layer. Its experts are cut to
  this rank's contiguous slice and its dispatcher becomes an `AllToAllDispatcher`; the model code
  does not change and never sees a process group.
- Expert exchange runs on its own process group, so its all-to-alls never interleave with DDP's
  asynchronous gradient all-reduces on the default group (gloo requires one order per group).
- Gradient scale: DDP averages the replicated gradients over ranks (each rank's loss is a mean over
  its own batch). An expert's gradient already *sums* the contributions of every rank's tokens
  (the backward all-to-all brings them home), so it is divided by the world size to match.
- DDP ignores the expert parameters (they differ per rank), finds unused parameters (the
  curriculum leaves some unused: the dense FFN after upcycling, routers before their feature is
  on) and does not broadcast buffers (per-rank load counters must stay per rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from hydra_ray.parallel.dispatch import AllToAllDispatcher


def expert_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "dispatcher") and isinstance(getattr(m, "experts", None), nn.Module)]


def expert_param_names(model: nn.Module) -> list[str]:
    ids = {id(p) for layer in expert_layers(model) for p in layer.experts.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def shard_experts(model: nn.Module, group=None) -> int:
    """Keep this rank's experts, route tokens with all-to-all. Returns the number of layers sharded."""
    world = dist.get_world_size(group)
    layers = expert_layers(model)
    for layer in layers:
        params = dict(layer.experts.named_parameters(recurse=False))
        num_experts = next(iter(params.values())).shape[0]
        dispatcher = AllToAllDispatcher(num_experts, group)
        lo, n = dispatcher.expert_offset, dispatcher.num_local_experts
        for name, p in params.items():
            local = nn.Parameter(p.detach()[lo : lo + n].clone(), requires_grad=p.requires_grad)
            local.register_hook(lambda g, w=world: g / w)
            setattr(layer.experts, name, local)
        layer.dispatcher = dispatcher
    return len(layers)


def parallelize(model: nn.Module, data_parallel: bool = True, device_ids=None) -> nn.Module:
    """Shard experts over all ranks of the default group, then wrap the rest in DDP.
    With one rank (or no process group) the model is returned unchanged."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    ep_group = dist.new_group(list(range(dist.get_world_size())))
    shard_experts(model, ep_group)
    if not data_parallel:
        return model
    DDP._set_params_and_buffers_to_ignore_for_model(model, expert_param_names(model))
    return DDP(model, device_ids=device_ids, find_unused_parameters=True, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


@torch.no_grad()
def gather_expert_state(model: nn.Module, group=None) -> dict[str, torch.Tensor]:
    """Full state dict with every expert under its global index (collective: call on all ranks)."""
    model = unwrap(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return state
    world = dist.get_world_size(group)
    for name in expert_param_names(model):
        local = state[name].contiguous()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
        state[name] = torch.cat(parts, 0)
    return state
