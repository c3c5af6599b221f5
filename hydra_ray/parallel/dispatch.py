"""Token dispatch for MoE layers: move each token's top-k copies to their experts and back.

Design choices
- A `Dispatcher` has two calls, `dispatch` (token order -> rows grouped by local expert, plus a
  count per local expert) and `combine` (expert outputs -> token order, weighted by the gates).
  Expert math only ever sees local, expert-contiguous rows, so the same MoE layer runs on one rank
  (`LocalDispatcher`) or expert-parallel (`AllToAllDispatcher`, swapped in from outside by
  parallelize.py); the layer never branches on which one it has.
- Both build on the dispatch ops of hydra_ray.kernels (Triton on GPUs, plain torch otherwise):
  `route` (histogram, offsets, destination row of every slot), `permute`, `combine`.
- Dropped assignments (capacity overflow) carry expert id -1: they never reach an expert and their
  tokens get nothing from that slot. Ordering within an expert is stable (token order), so with one
  expert and top-1 the permutation is the identity: "one expert == dense FFN" stays exact.
- Expert parallel: experts are split contiguously and as evenly as possible over the ranks of the
  group: the first E % W ranks own one expert more (4 over 3 = 2/1/1; 4 over 6 = 1/1/1/1/0/0).
  `expert_shard` is the one statement of that rule; sharding, checkpoint gathering and restoring
  all ask it. Any worker count therefore works, and a checkpoint (experts under their global
  index) reshards between any two.
- After the local permute the rows are already grouped by destination rank (shards are
  contiguous and in rank order), so one `all_to_all_single` with uneven splits moves them. The
  per-expert counts travel first, in an all_to_all_single of their own whose splits are the shard
  sizes (each rank sends a rank the counts of that rank's experts and gets back L counts from
  every rank), so every rank knows its row splits. Received rows arrive by (source rank, local
  expert) and are regrouped by local expert; the way back is the exact inverse. The exchange is an
  autograd function whose backward is the reverse exchange, so gradients flow to remote tokens and
  to local experts alike.
- A rank may own no experts (W > E). It still takes part in every exchange, with zero rows and
  zero counts, forward and backward: collectives must be called by every rank of the group.

Shape legend: T tokens, K top-k, A rows sent (kept slots), R rows received, D hidden,
E experts, L local experts (may differ per rank, may be 0), W ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hydra_ray import kernels
from hydra_ray.timing import TIMERS


def expert_shard(num_experts: int, rank: int, world: int) -> tuple[int, int]:
    """(global index of the first expert, number of experts) that `rank` of `world` owns: contiguous
    shards in rank order, the first num_experts % world ranks holding one expert more."""
    base, extra = divmod(num_experts, world)
    return rank * base + min(rank, extra), base + (rank < extra)


class Dispatcher:
    """Interface: subclasses move rows; the MoE layer never branches on which one it has."""

    expert_offset: int = 0  # global index of this rank's first expert

    def dispatch(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, num_experts: int):
        """-> (rows grouped by local expert, count per local expert as a list, plan for combine)."""
        raise NotImplementedError

    def combine(self, y_RD: torch.Tensor, w_TK: torch.Tensor, plan) -> torch.Tensor:
        raise NotImplementedError


class LocalDispatcher(Dispatcher):
    """Single rank: sort token copies by expert, run each expert on its contiguous slice, combine."""

    def dispatch(self, x_TD, idx_TK, num_experts):
        routing = kernels.route(idx_TK, num_experts)
        return kernels.permute(x_TD, routing), routing.counts, routing

    def combine(self, y_AD, w_TK, plan):
        return kernels.combine(y_AD, w_TK, plan)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward is the same exchange reversed."""

    @staticmethod
    def forward(ctx, x, recv_splits, send_splits, group):
        import torch.distributed as dist

        ctx.splits, ctx.group = (recv_splits, send_splits), group
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        with TIMERS.section("all_to_all"):
            dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        recv_splits, send_splits = ctx.splits
        out = g.new_empty(sum(send_splits), *g.shape[1:])
        with TIMERS.section("all_to_all"):
            dist.all_to_all_single(out, g.contiguous(), send_splits, recv_splits, group=ctx.group)
        return out, None, None, None


@dataclass
class AllToAllPlan:
    routing: kernels.Routing
    order_R: torch.Tensor  # received row -> position when grouped by local expert
    x_RD: torch.Tensor  # rows as received (keeps every rank in the backward exchange)
    send_splits: list[int]
    recv_splits: list[int]


class AllToAllDispatcher(Dispatcher):
    """Expert parallel over a torch.distributed process group (gloo on CPU, NCCL on GPU)."""

    def __init__(self, num_experts: int, group=None):
        import torch.distributed as dist

        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.expert_offset, self.num_local_experts = expert_shard(num_experts, self.rank, self.world)
        self.shard_sizes = [expert_shard(num_experts, r, self.world)[1] for r in range(self.world)]

    def dispatch(self, x_TD, idx_TK, num_experts):
        import torch.distributed as dist

        if num_experts != self.num_experts:
            raise ValueError(f"dispatcher built for {self.num_experts} experts, layer has {num_experts}")
        W, L = self.world, self.num_local_experts
        routing = kernels.route(idx_TK, num_experts)
        x_AD = kernels.permute(x_TD, routing)
        # rank r gets the counts of its own experts from every rank: L per source, shard sizes out
        recv_WL = routing.counts_E.new_empty(W * L)
        with TIMERS.section("all_to_all_counts"):  # the count exchange: it waits for the slowest rank
            dist.all_to_all_single(recv_WL, routing.counts_E.contiguous(), [L] * W, self.shard_sizes,
                                   group=self.group)
        recv_WL = recv_WL.view(W, L)
        send_W = torch.stack([c.sum() for c in routing.counts_E.split(self.shard_sizes)])
        send_splits = send_W.tolist()
        recv_splits = recv_WL.sum(1).tolist()
        x_RD = _AllToAll.apply(x_AD, recv_splits, send_splits, self.group)
        # rows arrive ordered (source rank, local expert): regroup by local expert, stably
        local_R = torch.arange(L, device=x_TD.device).repeat(W).repeat_interleave(recv_WL.reshape(-1))
        order_R = torch.argsort(local_R, stable=True)
        plan = AllToAllPlan(routing, order_R, x_RD, send_splits, recv_splits)
        return x_RD.index_select(0, order_R), recv_WL.sum(0).tolist(), plan

    def combine(self, y_RD, w_TK, plan):
        if plan.x_RD.requires_grad and not y_RD.requires_grad:
            # A rank whose experts ran on no rows may hand back a tensor outside the graph; the
            # backward all-to-all must still run on it, or the other ranks wait forever.
            y_RD = y_RD + plan.x_RD.sum() * 0
        back_RD = torch.empty_like(y_RD).index_copy(0, plan.order_R, y_RD)  # undo the regrouping
        y_AD = _AllToAll.apply(back_RD, plan.send_splits, plan.recv_splits, self.group)
        return kernels.combine(y_AD, w_TK, plan.routing)
