"""`train_loop_per_worker`: what every Ray Train worker runs (and what one-worker runs and Tune
trials run in-process).

Design choices
- Every decision is a function of the step (curriculum.py), every batch a function of the
  position (data/mixture.py), and all state that changes lives in the checkpoint: restoring a
  checkpoint and continuing is bitwise the same as never stopping (one worker, CPU).
- The model is built whole, the checkpoint (full weights, global expert indices) is loaded, and
  only then is it parallelised: so any worker count can resume any checkpoint.
- Collective decisions (skip a NaN step, roll back, log, save) are agreed across ranks before they
  are acted on, so every rank calls the same collectives and `ray.train.report` equally often.
- The global batch (train.batch_size sequences) is fixed; each of W workers takes a fixed slice of
  it and splits its slice into `grad_accum` micro-batches. Gradient norms count expert gradients
  once, from the rank that owns them.
- Rank 0 logs one JSON object per logged step, and events such as restores, through
  `runlog.RunLog` (metrics and events parts plus TensorBoard, on a local disk or an object
  store; flushed at every eval and checkpoint). The same values go to `ray.train.report` at
  checkpoint and eval steps: a report is a barrier that waits for Ray Train's controller poll
  (2 s by default), far too slow for every logged step of a small model.
- Worker liveness is Ray's business (its health checks restart the group); nothing is written
  to shared storage to say a worker is alive.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from hydra_ray.config import HydraConfig, dump_config, parse_config
from hydra_ray.models import HydraLM
from hydra_ray.models.trace import imbalance
from hydra_ray.parallel.dispatch import expert_shard
from hydra_ray.parallel.parallelize import expert_param_names, gather_expert_state, gather_experts, parallelize
from hydra_ray import storage
from hydra_ray import checkpoint as ckpt
from hydra_ray.train.curriculum import plan, segments
from hydra_ray.runlog import RunLog

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- environment
@dataclass
class Env:
    """Where the loop runs: rank/world, device, and how reports are made."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[..., None] | None = None  # (metrics, checkpoint_dir or None, step) -> None
    ray_checkpoints: bool = False  # True: checkpoints travel through report(); else written in place

    @property
    def distributed(self) -> bool:
        return self.world > 1 and dist.is_initialized()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t


def ray_train_env(use_gpu: bool) -> Env:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def report(metrics, ckpt_dir, step):
        from ray.train import Checkpoint

        if ckpt_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(ckpt_dir)) if ctx.get_world_rank() == 0
                             else None, checkpoint_dir_name=f"checkpoints/{ckpt.step_dir_name(step)}")

    return Env(ctx.get_world_rank(), ctx.get_world_size(), device, report=report, ray_checkpoints=True)


# --------------------------------------------------------------------------- data stream
class BatchStream:
    """This rank's slice of each global batch, read from the packed shards (data/reader.py), for
    the steps of the run's segments; measures how long steps wait for data."""

    def __init__(self, env: Env, cfg: HydraConfig, segs: list[tuple[int, int, int]], prepared):
        self.env, self.cfg, self.segs, self.prepared = env, cfg, segs, prepared
        self.reader = None
        self.next_step = None
        self.wait_s, self.gets = 0.0, 0

    def _open(self, step: int):
        from hydra_ray.data.reader import RankReader

        end = next(b for _, a, b in self.segs if a <= step < b)
        self.close()
        self.reader = RankReader(self.prepared, self.cfg, self.cfg.train.batch_size, self.env.rank, self.env.world,
                                 step, end)

    def get(self, step: int) -> dict:
        if self.reader is None or step != self.next_step or step >= self.reader.end:
            self._open(step)
        before = self.reader.wait_s
        s, batch = next(self.reader)
        if s != step:
            raise RuntimeError(f"data reader gave step {s} for step {step}")
        self.wait_s += self.reader.wait_s - before
        self.gets += 1
        self.next_step = step + 1
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.env.device) for k, v in batch.items()}

    def take_wait(self) -> float:
        """Mean seconds a step waited for its batch since the last call."""
        mean = self.wait_s / max(self.gets, 1)
        self.wait_s, self.gets = 0.0, 0
        return mean

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None


# --------------------------------------------------------------------------- optimizer
def build_optimizer(model: HydraLM, cfg: HydraConfig) -> torch.optim.AdamW:
    scales = {"dense": 1.0, "router": cfg.model.moe.router_lr_scale, "expert": cfg.model.moe.expert_lr_scale}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((model.param_category(name), p.dim() >= 2), []).append(p)
    param_groups = [{"params": ps, "weight_decay": cfg.train.weight_decay if decay else 0.0,
                     "lr_scale": scales[cat], "name": f"{cat}{'' if decay else '_nodecay'}"}
                    for (cat, decay), ps in sorted(groups.items())]
    return torch.optim.AdamW(param_groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=1e-8)


def _gather_optimizer(model: HydraLM, opt, env: Env) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    local = ckpt.optimizer_tensors(opt, names)
    if env.distributed:
        experts = set(expert_param_names(model))
        for key in sorted(local):
            if key.rpartition("::")[0] in experts and local[key].dim() > 0:
                local[key] = gather_experts(local[key], model.cfg.moe.num_experts)
    return local


def _expert_slices(model: HydraLM, env: Env) -> dict[str, slice]:
    """Global expert rows of this rank's shard, per expert parameter (nothing to cut on one rank)."""
    if not env.distributed:
        return {}
    lo, n = expert_shard(model.cfg.moe.num_experts, env.rank, env.world)
    return {name: slice(lo, lo + n) for name, _ in model.named_parameters() if ".experts." in name}


def restore(model: HydraLM, opt, loaded: ckpt.Loaded, env: Env) -> None:
    """Load a full checkpoint into a (possibly expert-sharded) model and its optimizer."""
    slices = _expert_slices(model, env)
    state = {k: (v[slices[k]] if k in slices else v) for k, v in loaded.model.items()}
    model.load_state_dict(state)
    if opt is not None:
        opt.state.clear()
        ckpt.load_optimizer_tensors(opt, dict(model.named_parameters()), loaded.optimizer, slices)
    if "rng" in loaded.trainer_state:
        torch.set_rng_state(torch.tensor(loaded.trainer_state["rng"], dtype=torch.uint8))


# --------------------------------------------------------------------------- metrics
def _routing_metrics(trace, domain_BT, model: HydraLM, env: Env) -> dict:
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


# --------------------------------------------------------------------------- the loop
def _finite_flag(env: Env, *values: torch.Tensor) -> bool:
    bad = torch.tensor([0.0 if all(bool(torch.isfinite(v).all()) for v in values) else 1.0])
    return env.all_max(bad).item() == 0.0


def _clip(model: HydraLM, max_norm: float, env: Env) -> tuple[float, float]:
    experts = set(expert_param_names(model)) if env.distributed else set()
    dense_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    grads = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if name in experts:
            expert_sq += sq
        else:
            dense_sq += sq
    env.all_sum(expert_sq.view(1))
    norm = math.sqrt(float(dense_sq + expert_sq))
    coef = min(1.0, max_norm / (norm + 1e-6)) if math.isfinite(norm) else 1.0
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)
    return norm, min(norm, max_norm) if math.isfinite(norm) else norm


def train_loop_per_worker(config: dict, env: Env | None = None) -> dict:
    """config: {"config": HydraConfig as a dict, "run_dir", "end_step", "segments": [(L, a, b)],
    "prepared": PreparedData, "use_gpu"}."""
    env = env or ray_train_env(config.get("use_gpu", False))
    cfg = parse_config(config["config"])
    run_dir = config["run_dir"]
    end_step = config["end_step"]
    G = cfg.train.batch_size
    if G % (env.world * cfg.train.grad_accum):
        raise ValueError(f"train.batch_size {G} must divide into {env.world} workers x {cfg.train.grad_accum} "
                         "accumulation steps")
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(max(1, int(os.environ.get("HYDRA_THREADS", torch.get_num_threads()))))
    model = HydraLM(cfg.model)
    loaded = ckpt.latest_valid(run_dir)
    if loaded is not None:
        model.load_state_dict(loaded.model)
    model.to(env.device)
    wrapped = parallelize(model) if env.world > 1 else model
    opt = build_optimizer(model, cfg)
    metrics = RunLog(run_dir, enabled=env.rank == 0)
    start = 0
    if loaded is not None:
        restore(model, opt, loaded, env)
        start = loaded.step
        metrics.restart(start)
        metrics.event(event="restored", step=start, checkpoint=loaded.path, world_size=env.world)
    else:
        metrics.restart(0)  # lines of an earlier attempt that never reached a checkpoint
        metrics.event(event="started", world_size=env.world)
    stream = BatchStream(env, cfg, [tuple(s) for s in config["segments"]], config["prepared"])
    try:
        return _train(model, wrapped, opt, metrics, stream, env, cfg, config, run_dir, start, end_step)
    finally:
        stream.close()
        metrics.close()


def _train(model: HydraLM, wrapped, opt, metrics: RunLog, stream: BatchStream, env: Env, cfg: HydraConfig,
           config: dict, run_dir: str, start: int, end_step: int) -> dict:
    G = cfg.train.batch_size
    tokenizer_json = config.get("tokenizer_json")  # the driver's copy; else the file the config names
    if tokenizer_json is None and cfg.data.tokenizer != "byte" and storage.is_file(cfg.data.tokenizer):
        tokenizer_json = storage.read_bytes(cfg.data.tokenizer)
    prepared = config.get("prepared")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.train.dtype == "bfloat16" and env.device.type == "cuda" \
        else nullcontext()
    inject = {int(s) for s in os.environ.get("HYDRA_INJECT_NAN_AT", "").split(",") if s.strip()}
    nan_run, tokens_total, last_log_t, last_log_tokens = 0, 0, time.time(), 0
    rollbacks: dict[int, int] = {}  # checkpoint step -> roll-backs to it in this attempt
    step = start
    micro = G // env.world // cfg.train.grad_accum
    result: dict = {}
    while step < end_step:
        p = plan(cfg, step, cfg.curriculum.total_steps)
        f = model.features
        batch = stream.get(step)
        switch = None
        if (f["mor"], f["mod"], f["moe"], f["routing"]) != (p.mor, p.mod, p.moe, p.routing) or \
                abs(f["mod_capacity"] - p.mod_capacity) > 1e-9:
            turned_on = [k for k in ("mor", "mod", "moe") if getattr(p, k) and not f[k]]
            before = _batch_ce(model, batch, env, amp) if turned_on and step > 0 else None
            gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)  # upcycling noise
            model.set_features(mor=p.mor, mod=p.mod, moe=p.moe, routing=p.routing,
                               mod_capacity=p.mod_capacity if p.mod else None, generator=gen)
            if before is not None:  # the cost of switching on, measured on the same batch
                switch = {"features": turned_on, "ce_before": before, "ce_after": _batch_ce(model, batch, env, amp)}
                metrics.event(event="switch_on", step=step, **switch)
        for g in opt.param_groups:
            g["lr"] = p.lr * g["lr_scale"]
        log_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == end_step or switch is not None
        model.train()
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(2, dtype=torch.float64)  # loss, ce
        aux_sum: dict[str, float] = {}
        stat_sum: dict[str, float] = {}  # MoD/MoR causal predictor accuracy
        trace, trace_dom = None, None
        for m in range(cfg.train.grad_accum):
            sl = slice(m * micro, (m + 1) * micro)
            x, y, dom = batch["input_ids"][sl], batch["labels"][sl], batch["domain"][sl]
            dom_BT = dom[:, None].expand_as(x)
            want_trace = log_now and m == cfg.train.grad_accum - 1
            sync = m == cfg.train.grad_accum - 1 or not hasattr(wrapped, "no_sync")
            with (nullcontext() if sync else wrapped.no_sync()), amp:
                out = wrapped(x, y, dom_BT, return_trace=want_trace)
                loss = out.loss
                if step in inject:
                    loss = loss * float("nan")
                (loss / cfg.train.grad_accum).backward()
            loss_sum += torch.tensor([loss.item(), out.ce.item()], dtype=torch.float64) / cfg.train.grad_accum
            for k, v in out.aux.items():
                aux_sum[k] = aux_sum.get(k, 0.0) + v.item() / cfg.train.grad_accum
            for k, v in out.stats.items():
                stat_sum[k] = stat_sum.get(k, 0.0) + v / cfg.train.grad_accum
            if want_trace:
                trace, trace_dom = out.trace, dom_BT
        inject.discard(step)
        ok = _finite_flag(env, loss_sum)
        grad_norm, clipped = (float("nan"), float("nan"))
        if ok:
            grad_norm, clipped = _clip(model, cfg.train.grad_clip, env)
            ok = _finite_flag(env, torch.tensor([grad_norm]))
        if ok:
            opt.step()
            for layer in model.moe_layers():
                env.all_sum(layer.load_acc)
                layer.balance_step()
            nan_run = 0
        else:
            opt.zero_grad(set_to_none=True)
            for layer in model.moe_layers():
                layer.load_acc.zero_()
            nan_run += 1
            metrics.event(event="nan_skipped", step=step + 1, consecutive=nan_run)
        tokens_total += G * batch["input_ids"].shape[1]
        step += 1
        stopping = None  # why the run cannot make progress: this step is logged, then it ends
        if not ok and nan_run >= cfg.train.max_nan_skips:
            back = ckpt.latest_valid(run_dir)
            if back is None:  # nothing to roll back to: more steps would only skip again
                stopping = (f"{nan_run} NaN/Inf steps in a row (train.max_nan_skips) at step {step} and no "
                            "checkpoint to roll back to")
            elif rollbacks.get(back.step, 0) >= 2:  # batches are deterministic: it would loop forever
                stopping = (f"NaN/Inf again after rolling back to step {back.step} twice "
                            f"({nan_run} in a row at step {step})")
            else:
                rollbacks[back.step] = rollbacks.get(back.step, 0) + 1
                restore(model, opt, back, env)
                metrics.event(event="rolled_back", step=step, to_step=back.step, after_nans=nan_run)
                metrics.restart(back.step)
                step, nan_run = back.step, 0
                continue
        # never a checkpoint or an eval of a state that stops the run
        save_now = stopping is None and (step % cfg.train.save_every == 0 or step == end_step)
        eval_now = stopping is None and prepared is not None and (step % cfg.train.eval_every == 0 or step == end_step)
        log_now = log_now or stopping is not None
        rec = None
        if log_now or save_now:
            loss_sum = env.all_sum(loss_sum) / env.world
            now = time.time()
            rec = {"step": step, "phase": p.phase.name, "loss": float(loss_sum[0]) if ok else None,
                   "ce": float(loss_sum[1]) if ok else None,
                   "aux": {k: v for k, v in sorted(aux_sum.items())}, "lr": p.lr,
                   "grad_norm": grad_norm, "grad_norm_clipped": clipped, "tokens": step * G * cfg.model.seq_len,
                   "tokens_per_s": (tokens_total - last_log_tokens) / max(now - last_log_t, 1e-9),
                   "world_size": env.world, "routing_mode": p.routing if p.moe else None,
                   "mod_capacity": p.mod_capacity if p.mod else None, "nan_skipped": not ok,
                   "seed_locked": p.phase.seed is not None, "time": now, "data_wait_s": stream.take_wait(),
                   **stat_sum}
            rec.update(_routing_metrics(trace, trace_dom, model, env))
            if switch is not None:
                rec["switch_on"] = switch
            last_log_t, last_log_tokens = now, tokens_total
        if eval_now:
            ev = evaluate(model, prepared, cfg, env, amp)
            if rec is None:
                rec = {"step": step, "phase": p.phase.name, "time": time.time(), "world_size": env.world}
            rec["eval"] = ev
        ckpt_dir = None
        if save_now:
            ckpt_dir = _save(model, opt, env, cfg, run_dir, step, p, rec, tokenizer_json)
        if rec is not None:
            if log_now or eval_now:
                metrics.write(rec, flush=save_now or eval_now or step == end_step or stopping is not None)
            result = rec
            # ray.train.report is a barrier that waits for the controller's poll (seconds), so
            # Ray Train gets the metrics at checkpoint and eval steps; metrics.jsonl has them all
            if env.report is not None and (save_now or eval_now):
                env.report(_flat(rec), ckpt_dir, step)
        if ckpt_dir is not None:  # Ray Train has copied it into the run by now
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        if save_now:
            metrics.end_part()  # what was logged up to this checkpoint is in a closed part
        if stopping is not None:
            metrics.event(event="stopped", step=step, reason=stopping)
            return {"step": step, "stopped": stopping}
    return result


@torch.no_grad()
def _batch_ce(model: HydraLM, batch: dict, env: Env, amp) -> float:
    """CE of this rank's batch with the current features, averaged over ranks (no update)."""
    was = model.training
    model.eval()
    x, y, dom = batch["input_ids"], batch["labels"], batch["domain"]
    with amp:
        ce = model(x, y, dom[:, None].expand_as(x)).ce.double().cpu().view(1)
    model.train(was)
    return float(env.all_sum(ce) / env.world)


def _flat(rec: dict) -> dict:
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


def _save(model: HydraLM, opt, env: Env, cfg: HydraConfig, run_dir: str, step: int, p, rec,
          tokenizer_json: bytes | None = None) -> Path | None:
    state = gather_expert_state(model)
    opt_state = _gather_optimizer(model, opt, env)
    trainer_state = {"step": step, "phase": p.phase.name, "data_position": step * cfg.train.batch_size,
                     "global_batch": cfg.train.batch_size, "world_size": env.world,
                     "rng": torch.get_rng_state().tolist(), "metrics": _flat(rec) if rec else {}}
    parts = dict(model_state=state, opt_state=opt_state, trainer_state=trainer_state,
                 config_yaml=dump_config(ckpt.portable_config(cfg) if tokenizer_json is not None else cfg),
                 tokenizer_json=tokenizer_json)
    if env.rank != 0:
        return None
    if not env.ray_checkpoints:  # in-process: write straight into the run
        ckpt.save_local(run_dir, step, cfg.train.keep_checkpoints, **parts)
        return None
    return ckpt.write(Path(tempfile.mkdtemp(prefix=f"hydra-ckpt-{step}-")), **parts)


def run_local(cfg: HydraConfig, run_dir: str, prepared, end_step: int | None = None, report=None) -> dict:
    """One worker, in this process (no Ray Train): used by tests, one-worker Tune trials and
    `hydra-ray train --workers 1 --local`."""
    end_step = end_step or cfg.curriculum.total_steps
    loaded = ckpt.latest_valid(run_dir)
    start = loaded.step if loaded else 0
    segs = segments(cfg, start, end_step) if start < end_step else []
    return train_loop_per_worker({"config": cfg.model_dump(mode="python"), "run_dir": run_dir, "end_step": end_step,
                                  "segments": segs, "prepared": prepared}, Env(report=report))
