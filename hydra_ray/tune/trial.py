"""One trial of a sweep, and what it reports to Tune.

Design choices
- A trial is a function trainable (`run_trial`). With `--workers-per-trial 1` it runs the training
  loop in-process (`run_local`, one torch thread per CPU it holds) and calls `tune.report` at
  every eval; with K > 1 it launches a Train v2 `TorchTrainer` from inside the trial function
  (Train v2 cannot be passed to a `Tuner`) whose `TuneReportCallback` forwards the workers' eval
  reports. Trials checkpoint at every eval (save_every := eval_every, keep 1) so each report is
  an eval.
- Run directories live at STORAGE/NAME/runs/TRIAL_ID (metrics and events parts, checkpoints/),
  the same layout as `hydra-ray train`; a restarted trial continues from its run's last
  checkpoint (both paths resume by themselves).
- Objective (`--metric`): `eval_loss` (held-out CE, lower is better) at the trial's last report,
  or a held-out task score (`task_math`, `task_code`, `task_chat`, or `task_mean` of the three;
  higher is better): `evaluation.task_scores` of the checkpoint written with that report, so every
  report carries the objective (Tune checks it is in each one, and ASHA compares trials on it at
  each rung). Each report then also carries `eval_loss` and the scores it measured. Second
  metric, `imbalance`: the loop's own per-layer imbalance (`utilisation.imbalance`, logged as
  each metrics record's `imbalance`), its `layer_cv` averaged over the logged steps since the
  previous eval (read back with the one metrics reader, `runlog.read_records`; the loop flushes
  its log at every eval); `util_max_min` is the largest `layer_max_min` of those steps. When no
  logged step of the window has it, the report's own `imbalance_layer_cv` /
  `imbalance_layer_max_min` (from the loop's `_flat`) stand in. Before MoE switches on both are
  None. Tune computes no imbalance of its own.
- Trial ids are Tune's: folders trial_ID, names ID.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from hydra_ray import checkpoint as ckpt
from hydra_ray import runlog, storage
from hydra_ray.config import HydraConfig, dump_config, parse_config
from hydra_ray.tune.space import apply_values
from hydra_ray.utilisation import from_log

METRIC = "eval_loss"
SECOND = "imbalance"
OBJECTIVES = (METRIC, "task_math", "task_code", "task_chat", "task_mean")


@dataclass(frozen=True)
class Objective:
    """What a sweep optimises: `name` (one of OBJECTIVES), and for a task score the held-out
    items per task (`n`) and their seed."""

    name: str = METRIC
    n: int = 16
    seed: int = 0

    @property
    def mode(self) -> str:
        return "min" if self.name == METRIC else "max"

    @property
    def tasks(self) -> tuple[str, ...]:
        from hydra_ray.evaluation import TASKS

        if self.name == METRIC:
            return ()
        return TASKS if self.name == "task_mean" else (self.name.removeprefix("task_"),)

    def as_cost(self, value: float) -> float:
        """The objective as a cost, for sorting and the Pareto set."""
        return value if self.mode == "min" else -value

    def measure(self, ckpt_path: str | None) -> dict:
        """The task scores of the report's checkpoint: {task_X: score, ..., name: objective}."""
        if not self.tasks:
            return {}
        if ckpt_path is None:
            raise RuntimeError(f"--metric {self.name}: the report at this eval has no checkpoint to score")
        from hydra_ray.evaluation import task_scores

        scores = {f"task_{k}": v for k, v in task_scores(ckpt_path, self.tasks, self.n, self.seed).items()}
        if self.name == "task_mean":
            scores["task_mean"] = sum(scores.values()) / len(scores)
        return scores


def trial_config(base: dict, values: dict[str, Any]) -> HydraConfig:
    """A trial's config: the base with its sampled values, checkpointing at every eval (so every
    report to Tune carries an eval loss) and keeping one checkpoint per trial."""
    data = apply_values(base, values)
    data["train"]["save_every"] = data["train"]["eval_every"]
    data["train"]["keep_checkpoints"] = 1
    return parse_config(data, "trial config")


# --------------------------------------------------------------------------- metrics of a report
def window_imbalance(run_dir: str, lo: int, hi: int, flat: dict) -> tuple[float | None, float | None]:
    """(mean `layer_cv`, max `layer_max_min`) of the loop's `imbalance` over the logged steps in
    (lo, hi]; else the report `flat`'s own; (None, None) while MoE is off. A strict-JSON record
    keeps an infinite max/min (an expert that got nothing) as null: read back as inf."""
    window = [r["imbalance"] for r in runlog.read_records(run_dir, after=lo)
              if r["step"] <= hi and isinstance(r.get("imbalance"), dict)]
    if not window:
        return flat.get("imbalance_layer_cv"), flat.get("imbalance_layer_max_min")
    cvs = [m["layer_cv"] for m in window if m.get("layer_cv") is not None]
    ratios = [from_log(m)["layer_max_min"] for m in window]
    return (sum(cvs) / len(cvs) if cvs else None), max(ratios)


def tune_metrics(flat: dict, run_dir: str, window: int, objective: Objective = Objective(),
                 ckpt_path: str | None = None) -> dict:
    """What a trial reports to Tune, from one report of the training loop (`train.measure.flat`);
    with a task objective, the scores of the checkpoint at `ckpt_path` (default: the run's
    checkpoint of this step)."""
    step = int(flat["step"])
    cv, ratio = window_imbalance(run_dir, step - window, step, flat)
    if objective.tasks and ckpt_path is None:
        ckpt_path = storage.join(run_dir, "checkpoints", ckpt.step_dir_name(step))
    return {"step": step, "phase": flat.get("phase"), METRIC: flat.get("eval_loss"), SECOND: cv,
            "util_max_min": ratio, "loss": flat.get("loss"), "ce": flat.get("ce"),
            "routing_mode": flat.get("routing_mode"), "world_size": flat.get("world_size"),
            **objective.measure(ckpt_path)}


def _last_eval(run_dir: str) -> dict | None:
    """The loop's flat report of the run's last eval (for a trial whose run had already ended)."""
    for r in reversed(runlog.read_records(run_dir)):
        if r.get("eval") and r["eval"].get("loss") is not None:
            flat = {k: v for k, v in r.items() if not isinstance(v, dict)}
            flat["eval_loss"] = r["eval"]["loss"]
            return flat
    return None


# --------------------------------------------------------------------------- the trial
def run_trial(config: dict, setup: dict, prepared) -> None:
    """One trial (runs in a Tune actor): the base config with this trial's values, trained to
    `end_step` in STORAGE/NAME/runs/TRIAL_ID, continuing from that run's last checkpoint."""
    import ray.tune
    import torch

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(setup["base"], config)
    run_dir = storage.join(setup["runs"], trial_id)
    end_step, window = setup["end_step"], cfg.train.eval_every
    objective = setup.get("objective", Objective())
    storage.write_text(storage.join(run_dir, "config.yaml"), dump_config(cfg))
    threads = max(1, int(setup["cpus_per_worker"]))
    os.environ["HYDRA_THREADS"] = str(threads)  # read by the training loop (and Train workers)
    torch.set_num_threads(threads)

    # the run ended (its final checkpoint complete) before Tune heard of it: report it again
    if any(s >= end_step and ckpt.is_complete(run_dir, s) for s, _ in ckpt.list_steps(run_dir)):
        flat = _last_eval(run_dir)
        if flat is not None:
            ray.tune.report(tune_metrics(flat, run_dir, window, objective))
        return
    if setup["workers"] == 1:
        from hydra_ray.train.loop import run_local

        def report(flat, ckpt_dir, _step):
            if flat.get("eval_loss") is not None:  # checkpoint-only steps carry no objective
                ray.tune.report(tune_metrics(flat, run_dir, window, objective, ckpt_dir))

        run_local(cfg, run_dir, prepared, end_step=end_step, report=report)
    else:
        _train_v2(cfg, run_dir, trial_id, setup, prepared, window, objective)


def _tune_report_callback(run_dir: str, window: int, objective: Objective):
    """`TuneReportCallback` that turns the workers' reports into `tune_metrics` first."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class Report(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            # rank 0's report, as TuneReportCallback forwards it; the checkpoint stays in the run dir
            # (a task objective scores it there: the workers wrote it before reporting)
            super().after_report(run_context, [tune_metrics(metrics[0], run_dir, window, objective)], None)

    return Report()


def _train_v2(cfg: HydraConfig, run_dir: str, trial_id: str, setup: dict, prepared, window: int,
              objective: Objective) -> None:
    """K workers on Ray Train v2, launched from inside the trial (`driver.build_trainer`, with a
    TuneReportCallback): the run is RUNS/TRIAL_ID, so a restarted trial continues it."""
    from hydra_ray.train.driver import build_trainer

    latest = ckpt.latest_valid(run_dir)
    trainer = build_trainer(cfg, prepared, run_dir, setup["runs"], trial_id, latest.step if latest else 0,
                            setup["end_step"], setup["workers"], cpus_per_worker=setup["cpus_per_worker"],
                            keep=1, callbacks=[_tune_report_callback(run_dir, window, objective)])
    result = trainer.fit()
    if getattr(result, "error", None):
        raise RuntimeError(f"trial {trial_id}: training failed: {result.error}")


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def trial_name(trial) -> str:
    return trial.trial_id
