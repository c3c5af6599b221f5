"""Mixture-of-Depths token selection (arXiv 2404.02258), shared by MoD blocks and MoR recursions.

Design choices
- A `TokenRouter` scores every token with a linear router. In training it keeps the top
  `capacity` fraction of each sequence (expert-choice, so compute per sequence is fixed and
  balanced); at generation that top-k would look at future tokens, so a small causal predictor
  (an MLP on the *detached* hidden state, trained with BCE against top-k membership) decides per
  token instead. Its accuracy is reported with the aux losses.
- Selected tokens' updates are multiplied by a gate computed from the router score, which puts the
  router on the gradient path. Two gate shapes:
    * `centered` (MoD): 2 * sigmoid(s) with a zero-initialised router, so the gate is exactly 1 at
      switch-on. MoD at capacity 1.0 then *is* the dense block, and the trainer anneals capacity
      from 1.0 to its target (`capacity_warmup_steps`), so MoD switches on with no loss cliff.
    * `residual` (MoR extra recursions): sigmoid(s) with a negative initial bias, so a recursion
      that did not exist before switch-on starts near identity and grows as the router learns.
- `eligible` restricts selection (MoR recursion r only chooses among tokens that ran recursion
  r - 1: hierarchical filtering, as in the MoR paper).

Shape legend: B batch, T sequence, D d_model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hydra_ray.models.attention import upcast


@dataclass
class Selection:
    sel_BT: torch.Tensor | None  # None: every (eligible) token is processed
    score_BT: torch.Tensor
    gate_BT: torch.Tensor | None  # None when the gate is exactly 1 (skip the multiply)
    bce: torch.Tensor | None = None  # predictor loss (training top-k only)
    acc: torch.Tensor | None = None  # predictor accuracy on the same tokens


class TokenRouter(nn.Module):
    def __init__(self, d_model: int, predictor_hidden: int, gate: str, init_bias: float = 0.0,
                 init_std: float = 0.0, router_aux: float = 0.0):
        super().__init__()
        self.router_aux = router_aux  # weight of the router's own BCE against its top-k, inside `bce`
        if gate not in ("centered", "residual"):
            raise ValueError(f"unknown gate {gate!r}")
        self.gate_kind = gate
        self.router = nn.Linear(d_model, 1)
        self.predictor = nn.Sequential(
            nn.Linear(d_model, predictor_hidden), nn.GELU(), nn.Linear(predictor_hidden, 1)
        )
        self.init_bias, self.init_std = init_bias, init_std
        self.reset_router()

    @torch.no_grad()
    def reset_router(self) -> None:
        nn.init.normal_(self.router.weight, std=self.init_std) if self.init_std > 0 else nn.init.zeros_(
            self.router.weight
        )
        nn.init.constant_(self.router.bias, self.init_bias)

    def gate(self, score: torch.Tensor) -> torch.Tensor:
        return 2 * torch.sigmoid(score) if self.gate_kind == "centered" else torch.sigmoid(score)

    def forward(
        self,
        x_BTD: torch.Tensor,
        capacity: float,
        causal: bool,
        eligible_BT: torch.Tensor | None = None,
        base: int | None = None,
    ) -> Selection:
        """Keep ceil(capacity * base) tokens per sequence (base: T, or the tokens that entered the
        block when MoD already thinned them), or the predictor's choice when `causal`."""
        score_BT = upcast(self.router(x_BTD).squeeze(-1))
        gate_BT = self.gate(score_BT)
        if capacity >= 1.0:  # nothing to decide: every eligible token runs
            return Selection(eligible_BT, score_BT, gate_BT)
        pred_BT = upcast(self.predictor(x_BTD.detach()).squeeze(-1))
        if causal:
            sel = pred_BT > 0
            if eligible_BT is not None:
                sel &= eligible_BT
            return Selection(sel, score_BT, gate_BT)
        # the tolerance keeps float noise (0.55 * 100 = 55.000000000000007) from adding a token
        k = max(1, math.ceil(capacity * (base if base is not None else x_BTD.shape[1]) - 1e-6))
        masked = score_BT if eligible_BT is None else score_BT.masked_fill(~eligible_BT, -math.inf)
        if eligible_BT is not None:
            k = min(k, int(eligible_BT.sum(1).min()))
        top = masked.detach().topk(k, dim=1).indices
        sel = torch.zeros_like(score_BT, dtype=torch.bool).scatter_(1, top, True)
        if eligible_BT is not None:
            sel &= eligible_BT
        among = eligible_BT if eligible_BT is not None else torch.ones_like(sel)
        target = sel[among].to(pred_BT.dtype)
        bce = F.binary_cross_entropy_with_logits(pred_BT[among], target)
        if self.router_aux:
            bce = bce + self.router_aux * F.binary_cross_entropy_with_logits(score_BT[among], target)
        acc = ((pred_BT[among] > 0) == (target > 0)).float().mean()
        return Selection(sel, score_BT, gate_BT, bce, acc.detach())
