"""`hydra-ray train`: validate, prepare data, build the Ray Train v2 TorchTrainer, show progress.

Design choices
- Joins the cluster named by RAY_ADDRESS (or the one `ray job submit` runs in), else starts a
  local Ray. The run directory is STORAGE/NAME, a local folder or a URI (s3://bucket/prefix):
  config.yaml, data_report.txt, tokenizer.json, metrics/ and events/ parts, tensorboard/,
  checkpoints/. STORAGE is probed before any work starts (`storage.check_storage`), so a missing
  bucket or wrong credentials are a one-line error, not a failed run.
- `--workers N` or `MIN-MAX` (elastic: Ray Train starts as many as the cluster has room for,
  between the two, and restarts the group from the last checkpoint when workers die or join).
- An existing run is only continued with `--resume`, so a typo in --name cannot silently mix
  two runs. Checkpoints are reported to Ray Train (which keeps the last K) under
  RUN/checkpoints/step_XXXXXXXX.
- Progress: a thread polls the run's metrics parts and prints a line per logged step (step, phase, loss,
  tokens/s, ETA); worker stdout is not forwarded, so the console stays readable.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hydra_ray import storage as st
from hydra_ray.config import ConfigError, HydraConfig, check_batch_split, dump_config, parse_min_max
from hydra_ray.raystart import ray_init
from hydra_ray import checkpoint as ckpt
from hydra_ray.train.curriculum import segments


@dataclass
class WorkerSpec:
    min_workers: int
    max_workers: int

    @classmethod
    def parse(cls, text: str) -> "WorkerSpec":
        return cls(*parse_min_max(text, "--workers"))

    @property
    def num_workers(self):
        return self.min_workers if self.min_workers == self.max_workers else (self.min_workers, self.max_workers)


class Progress(threading.Thread):
    """Prints new metrics records as they are flushed: step, phase, loss, tokens/s, ETA. Polls the
    run's log parts (every second on a local disk, every 5 s on an object store)."""

    def __init__(self, run_dir: str, start_step: int, end_step: int, log=print, interval: float | None = None):
        super().__init__(daemon=True)
        self.run_dir, self.end, self.log = run_dir, end_step, log
        self.interval = interval if interval is not None else (1.0 if st.is_local(run_dir) else 5.0)
        self.stop = threading.Event()
        self.last = start_step  # a resumed run: only steps after its checkpoint

    def poll(self) -> None:
        from hydra_ray.runlog import read_records

        try:
            records = read_records(self.run_dir, "metrics", after=self.last)
        except (OSError, ConfigError) as e:  # a storage hiccup must not end the run's console
            self.log(f"[progress] cannot read the run's metrics ({e})")
            return
        for r in records:
            self.last = r["step"]
            tps = r.get("tokens_per_s") or 0
            tokens_per_step = r.get("tokens", 0) / max(r["step"], 1)
            eta = (self.end - r["step"]) * tokens_per_step / tps if tps else 0.0
            loss = r.get("loss")
            ev = r.get("eval", {}).get("loss") if r.get("eval") else None
            self.log(f"step {r['step']:>6}/{self.end}  {r['phase']:<11} loss {loss if loss is None else f'{loss:.4f}'}"
                     f"  ce {r.get('ce') or 0:.4f}  {tps:9,.0f} tok/s  world {r.get('world_size')}"
                     f"  ETA {eta / 60:5.1f} min" + (f"  eval {ev:.4f}" if ev is not None else ""))

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(self.interval)
        self.poll()


def train(cfg: HydraConfig, config_path: str, workers: str = "2", gpu: bool = False, storage: str = "runs",
          name: str | None = None, max_steps: int | None = None, resume: bool = False,
          cpus_per_worker: float = 1.0, resize_interval_s: float = 60.0, resources_per_worker: str | None = None,
          log=print) -> dict:
    from hydra_ray.data.pipeline import pack_cache, prepare_data

    spec = WorkerSpec.parse(workers)
    G = cfg.train.batch_size
    check_batch_split(cfg, range(spec.min_workers, spec.max_workers + 1))
    extra = parse_resources(resources_per_worker)
    custom = sorted(set(extra) - {"CPU", "GPU"})
    if custom and not os.environ.get("RAY_ADDRESS"):
        raise ConfigError(f"--resources-per-worker asks for {', '.join(custom)}: only a cluster whose node types "
                          "declare them has those (the local Ray started here does not)")
    if resize_interval_s <= 0:
        raise ConfigError(f"--resize-interval {resize_interval_s:g}: must be positive (seconds)")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps {max_steps}: must be at least 1")
    name = name or cfg.train.run_name or Path(config_path).stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", name or ""):
        # the rule of train.run_name, and of the checkpoint ids that eval and serve take (RUN@STEP)
        raise ConfigError(f"--name {name!r}: a run name is letters, digits, '.', '_' and '-', "
                          "starting with a letter or digit")
    storage = st.check_storage(storage)  # scheme, bucket, credentials, endpoint: before any work
    run_dir = st.join(storage, name)
    existing = ckpt.list_steps(run_dir)
    if existing and not resume:
        raise ConfigError(f"run {run_dir} already has checkpoints (last step {existing[-1][0]}): "
                          "pass --resume to continue it, or choose another --name")
    if resume and not existing:
        raise ConfigError(f"--resume: run {run_dir} has no checkpoints to continue (check --storage and "
                          "--name, or start it without --resume)")
    latest = ckpt.latest_valid(run_dir) if resume else None
    if resume and latest is None:
        raise ConfigError(f"--resume: none of the checkpoints of run {run_dir} is complete and intact "
                          f"(steps {', '.join(str(s) for s, _ in existing)}); see the warnings above")
    if latest is not None:
        ckpt.check_resumable(latest, cfg.train.batch_size)
    end_step = min(cfg.curriculum.total_steps, max_steps or cfg.curriculum.total_steps)
    cfg, tokenizer_json = run_tokenizer(cfg, config_path, run_dir, resume)
    if tokenizer_json is not None:  # every worker reads the run's copy, wherever it runs
        st.write_bytes(st.join(run_dir, ckpt.TOKENIZER), tokenizer_json)
        cfg.data.tokenizer = st.join(run_dir, ckpt.TOKENIZER)
    st.write_text(st.join(run_dir, "config.yaml"), dump_config(ckpt.portable_config(cfg)))

    def start_ray() -> None:
        ray_init(log, min_cpus=spec.max_workers * cpus_per_worker + 2)

    # a pack that exists is verified before Ray starts: a bad shard is an error in seconds
    prepared = prepare_data(cfg, log=log, cache=pack_cache(storage), before_pack=start_ray)
    start_ray()
    st.write_text(st.join(run_dir, "data_report.txt"), prepared.report() + "\n")
    log(f"[data] {prepared.extra['corpus']} tokenizer {prepared.tokenizer}\n{prepared.report()}")
    start = latest.step if latest else 0
    if start >= end_step:
        log(f"run {run_dir} is already at step {start} (target {end_step}): nothing to do")
        return {"run_dir": run_dir, "step": start}
    trainer = build_trainer(cfg, prepared, run_dir, storage, name, start, end_step, spec.num_workers, gpu,
                            cpus_per_worker, keep=cfg.train.keep_checkpoints, tokenizer_json=tokenizer_json,
                            resize_interval_s=resize_interval_s, extra_resources=extra)
    log(f"[train] {run_dir}: steps {start}..{end_step} on {workers} worker(s) "
        f"({'GPU' if gpu else 'CPU'}), global batch {G}")
    progress = Progress(run_dir, start, end_step, log)
    progress.start()
    t0 = time.time()
    restore = stop_on_sigterm()
    try:
        result = trainer.fit()
    finally:
        restore()
        progress.stop.set()
        progress.join()
    last = ckpt.list_steps(run_dir)
    stopped = stop_reason(run_dir, since=t0)
    log(f"[train] {'stopped' if stopped else 'done'} in {time.time() - t0:.0f}s. metrics: {st.join(run_dir, 'metrics')}/  "
        f"checkpoints: {st.join(run_dir, 'checkpoints')} ({', '.join(ckpt.step_dir_name(s) for s, _ in last) or 'none'})")
    return {"run_dir": run_dir, "step": last[-1][0] if last else None,
            "error": getattr(result, "error", None) or stopped}


def worker_resources(gpu: bool, cpus_per_worker: float, extra: dict | None) -> dict | None:
    """What one training worker asks Ray for: a GPU (Ray Train's default) or CPUs, plus `extra`."""
    if gpu:
        return {"GPU": 1, **extra} if extra else None
    return {"CPU": cpus_per_worker, **(extra or {})}


def stop_on_sigterm():
    """Treat SIGTERM like Ctrl-C while the trainer runs: `ray job stop` sends SIGTERM, and Ray
    Train's SIGINT handler aborts the run gracefully, so its workers end and its request for
    cluster resources is withdrawn at once (killed outright, the request would hold its nodes
    until it expires, minutes later). Returns the function that puts the old handler back."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def as_sigint(signum, frame):
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, as_sigint)
    return lambda: signal.signal(signal.SIGTERM, previous)


def parse_resources(text: str | None) -> dict:
    """--resources-per-worker: a JSON object of Ray resource names to non-negative amounts."""
    import json

    if not text:
        return {}
    try:
        res = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--resources-per-worker {text!r}: not JSON ({e.msg}); expected e.g. '{{\"trainer\": 1}}'") from None
    if not isinstance(res, dict) or not all(isinstance(k, str) and k and isinstance(v, (int, float))
                                            and not isinstance(v, bool) and v >= 0 for k, v in res.items()):
        raise ConfigError(f"--resources-per-worker {text!r}: expected a JSON object of resource names to "
                          "non-negative numbers, e.g. '{\"trainer\": 1}'")
    return {k: float(v) for k, v in res.items()}


def run_tokenizer(cfg: HydraConfig, config_path: str, run_dir: str, resume: bool) -> tuple[HydraConfig, bytes | None]:
    """The tokenizer file this run trains with, as (config naming it by absolute path with its
    sha256, its bytes), or (cfg, None) for the byte tokenizer. The user's file is found as the
    config names it (working directory, then the config's folder); a resumed run falls back to its
    own copy and refuses a file that differs from it. Raises ConfigError."""
    from hydra_ray.data.tokenizer import find_tokenizer, load_tokenizer

    spec = cfg.data.tokenizer
    if spec == "byte":
        return cfg, None
    own = st.join(run_dir, ckpt.TOKENIZER)
    has_own = resume and st.is_file(own)
    found = spec if st.is_uri(spec) and st.is_file(spec) else find_tokenizer(spec, config_path)
    if found is None and has_own:
        found = own
    if found is None:
        raise ConfigError(f"data.tokenizer: {spec}: no such file (looked in the working directory and "
                          f"beside {config_path}); give 'byte' or the path of a tokenizer.json")
    blob = st.read_bytes(str(found))
    sha = hashlib.sha256(blob).hexdigest()
    if has_own and sha != hashlib.sha256(st.read_bytes(own)).hexdigest():
        raise ConfigError(f"data.tokenizer: {found} differs from the tokenizer run {run_dir} was trained with "
                          f"({own}); resume with that one")
    if cfg.data.tokenizer_sha256 and sha != cfg.data.tokenizer_sha256:
        raise ConfigError(f"data.tokenizer: {found} does not match data.tokenizer_sha256 of the config")
    try:
        load_tokenizer(str(found), sha)
    except ValueError as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    cfg = cfg.model_copy(deep=True)
    cfg.data.tokenizer, cfg.data.tokenizer_sha256 = str(found), sha
    return cfg, blob


def stop_reason(run_dir: str, since: float = 0.0) -> str | None:
    """Why the run gave up (a `stopped` event written after `since`), or None."""
    from hydra_ray.runlog import read_records

    reasons = [e.get("reason") for e in read_records(run_dir, "events")
               if e.get("event") == "stopped" and e.get("time", 0) >= since]
    return reasons[-1] if reasons else None


def build_trainer(cfg: HydraConfig, prepared, run_dir: str, storage: str, name: str, start: int, end_step: int,
                  num_workers, gpu: bool = False, cpus_per_worker: float = 1.0, keep: int = 3,
                  callbacks: list | None = None, tokenizer_json: bytes | None = None,
                  resize_interval_s: float = 60.0, extra_resources: dict | None = None):
    """The TorchTrainer of one run (steps start..end_step of its curriculum; every worker reads
    its own rows of the packed data, data/reader.py): elastic scaling, failure and checkpoint policies. Also used by Tune trials
    with more than one worker (with a TuneReportCallback in `callbacks`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from hydra_ray.train.loop import train_loop_per_worker

    segs = segments(cfg, start, end_step)
    loop_config = {"config": cfg.model_dump(mode="python"), "run_dir": run_dir, "end_step": end_step,
                   "segments": segs, "prepared": prepared, "use_gpu": gpu,
                   "tokenizer_json": tokenizer_json}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpu,
                                     resources_per_worker=worker_resources(gpu, cpus_per_worker, extra_resources),
                                     elastic_resize_monitor_interval_s=resize_interval_s),
        run_config=RunConfig(
            storage_path=storage, name=name,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep),
            callbacks=callbacks or [],
            worker_runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                             if k.startswith(("HYDRA_", "OMP_NUM_THREADS", "AWS_"))}},
        ),
    )
