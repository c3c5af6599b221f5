"""`hydra-ray tune`: the command, its flags and the sweep's settings.

    hydra-ray tune --config C --space S --samples N [--scheduler asha|none] [--storage DIR|URI]
                   [--workers-per-trial K] [--name NAME] [--max-steps N] [--resume]
                   [--metric eval_loss|task_math|task_code|task_chat|task_mean] [--task-n N]

Design choices
- Everything the user can get wrong (config, space file, flags, storage) is checked before Ray
  starts; a mistake is one `ConfigError` line, exit 2.
- STORAGE is a local path or a URI (s3://bucket/prefix), checked with `storage.check_storage`
  before Ray starts. Every file of the sweep goes through `hydra_ray.storage`, Tune's own
  experiment files through RunConfig(storage_path=STORAGE), which takes URIs itself. On a
  multi-node cluster STORAGE must be a URI or a filesystem every node sees.
- The objective (`--metric`) is `eval_loss` (minimised) or a held-out task score of
  `hydra-ray eval` (maximised): each trial scores the checkpoint of each eval on `--task-n`
  generated items per task (trial.Objective). Scoring costs greedy decoding at every eval, so keep
  `--task-n` small; ties between trials go to the lower eval loss.
- ASHA (`--scheduler asha`) stops trials on the objective with the training *step* as its clock
  (`time_attr="step"`): a resumed trial keeps its place on the step axis, which Tune's
  `training_iteration` (reset when a trial restarts without a Tune checkpoint, as Train v2 trials
  do) would not. The default grace period is the first eval after MoE switches on, so trials are
  compared once the routing hyper-parameters have had an effect; `--grace-period` overrides it.
- Resources: a trial holds K x `--cpus-per-worker` CPUs. Ray Data's tasks need free CPUs beside
  the trials, so at most free CPUs // (K x cpus + 1) trials run at once (`--max-concurrent`
  overrides). On a local Ray of C cores we declare enough logical CPUs to run C // (K x cpus)
  trials that way: on a 2-core machine, 2 one-worker trials at once on 4 logical CPUs.
- sweep.json keeps the sweep's settings. `--resume` restores Tune's experiment (`Tuner.restore`):
  finished trials are kept as they are, unfinished ones continue from their run directory,
  errored ones are run again. The command must be the same as the interrupted one (compared with
  sweep.json). Ctrl+C (SIGINT) stops a sweep cleanly: Tune saves its state and the command exits
  with status 130.
- Nothing heavy is imported at module level: the CLI imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from hydra_ray import storage
from hydra_ray.config import ConfigError, HydraConfig, check_batch_split, dump_config, load_config
from hydra_ray.tune.results import collect, fmt, scheme_of, status_callback, table, write_outputs
from hydra_ray.tune.space import Entry, load_space, validate_space
from hydra_ray.tune.trial import METRIC, OBJECTIVES, Objective, run_trial, trial_dirname, trial_name

EXIT_INTERRUPTED = 130


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="base training config (YAML path or preset name)")
    p.add_argument("--space", required=True, help="search space YAML, e.g. configs/sweeps/routing.yaml")
    p.add_argument("--samples", type=int, required=True,
                   help="samples of the space (each grid combination is run this many times)")
    p.add_argument("--scheduler", default="asha", choices=["asha", "none"],
                   help="asha: stop weak trials early on the objective; none: run every trial to the end")
    p.add_argument("--metric", default=METRIC, choices=OBJECTIVES,
                   help="objective: eval_loss (lower is better) or a held-out task score of `hydra-ray eval` "
                        "(higher is better; task_mean averages math, code and chat), measured at every eval")
    p.add_argument("--task-n", type=int, default=16,
                   help="with a task --metric: held-out items per task scored at each eval")
    p.add_argument("--storage", default="runs/tune",
                   help="the sweep goes to STORAGE/NAME (local path or URI such as s3://bucket/tune)")
    p.add_argument("--name", default=None, help="sweep name (default: CONFIG-SPACE file stems)")
    p.add_argument("--workers-per-trial", type=int, default=1,
                   help="1: the training loop in the trial's process; K > 1: a Ray Train run of K workers")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: as many as the cluster's CPUs hold, with room for Ray Data)")
    p.add_argument("--max-steps", type=int, default=None, help="stop every trial after this many steps")
    p.add_argument("--grace-period", type=int, default=None,
                   help="ASHA: steps before a trial can be stopped (default: the first eval after MoE switches on)")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep the best 1/F at each rung")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling the space (default: random)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep: finished trials are kept, the others continue")


# --------------------------------------------------------------------------- sweep settings
def _moe_on_step(cfg: HydraConfig) -> int | None:
    start = 0
    for p in cfg.curriculum.phases:
        if p.moe:
            return start
        start = p.until_step
    return None


def default_grace(cfg: HydraConfig, end_step: int) -> int:
    """The first eval step after MoE switches on (or the first eval when it never does)."""
    every = cfg.train.eval_every
    on = _moe_on_step(cfg)
    first = every * (on // every + 1) if on is not None else every
    return max(1, min(first, end_step))


def _sweep_dir(args: argparse.Namespace) -> str:
    """STORAGE/NAME, once STORAGE is known to take writes (a probe object; StorageError otherwise)."""
    name = args.name or f"{os.path.splitext(storage.name(args.config))[0]}-{Path(args.space).stem}"
    if not name or "/" in name:
        raise ConfigError(f"--name {name!r}: expected a plain folder name")
    return storage.join(storage.check_storage(args.storage, "--storage"), name)


def _settings(args: argparse.Namespace, cfg: HydraConfig, entries: list[Entry]) -> dict:
    for flag, value, low in (("--samples", args.samples, 1), ("--workers-per-trial", args.workers_per_trial, 1),
                             ("--max-steps", args.max_steps, 1), ("--grace-period", args.grace_period, 1),
                             ("--max-concurrent", args.max_concurrent, 1), ("--task-n", args.task_n, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value}: must be at least {low}")
    if not args.cpus_per_worker > 0:
        raise ConfigError(f"--cpus-per-worker {args.cpus_per_worker}: must be positive")
    if not args.reduction_factor > 1:
        raise ConfigError(f"--reduction-factor {args.reduction_factor}: must be greater than 1")
    K = args.workers_per_trial
    check_batch_split(cfg, [K], "--workers-per-trial")
    end_step = min(cfg.curriculum.total_steps, args.max_steps or cfg.curriculum.total_steps)
    grace = args.grace_period or default_grace(cfg, end_step)
    if grace > end_step:
        raise ConfigError(f"--grace-period {grace}: beyond the trials' last step ({end_step})")
    grid = math.prod(len(e.values) for e in entries if e.kind == "grid")
    config = args.config if storage.is_uri(args.config) else str(Path(args.config))
    return {"config": config, "config_yaml": dump_config(cfg),
            "space": {e.key: e.spec() for e in entries}, "samples": args.samples, "trials": args.samples * grid,
            "scheduler": args.scheduler, "workers_per_trial": K, "cpus_per_worker": args.cpus_per_worker,
            "end_step": end_step, "grace_period": grace, "reduction_factor": args.reduction_factor,
            "seed": args.seed, "metric": args.metric, "task_n": args.task_n}


# settings a sweep.json written before they existed stands for
_SETTING_DEFAULTS = {"metric": METRIC, "task_n": 16}


def _objective(settings: dict) -> Objective:
    return Objective(settings["metric"], settings["task_n"])


def _check_resume(saved: dict, now: dict, sweep_dir: str) -> None:
    for key in ("config_yaml", "space", "samples", "scheduler", "workers_per_trial", "cpus_per_worker",
                "end_step", "grace_period", "reduction_factor", "seed", "metric", "task_n"):
        if json.loads(json.dumps(saved.get(key, _SETTING_DEFAULTS.get(key)))) != json.loads(json.dumps(now[key])):
            what = {"config_yaml": "--config", "space": "--space", "end_step": "--max-steps"}.get(
                key, "--" + key.replace("_", "-"))
            raise ConfigError(f"--resume: {what} differs from the sweep in {sweep_dir} (see its sweep.json); "
                              "resume with the command that started it")


def _plan_resources(K: int, cpus: float) -> tuple[float, int]:
    """(CPUs a trial holds, trials that fit at once beside Ray Data) on the running cluster. Counts
    the CPUs free now, not the total: CPUs held by something else (a Serve app, another job) must
    not be promised to the trials' Ray Data tasks, or they would wait for them forever."""
    import ray

    per_trial = K * cpus
    free = float(ray.available_resources().get("CPU", 0))
    return per_trial, max(1, int(free // (per_trial + 1)))


def _local_cpus(K: int, cpus: float) -> float:
    """Logical CPUs for a local Ray: room for cores // (K x cpus) trials, each beside one CPU for
    its Ray Data tasks (oversubscribing the cores, as `hydra-ray train` does)."""
    per_trial = K * cpus
    fit = max(1, int((os.cpu_count() or 1) // per_trial))
    return fit * (per_trial + 1)


# --------------------------------------------------------------------------- the command
def _new_tuner(trainable, entries: list[Entry], settings: dict, sweep_dir: str, concurrent: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    objective = _objective(settings)
    if settings["scheduler"] == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=settings["end_step"], grace_period=settings["grace_period"],
                                  reduction_factor=settings["reduction_factor"])
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space={e.key: e.tune_domain() for e in entries},
        tune_config=tune.TuneConfig(
            metric=objective.name, mode=objective.mode, num_samples=settings["samples"], scheduler=scheduler,
            # the generator, not TuneConfig.max_concurrent_trials, when a search_alg is given
            search_alg=BasicVariantGenerator(max_concurrent=concurrent, random_state=settings["seed"]),
            trial_dirname_creator=trial_dirname, trial_name_creator=trial_name,
        ),
        run_config=tune.RunConfig(storage_path=storage.parent(sweep_dir), name=storage.name(sweep_dir),
                                  callbacks=[status_callback(settings["end_step"], scheme_of(sweep_dir), objective)]),
    )


def run(args: argparse.Namespace, log=print) -> int:
    # everything the user can get wrong is checked before Ray starts
    cfg = load_config(args.config)
    base = cfg.model_dump(mode="python")
    entries = load_space(args.space)
    validate_space(entries, base, args.space)
    settings = _settings(args, cfg, entries)
    sweep_dir = _sweep_dir(args)
    runs = storage.join(sweep_dir, "runs")
    from ray.tune import Tuner  # heavy: only once the inputs are known to be good

    exists = storage.exists(sweep_dir) and Tuner.can_restore(sweep_dir)
    if args.resume:
        if not exists:
            raise ConfigError(f"--resume: no sweep to resume in {sweep_dir}")
        try:
            saved = json.loads(storage.read_text(storage.join(sweep_dir, "sweep.json")))
        except (FileNotFoundError, ValueError):  # missing, or not JSON / UTF-8
            raise ConfigError(f"--resume: {sweep_dir}/sweep.json is missing or unreadable") from None
        _check_resume(saved, settings, sweep_dir)
    elif storage.listdir(sweep_dir):
        raise ConfigError(f"sweep {sweep_dir} already exists: pass --resume to continue it, "
                          "or choose another --name")

    from ray import tune

    from hydra_ray.data.corpus import CorpusError
    from hydra_ray.data.pipeline import pack_cache, prepare_data
    from hydra_ray.raystart import ray_init

    K, cpus = settings["workers_per_trial"], settings["cpus_per_worker"]
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials keep the command's working directory
    ray_init(log, min_cpus=_local_cpus(K, cpus))
    per_trial, fit = _plan_resources(K, cpus)
    concurrent = min(args.max_concurrent or fit, settings["trials"])
    try:
        prepared = prepare_data(cfg, log=log, cache=pack_cache(storage.parent(sweep_dir)))
    except CorpusError as e:
        raise ConfigError(str(e)) from None
    storage.makedirs(runs)
    if not args.resume:
        storage.write_text(storage.join(sweep_dir, "sweep.json"), json.dumps(settings, indent=1) + "\n")

    objective = _objective(settings)
    setup = {"base": base, "runs": runs, "end_step": settings["end_step"], "workers": K,
             "cpus_per_worker": cpus, "objective": objective}
    # K = 1: the loop runs in the trial's own process, which holds the CPUs. K > 1: the trial
    # process only waits on its Train run, whose workers hold the CPUs (Tune refuses 0).
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup, prepared=prepared),
                                    {"CPU": per_trial} if K == 1 else {"CPU": 0.01})
    log(f"[tune] {sweep_dir}: {settings['trials']} trial(s) of {settings['end_step']} steps, {concurrent} at once, "
        f"{K} worker(s) x {cpus:g} CPU each; objective {objective.name} ({objective.mode}"
        + (f", {objective.n} items per task at each eval" if objective.tasks else "") + f"); scheduler {settings['scheduler']}"
        + (f" (grace {settings['grace_period']} steps, reduction factor {settings['reduction_factor']:g})"
           if settings["scheduler"] == "asha" else ""))
    t0 = time.time()
    if args.resume:
        tuner = Tuner.restore(sweep_dir, trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = _new_tuner(trainable, entries, settings, sweep_dir, concurrent)
    grid = tuner.fit()
    rows = collect(grid, entries, settings["end_step"], sweep_dir, objective)
    unfinished = [r for r in rows if r["status"] == "unfinished"]
    interrupted = bool(unfinished) or len(rows) < settings["trials"]
    out = write_outputs(sweep_dir, rows, entries, base, settings, final=not interrupted, objective=objective)
    log("")
    log(table(rows, entries, out["front_ids"], out["best"]["trial"] if out["best"] else None, objective))
    log(f"\n[tune] {len(rows)} trial(s) in {time.time() - t0:.0f}s: "
        + ", ".join(f"{sum(r['status'] == s for r in rows)} {s}"
                    for s in ("completed", "stopped", "error", "unfinished") if any(r["status"] == s for r in rows)))
    log(f"[tune] table: {storage.join(sweep_dir, 'trials.csv')}")
    if interrupted:
        log("[tune] the sweep was interrupted: continue it with the same command and --resume")
        return EXIT_INTERRUPTED
    log(f"[tune] Pareto set ({objective.name}, imbalance): {storage.join(sweep_dir, 'pareto.csv')} "
        f"({', '.join(r['trial'] for r in out['front']) or 'empty'})")
    if out["best"] is None:
        print("error: no trial completed: see the errors in trials.csv", file=sys.stderr)
        return 1
    best = out["best"]
    best_yaml = storage.join(sweep_dir, "best.yaml")
    log(f"[tune] best: {best_yaml} (trial {best['trial']}, {objective.name} {fmt(best[objective.name])}); "
        f"train it with: hydra-ray train --config {best_yaml}")
    return 0
