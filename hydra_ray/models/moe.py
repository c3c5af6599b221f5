"""Mixture-of-Experts FFN: router, SwiGLU experts, and the dense FFN they are upcycled from.

Design choices
- Before MoE switches on, the layer is the block's dense SwiGLU FFN. Switching on *upcycles* it:
  every expert becomes a copy of the dense FFN plus small noise, and the router starts near
  uniform. The dense FFN then retires, unless `shared_expert` is set, in which case it becomes the
  always-on shared expert: the routed experts' output projections are halved at upcycling and the
  shared expert's output is scaled by 0.5 in forward, so the sum starts as the dense FFN and the
  dense weights themselves never change (switching MoE off again restores the dense layer).
  The parameter set never changes shape, so optimizer state and checkpoints stay stable across
  the curriculum.
- Gates are softmax probabilities scaled by E / k ("relative to uniform"): a near-uniform router
  then gives gates that sum to ~1, so an upcycled layer computes ~ the dense FFN and switching MoE
  on costs no loss cliff, while the gate still depends smoothly on the router (it gets gradient).
  With one expert the gate is exactly 1, so one expert == the dense FFN.
- Selection is top-k of (probabilities + balancing bias); the bias (DeepSeek-V3 aux-loss-free
  balancing) only ever affects *which* experts are chosen, never the gate values.
- Routing modes: `learned` (top-k + Switch load-balance loss), `forced` (a token whose domain is
  in `domain_expert_map` goes to that expert alone with gate 1; the router learns the mapping
  through the teacher loss meanwhile), `teacher` (learned routing plus teacher_weight x CE of the
  router logits against the mapped expert), `free` (the computation of `learned`; the name marks
  routing after domain supervision so reports can compare the two). Tokens with no mapped domain
  always route as `learned`.
- Capacity: C = ceil(capacity_factor * N * k / E) per expert; first choices queue before second
  choices, then token order; overflow slots get expert id -1 and are dropped. inf = dropless.
  Capacity applies to training's non-causal forwards only: a causal forward (generation) must
  not let one token's routing depend on another's, so it never drops. The balance loss and the
  balancing bias count the routed load *before* dropping, so an overloaded expert is seen as such.
- Dispatch goes through `self.dispatcher` (parallel/dispatch.py); expert math sees only local rows.

Shape legend: N tokens, K top-k, E experts, D d_model, F expert hidden, A kept assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from hydra_ray.config import MoEConfig
from hydra_ray.models.attention import upcast
from hydra_ray.parallel.dispatch import Dispatcher, LocalDispatcher

ROUTING_MODES = ("learned", "forced", "teacher", "free")


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(hidden, d_model))
        self.w3 = nn.Parameter(torch.empty(hidden, d_model))
        self.w2 = nn.Parameter(torch.empty(d_model, hidden))
        for w in (self.w1, self.w3, self.w2):  # HydraLM re-initialises with depth-scaled stds
            nn.init.normal_(w, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w1, self.w3, self.w2)


def grouped_swiglu(x_AD, w1_EFD, w3_EFD, w2_EDF, counts: list[int]):
    """E SwiGLU experts over rows grouped by expert (`counts[e]` rows each), written into one
    output: (y_AD, and the hidden pre-activations h1_AF, h3_AF the backward needs)."""
    A, Fh = x_AD.shape[0], w1_EFD.shape[1]
    h1_AF, h3_AF = x_AD.new_empty(A, Fh), x_AD.new_empty(A, Fh)
    y_AD = x_AD.new_empty(A, w2_EDF.shape[1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            rows = slice(start, start + n)
            torch.mm(x_AD[rows], w1_EFD[e].t(), out=h1_AF[rows])
            torch.mm(x_AD[rows], w3_EFD[e].t(), out=h3_AF[rows])
            torch.mm(F.silu(h1_AF[rows]) * h3_AF[rows], w2_EDF[e].t(), out=y_AD[rows])
        start += n
    return y_AD, h1_AF, h3_AF


class _GroupedSwiGLU(torch.autograd.Function):
    """E SwiGLU experts over rows grouped by expert (`counts[e]` rows each), as one autograd node.
    The forward writes every expert's rows into one output (no concatenation); the backward
    writes each expert's weight gradients straight into one [E, ...] buffer per weight. Through
    autograd, each expert's gradient would be a separate tensor stacked afterwards (a copy of all
    expert gradients per call, 3 per layer and recursion). Same dtype throughout (the caller falls
    back to autograd under autocast)."""

    @staticmethod
    def forward(ctx, x_AD, w1_EFD, w3_EFD, w2_EDF, counts):
        y_AD, h1_AF, h3_AF = grouped_swiglu(x_AD, w1_EFD, w3_EFD, w2_EDF, counts)
        ctx.save_for_backward(x_AD, w1_EFD, w3_EFD, w2_EDF, h1_AF, h3_AF)
        ctx.counts = counts
        return y_AD

    @staticmethod
    def backward(ctx, gy_AD):
        x_AD, w1, w3, w2, h1_AF, h3_AF = ctx.saved_tensors
        gx_AD = torch.empty_like(x_AD)
        g1, g3, g2 = torch.empty_like(w1), torch.empty_like(w3), torch.empty_like(w2)
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n:  # an expert without rows has a zero gradient
                g1[e].zero_(), g3[e].zero_(), g2[e].zero_()
                continue
            rows = slice(start, start + n)
            x, gy, h1, h3 = x_AD[rows], gy_AD[rows], h1_AF[rows], h3_AF[rows]
            act = F.silu(h1)
            torch.mm(gy.t(), act * h3, out=g2[e])
            gg = gy @ w2[e]  # d(act * h3)
            gh3 = gg * act
            gh1 = torch.ops.aten.silu_backward(gg * h3, h1)
            torch.mm(gh1.t(), x, out=g1[e])
            torch.mm(gh3.t(), x, out=g3[e])
            torch.mm(gh1, w1[e], out=gx_AD[rows])
            gx_AD[rows].addmm_(gh3, w3[e])
            start += n
        return gx_AD, g1, g3, g2, None


class Experts(nn.Module):
    """E SwiGLU experts stored stacked (w1_EFD, w3_EFD, w2_EDF): global expert e is row e - offset."""

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=0.02)

    def forward(self, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows of x_AD are grouped by local expert, `counts[e]` rows each."""
        if any(counts) and not torch.is_autocast_enabled(x_AD.device.type) and \
                x_AD.dtype == self.w1.dtype == self.w3.dtype == self.w2.dtype:
            if not torch.is_grad_enabled():  # generation: no autograd node to build
                return grouped_swiglu(x_AD, self.w1, self.w3, self.w2, counts)[0]
            return _GroupedSwiGLU.apply(x_AD, self.w1, self.w3, self.w2, list(counts))
        outs, start = [], 0
        # unbind, not w[e]: the backward of w[e] zero-fills a gradient of every expert's size per
        # expert and adds them up; unbind's backward stacks the E gradients once
        w1, w3, w2 = self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)
        for e, n in enumerate(counts):
            if n:
                outs.append(swiglu(x_AD[start : start + n], w1[e], w3[e], w2[e]))
            start += n
        if not outs:  # no rows at all: stay in the autograd graph (collectives in backward need it,
            # and every rank's expert weights get a gradient, so optimizer state exists on all ranks).
            # `w[:1].sum(0)` is expert 0, or zeros on a rank that owns no experts (more ranks than experts)
            return swiglu(x_AD, *(w[:1].sum(0) for w in (self.w1, self.w3, self.w2)))
        return torch.cat(outs)


@dataclass
class MoEOut:
    y_ND: torch.Tensor
    idx_NK: torch.Tensor | None = None  # chosen experts, -1 = dropped (None: dense mode)
    gate_NK: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted lb / z / teacher
    weights: dict[str, float] = field(default_factory=dict)  # their weights in the training loss


class MoELayer(nn.Module):
    def __init__(self, d_model: int, hidden: int, cfg: MoEConfig, domain_to_expert: list[int]):
        super().__init__()
        self.cfg = cfg
        self.E, self.k = cfg.num_experts, cfg.top_k
        self.dense = SwiGLU(d_model, hidden)
        self.router = nn.Linear(d_model, self.E, bias=False)
        nn.init.normal_(self.router.weight, std=cfg.router_init_std)
        self.experts = Experts(self.E, d_model, hidden)
        self.register_buffer("expert_bias", torch.zeros(self.E))
        self.register_buffer("domain_expert", torch.tensor(domain_to_expert or [-1], dtype=torch.long))
        self.register_buffer("upcycled", torch.tensor(False))
        self.register_buffer("load_acc", torch.zeros(self.E), persistent=False)
        self.enabled = False
        self.routing = "learned"
        self.dispatcher: Dispatcher = LocalDispatcher()

    @torch.no_grad()
    def reset_buffers(self, domain_to_expert: list[int]) -> None:
        self.expert_bias.zero_()
        self.load_acc.zero_()
        self.upcycled.fill_(False)
        self.domain_expert.copy_(torch.tensor(domain_to_expert or [-1], dtype=torch.long))

    # ----------------------------------------------------------------- switch-on
    @torch.no_grad()
    def upcycle(self, generator: torch.Generator | None = None) -> None:
        """Experts <- dense FFN + noise; router near uniform. Idempotent (the flag is checkpointed)."""
        if self.upcycled.is_meta or bool(self.upcycled):
            return
        off = self.dispatcher.expert_offset
        n_local = self.experts.w1.shape[0]
        half = 0.5 if self.cfg.shared_expert else 1.0  # routed half + shared half (see forward)
        for name in ("w1", "w3", "w2"):
            src = getattr(self.dense, name)
            dst = getattr(self.experts, name)
            scale = half if name == "w2" else 1.0
            noise = torch.randn((self.E, *src.shape), generator=generator, dtype=src.dtype)
            noise = noise[off : off + n_local].to(src.device)
            dst.copy_(src[None] * scale * (1 + self.cfg.upcycle_noise * noise))
        w = torch.randn(self.router.weight.shape, generator=generator) * self.cfg.router_init_std
        self.router.weight.copy_(w.to(self.router.weight))
        self.expert_bias.zero_()
        self.upcycled.fill_(True)

    @torch.no_grad()
    def balance_step(self, on: bool = True) -> None:
        """Aux-loss-free balancing: nudge under-loaded experts' bias up, over-loaded down. `on`
        False (a phase with `bias_balancing: false`): the bias is cleared and held at zero."""
        if not on:
            self.expert_bias.zero_()
        elif self.cfg.bias_balancing and self.load_acc.sum() > 0:
            self.expert_bias.add_(self.cfg.bias_rate * torch.sign(self.load_acc.mean() - self.load_acc))
        self.load_acc.zero_()

    # ----------------------------------------------------------------- forward
    def forward(self, x_ND: torch.Tensor, domain_N: torch.Tensor | None = None, causal: bool = False) -> MoEOut:
        """`causal`: no decision may depend on other tokens (generation), so capacity never drops.
        The auxiliary losses are computed only where they can be trained on (grad enabled)."""
        want_losses = torch.is_grad_enabled()
        if not self.enabled:
            return MoEOut(self.dense(x_ND))
        N, E, k = x_ND.shape[0], self.E, self.k
        xr = x_ND
        if self.training and self.cfg.jitter > 0:
            xr = x_ND * torch.empty_like(x_ND).uniform_(1 - self.cfg.jitter, 1 + self.cfg.jitter)
        logits_NE = upcast(self.router(xr))
        probs_NE = logits_NE.softmax(-1)
        select_NE = probs_NE + self.expert_bias if self.cfg.bias_balancing else probs_NE
        idx_NK = select_NE.topk(k, dim=-1).indices
        gate_NK = probs_NE.gather(1, idx_NK) * (E / k)

        mapped_N = None
        if domain_N is not None and self.routing in ("forced", "teacher"):
            n = self.domain_expert.numel()
            known_N = (domain_N >= 0) & (domain_N < n)
            mapped_N = torch.where(known_N, self.domain_expert[domain_N.clamp(0, n - 1)], -1)
        if self.routing == "forced" and mapped_N is not None:
            forced_N = mapped_N >= 0
            idx_NK = idx_NK.clone()
            gate_NK = gate_NK.clone()
            idx_NK[forced_N, 0] = mapped_N[forced_N]
            gate_NK[forced_N, 0] = 1.0
            if k > 1:
                idx_NK[forced_N, 1:] = -1
                gate_NK[forced_N, 1:] = 0.0

        # routed load before capacity: the balance loss and bias balancing must see the overload
        count_E = torch.bincount(idx_NK[idx_NK >= 0], minlength=E).float() if want_losses or self.training else None
        if self.training and not causal and math.isfinite(self.cfg.capacity_factor):
            idx_NK = self._drop_overflow(idx_NK)

        losses: dict[str, torch.Tensor] = {}
        if want_losses:
            if self.routing in ("learned", "teacher", "free"):
                frac_E = count_E / max(N * k, 1)
                losses["lb"] = E * (frac_E * probs_NE.mean(0)).sum()
            losses["z"] = torch.logsumexp(logits_NE, -1).pow(2).mean()
            if mapped_N is not None and (mapped_N >= 0).any():
                m = mapped_N >= 0
                losses["teacher"] = F.cross_entropy(logits_NE[m], mapped_N[m])
        weights = {"lb": self.cfg.aux_weight, "z": self.cfg.z_loss, "teacher": self.cfg.teacher_weight}
        if self.training:
            self.load_acc += count_E.detach()

        x_AD, counts, plan = self.dispatcher.dispatch(x_ND, idx_NK, E)
        y_AD = self.experts(x_AD, counts)
        y_ND = self.dispatcher.combine(y_AD, gate_NK, plan)
        if self.cfg.shared_expert:
            y_ND = y_ND + 0.5 * self.dense(x_ND)
        return MoEOut(y_ND, idx_NK, gate_NK, losses, weights)

    def _drop_overflow(self, idx_NK: torch.Tensor) -> torch.Tensor:
        N, K = idx_NK.shape
        cap = math.ceil(self.cfg.capacity_factor * N * K / self.E)
        flat_S = idx_NK.t().reshape(-1)  # first choices of all tokens queue before second choices
        oh_SE = F.one_hot(flat_S.clamp(min=0), self.E) * (flat_S >= 0)[:, None]
        pos_S = (oh_SE.cumsum(0) * oh_SE).sum(-1) - 1
        keep_S = (pos_S < cap) & (flat_S >= 0)
        return torch.where(keep_S, flat_S, -1).view(K, N).t()
