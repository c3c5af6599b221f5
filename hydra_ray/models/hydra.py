"""HydraLM: embed -> shared recursive blocks (MoR / MoD / MoE) -> norm -> head; trace; sampling.

Design choices
- Plain torch: no Ray, no process groups. Expert parallelism swaps each MoE layer's dispatcher from
  outside (parallel/parallelize.py); nothing here branches on it.
- Features switch at run time (`set_features`), because the curriculum turns them on mid-training.
  The parameter set is fixed from construction (dense FFNs, experts and routers all exist), so the
  optimizer and checkpoint layout never change shape; switching MoE on upcycles the experts once.
  The switches live in a buffer, so a loaded checkpoint knows which features it was trained with.
- Two routing regimes: training uses expert-choice top-k over each sequence (MoD/MoR), generation
  (`causal=True`) uses each selector's causal predictor so no decision depends on a future token.
  Greedy decoding with the KV cache equals decoding that recomputes the prefix, for every feature
  combination (tests hold this). The decoder itself is the serving engine's (serve/engine.py): the
  model gives the forward (with `cache` and a per-row `start_pos`) and `sample`.
- float32 on CPU: bfloat16 matmuls are ~300x slower there; mixed precision is for GPUs (autocast
  in the trainer), the model itself is dtype-agnostic.

Shape legend: B batch, T sequence, K processed subset, D d_model, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from hydra_ray.config import ModelConfig
from hydra_ray.models.attention import Attention, KVCache, RMSNorm, upcast
from hydra_ray.models.mod import TokenRouter
from hydra_ray.models.moe import ROUTING_MODES, MoELayer, MoEOut, SwiGLU
from hydra_ray.models.mor import ForwardCtx, RecursiveBlock
from hydra_ray.models.trace import RoutingTrace


def _after_load(module: "HydraLM", incompatible_keys) -> None:
    module._load_features()


class Block(nn.Module):
    """Pre-norm transformer block that returns its residual *update* (attention + FFN/MoE)."""

    def __init__(self, cfg: ModelConfig, moe: bool, domain_to_expert: list[int]):
        super().__init__()
        d = cfg.d_model
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.attn = Attention(d, cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta, cfg.norm_eps)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        self.ffn = MoELayer(d, cfg.ffn_width, cfg.moe, domain_to_expert) if moe else SwiGLU(d, cfg.ffn_width)

    def forward(self, x_BKD, pos_BK, valid_BK, cache, domain_BK, causal: bool = False
                ) -> tuple[torch.Tensor, MoEOut | None]:
        a_BKD = self.attn(self.attn_norm(x_BKD), pos_BK, valid_BK, cache)
        h_BKD = self.ffn_norm(x_BKD + a_BKD)
        if not isinstance(self.ffn, MoELayer):
            return a_BKD + self.ffn(h_BKD), None
        B, K, D = h_BKD.shape
        if valid_BK is None:
            dom = domain_BK.reshape(-1) if domain_BK is not None else None
            out = self.ffn(h_BKD.reshape(B * K, D), dom, causal)
            f_BKD = out.y_ND.view(B, K, D)
        else:
            dom = domain_BK[valid_BK] if domain_BK is not None else None
            out = self.ffn(h_BKD[valid_BK], dom, causal)
            f_BKD = out.y_ND.new_zeros(B, K, D).index_put((valid_BK,), out.y_ND)
        return a_BKD + f_BKD, out


@dataclass
class HydraOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # ce + weighted auxiliary losses
    ce: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, mean over layers
    stats: dict[str, float] = field(default_factory=dict)
    trace: RoutingTrace | None = None


FEATURES = ("mor", "mod", "moe")


class HydraLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        expert_of = cfg.domain_expert_map()
        self.domain_to_expert = [expert_of.get(d, -1) for d in cfg.domains]
        moe_blocks, mod_blocks = set(cfg.moe_blocks()), set(cfg.mod_blocks())
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.units = nn.ModuleList(
            RecursiveBlock(i, Block(cfg, i in moe_blocks, self.domain_to_expert), cfg, i in mod_blocks)
            for i in range(cfg.n_blocks)
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # [mor, mod, moe, routing index, MoD capacity in millionths]: checkpointed so a loaded model
        # is self-describing; integers, so dtype casts (.half(), .to(bfloat16)) cannot round them
        self.register_buffer("feature_state", torch.zeros(5, dtype=torch.int64))
        self.register_load_state_dict_post_hook(_after_load)
        self._features = {"mor": False, "mod": False, "moe": False, "routing": "learned",
                          "mod_capacity": cfg.mod.capacity}
        self.reset_parameters()
        self.set_features()

    # ----------------------------------------------------------------- init / features
    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_blocks * self.cfg.mor.recursions)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norms (ones) and router biases keep their own init
            last = name.rsplit(".", 1)[-1]
            is_out = name.endswith("attn.wo.weight") or last == "w2"
            nn.init.normal_(p, std=out_std if is_out else std)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, TokenRouter):
                m.reset_router()
                for lin in (m.predictor[0], m.predictor[2]):
                    nn.init.zeros_(lin.bias)
            elif isinstance(m, MoELayer):
                nn.init.normal_(m.router.weight, std=self.cfg.moe.router_init_std)
                m.reset_buffers(self.domain_to_expert)
        if not self.feature_state.is_meta:  # e.g. after to_empty(): rewrite from the Python state
            self.set_features()

    def moe_layers(self) -> list[MoELayer]:
        return [u.block.ffn for u in self.units if isinstance(u.block.ffn, MoELayer)]

    @property
    def features(self) -> dict:
        return dict(self._features)

    def set_features(
        self,
        mor: bool | None = None,
        mod: bool | None = None,
        moe: bool | None = None,
        routing: str | None = None,
        mod_capacity: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Turn features on/off mid-run. Turning MoE on the first time upcycles its experts."""
        f = self._features
        for name, v in (("mor", mor), ("mod", mod), ("moe", moe)):
            if v is not None:
                f[name] = bool(v)
        if routing is not None:
            if routing not in ROUTING_MODES:
                raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
            f["routing"] = routing
        if mod_capacity is not None:
            if not 0 < mod_capacity <= 1:
                raise ValueError(f"mod_capacity must lie in (0, 1], got {mod_capacity}")
            f["mod_capacity"] = float(mod_capacity)
        if moe:
            for layer in self.moe_layers():
                layer.upcycle(generator)
        state = [int(f["mor"]), int(f["mod"]), int(f["moe"]), ROUTING_MODES.index(f["routing"]),
                 round(f["mod_capacity"] * 1_000_000)]
        if not self.feature_state.is_meta:
            self.feature_state.copy_(torch.tensor(state))
        self._apply_features()

    def _load_features(self) -> None:
        s = self.feature_state.tolist()
        self._features = {"mor": bool(s[0]), "mod": bool(s[1]), "moe": bool(s[2]),
                          "routing": ROUTING_MODES[int(s[3])], "mod_capacity": s[4] / 1_000_000}
        self._apply_features()

    def set_full_depth(self, on: bool) -> None:
        """The dense baseline of equal depth (`bench train`): with MoR off, every shared block still
        runs all its recursions, on every token, ungated. Not part of the curriculum or checkpoints."""
        for u in self.units:
            u.full_depth = bool(on)

    def _apply_features(self) -> None:
        f = self._features
        for u in self.units:
            u.mor_on, u.mod_on = f["mor"], f["mod"]
        for layer in self.moe_layers():
            layer.enabled, layer.routing = f["moe"], f["routing"]

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        idx_BT: torch.Tensor,
        targets_BT: torch.Tensor | None = None,
        domain_BT: torch.Tensor | None = None,
        *,
        causal: bool = False,
        cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
        return_trace: bool = False,
    ) -> HydraOutput:
        """`targets_BT` uses -100 for positions that must not reach the loss (padding, boundaries).
        `domain_BT` holds per-token domain ids (index into cfg.domains, -1 unknown).
        `start_pos`: position of column 0, one int for the batch or a [B] tensor per row; or a
        [B, T] tensor, every token's position (with `cache.packed()`: attention.pack_positions)."""
        B, T = idx_BT.shape
        if cache is not None and not causal:
            raise ValueError("a KV cache needs causal routing (causal=True)")
        f = self.features
        ctx = ForwardCtx(
            causal=causal,
            mod_capacity=f["mod_capacity"],
            domain_BT=domain_BT,
            cache=cache,
            trace=RoutingTrace(self.cfg.moe.num_experts) if return_trace else None,
        )
        if torch.is_tensor(start_pos) and start_pos.dim() == 2:  # every token's own (a packed batch)
            pos_BT = start_pos.to(idx_BT.device)
        else:  # a [B] tensor gives every row its own offset (batched decoding of ragged prompts)
            offset = start_pos.to(idx_BT.device)[:, None] if torch.is_tensor(start_pos) else start_pos
            pos_BT = (offset + torch.arange(T, device=idx_BT.device)).expand(B, T)
        x_BTD = self.embed(idx_BT)
        for unit in self.units:
            x_BTD = unit(x_BTD, pos_BT, ctx)
        x_BTD = self.norm(x_BTD)
        logits_BTV = self.head(x_BTD) if self.head is not None else F.linear(x_BTD, self.embed.weight)
        out = HydraOutput(logits_BTV, trace=ctx.trace)
        out.aux = {k: torch.stack(v).mean() for k, v in ctx.losses.items()}
        out.stats = {k: float(torch.stack(v).mean()) for k, v in ctx.stats.items()}
        if targets_BT is not None:
            out.ce = F.cross_entropy(
                upcast(logits_BTV.reshape(B * T, -1)), targets_BT.reshape(-1), ignore_index=-100
            )
            aux = ctx.aux_loss()
            out.loss = out.ce if aux is None else out.ce + aux
        return out

    @torch.no_grad()
    def trace(self, idx_BT: torch.Tensor, domain_BT: torch.Tensor | None = None) -> HydraOutput:
        """Routing trace as generation would route (causal decisions), with the logits."""
        was = self.training
        self.eval()
        try:
            return self.forward(idx_BT, domain_BT=domain_BT, causal=True, return_trace=True)
        finally:
            self.train(was)

    # ----------------------------------------------------------------- bookkeeping
    def param_category(self, name: str) -> str:
        """'router' (MoE/MoD/MoR routers and predictors), 'expert' (routed experts) or 'dense'."""
        if ".router." in name or ".predictor." in name or "mod_router" in name or "mor_routers" in name:
            return "router"
        if ".experts." in name:
            return "expert"
        return "dense"

    def param_counts(self) -> dict[str, int]:
        """total: parameters the full-featured model computes with (an MoE block's dense FFN retires
        after upcycling unless it serves as the shared expert); active: per token, top-k experts."""
        cfg = self.cfg
        total = sum(p.numel() for p in self.parameters())
        stored = total
        inactive = 0
        for layer in self.moe_layers():
            if not cfg.moe.shared_expert:
                total -= sum(p.numel() for p in layer.dense.parameters())
            per_expert = sum(p[0].numel() for p in layer.experts.parameters())
            inactive += (cfg.moe.num_experts - cfg.moe.top_k) * per_expert
        return {"total_params": total, "active_params": total - inactive, "stored_params": stored}

    def flops_per_token(self, selectors: bool = True) -> int:
        """Forward FLOPs per token with every feature on at its configured capacity: 2 x the
        parameters each application of a block multiplies with, times the expected number of
        applications (MoD capacity x sum of the MoR capacity schedule), plus attention scores
        over the average causal context, plus the LM head. Plus the token selectors in front of
        the applications (`selectors`; False for the dense baseline, which runs none): an MoD
        block's router, and each extra recursion's, score every token of the sequence, with its
        causal predictor where it selects (capacity < 1)."""
        cfg = self.cfg
        d, T = cfg.d_model, cfg.seq_len
        sched = cfg.mor.schedule()
        total = 2 * d * cfg.vocab_size
        moe_blocks, mod_blocks = set(cfg.moe_blocks()), set(cfg.mod_blocks())
        attn = sum(p.numel() for p in self.units[0].block.attn.parameters() if p.dim() == 2)
        ffn = 3 * d * cfg.ffn_width

        def selector(hidden: int, capacity: float) -> int:
            return 2 * d + (2 * (d * hidden + hidden) if capacity < 1.0 else 0) if selectors else 0

        for i in range(cfg.n_blocks):
            enter = cfg.mod.capacity if i in mod_blocks else 1.0
            ffn_active = ffn * (cfg.moe.top_k + (1 if cfg.moe.shared_expert else 0)) if i in moe_blocks else ffn
            router = d * cfg.moe.num_experts if i in moe_blocks else 0
            if i in mod_blocks:
                total += selector(cfg.mod.predictor_hidden, cfg.mod.capacity)
            for r, c in enumerate(sched):
                if r >= 1:
                    total += selector(cfg.mor.predictor_hidden, c)
                frac = enter * c  # fraction of the sequence running this application
                scores = 2 * 2 * cfg.n_heads * cfg.head_dim * (frac * T / 2)
                total += frac * (2 * (attn + ffn_active + router) + scores)
        return int(total)


GREEDY_BELOW = 1e-5  # a temperature this small is greedy; a tinier one would overflow the logits to inf


def race(probs_BV: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """One draw from each row's distribution: the argmax of p / E, E ~ Exp(1) (the exponential
    race, as vLLM samples), each row's noise from its own generator, so a row's draw does not
    depend on the rows beside it. A third of `torch.multinomial`'s time for one row here, and
    rows batch."""
    noise_BV = torch.empty_like(probs_BV)
    for b, g in enumerate(gens):
        noise_BV[b].exponential_(generator=g)
    return (probs_BV / noise_BV.clamp_(min=torch.finfo(noise_BV.dtype).tiny)).argmax(-1)


def keeps_top_k(top_k: int | None, vocab: int) -> bool:
    return top_k is not None and 0 < top_k < vocab


def keeps_top_p(top_p: float | None) -> bool:
    return top_p is not None and 0 < top_p < 1


def sample(logits_BV: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           gen: torch.Generator) -> torch.Tensor:
    logits_BV = upcast(logits_BV)
    if temperature <= GREEDY_BELOW:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV / temperature
    if keeps_top_k(top_k, logits_BV.shape[-1]):
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, -math.inf)
    if keeps_top_p(top_p):
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs = sorted_BV.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_BV = sorted_BV.masked_fill(drop, -math.inf)
        logits_BV = torch.full_like(logits_BV, -math.inf).scatter(-1, order_BV, sorted_BV)
    return race(logits_BV.softmax(-1), [gen] * logits_BV.shape[0])
