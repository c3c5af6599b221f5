"""Token dispatch for MoE layers: move each token's top-k copies to their experts and back.

Design choices
- A `Dispatcher` has two calls, `dispatch` (token order -> expert-contiguous order) and `combine`
  (expert outputs -> token order, weighted by the gates). Expert math only ever sees the local,
  expert-contiguous rows and a count per local expert, so the same MoE layer runs on one rank
  (`LocalDispatcher`) or expert-parallel (the all-to-all dispatcher swaps in from outside).
- Dropped assignments (capacity overflow) carry expert id -1: they are sorted past the last
  expert and never reach an expert; their tokens get nothing from that slot.
- The sort is stable, so within an expert tokens keep their order: with one expert and top-1 the
  permutation is the identity, which is what makes "one expert == dense FFN" exact.

Shape legend: T tokens, K top-k slots per token, A kept assignments (<= T*K), D hidden, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    """What `combine` needs to bring expert outputs home."""

    slot_A: torch.Tensor  # index into the flattened T*K slots, expert-contiguous order
    token_A: torch.Tensor  # token each row came from
    num_tokens: int


class Dispatcher:
    """Interface: subclasses move rows; the MoE layer never branches on which one it has."""

    num_local_experts: int | None = None  # None: all experts are local
    expert_offset: int = 0

    def dispatch(
        self, x_TD: torch.Tensor, idx_TK: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, list[int], DispatchPlan]:
        raise NotImplementedError

    def combine(self, y_AD: torch.Tensor, w_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        raise NotImplementedError


def sort_by_expert(idx_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order of the kept slots by expert, and the count per expert (dropped = -1 excluded)."""
    key_S = idx_TK.reshape(-1).long()
    key_S = torch.where(key_S < 0, num_experts, key_S)
    counts_E = torch.bincount(key_S, minlength=num_experts + 1)[:num_experts]
    order_S = torch.argsort(key_S, stable=True)
    return order_S[: int(counts_E.sum())], counts_E


class LocalDispatcher(Dispatcher):
    """Single rank: sort token copies by expert, run each expert on its contiguous slice, combine."""

    def dispatch(self, x_TD, idx_TK, num_experts):
        k = idx_TK.shape[1]
        slot_A, counts_E = sort_by_expert(idx_TK, num_experts)
        token_A = slot_A // k
        return x_TD[token_A], counts_E.tolist(), DispatchPlan(slot_A, token_A, x_TD.shape[0])

    def combine(self, y_AD, w_TK, plan):
        w_A = w_TK.reshape(-1)[plan.slot_A].to(y_AD.dtype)
        out_TD = y_AD.new_zeros(plan.num_tokens, y_AD.shape[1])
        return out_TD.index_add(0, plan.token_A, y_AD * w_A[:, None])
