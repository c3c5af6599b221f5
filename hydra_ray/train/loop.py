"""`train_loop_per_worker`: what every Ray Train worker runs (and what one-worker runs, smoke
runs and Tune trials run in-process, through `run_local`).

Design choices
- Every decision is a function of the step (curriculum.py), every batch a function of the
  position (data/mixture.py), and all state that changes lives in the checkpoint: restoring a
  checkpoint and continuing is bitwise the same as never stopping (one worker, CPU).
- The model is built whole, the checkpoint (full weights, global expert indices) is loaded, and
  only then is it parallelised: so any worker count can resume any checkpoint (state.py).
- Collective decisions (skip a NaN step, roll back, log, save) are agreed across ranks before they
  are acted on, so every rank calls the same collectives and `ray.train.report` equally often.
- The global batch (train.batch_size sequences) is fixed; each of W workers takes a fixed slice of
  it and splits its slice into `grad_accum` micro-batches.
- Rank 0 logs one JSON object per logged step, and events such as restores, through
  `runlog.RunLog` (metrics and events parts plus TensorBoard, on a local disk or an object
  store; flushed at every eval and checkpoint). The same values go to `ray.train.report` at
  checkpoint and eval steps: a report is a barrier that waits for Ray Train's controller poll
  (2 s by default), far too slow for every logged step of a small model.
- Routing figures (expert utilisation per layer, `imbalance`, domain->expert agreement, MoD
  fraction, MoR depth) are computed here, where the routing trace is, from `RoutingTrace` and
  `utilisation.imbalance`; Tune, the analysis and the console read them from the records.
- Faults are drills of the config (`train.inject_nan_steps`), read once when the loop starts.
- Worker liveness is Ray's business (its health checks restart the group); nothing is written
  to shared storage to say a worker is alive.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import nullcontext

import numpy as np
import torch

from hydra_ray import checkpoint as ckpt
from hydra_ray import storage
from hydra_ray.config import HydraConfig, check_batch_split, parse_config
from hydra_ray.models import HydraLM
from hydra_ray.parallel.parallelize import parallelize
from hydra_ray.runlog import RunLog
from hydra_ray.timing import TIMERS
from hydra_ray.train.curriculum import plan, segments
from hydra_ray.train.env import Env, ray_train_env
from hydra_ray.train.measure import batch_ce, evaluate, flat, routing_metrics
from hydra_ray.train.state import build_optimizer, clip_grad_norm, restore, save

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- the loop
def train_loop_per_worker(config: dict, env: Env | None = None) -> dict:
    """config: {"config": HydraConfig as a dict, "run_dir", "end_step", "segments": [(L, a, b)],
    "prepared": PreparedData, "use_gpu", "tokenizer_json", "smoke" (default False)}."""
    env = env or ray_train_env(config.get("use_gpu", False))
    cfg = parse_config(config["config"])
    check_batch_split(cfg, [env.world], "world size")
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(max(1, int(os.environ.get("HYDRA_THREADS", torch.get_num_threads()))))
    run = _Run(cfg, config, env)
    try:
        return run.train(config["end_step"])
    finally:
        run.close()


class _Run:
    """One attempt of a run on this rank: model, optimizer, log and data stream, and the step."""

    def __init__(self, cfg: HydraConfig, config: dict, env: Env):
        self.cfg, self.env, self.run_dir = cfg, env, config["run_dir"]
        self.prepared = config.get("prepared")
        self.checkpoints = not config.get("smoke", False)  # a smoke run neither saves, loads nor evaluates
        self.tokenizer_json = config.get("tokenizer_json")  # the driver's copy; else the file the config names
        if self.tokenizer_json is None and cfg.data.tokenizer != "byte" and storage.is_file(cfg.data.tokenizer):
            self.tokenizer_json = storage.read_bytes(cfg.data.tokenizer)
        self.model = model = HydraLM(cfg.model)
        loaded = ckpt.agreed_latest(self.run_dir, env) if self.checkpoints else None
        if loaded is not None:
            model.load_state_dict(loaded.model)
        model.to(env.device)
        self.wrapped = parallelize(model, force=env.group_of_one, experts=cfg.train.expert_placement) if env.distributed else model
        self.opt = build_optimizer(model, cfg)
        self.metrics = RunLog(self.run_dir, enabled=env.rank == 0)
        self.step = 0
        if loaded is not None:
            restore(model, self.opt, loaded, env)
            self.step = loaded.step
            self.metrics.restart(self.step)
            self.metrics.event(event="restored", step=self.step, checkpoint=loaded.path, world_size=env.world)
        else:
            self.metrics.restart(0)  # lines of an earlier attempt that never reached a checkpoint
            self.metrics.event(event="started", world_size=env.world)
        self.stream = BatchStream(env, cfg, [tuple(s) for s in config["segments"]], self.prepared)
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) \
            if cfg.train.dtype == "bfloat16" and env.device.type == "cuda" else nullcontext()
        self.inject = set(cfg.train.inject_nan_steps)  # each fires once per attempt
        if config.get("timing"):  # `bench train`: synchronised section timers, logged as step_time_s
            TIMERS.enable(env.device)
        self.nan_run, self.tokens_total = 0, 0
        self.last_log_t, self.last_log_tokens = time.time(), 0
        self.rollbacks: dict[int, int] = {}  # checkpoint step -> roll-backs to it in this attempt

    def close(self) -> None:
        TIMERS.disable()
        self.stream.close()
        self.metrics.close()

    def train(self, end_step: int) -> dict:
        result: dict = {}
        while self.step < end_step:
            p = plan(self.cfg, self.step, self.cfg.curriculum.total_steps)
            with TIMERS.section("data"):
                batch = self.stream.get(self.step)
            switch = self._set_features(p, batch)
            for g in self.opt.param_groups:
                g["lr"] = p.lr * g["lr_scale"]
            log_now = (self.step + 1) % self.cfg.train.log_every == 0 or self.step + 1 == end_step \
                or switch is not None
            sums, trace, trace_dom = self._forward_backward(batch, want_trace=log_now)
            with TIMERS.section("optimizer"):
                ok, grad_norm, clipped = self._update(sums[0], balancing=p.phase.bias_balancing is not False)
            TIMERS.steps += 1
            self.tokens_total += self.cfg.train.batch_size * batch["input_ids"].shape[1]
            self.step += 1
            stopping = self._after_nan() if not ok and self.nan_run >= self.cfg.train.max_nan_skips else None
            if stopping == "rolled_back":
                continue
            rec = self._log(p, end_step, ok, log_now, stopping, sums, grad_norm, clipped, trace, trace_dom, switch)
            result = rec or result
            if stopping is not None:
                self.metrics.event(event="stopped", step=self.step, reason=stopping)
                return {"step": self.step, "stopped": stopping}
        return result

    # ----------------------------------------------------------------- pieces of a step
    def _set_features(self, p, batch: dict) -> dict | None:
        """Switch features as the plan says; a switch-on's cost is measured on the same batch."""
        model, f = self.model, self.model.features
        if (f["mor"], f["mod"], f["moe"], f["routing"]) == (p.mor, p.mod, p.moe, p.routing) and \
                abs(f["mod_capacity"] - p.mod_capacity) <= 1e-9:
            return None
        turned_on = [k for k in ("mor", "mod", "moe") if getattr(p, k) and not f[k]]
        before = batch_ce(model, batch, self.env, self.amp) if turned_on and self.step > 0 else None
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + self.step)  # upcycling noise
        model.set_features(mor=p.mor, mod=p.mod, moe=p.moe, routing=p.routing,
                           mod_capacity=p.mod_capacity if p.mod else None, generator=gen)
        if before is None:
            return None
        switch = {"features": turned_on, "ce_before": before, "ce_after": batch_ce(model, batch, self.env, self.amp)}
        self.metrics.event(event="switch_on", step=self.step, **switch)
        return switch

    def _forward_backward(self, batch: dict, want_trace: bool):
        """Gradients of this rank's slice, over its micro-batches; returns the averaged loss, ce,
        aux losses and predictor stats, and the last micro-batch's routing trace when logging."""
        cfg, accum = self.cfg, self.cfg.train.grad_accum
        micro = cfg.train.batch_size // self.env.world // accum
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(2, dtype=torch.float64)  # loss, ce
        aux: dict[str, float] = {}
        stats: dict[str, float] = {}  # MoD/MoR causal predictor accuracy
        trace = trace_dom = None
        for m in range(accum):
            sl = slice(m * micro, (m + 1) * micro)
            x, y, dom = batch["input_ids"][sl], batch["labels"][sl], batch["domain"][sl]
            dom_BT = dom[:, None].expand_as(x)
            last = m == accum - 1
            sync = last or not hasattr(self.wrapped, "no_sync")
            with (nullcontext() if sync else self.wrapped.no_sync()), self.amp:
                with TIMERS.section("forward"):
                    out = self.wrapped(x, y, dom_BT, return_trace=want_trace and last)
                loss = out.loss * float("nan") if self.step in self.inject else out.loss
                with TIMERS.section("backward"):
                    (loss / accum).backward()
            loss_sum += torch.tensor([loss.item(), out.ce.item()], dtype=torch.float64) / accum
            for k, v in out.aux.items():
                aux[k] = aux.get(k, 0.0) + v.item() / accum
            for k, v in out.stats.items():
                stats[k] = stats.get(k, 0.0) + v / accum
            if want_trace and last:
                trace, trace_dom = out.trace, dom_BT
        self.inject.discard(self.step)
        return (loss_sum, aux, stats), trace, trace_dom

    def _update(self, loss_sum: torch.Tensor, balancing: bool = True) -> tuple[bool, float, float]:
        """Clip and step when every rank's loss and the gradient norm are finite; else skip.
        `balancing`: the phase's bias_balancing (false: the MoE routing bias is held at zero)."""
        env = self.env
        ok = env.all_finite(loss_sum)
        grad_norm = clipped = float("nan")
        if ok:
            grad_norm, clipped = clip_grad_norm(self.model, self.cfg.train.grad_clip, env)
            ok = env.all_finite(torch.tensor([grad_norm]))
        if ok:
            self.opt.step()
            layers = self.model.moe_layers()
            if layers and env.distributed:  # every layer's expert load in one all-reduce, not one each
                acc = env.all_sum(torch.cat([layer.load_acc for layer in layers]))
                for layer, part in zip(layers, acc.split([layer.load_acc.numel() for layer in layers])):
                    layer.load_acc.copy_(part)
            for layer in layers:
                layer.balance_step(on=balancing)
            self.nan_run = 0
        else:
            self.opt.zero_grad(set_to_none=True)
            for layer in self.model.moe_layers():
                layer.load_acc.zero_()
            self.nan_run += 1
            self.metrics.event(event="nan_skipped", step=self.step + 1, consecutive=self.nan_run)
        return ok, grad_norm, clipped

    def _after_nan(self) -> str | None:
        """After max_nan_skips NaN steps in a row: roll back to the last checkpoint ("rolled_back"),
        or the reason the run cannot make progress."""
        back = ckpt.agreed_latest(self.run_dir, self.env) if self.checkpoints else None
        if back is None:  # nothing to roll back to: more steps would only skip again
            return (f"{self.nan_run} NaN/Inf steps in a row (train.max_nan_skips) at step {self.step} and no "
                    "checkpoint to roll back to")
        if self.rollbacks.get(back.step, 0) >= 2:  # batches are deterministic: it would loop forever
            return (f"NaN/Inf again after rolling back to step {back.step} twice "
                    f"({self.nan_run} in a row at step {self.step})")
        self.rollbacks[back.step] = self.rollbacks.get(back.step, 0) + 1
        restore(self.model, self.opt, back, self.env)
        self.metrics.event(event="rolled_back", step=self.step, to_step=back.step, after_nans=self.nan_run)
        self.metrics.restart(back.step)
        self.step, self.nan_run = back.step, 0
        return "rolled_back"

    def _log(self, p, end_step: int, ok: bool, log_now: bool, stopping: str | None, sums, grad_norm: float,
             clipped: float, trace, trace_dom, switch: dict | None) -> dict | None:
        """The step's record (logged, evaluated, checkpointed and reported as due); never a
        checkpoint or an eval of a state that stops the run."""
        cfg, env, step = self.cfg, self.env, self.step
        loss_sum, aux, stats = sums
        save_now = self.checkpoints and stopping is None and (step % cfg.train.save_every == 0 or step == end_step)
        eval_now = self.checkpoints and stopping is None and (step % cfg.train.eval_every == 0 or step == end_step)
        log_now = log_now or stopping is not None
        rec = None
        if log_now or save_now:
            loss_sum = env.all_sum(loss_sum) / env.world
            now = time.time()
            G = cfg.train.batch_size
            rec = {"step": step, "phase": p.phase.name, "loss": float(loss_sum[0]) if ok else None,
                   "ce": float(loss_sum[1]) if ok else None, "aux": dict(sorted(aux.items())), "lr": p.lr,
                   "grad_norm": grad_norm, "grad_norm_clipped": clipped, "tokens": step * G * cfg.model.seq_len,
                   "tokens_per_s": (self.tokens_total - self.last_log_tokens) / max(now - self.last_log_t, 1e-9),
                   "world_size": env.world, "routing_mode": p.routing if p.moe else None,
                   "mod_capacity": p.mod_capacity if p.mod else None, "nan_skipped": not ok,
                   "seed_locked": p.phase.seed is not None, "time": now, "data_wait_s": self.stream.take_wait(),
                   **stats}
            rec.update(routing_metrics(trace, trace_dom, self.model, env))
            timed = TIMERS.take()
            if timed is not None:
                rec["step_time_s"] = timed
            if switch is not None:
                rec["switch_on"] = switch
            self.last_log_t, self.last_log_tokens = now, self.tokens_total
        if eval_now:
            ev = evaluate(self.model, self.prepared, cfg, env, self.amp)
            if rec is None:
                rec = {"step": step, "phase": p.phase.name, "time": time.time(), "world_size": env.world}
            rec["eval"] = ev
        ckpt_dir = save(self.model, self.opt, env, cfg, self.run_dir, step, p.phase.name, flat(rec) if rec else {},
                        self.tokenizer_json) if save_now else None
        try:
            if rec is not None:
                if log_now or eval_now:
                    self.metrics.write(rec, flush=save_now or eval_now or step == end_step or stopping is not None)
                # ray.train.report is a barrier that waits for the controller's poll (seconds), so
                # Ray Train gets the metrics at checkpoint and eval steps; the run's log has them all
                if env.report is not None and (save_now or eval_now):
                    env.report(flat(rec), ckpt_dir, step)
        finally:
            if ckpt_dir is not None:  # Ray Train has copied it into the run by now (or failed to)
                shutil.rmtree(ckpt_dir, ignore_errors=True)
        if save_now:
            self.metrics.end_part()  # what was logged up to this checkpoint is in a closed part
        return rec


def run_local(cfg: HydraConfig, run_dir: str, prepared, end_step: int | None = None, report=None,
              smoke: bool = False, timing: bool = False) -> dict:
    """One worker, in this process (no Ray Train): `hydra-ray ablate --workers 1`, one-worker
    Tune trials, tests, and with `smoke` the smoke run: no checkpoints and no evals, every step
    logged (the run folder holds only its metrics and events)."""
    end_step = end_step or cfg.curriculum.total_steps
    loaded = None if smoke else ckpt.latest_valid(run_dir)
    if loaded is not None:
        ckpt.check_resumable(loaded, cfg.train.batch_size)
    start = loaded.step if loaded else 0
    segs = segments(cfg, start, end_step) if start < end_step else []
    return train_loop_per_worker({"config": cfg.model_dump(mode="python"), "run_dir": run_dir, "end_step": end_step,
                                  "segments": segs, "prepared": prepared, "smoke": smoke,
                                  "timing": timing},
                                 Env(report=report))
