"""Mixture-of-Recursions (arXiv 2507.10524) with Mixture-of-Depths on the first application.

Design choices
- Each shared block is applied up to R times to a token ("recursions"), the same weights each
  time. Routing is *expert-choice per recursion* (the paper's choice): recursion 0 runs every token
  that reaches the block, recursion r >= 1 runs the top-scored `capacity_schedule[r]` fraction of
  the tokens that entered the block, chosen among those that ran r - 1 (hierarchical filtering;
  the schedule is absolute and non-increasing, e.g. [1, 2/3, 1/3]), so a token's depth is the
  number of recursions it survived. At generation a per-recursion causal predictor replaces the top-k (mod.py).
- In an MoD block, recursion 0 itself is routed by the MoD router: unselected tokens ride the
  residual stream past the whole block (depth 0). MoD and MoR are therefore one mechanism, a token
  selector in front of each application of a block.
- An application processes only its selected tokens: they are gathered into a dense sub-batch
  with their original positions, run through attention/FFN (the causal mask over the subset is
  causal over positions), and their gated updates are scattered back. Rows with equal counts
  (training top-k) need no padding mask; ragged rows (causal decisions) carry `valid`.
- KV cache per (block, recursion): a token writes K/V for exactly the applications it runs, so a
  cached decode sees the same keys as a full recompute (recursion-wise caching, as in the paper).
- Switching MoR on adds recursions that start near identity (residual gate sigmoid(-4)); with one
  recursion the unit is exactly the plain block.

Shape legend: B batch, T sequence, K tokens in a processed subset, D d_model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from hydra_ray.config import ModelConfig
from hydra_ray.models.attention import KVCache
from hydra_ray.models.mod import Selection, TokenRouter
from hydra_ray.models.trace import RoutingTrace


@dataclass
class ForwardCtx:
    """Per-forward state threaded through the units: routing mode, cache, losses, trace."""

    causal: bool  # causal routing decisions (generation); False = training top-k
    mod_capacity: float
    domain_BT: torch.Tensor | None = None
    cache: KVCache | None = None
    trace: RoutingTrace | None = None
    losses: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # unweighted, per layer
    weights: dict[str, float] = field(default_factory=dict)
    stats: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor, weight: float) -> None:
        self.losses.setdefault(name, []).append(value)
        self.weights[name] = weight

    def aux_loss(self) -> torch.Tensor | None:
        """Each auxiliary term is averaged over the layers that produced it, then weighted, so its
        scale does not grow with depth."""
        terms = [self.weights[n] * torch.stack(v).mean() for n, v in self.losses.items() if self.weights[n]]
        return sum(terms) if terms else None


def gather_index(sel_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Columns of the selected tokens, in order, padded to the longest row; `valid` marks real ones
    (None when every row holds the same count, the common training case)."""
    count_B = sel_BT.sum(1)
    K = int(count_B.max())
    idx_BT = torch.sort(sel_BT.to(torch.uint8), dim=1, descending=True, stable=True).indices
    idx_BK = idx_BT[:, :K]
    if bool((count_B == K).all()):
        return idx_BK, None
    valid_BK = torch.arange(K, device=sel_BT.device)[None, :] < count_B[:, None]
    return idx_BK, valid_BK


class RecursiveBlock(nn.Module):
    def __init__(self, index: int, block: nn.Module, cfg: ModelConfig, is_mod: bool):
        super().__init__()
        self.index = index
        self.block = block
        self.schedule = cfg.mor.schedule()
        d = cfg.d_model
        self.mod_router = (
            TokenRouter(d, cfg.mod.predictor_hidden, "centered", router_aux=cfg.mod.router_aux_weight) if is_mod else None
        )
        self.mor_routers = nn.ModuleList(
            TokenRouter(d, cfg.mor.predictor_hidden, "residual", cfg.mor.gate_init_bias, init_std=1e-3,
                        router_aux=cfg.mor.router_aux_weight)
            for _ in range(cfg.mor.recursions - 1)
        )
        self.mod_weight, self.mor_weight = cfg.mod.predictor_weight, cfg.mor.predictor_weight
        self.mod_on = False
        self.mor_on = False
        self.full_depth = False  # with MoR off: every recursion, every token, no router (dense baseline)

    def forward(self, x_BTD: torch.Tensor, pos_BT: torch.Tensor, ctx: ForwardCtx) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        recursions = 1 + len(self.mor_routers) if self.mor_on or self.full_depth else 1
        active_BT: torch.Tensor | None = None  # tokens that ran the previous recursion (None = all)
        depth_BT = torch.zeros(B, T, dtype=torch.long, device=x_BTD.device)
        entered = T
        for r in range(recursions):
            if r == 0:
                if self.mod_router is not None and self.mod_on:
                    s = self.mod_router(x_BTD, ctx.mod_capacity, ctx.causal)
                    self._log(ctx, "mod", s, self.mod_weight)
                    if ctx.trace is not None:
                        sel = s.sel_BT if s.sel_BT is not None else torch.ones_like(depth_BT, dtype=torch.bool)
                        ctx.trace.mod[self.index] = (sel.detach(), s.score_BT.detach())
                else:
                    s = Selection(None, None, None)
                if s.sel_BT is not None and not ctx.causal:
                    entered = int(s.sel_BT.sum(1).max())
            elif not self.mor_on:  # full depth: the block again, on every token, ungated
                s = Selection(None, None, None)
            else:
                if ctx.causal and active_BT is not None and not bool(active_BT.any()):
                    break  # nobody ran the last application, so nobody may run a deeper one
                eligible = active_BT if active_BT is not None else torch.ones_like(depth_BT, dtype=torch.bool)
                s = self.mor_routers[r - 1](x_BTD, self.schedule[r], ctx.causal, eligible, base=entered)
                self._log(ctx, "mor", s, self.mor_weight)
            x_BTD = self._run(x_BTD, pos_BT, s.sel_BT, s.gate_BT, r, ctx)
            depth_BT += 1 if s.sel_BT is None else s.sel_BT.long()
            active_BT = s.sel_BT  # recursion r >= 1 always passes `eligible`, so never None there
        if self.mor_on and ctx.trace is not None:
            ctx.trace.mor[self.index] = depth_BT
        return x_BTD

    @staticmethod
    def _log(ctx: ForwardCtx, name: str, s: Selection, weight: float) -> None:
        if s.bce is not None:
            ctx.add(f"{name}_bce", s.bce, weight)
            ctx.stats.setdefault(f"{name}_predictor_acc", []).append(s.acc)

    def _run(self, x_BTD, pos_BT, sel_BT, gate_BT, r, ctx: ForwardCtx) -> torch.Tensor:
        B, T, D = x_BTD.shape
        cache = ctx.cache.layer((self.index, r)) if ctx.cache is not None else None
        if sel_BT is not None and not bool(sel_BT.any()):
            return x_BTD  # nobody runs this application (possible with causal decisions)
        if sel_BT is None or bool(sel_BT.all()):
            col_BK = torch.arange(T, device=x_BTD.device).expand(B, T)
            delta, moe = self.block(x_BTD, pos_BT, None, cache, ctx.domain_BT, ctx.causal)
            self._trace_moe(ctx, r, (B, T), col_BK, None, moe)
            if gate_BT is None:
                return x_BTD + delta
            return x_BTD + gate_BT[..., None].to(delta.dtype) * delta
        idx_BK, valid_BK = gather_index(sel_BT)
        # whole rows by flat index (index_select / index_copy): 4x faster than an element-wise
        # gather / scatter with a [B, K, D] index, forward and backward; a row's columns are distinct
        K = idx_BK.shape[1]
        flat_N = (idx_BK + torch.arange(B, device=idx_BK.device)[:, None] * T).reshape(-1)
        x_ND = x_BTD.reshape(B * T, D)
        x_BKD = x_ND.index_select(0, flat_N).view(B, K, D)
        dom = ctx.domain_BT.gather(1, idx_BK) if ctx.domain_BT is not None else None
        delta, moe = self.block(x_BKD, pos_BT.gather(1, idx_BK), valid_BK, cache, dom, ctx.causal)
        self._trace_moe(ctx, r, (B, T), idx_BK, valid_BK, moe)
        g_BK = gate_BT.gather(1, idx_BK) if gate_BT is not None else torch.ones_like(idx_BK, dtype=delta.dtype)
        if valid_BK is not None:
            g_BK = g_BK * valid_BK  # padding rows write back their own unchanged value
        new_BKD = x_BKD + g_BK[..., None].to(delta.dtype) * delta
        return x_ND.index_copy(0, flat_N, new_BKD.reshape(B * K, D).to(x_ND.dtype)).view(B, T, D)

    def _trace_moe(self, ctx, r, shape_BT, col_BK, valid_BK, moe) -> None:
        if moe is None or moe.idx_NK is None:
            return
        for name, v in moe.losses.items():
            ctx.add(f"moe_{name}", v, moe.weights[name])
        if ctx.trace is not None:
            if valid_BK is None:
                rows, j = torch.meshgrid(
                    torch.arange(col_BK.shape[0], device=col_BK.device),
                    torch.arange(col_BK.shape[1], device=col_BK.device),
                    indexing="ij",
                )
                rows, j = rows.reshape(-1), j.reshape(-1)
            else:
                rows, j = valid_BK.nonzero(as_tuple=True)
            ctx.trace.record_moe((self.index, r), shape_BT, rows, col_BK[rows, j], moe.idx_NK, moe.gate_NK)
