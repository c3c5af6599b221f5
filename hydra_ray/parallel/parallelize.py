"""Spread a model over workers from outside: shard experts (expert parallel), replicate the rest (DDP).

Design choices
- Nothing model-specific: any module with an `experts` submodule (parameters stacked along a
  leading expert dimension) and a `dispatcher` attribute is an expert layer. Its experts are cut to
  this rank's contiguous slice (`expert_shard` in dispatch.py says which; shards may differ by one
  expert, or be empty when there are more ranks than experts) and its dispatcher becomes an
  `AllToAllDispatcher`; the model code does not change and never sees a process group.
- Gathering a sharded tensor back to global expert order (`gather_experts`: weights, optimizer
  state) pads every shard to the largest one, because `all_gather` wants equal sizes everywhere,
  and cuts the padding off again: pure data movement, so the result is exact.
- Expert exchange runs on its own process group, so its all-to-alls never interleave with DDP's
  asynchronous gradient all-reduces on the default group (gloo requires one order per group).
- Gradient scale: DDP averages the replicated gradients over ranks (each rank's loss is a mean over
  its own batch). An expert's gradient already *sums* the contributions of every rank's tokens
  (the backward all-to-all brings them home), so it is divided by the world size to match.
- Replicated experts (`train.expert_placement: replicated`) are the other choice when they fit on
  every worker: no all-to-all, so no rank waits for the one that drew the most tokens; DDP
  averages their gradients like any other. Only *sharded* experts count as expert parameters below
  (gathered for checkpoints, ignored by DDP, clipped once per owner).
- DDP ignores the expert parameters (they differ per rank), finds unused parameters (the
  curriculum leaves some unused: the dense FFN after upcycling, routers before their feature is
  on) and does not broadcast buffers (per-rank load counters must stay per rank).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from hydra_ray.parallel.dispatch import AllToAllDispatcher, expert_shard


def expert_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "dispatcher") and isinstance(getattr(m, "experts", None), nn.Module)]


def sharded_expert_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in expert_layers(model) if isinstance(m.dispatcher, AllToAllDispatcher)]


def expert_param_names(model: nn.Module) -> list[str]:
    """Names of the sharded expert parameters (each rank holds a different slice)."""
    ids = {id(p) for layer in sharded_expert_layers(model) for p in layer.experts.parameters()}
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


def parallelize(model: nn.Module, data_parallel: bool = True, device_ids=None, force: bool = False,
                experts: str = "sharded") -> nn.Module:
    """Shard experts over all ranks of the default group (or keep them whole: `experts="replicated"`),
    then wrap the rest in DDP. With one rank (or no process group) the model is returned unchanged,
    unless `force` (one rank still takes the all-to-all and DDP paths: the GPU check)."""
    if experts not in ("sharded", "replicated"):
        raise ValueError(f"experts must be 'sharded' or 'replicated', got {experts!r}")
    if not dist.is_available() or not dist.is_initialized() or (dist.get_world_size() == 1 and not force):
        return model
    if experts == "sharded":
        shard_experts(model, dist.new_group(list(range(dist.get_world_size()))))
    if not data_parallel:
        return model
    DDP._set_params_and_buffers_to_ignore_for_model(model, expert_param_names(model))
    with warnings.catch_warnings():
        # newer torch deprecates broadcast_buffers for forward_sync_buffers, which older torch
        # (GPU images) lacks and which would still sync the per-rank load counters at init
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DDP(model, device_ids=device_ids, find_unused_parameters=True, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


@torch.no_grad()
def gather_experts(local: torch.Tensor, num_experts: int, group=None) -> torch.Tensor:
    """This rank's shard of a tensor stacked along the expert dimension -> all `num_experts` rows,
    in global expert order (collective: call on all ranks, with the same tensors in the same order)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = [expert_shard(num_experts, r, world)[1] for r in range(world)]
    if local.shape[0] != sizes[rank]:
        raise ValueError(f"rank {rank} holds {local.shape[0]} experts, its shard of {num_experts} is {sizes[rank]}")
    padded = local.new_zeros(max(sizes), *local.shape[1:])
    padded[: sizes[rank]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], 0)


@torch.no_grad()
def gather_expert_state(model: nn.Module, group=None) -> dict[str, torch.Tensor]:
    """Full state dict with every expert under its global index (collective: call on all ranks)."""
    model = unwrap(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return state
    num_experts = {id(p): layer.dispatcher.num_experts for layer in sharded_expert_layers(model)
                   for p in layer.experts.parameters()}
    for name, p in model.named_parameters():
        if id(p) in num_experts:
            state[name] = gather_experts(state[name], num_experts[id(p)], group)
    return state
