"""`hydra-ray tune`: Ray Tune sweeps of routing hyper-parameters.

    hydra-ray tune --config C --space S --samples N [--scheduler asha|none] [--storage DIR|URI]
                   [--workers-per-trial K] [--name NAME] [--max-steps N] [--resume]

Design choices
- The space file is YAML: one entry per swept field, keyed by its dotted config path, whose value
  is one distribution: `{choice: [..]}`, `{grid: [..]}`, `{uniform: [low, high]}` or
  `{loguniform: [low, high]}` (configs/sweeps/routing.yaml). Everything is checked before Ray
  starts: the distribution and its arguments, that the key is a real config field, and that the
  config stays valid with every choice/grid value and with each range's ends and an inner point
  (applied through `parse_config`, so pydantic names the problem), alone and all together. A
  mistake is one `ConfigError` line naming the file and the entry. Keys that would change the
  prepared data (data.*, domains, vocab, sequence lengths, mixtures) are refused: every trial
  shares one `prepare_data` result, passed to the trials with `tune.with_parameters`.
- A trial is a function trainable. With `--workers-per-trial 1` it runs the training loop
  in-process (`run_local`, one torch thread per CPU it holds) and calls `tune.report` at every
  eval; with K > 1 it launches a Train v2 `TorchTrainer` from inside the trial function (Train v2
  cannot be passed to a `Tuner`) whose `TuneReportCallback` forwards the workers' eval reports.
  Trials checkpoint at every eval (save_every := eval_every, keep 1) so each report is an eval.
- STORAGE is a local path or a URI (s3://bucket/prefix), checked with `storage.check_storage`
  before Ray starts. Every file of the sweep goes through `hydra_ray.storage`, Tune's own
  experiment files through RunConfig(storage_path=STORAGE), which takes URIs itself. Run
  directories live at STORAGE/NAME/runs/TRIAL_ID (metrics and events parts, checkpoints/), the
  same layout as `hydra-ray train`; a restarted trial continues from its run's last checkpoint
  (both paths resume by themselves). On a multi-node cluster STORAGE must be a URI or a
  filesystem every node sees.
- Objective: `eval_loss` (held-out CE, lower is better) at the trial's last report. Second
  metric, `imbalance`: the coefficient of variation (std / mean) of each MoE layer's expert
  utilisation, averaged over the logged steps since the previous eval (read back with the one
  metrics reader, `runlog.read_records`; the loop flushes its log at every eval) and then over
  layers (0 is perfectly balanced; per layer so that two layers collapsing onto different experts
  do not look balanced when pooled). `util_max_min` (max / min utilisation of the worst layer) is reported
  beside it. Before MoE switches on both are empty.
- ASHA (`--scheduler asha`) stops trials on `eval_loss` with the training *step* as its clock
  (`time_attr="step"`): a resumed trial keeps its place on the step axis, which Tune's
  `training_iteration` (reset when a trial restarts without a Tune checkpoint, as Train v2 trials
  do) would not. The default grace period is the first eval after MoE switches on, so trials are
  compared once the routing hyper-parameters have had an effect; `--grace-period` overrides it.
- Resources: a trial holds K x `--cpus-per-worker` CPUs. Ray Data's tasks need free CPUs beside
  the trials, so at most free CPUs // (K x cpus + 1) trials run at once (`--max-concurrent`
  overrides). On a local Ray of C cores we declare enough logical CPUs to run C // (K x cpus)
  trials that way: on this 2-core machine, 2 one-worker trials at once on 4 logical CPUs.
- Outputs under STORAGE/NAME, beside Tune's own experiment files: trials.csv (every trial with
  status, last step, Tune iterations, metrics and sampled values), pareto.csv (the completed
  trials that no other completed trial beats on both eval_loss and imbalance), best.yaml (the
  complete config with the lowest final eval_loss: the --config file with that trial's values,
  which `hydra-ray train --config best.yaml` takes as it is), sweep.json (the sweep's settings)
  and trial_status.jsonl (how each trial ended, written by a Tune callback: Tune's own statuses
  cannot tell a trial ASHA stopped from one that an interruption stopped; object stores cannot
  append, so the callback rewrites the file whole at each trial's end). Trials stopped by
  ASHA or errored are listed but are neither Pareto nor best: their last eval is from an earlier
  step.
- `--resume` restores Tune's experiment (`Tuner.restore`): finished trials are kept as they are,
  unfinished ones continue from their run directory, errored ones are run again. The command
  must be the same as the interrupted one (compared with sweep.json). Ctrl+C (SIGINT) stops a
  sweep cleanly: Tune saves its state and the command exits with status 130.
- Nothing heavy is imported at module level: the CLI imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import os
import posixpath
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hydra_ray import storage
from hydra_ray.config import ConfigError, HydraConfig, did_you_mean, dump_config, load_config, parse_config
from hydra_ray import runlog

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform")
METRIC = "eval_loss"
SECOND = "imbalance"
EXIT_INTERRUPTED = 130


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="base training config (YAML path or preset name)")
    p.add_argument("--space", required=True, help="search space YAML, e.g. configs/sweeps/routing.yaml")
    p.add_argument("--samples", type=int, required=True,
                   help="samples of the space (each grid combination is run this many times)")
    p.add_argument("--scheduler", default="asha", choices=["asha", "none"],
                   help="asha: stop weak trials early on eval loss; none: run every trial to the end")
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


# --------------------------------------------------------------------------- the space file
@dataclass(frozen=True)
class Entry:
    key: str  # dotted config path, e.g. model.moe.aux_weight
    kind: str  # one of DISTRIBUTIONS
    values: tuple  # choice/grid: the values; uniform/loguniform: (low, high)

    def probes(self) -> list:
        """Values the config must accept: every choice, or a range's ends and an inner point."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        lo, hi = self.values
        f = 0.382  # not the exact middle, which can be a whole number
        inner = lo * (hi / lo) ** f if self.kind == "loguniform" else lo + (hi - lo) * f
        return [lo, inner, hi]

    def tune_domain(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        return tune.loguniform(*self.values)

    def spec(self) -> dict:
        return {self.kind: list(self.values)}


class _SpaceLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; a space file is full of such numbers, so read them as floats."""


def _unique_keys(loader: yaml.SafeLoader, node: yaml.MappingNode):
    """Plain YAML keeps the last of two equal keys silently; in a space file that hides a mistake."""
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, str) and key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"{key} is listed twice", key_node.start_mark)
        seen.add(key if isinstance(key, str) else id(key_node))
    return loader.construct_mapping(node)


_SpaceLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys)
_SpaceLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_SpaceLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def parse_entry(key: Any, spec: Any, source: str) -> Entry:
    where = f"{source}: {key}"
    if not isinstance(key, str) or not key.strip():
        raise ConfigError(f"{source}: entry {key!r}: keys are dotted config paths such as model.moe.aux_weight")
    forms = "{choice: [a, b]}, {grid: [a, b]}, {uniform: [low, high]} or {loguniform: [low, high]}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one distribution, {forms}; got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        hint = did_you_mean(kind, DISTRIBUTIONS, cutoff=0.75)
        raise ConfigError(f"{where}: unknown distribution {kind!r}{hint}; use {', '.join(DISTRIBUTIONS)}")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind} needs a non-empty list of values, got {args!r}")
        return Entry(key, kind, tuple(args))
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}: {kind} needs [low, high], got {args!r}")
    lo, hi = (_number(a) for a in args)
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(f"{where}: {kind} needs two finite numbers [low, high], got {args!r}")
    if not lo < hi:
        raise ConfigError(f"{where}: {kind} needs low < high, got [{args[0]}, {args[1]}]")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs 0 < low, got [{args[0]}, {args[1]}]")
    return Entry(key, kind, (lo, hi))


def load_space(path: str) -> list[Entry]:
    """Read and check the form of a space file (not yet against a config)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read space file ({e.strerror or e})") from None
    try:
        data = yaml.load(text, Loader=_SpaceLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{p}: not valid YAML{where}: {what}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of dotted config keys to distributions, "
                          f"got {type(data).__name__}")
    if not data:
        raise ConfigError(f"{p}: the space has no entries")
    return [parse_entry(k, v, str(p)) for k, v in data.items()]


# --------------------------------------------------------------------------- applying values
def _field_paths(node: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append(f"{prefix}{k}")
            out += _field_paths(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _field_paths(v, f"{prefix}{i}.")
    return out


def _locate(data: dict, key: str, source: str) -> tuple[Any, Any]:
    """The container holding `key` (dotted; integer parts index lists) and the last part."""
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if isinstance(node, dict) and part in node:
            container, idx = node, part
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            container, idx = node, int(part)
        else:
            hint = did_you_mean(key, _field_paths(data))
            what = "not a config field" if here == key else f"{here} is not a config field"
            raise ConfigError(f"{source}: {key}: {what}{hint}")
        node = container[idx]
    if isinstance(node, dict):
        raise ConfigError(f"{source}: {key}: is a config section, not a field")
    return container, idx


def apply_values(base: dict, values: dict[str, Any], source: str = "space") -> dict:
    """A deep copy of the config mapping `base` with the dotted keys of `values` set."""
    data = copy.deepcopy(base)
    for key, value in values.items():
        container, idx = _locate(data, key, source)
        container[idx] = value
    return data


def _data_signature(cfg: HydraConfig) -> tuple:
    """What `prepare_data` depends on: trials must agree on it to share one prepared dataset."""
    from hydra_ray.data.pipeline import required_domains  # numpy + config only

    seq_lens = sorted({p.seq_len or cfg.model.seq_len for p in cfg.curriculum.phases})
    return (json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True), tuple(cfg.model.domains),
            cfg.model.vocab_size, tuple(seq_lens), tuple(required_domains(cfg)))


def validate_space(entries: list[Entry], base: dict, source: str) -> None:
    """Every entry must name a config field, and the config must stay valid (and keep the same
    prepared data) with each probe value alone and with all entries at once."""
    seen = set()
    for e in entries:
        if e.key in seen:
            raise ConfigError(f"{source}: {e.key}: listed twice")
        seen.add(e.key)
        container, idx = _locate(copy.deepcopy(base), e.key, source)
        current = container[idx]
        if e.kind in ("uniform", "loguniform") and isinstance(current, int) and not isinstance(current, bool):
            raise ConfigError(f"{source}: {e.key}: an integer field takes choice or grid, not {e.kind}")
    signature = _data_signature(parse_config(base, source))
    for e in entries:
        for v in e.probes():
            cfg = parse_config(apply_values(base, {e.key: v}, source), f"{source}: {e.key} = {v!r} gives")
            if _data_signature(cfg) != signature:
                raise ConfigError(f"{source}: {e.key}: changes the prepared data (corpus, domains, mixture, "
                                  "tokenizer or sequence length), which all trials of a sweep share")
    for pick in (0, -1):  # the first probes together, then the last ones: cross-field rules
        combo = {e.key: e.probes()[pick] for e in entries}
        shown = ", ".join(f"{k}={v!r}" for k, v in combo.items())
        parse_config(apply_values(base, combo, source), f"{source}: the combination {shown} gives")


def trial_config(base: dict, values: dict[str, Any]) -> HydraConfig:
    """A trial's config: the base with its sampled values, checkpointing at every eval (so every
    report to Tune carries an eval loss) and keeping one checkpoint per trial."""
    data = apply_values(base, values)
    data["train"]["save_every"] = data["train"]["eval_every"]
    data["train"]["keep_checkpoints"] = 1
    return parse_config(data, "trial config")


# --------------------------------------------------------------------------- metrics of a report
def imbalance(run_dir: str, lo: int, hi: int, pooled: list | None = None) -> tuple[float | None, float | None]:
    """(mean over MoE layers of the coefficient of variation of expert utilisation, max over layers
    of max/min utilisation), over the logged steps in (lo, hi]. Falls back to the pooled
    utilisation of the report itself; (None, None) while MoE is off."""
    by_layer: dict[str, list[list[float]]] = {}
    for r in runlog.read_records(run_dir):
        if lo < r["step"] <= hi and r.get("expert_util_by_layer"):
            for name, util in r["expert_util_by_layer"].items():
                by_layer.setdefault(name, []).append(util)
    utils = [[sum(col) / len(rows) for col in zip(*rows)] for rows in by_layer.values()]
    if not utils and pooled:
        utils = [pooled]
    if not utils:
        return None, None
    cvs, ratios = [], []
    for u in utils:
        mean = sum(u) / len(u)
        std = math.sqrt(sum((x - mean) ** 2 for x in u) / len(u))
        cvs.append(std / mean if mean > 0 else float("nan"))
        ratios.append(max(u) / min(u) if min(u) > 0 else float("inf"))
    return sum(cvs) / len(cvs), max(ratios)


def tune_metrics(flat: dict, run_dir: str, window: int) -> dict:
    """What a trial reports to Tune, from one report of the training loop (`loop._flat`)."""
    step = int(flat["step"])
    cv, ratio = imbalance(run_dir, step - window, step, flat.get("expert_util"))
    return {"step": step, "phase": flat.get("phase"), METRIC: flat.get("eval_loss"), SECOND: cv,
            "util_max_min": ratio, "loss": flat.get("loss"), "ce": flat.get("ce"),
            "routing_mode": flat.get("routing_mode"), "world_size": flat.get("world_size")}


def _last_eval(run_dir: str) -> dict | None:
    """The loop's flat report of the run's last eval (for a trial whose run had already ended)."""
    for r in reversed(runlog.read_records(run_dir)):
        if r.get("eval") and r["eval"].get("loss") is not None:
            flat = {k: v for k, v in r.items() if not isinstance(v, dict)}
            flat["eval_loss"] = r["eval"]["loss"]
            return flat
    return None


# --------------------------------------------------------------------------- the trial
def _trial(config: dict, setup: dict, prepared) -> None:
    """One trial (runs in a Tune actor): the base config with this trial's values, trained to
    `end_step` in STORAGE/NAME/runs/TRIAL_ID, continuing from that run's last checkpoint."""
    import ray.tune
    import torch

    from hydra_ray import checkpoint as ckpt

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(setup["base"], config)
    run_dir = storage.join(setup["runs"], trial_id)
    end_step, window = setup["end_step"], cfg.train.eval_every
    storage.write_text(storage.join(run_dir, "config.yaml"), dump_config(cfg))
    threads = max(1, int(setup["cpus_per_worker"]))
    os.environ["HYDRA_THREADS"] = str(threads)  # read by the training loop (and Train workers)
    torch.set_num_threads(threads)

    latest = ckpt.list_steps(run_dir)
    if latest and latest[-1][0] >= end_step:  # the run ended before Tune heard of it: report it again
        flat = _last_eval(run_dir)
        if flat is not None:
            ray.tune.report(tune_metrics(flat, run_dir, window))
        return
    if setup["workers"] == 1:
        from hydra_ray.train.loop import run_local

        def report(flat, _ckpt_dir, _step):
            if flat.get("eval_loss") is not None:  # checkpoint-only steps carry no objective
                ray.tune.report(tune_metrics(flat, run_dir, window))

        run_local(cfg, run_dir, prepared, end_step=end_step, report=report)
    else:
        _train_v2(cfg, run_dir, trial_id, setup, prepared, window)


def _tune_report_callback(run_dir: str, window: int):
    """`TuneReportCallback` that turns the workers' reports into `tune_metrics` first."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class Report(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            # rank 0's report, as TuneReportCallback forwards it; the checkpoint stays in the run dir
            super().after_report(run_context, [tune_metrics(metrics[0], run_dir, window)], None)

    return Report()


def _train_v2(cfg: HydraConfig, run_dir: str, trial_id: str, setup: dict, prepared, window: int) -> None:
    """K workers on Ray Train v2, launched from inside the trial (`driver.build_trainer`, with a
    TuneReportCallback): the run is RUNS/TRIAL_ID, so a restarted trial continues it."""
    from hydra_ray import checkpoint as ckpt
    from hydra_ray.train.driver import build_trainer

    latest = ckpt.latest_valid(run_dir)
    trainer = build_trainer(cfg, prepared, run_dir, setup["runs"], trial_id, latest.step if latest else 0,
                            setup["end_step"], setup["workers"], cpus_per_worker=setup["cpus_per_worker"],
                            keep=1, callbacks=[_tune_report_callback(run_dir, window)])
    result = trainer.fit()
    if getattr(result, "error", None):
        raise RuntimeError(f"trial {trial_id}: training failed: {result.error}")


STATUS_FILE = "trial_status.jsonl"


def _say(msg: str) -> None:
    """`print` looked up when called: the Tune callback that uses it is pickled with the experiment,
    and a builtin captured by value fails to pickle once a library has swapped `builtins.print`
    (Ray's tqdm integration does)."""
    print(msg, flush=True)


def _scheme(loc: str) -> str:
    """The prefix that turns a path inside Tune's filesystem back into a location: "s3://" for
    s3://bucket/..., "" for a local path (or a file:// URI, whose paths are local ones)."""
    return "" if storage.is_local(loc) else loc.partition("://")[0] + "://"


def _status_callback(end_step: int, scheme: str, log=_say):
    """A Tune callback that records each trial's end (finished or stopped by the scheduler:
    "terminated"; or "error") in EXPERIMENT/trial_status.jsonl, and logs it. Tune's in-memory
    statuses cannot tell a trial ASHA stopped from one an interruption stopped (both end up
    TERMINATED); this file can, and it survives `--resume` (the callback is pickled with the
    experiment, so it finds the file through the trial's path, not through this process; that
    path is inside Tune's filesystem, so `scheme`, "s3://" or "", makes it a location again)."""
    from ray.tune import Callback

    class TrialStatus(Callback):
        def _mark(self, trial, status: str) -> None:
            m = trial.last_result or {}
            loc = scheme + posixpath.join(posixpath.dirname(trial.path.rstrip("/")), STATUS_FILE)
            try:
                text = storage.read_text(loc)
            except FileNotFoundError:
                text = ""
            # rewritten whole (object stores cannot append); Tune calls back one trial at a time
            storage.write_text(loc, text + json.dumps({"trial": trial.trial_id, "status": status,
                                                       "step": m.get("step"), "time": time.time()}) + "\n")
            step, loss = m.get("step"), m.get(METRIC)
            what = "error" if status == "error" else "completed" if step is not None and step >= end_step else \
                f"stopped at step {step}"
            log(f"[tune] trial {trial.trial_id} {what}" + (f": eval_loss {loss:.4f}" if loss is not None else ""))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._mark(trial, "terminated")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._mark(trial, "error")

    return TrialStatus()


def _ended(sweep_dir: str) -> dict[str, str]:
    """trial id -> its last recorded end ("terminated" or "error")."""
    out = {}
    try:
        text = storage.read_text(storage.join(sweep_dir, STATUS_FILE))
    except FileNotFoundError:
        text = ""
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[rec["trial"]] = rec["status"]
    return out


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _trial_name(trial) -> str:
    return trial.trial_id


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
                             ("--max-concurrent", args.max_concurrent, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value}: must be at least {low}")
    if not args.cpus_per_worker > 0:
        raise ConfigError(f"--cpus-per-worker {args.cpus_per_worker}: must be positive")
    if not args.reduction_factor > 1:
        raise ConfigError(f"--reduction-factor {args.reduction_factor}: must be greater than 1")
    K = args.workers_per_trial
    if cfg.train.batch_size % (K * cfg.train.grad_accum):
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} does not split over {K} workers x grad_accum "
                          f"{cfg.train.grad_accum} (--workers-per-trial)")
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
            "seed": args.seed}


def _check_resume(saved: dict, now: dict, sweep_dir: str) -> None:
    for key in ("config_yaml", "space", "samples", "scheduler", "workers_per_trial", "cpus_per_worker",
                "end_step", "grace_period", "reduction_factor", "seed"):
        if json.loads(json.dumps(saved.get(key))) != json.loads(json.dumps(now[key])):
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


# --------------------------------------------------------------------------- results
def _status(result, ended: str | None, end_step: int) -> str:
    m = result.metrics or {}
    if ended is None:
        return "unfinished"  # still running or pending when the sweep was interrupted
    if result.error is not None or ended == "error":
        return "error"
    step = m.get("step")
    return "completed" if step is not None and step >= end_step else "stopped"


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def collect(grid, entries: list[Entry], end_step: int, sweep_dir: str) -> list[dict]:
    ended = _ended(sweep_dir)
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or posixpath.basename(result.path.rstrip("/")).removeprefix("trial_")
        cfg = result.config or {}
        rows.append({
            "trial": trial_id, "status": _status(result, ended.get(trial_id), end_step),
            "step": m.get("step"), "iters": m.get("training_iteration"),
            METRIC: _num(m.get(METRIC)), SECOND: _num(m.get(SECOND)), "util_max_min": _num(m.get("util_max_min")),
            "values": {e.key: cfg.get(e.key) for e in entries},
            "error": " ".join(str(result.error).split())[:300] if result.error is not None else "",
            "run_dir": storage.join(sweep_dir, "runs", trial_id),
        })
    rows.sort(key=lambda r: r["trial"])
    return rows


def pareto(rows: list[dict]) -> list[dict]:
    """Completed trials not dominated on (eval_loss, imbalance), both lower-is-better; a missing
    imbalance (MoE never on) counts as the worst."""
    def point(r):
        imb = r[SECOND]
        return r[METRIC], imb if imb is not None and not math.isnan(imb) else math.inf

    done = [r for r in rows if r["status"] == "completed" and r[METRIC] is not None]
    front = []
    for r in done:
        a = point(r)
        dominated = any(point(o)[0] <= a[0] and point(o)[1] <= a[1] and point(o) != a for o in done if o is not r)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: point(r))


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isinf(x) or math.isnan(x):
            return str(x)
        return f"{x:.{digits}g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return str(x)


def _short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that is unique among them (aux_weight, mod.capacity)."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            if sum(1 for o in keys if o == cand or o.endswith("." + cand)) == 1:
                out[k] = cand
                break
        else:
            out[k] = k
    return out


def table(rows: list[dict], entries: list[Entry], front_ids: set[str], best_id: str | None) -> str:
    short = _short_names([e.key for e in entries])
    head = ["trial", "status", "step", "iters", METRIC, SECOND, ""] + [short[e.key] for e in entries]
    body = []
    for r in rows:
        mark = "best" if r["trial"] == best_id else ("pareto" if r["trial"] in front_ids else "")
        body.append([r["trial"], r["status"], _fmt(r["step"]), _fmt(r["iters"]), _fmt(r[METRIC]), _fmt(r[SECOND], 3),
                     mark] + [_fmt(r["values"][e.key], 3) for e in entries])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head] + body)


def _write_csv(loc: str, rows: list[dict], entries: list[Entry], front_ids: set[str]) -> None:
    fields = ["trial", "status", "step", "iters", METRIC, SECOND, "util_max_min", "pareto"] + \
        [e.key for e in entries] + ["run_dir", "error"]
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({**{k: r[k] for k in fields if k in r}, **r["values"], "pareto": r["trial"] in front_ids})
    storage.write_text(loc, f.getvalue())


def write_outputs(sweep_dir: str, rows: list[dict], entries: list[Entry], base: dict, settings: dict,
                  final: bool) -> dict:
    """trials.csv always; pareto.csv and best.yaml once the sweep is over."""
    front = pareto(rows) if final else []
    front_ids = {r["trial"] for r in front}
    done = [r for r in rows if r["status"] == "completed" and r[METRIC] is not None]
    best = min(done, key=lambda r: r[METRIC]) if final and done else None
    _write_csv(storage.join(sweep_dir, "trials.csv"), rows, entries, front_ids)
    if final:
        _write_csv(storage.join(sweep_dir, "pareto.csv"), front, entries, front_ids)
    if best is not None:
        cfg = parse_config(apply_values(base, best["values"]), "best config")
        # `hydra-ray train --config .../best.yaml` trains into a run named after the sweep, so
        # the best configs of two sweeps never share (and refuse to resume) one run folder
        cfg.train.run_name = f"{storage.name(sweep_dir)}-best"
        values = ", ".join(f"{k}={_fmt(v, 6)}" for k, v in best["values"].items())
        name = storage.name(sweep_dir)
        header = (f"# hydra-ray tune: best of sweep {name} ({len(done)} completed trial(s)):\n"
                  f"# trial {best['trial']}, eval_loss {_fmt(best[METRIC])} at step {best['step']}, "
                  f"imbalance {_fmt(best[SECOND], 3)}\n"
                  f"# base config {settings['config']} with {values}\n")
        storage.write_text(storage.join(sweep_dir, "best.yaml"), header + dump_config(cfg))
    return {"front": front, "best": best, "front_ids": front_ids}


# --------------------------------------------------------------------------- the command
def _new_tuner(trainable, entries: list[Entry], settings: dict, sweep_dir: str, concurrent: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if settings["scheduler"] == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=settings["end_step"], grace_period=settings["grace_period"],
                                  reduction_factor=settings["reduction_factor"])
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space={e.key: e.tune_domain() for e in entries},
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="min", num_samples=settings["samples"], scheduler=scheduler,
            # the generator, not TuneConfig.max_concurrent_trials, when a search_alg is given
            search_alg=BasicVariantGenerator(max_concurrent=concurrent, random_state=settings["seed"]),
            trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_name,
        ),
        run_config=tune.RunConfig(storage_path=storage.parent(sweep_dir), name=storage.name(sweep_dir),
                                  callbacks=[_status_callback(settings["end_step"], _scheme(sweep_dir))]),
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
    from ray.tune import Tuner  # noqa: E402  (heavy: only once the inputs are known to be good)

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

    setup = {"base": base, "runs": runs, "end_step": settings["end_step"], "workers": K,
             "cpus_per_worker": cpus}
    # K = 1: the loop runs in the trial's own process, which holds the CPUs. K > 1: the trial
    # process only waits on its Train run, whose workers hold the CPUs (Tune refuses 0).
    trainable = tune.with_resources(tune.with_parameters(_trial, setup=setup, prepared=prepared),
                                    {"CPU": per_trial} if K == 1 else {"CPU": 0.01})
    log(f"[tune] {sweep_dir}: {settings['trials']} trial(s) of {settings['end_step']} steps, {concurrent} at once, "
        f"{K} worker(s) x {cpus:g} CPU each; scheduler {settings['scheduler']}"
        + (f" (grace {settings['grace_period']} steps, reduction factor {settings['reduction_factor']:g})"
           if settings["scheduler"] == "asha" else ""))
    t0 = time.time()
    if args.resume:
        tuner = Tuner.restore(sweep_dir, trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = _new_tuner(trainable, entries, settings, sweep_dir, concurrent)
    grid = tuner.fit()
    rows = collect(grid, entries, settings["end_step"], sweep_dir)
    unfinished = [r for r in rows if r["status"] == "unfinished"]
    interrupted = bool(unfinished) or len(rows) < settings["trials"]
    out = write_outputs(sweep_dir, rows, entries, base, settings, final=not interrupted)
    log("")
    log(table(rows, entries, out["front_ids"], out["best"]["trial"] if out["best"] else None))
    log(f"\n[tune] {len(rows)} trial(s) in {time.time() - t0:.0f}s: "
        + ", ".join(f"{sum(r['status'] == s for r in rows)} {s}"
                    for s in ("completed", "stopped", "error", "unfinished") if any(r["status"] == s for r in rows)))
    log(f"[tune] table: {storage.join(sweep_dir, 'trials.csv')}")
    if interrupted:
        log("[tune] the sweep was interrupted: continue it with the same command and --resume")
        return EXIT_INTERRUPTED
    log(f"[tune] Pareto set (eval_loss, imbalance): {storage.join(sweep_dir, 'pareto.csv')} "
        f"({', '.join(r['trial'] for r in out['front']) or 'empty'})")
    if out["best"] is None:
        print("error: no trial completed: see the errors in trials.csv", file=sys.stderr)
        return 1
    best = out["best"]
    best_yaml = storage.join(sweep_dir, "best.yaml")
    log(f"[tune] best: {best_yaml} (trial {best['trial']}, eval_loss {_fmt(best[METRIC])}); "
        f"train it with: hydra-ray train --config {best_yaml}")
    return 0
