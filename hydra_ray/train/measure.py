"""What a training step measures, beside the loss: the routing figures of a logged step (from
its `RoutingTrace`, summed over ranks; `imbalance` by its one definition), held-out loss per
domain, the CE of a batch around a feature switch, and records flattened for Ray/Tune reports."""

from __future__ import annotations

import torch

from hydra_ray.config import HydraConfig
from hydra_ray.models import HydraLM
from hydra_ray.train.env import Env
from hydra_ray.utilisation import imbalance


def routing_metrics(trace, domain_BT, model: HydraLM, env: Env) -> dict:
    """The routing figures of a logged step, summed over ranks, from the step's routing trace."""
    E = model.cfg.moe.num_experts
    by_layer = trace.expert_counts_by_layer() if trace is not None else {}
    names = sorted(by_layer)
    counts = torch.stack([by_layer[n] for n in names]).double() if names else torch.zeros(0, E, dtype=torch.float64)
    hits = torch.tensor(trace.domain_expert_hits(domain_BT, model.domain_to_expert) if trace is not None
                        else (0, 0), dtype=torch.float64)
    mod = trace.mod_selected_frac() if trace is not None else None
    mor = trace.mor_mean_depth() if trace is not None else None
    extra = torch.tensor([mod if mod is not None else 0.0, mor if mor is not None else 0.0], dtype=torch.float64)
    env.all_sum(counts)
    env.all_sum(hits)
    env.all_sum(extra)
    total = counts.sum(1, keepdim=True).clamp(min=1)
    util_layer = {n: (counts[i] / total[i]).tolist() for i, n in enumerate(names)}
    overall = counts.sum(0)
    return {
        "expert_util": (overall / overall.sum()).tolist() if names and overall.sum() > 0 else None,
        "expert_util_by_layer": util_layer or None,
        "imbalance": imbalance(util_layer),
        "domain_expert_agreement": float(hits[0] / hits[1]) if hits[1] > 0 else None,
        "mod_selected_frac": float(extra[0] / env.world) if mod is not None else None,
        "mor_mean_depth": float(extra[1] / env.world) if mor is not None else None,
    }


def flat(rec: dict) -> dict:
    """A record as flat scalars, for Ray Train's and Tune's reports (`eval_loss`, `imbalance_layer_cv`, ...)."""
    out = {k: v for k, v in rec.items() if not isinstance(v, (dict, list)) or k == "expert_util"}
    for k, v in (rec.get("eval") or {}).items():
        if not isinstance(v, dict):
            out[f"eval_{k}"] = v
    for k, v in (rec.get("imbalance") or {}).items():
        out[f"imbalance_{k}"] = v
    return out


@torch.no_grad()
def evaluate(model: HydraLM, prepared, cfg: HydraConfig, env: Env, amp) -> dict:
    """Held-out loss per domain (every rank runs the same batches: experts may live elsewhere)."""
    from hydra_ray.data.pipeline import eval_batches

    model.eval()
    by_domain = {}
    L = cfg.model.seq_len
    for d in prepared.domains:
        tot, n = 0.0, 0
        for b in eval_batches(prepared, d, L, cfg.train.eval_batch_size, cfg.train.eval_batches):
            x, y = b["input_ids"].to(env.device), b["labels"].to(env.device)
            dom = b["domain"].to(env.device)[:, None].expand_as(x)
            with amp:
                out = model(x, y, dom)  # not through DDP: nothing to synchronise in eval
            count = int((y != -100).sum())
            tot += out.ce.item() * count
            n += count
        if n:
            by_domain[d] = tot / n
    model.train()
    loss = sum(by_domain.values()) / len(by_domain) if by_domain else None
    return {"loss": loss, "by_domain": by_domain}


@torch.no_grad()
def batch_ce(model: HydraLM, batch: dict, env: Env, amp) -> float:
    """CE of this rank's batch with the current features, averaged over ranks (no update)."""
    was = model.training
    model.eval()
    x, y, dom = batch["input_ids"], batch["labels"], batch["domain"]
    with amp:
        ce = model(x, y, dom[:, None].expand_as(x)).ce.double().cpu().view(1)
    model.train(was)
    return float(env.all_sum(ce) / env.world)
