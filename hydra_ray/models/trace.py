"""The routing trace: what every router decided for every token of one forward pass.

Design choices
- One trace type feeds training metrics (expert utilisation, MoD fraction, MoR depth,
  domain->expert agreement), the serving endpoint (per-token routing JSON) and the analysis.
- It holds small detached tensors laid out by (row, column) of the forward's input, so recording it
  costs a few index writes per layer; everything derived is computed on demand.
- MoE layers are named by (block, recursion): a shared block applied R times is R MoE layers.
  A slot with expert -1 did not run (MoD skip, MoR exit, or dropped by capacity); a token ran a
  layer when any of its slots is >= 0.

Shape legend: B batch, T sequence, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RoutingTrace:
    num_experts: int
    moe: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    mod: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # selected, score
    mor: dict[int, torch.Tensor] = field(default_factory=dict)  # depth per token

    # ----------------------------------------------------------------- recording
    def record_moe(self, key, shape_BT, rows, cols, idx_NK, gate_NK):
        if key not in self.moe:
            K = idx_NK.shape[1]
            self.moe[key] = (
                torch.full((*shape_BT, K), -1, dtype=torch.long, device=idx_NK.device),
                torch.zeros((*shape_BT, K), dtype=torch.float32, device=idx_NK.device),
            )
        exp_BTK, gate_BTK = self.moe[key]
        exp_BTK[rows, cols] = idx_NK.detach()
        gate_BTK[rows, cols] = gate_NK.detach().float()

    # ----------------------------------------------------------------- summaries
    def moe_layers(self) -> list[str]:
        return [f"b{b}r{r}" for b, r in sorted(self.moe)]

    def expert_counts_by_layer(self, valid_BT: torch.Tensor | None = None,
                               by_row: bool = False) -> dict[str, torch.Tensor]:
        """Tokens per expert in each MoE layer: [E] per layer, or [B, E] (one row per sequence)
        with `by_row`. `valid_BT` (a boolean mask that broadcasts to [B, T]) keeps only those
        positions, e.g. a batch's real tokens and not its padding; None counts every position."""
        out = {}
        for (b, r), (exp_BTK, _) in sorted(self.moe.items()):
            if valid_BT is not None:
                keep_BT = valid_BT.to(exp_BTK.device).expand(exp_BTK.shape[:2])
                exp_BTK = exp_BTK.masked_fill(~keep_BT[..., None], -1)
            if by_row:  # expert -1 goes to column 0, which is dropped
                B = exp_BTK.shape[0]
                flat_BN = (exp_BTK + 1).reshape(B, -1)
                c_BE = torch.zeros(B, self.num_experts + 1, dtype=torch.long, device=exp_BTK.device)
                out[f"b{b}r{r}"] = c_BE.scatter_add_(1, flat_BN, torch.ones_like(flat_BN))[:, 1:].cpu()
            else:
                e = exp_BTK[exp_BTK >= 0]
                out[f"b{b}r{r}"] = torch.bincount(e, minlength=self.num_experts).cpu()
        return out

    def expert_counts_by_group(self, groups_GT: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tokens per expert in each MoE layer of a one-row forward, [G, E] per layer: row g counts
        the positions `groups_GT[g]` marks (a packed forward: each sequence's own tokens)."""
        out = {}
        for (b, r), (exp_BTK, _) in sorted(self.moe.items()):
            e_TK = exp_BTK[0].cpu()  # on the host: integer matmuls are a CPU thing
            oh_TE = torch.zeros(e_TK.shape[0], self.num_experts + 1, dtype=torch.long)
            oh_TE.scatter_add_(1, e_TK + 1, torch.ones_like(e_TK))  # expert -1 to column 0, dropped
            out[f"b{b}r{r}"] = groups_GT.cpu().long() @ oh_TE[:, 1:]
        return out

    def expert_counts(self, valid_BT: torch.Tensor | None = None) -> torch.Tensor | None:
        by = self.expert_counts_by_layer(valid_BT)
        return torch.stack(list(by.values())).sum(0) if by else None

    @staticmethod
    def fractions(counts: torch.Tensor) -> list[float]:
        total = float(counts.sum())
        return [float(c) / total if total else 0.0 for c in counts]

    def expert_util(self) -> list[float] | None:
        c = self.expert_counts()
        return None if c is None else self.fractions(c)

    def expert_util_by_layer(self) -> dict[str, list[float]] | None:
        by = self.expert_counts_by_layer()
        return {k: self.fractions(v) for k, v in by.items()} or None

    def mod_selected_frac(self) -> float | None:
        if not self.mod:
            return None
        return float(torch.stack([s.float().mean() for s, _ in self.mod.values()]).mean())

    def mor_mean_depth(self) -> float | None:
        if not self.mor:
            return None
        return float(torch.stack([d.float().mean() for d in self.mor.values()]).mean())

    def domain_expert_agreement(self, domain_BT: torch.Tensor | None, domain_expert: list[int]) -> float | None:
        """Fraction of (token, MoE layer) pairs with a mapped domain whose first expert is the mapped one."""
        hit, tot = self.domain_expert_hits(domain_BT, domain_expert)
        return hit / tot if tot else None

    def domain_expert_hits(self, domain_BT: torch.Tensor | None, domain_expert: list[int],
                           valid_BT: torch.Tensor | None = None) -> tuple[int, int]:
        """(pairs routed to their domain's expert, pairs that ran with a mapped domain): the counts
        behind the agreement, so several ranks can add theirs up. `valid_BT` (a boolean mask that
        broadcasts to [B, T]) keeps only those positions, e.g. one row's real tokens."""
        if domain_BT is None or not self.moe or not domain_expert:
            return 0, 0
        table = torch.tensor(domain_expert, device=domain_BT.device)
        known = (domain_BT >= 0) & (domain_BT < len(domain_expert))
        mapped_BT = torch.where(known, table[domain_BT.clamp(0, len(domain_expert) - 1)], -1)
        if valid_BT is not None:
            mapped_BT = mapped_BT.masked_fill(~valid_BT.to(mapped_BT.device).expand(mapped_BT.shape), -1)
        hit = tot = 0
        for exp_BTK, _ in self.moe.values():  # a dropped first choice counts as a miss
            ran = (exp_BTK >= 0).any(-1) & (mapped_BT >= 0)
            hit += int((exp_BTK[..., 0][ran] == mapped_BT[ran]).sum())
            tot += int(ran.sum())
        return hit, tot

    def tokens(self, row: int = 0, n: int | None = None) -> list[dict]:
        """Per-token records for one row (its first `n` positions; all when None):
        {'moe': {layer: {experts, gates}}, 'mod': {...}, 'mor': {...}}. Gates and MoD scores to 6
        decimals: the float noise of differently batched matmuls stays below that."""
        T = next(iter([*self.mor.values(), *(s for s, _ in self.mod.values()),
                       *(e[..., 0] for e, _ in self.moe.values())]), torch.empty(1, 0)).shape[1]
        T = T if n is None else min(n, T)
        # the row's values as Python lists once, rounded in one tensor op: indexing tensors
        # element by element costs microseconds a value, which made this loop most of a served trace
        moe = [(f"b{b}r{r}", e[row, :T].tolist(), torch.round(g[row, :T].double(), decimals=6).tolist())
               for (b, r), (e, g) in sorted(self.moe.items())]
        mod = [(f"b{b}", s[row, :T].tolist(), torch.round(c[row, :T].double(), decimals=6).tolist())
               for b, (s, c) in sorted(self.mod.items())]
        mor = [(f"b{b}", d[row, :T].tolist()) for b, d in sorted(self.mor.items())]
        # column by column (one comprehension per layer), then one record per token
        moe_cols = [(name, [{"experts": ex, "gates": g} if min(ex) >= 0 else _kept(ex, g) if max(ex) >= 0 else None
                            for ex, g in zip(ex_TK, gate_TK)]) for name, ex_TK, gate_TK in moe]
        mod_cols = [(name, [{"selected": bool(x), "score": y} for x, y in zip(sel_T, score_T)])
                    for name, sel_T, score_T in mod]
        return [{"moe": {name: col[t] for name, col in moe_cols if col[t] is not None},
                 "mod": {name: col[t] for name, col in mod_cols},
                 "mor": {name: depth_T[t] for name, depth_T in mor}} for t in range(T)]


def _kept(ex: list[int], gates: list[float]) -> dict:
    """A token's slots that ran (expert >= 0), of a layer where some did not."""
    keep = [i for i, e in enumerate(ex) if e >= 0]
    return {"experts": [ex[i] for i in keep], "gates": [gates[i] for i in keep]}
