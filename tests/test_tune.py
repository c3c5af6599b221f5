"""`hydra-ray tune`: the space file and its errors, the imbalance a trial reports, a 4-trial ASHA
sweep on a tiny budget whose best.yaml trains, `--resume` of an interrupted sweep, and a sweep on
S3 (`--storage s3://...`) whose best.yaml trains straight from the bucket."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hydra_ray import evaluation, storage
from hydra_ray.cli import build_parser, main
from hydra_ray.config import ConfigError, dump_config, load_config, parse_config
from hydra_ray.runlog import RunLog
from hydra_ray.tune import cli as tune
from hydra_ray.tune.space import Entry, load_space, parse_entry, validate_space
from hydra_ray.tune.results import pareto, table, write_outputs
from hydra_ray.tune.trial import Objective, tune_metrics

ROOT = Path(__file__).resolve().parent.parent
ROUTING = ROOT / "configs" / "sweeps" / "routing.yaml"
SCRIPT = Path(sys.executable).parent / "hydra-ray"
LAUNCH_DIR = Path.cwd()  # the working directory of the session's Ray workers, hence of the trials
# The ASHA sweep adds a learning-rate grid to the routing space: two good rates and two hopeless
# ones, in that order. Trials run two at a time, so each hopeless trial starts only after a good
# one has reported at the first rung (step 6, MoE still off: only the rate matters there), and its
# eval loss is then far worse than the rung's median: ASHA must stop it, whatever the timing.
LR_GRID = [3.0e-3, 1.0e-3, 1.0e-5, 1.0e-6]
HOPELESS = {1.0e-5, 1.0e-6}


def _args(*argv: str):
    return build_parser().parse_args(["tune", *argv])


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def base_yaml(tmp_path_factory, builtin_cache) -> Path:
    """configs/tune-tiny.yaml reading the session's built-in corpus cache."""
    data = load_config(ROOT / "configs" / "tune-tiny.yaml").model_dump(mode="python")
    data["data"]["cache_dir"] = builtin_cache
    path = tmp_path_factory.mktemp("tune-config") / "tune-tiny.yaml"
    path.write_text(dump_config(parse_config(data)))
    return path


# --------------------------------------------------------------------------- the space file
def test_routing_space_covers_the_routing_knobs_and_fits_the_presets():
    entries = {e.key: e for e in load_space(str(ROUTING))}
    assert {"model.moe.aux_weight", "model.moe.z_loss", "model.moe.capacity_factor", "model.moe.top_k",
            "model.moe.jitter", "model.moe.teacher_weight", "model.mod.capacity",
            "model.mor.recursions"} <= set(entries)
    assert entries["model.moe.aux_weight"].kind == entries["model.moe.z_loss"].kind == "loguniform"
    assert entries["model.moe.aux_weight"].values == (1e-4, 1e-1)  # `1e-4` is a float, not YAML 1.1's string
    for preset in ("tiny", ROOT / "configs" / "tune-tiny.yaml"):
        validate_space(list(entries.values()), load_config(preset).model_dump(mode="python"), str(ROUTING))


@pytest.mark.parametrize("key, spec, says", [
    (3, {"choice": [1]}, "entry 3: keys are dotted config paths"),
    ("  ", {"normal": [1]}, "entry '  ': keys are dotted config paths"),  # the key is said first
    ("model.moe.jitter", {"uniform": [0.1]}, "model.moe.jitter: uniform needs [low, high], got [0.1]"),
    ("model.moe.jitter", {"uniform": ["0", 1]}, "uniform needs two finite numbers [low, high]"),
    ("model.moe.jitter", {"uniform": [True, 2]}, "uniform needs two finite numbers [low, high]"),
    ("model.moe.jitter", {"uniform": [0, float("inf")]}, "uniform needs two finite numbers [low, high]"),
    ("model.moe.top_k", {"grid": "12"}, "grid needs a non-empty list of values, got '12'"),
    ("model.moe.top_k", {"choice": [1], "grid": [2]}, "expected one distribution"),
    ("model.moe.top_k", {"choise": [1]}, "unknown distribution 'choise' (did you mean choice?)"),
])
def test_a_bad_entry_is_one_line_naming_file_and_entry(key, spec, says):
    with pytest.raises(ConfigError) as err:
        parse_entry(key, spec, "space.yaml")
    msg = str(err.value)
    assert msg.startswith("space.yaml: ") and "\n" not in msg and says in msg, msg


def test_an_entry_is_a_frozen_model_of_kind_and_values():
    e = parse_entry("model.moe.aux_weight", {"loguniform": [1, 100]}, "space.yaml")
    assert (e.kind, e.values) == ("loguniform", (1.0, 100.0)) and all(type(v) is float for v in e.values)
    assert e == Entry(key="model.moe.aux_weight", kind="loguniform", values=(1, 100))  # built from fields alike
    assert e.probes()[0] == 1.0 and 1 < e.probes()[1] < 100 and e.probes()[2] == 100.0
    assert e.spec() == {"loguniform": [1.0, 100.0]}
    with pytest.raises(ValueError):
        e.kind = "uniform"
    assert parse_entry("model.moe.top_k", {"grid": [1, 2]}, "s").values == (1, 2)


def test_the_trial_reports_the_loops_imbalance_over_the_eval_window(tmp_path):
    """`imbalance` is the mean of the logged records' imbalance.layer_cv over the steps since the
    previous eval, `util_max_min` the largest layer_max_min (null in strict JSON: an expert that got
    nothing, inf); with no such record in the window the report's own flat keys stand in."""
    run = str(tmp_path / "run")
    log = RunLog(run, tensorboard=False)
    log.restart(0)
    for step, imb in [(1, None), (2, {"layer_cv": 9.0, "pooled_cv": 0.0, "layer_max_min": 99.0}),  # before
                      (3, {"layer_cv": 0.2, "pooled_cv": 0.1, "layer_max_min": 2.0}),
                      (4, {"layer_cv": 0.4, "pooled_cv": 0.1, "layer_max_min": 3.0}),
                      (5, {"layer_cv": 0.6, "pooled_cv": 0.1, "layer_max_min": 1.5}),
                      (6, None), (7, None), (8, None),
                      (9, {"layer_cv": 0.5, "pooled_cv": 0.2, "layer_max_min": math.inf})]:
        log.write({"step": step, "loss": 1.0, **({"imbalance": imb} if imb else {})})
    log.close()
    flat = {"step": 5, "eval_loss": 2.5, "imbalance_layer_cv": 7.0, "imbalance_layer_max_min": 7.0}
    m = tune_metrics(flat, run, window=3)  # steps 3, 4, 5
    assert m["eval_loss"] == 2.5 and m["step"] == 5
    assert m["imbalance"] == pytest.approx(0.4) and m["util_max_min"] == 3.0
    m = tune_metrics({**flat, "step": 9}, run, window=4)  # steps 6..9: one record, its ratio infinite
    assert m["imbalance"] == pytest.approx(0.5) and m["util_max_min"] == math.inf
    m = tune_metrics({**flat, "step": 8}, run, window=2)  # steps 7, 8 logged no imbalance: the report's
    assert (m["imbalance"], m["util_max_min"]) == (7.0, 7.0)
    m = tune_metrics({"step": 1, "eval_loss": 3.0}, run, window=1)  # MoE off
    assert (m["imbalance"], m["util_max_min"]) == (None, None)


def test_a_task_objective_is_maximised_and_ties_go_to_the_lower_eval_loss(tmp_path):
    """--metric task_X: the best trial has the highest score (among completed ones), a tie goes to
    the lower eval loss, and the Pareto set counts the score as a gain; eval_loss stays a cost."""
    entries = [Entry(key="train.lr", kind="choice", values=(1e-3, 2e-3))]
    base = load_config(ROOT / "configs" / "tune-tiny.yaml").model_dump(mode="python")

    def row(trial, status, loss, chat, imb):
        return {"trial": trial, "status": status, "step": 48, "iters": 8, "eval_loss": loss, "task_chat": chat,
                "imbalance": imb, "util_max_min": 1.0, "values": {"train.lr": 1e-3}, "error": "", "run_dir": "r"}

    rows = [row("a", "completed", 2.0, 0.50, 0.1), row("b", "completed", 1.5, 0.50, 0.3),
            row("c", "completed", 1.0, 0.25, 0.05), row("d", "stopped", 0.5, 0.90, 0.0)]
    chat = Objective("task_chat")
    assert (chat.mode, chat.tasks, Objective().mode, Objective().tasks) == ("max", ("chat",), "min", ())
    assert Objective("task_mean").tasks == ("math", "code", "chat")
    out = write_outputs(str(tmp_path), rows, entries, base, {"config": "c"}, final=True, objective=chat)
    assert out["best"]["trial"] == "b"  # 0.50 like a, with the lower eval loss; d was stopped
    assert {r["trial"] for r in pareto(rows, chat)} == {"a", "c"}  # b: as good as a, less balanced
    assert {r["trial"] for r in pareto(rows)} == {"c"}  # on eval_loss, c is best on both
    assert "task_chat" in table(rows, entries, out["front_ids"], "b", chat).splitlines()[0]
    assert _rows(tmp_path / "trials.csv")[1]["task_chat"] == "0.5"
    assert "task_chat 0.5 at step 48" in (tmp_path / "best.yaml").read_text()


def test_a_task_metric_is_checked_before_the_sweep_starts(tmp_path, base_yaml):
    space = tmp_path / "space.yaml"
    space.write_text("model.moe.aux_weight: {loguniform: [1e-4, 1e-1]}\n")
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        _args("--config", str(base_yaml), "--space", str(space), "--samples", "1", "--metric", "task_poetry")
    with pytest.raises(ConfigError, match="--task-n 0"):
        tune.run(_args("--config", str(base_yaml), "--space", str(space), "--samples", "1", "--metric", "task_code",
                       "--task-n", "0", "--storage", str(tmp_path)))


@pytest.mark.parametrize("text, names", [
    ("model.moe.aux_weight: {normal: [0.0, 1.0]}", ["model.moe.aux_weight", "unknown distribution 'normal'"]),
    ("model.moe.aux_wieght: {loguniform: [1e-4, 1e-1]}", ["model.moe.aux_wieght", "not a config field",
                                                          "did you mean model.moe.aux_weight"]),
    ("model.moe.jitter: {uniform: [0.2, 0.1]}", ["model.moe.jitter", "low < high"]),
    ("model.moe.aux_weight: {loguniform: [0.0, 0.1]}", ["model.moe.aux_weight", "0 < low"]),
    ("model.moe.top_k: {choice: []}", ["model.moe.top_k", "non-empty list"]),
    ("model.moe.top_k: {choice: [1, 8]}", ["model.moe.top_k = 8", "less than or equal to 4"]),
    ("model.mor.recursions: {uniform: [1, 4]}", ["model.mor.recursions", "integer field"]),
    ("model.moe: {choice: [1]}", ["model.moe", "section"]),
    ("model.moe.top_k: 2", ["model.moe.top_k", "expected one distribution"]),
    ("data.mixture.math: {uniform: [0.1, 0.9]}", ["data.mixture.math", "prepared data"]),
    ("model.d_model: {choice: [128, 120]}\nmodel.n_heads: {choice: [4, 8]}",  # each fine alone, not together
     ["the combination", "model.d_model=120", "model.n_heads=8", "must be even"]),
    ("", ["no entries"]),
    ("[model.moe.top_k]", ["expected a mapping"]),
    ("model.moe.top_k: {choice: [1, 2]", ["not valid YAML"]),
    ("model.moe.top_k: {choice: [1, 2]}\nmodel.moe.top_k: {grid: [1, 2]}", ["line 2", "model.moe.top_k is listed twice"]),
])
def test_bad_space_files_are_one_clear_error(tmp_path, base_yaml, text, names):
    space = tmp_path / "bad.yaml"
    space.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        tune.run(_args("--config", str(base_yaml), "--space", str(space), "--samples", "2",
                       "--storage", str(tmp_path / "store")))
    msg = str(err.value)
    assert "\n" not in msg and str(space) in msg
    for n in names:
        assert n in msg, (n, msg)
    assert not (tmp_path / "store").exists()  # refused before anything was started or written


@pytest.mark.integration
@pytest.mark.slow
def test_bad_space_file_on_the_command_line(tmp_path, base_yaml):
    space = tmp_path / "bad.yaml"
    space.write_text("model.moe.capacity_factor: {choice: [1.0, -1.0]}\n")
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "hydra_ray.cli"]
    r = subprocess.run(cmd + ["tune", "--config", str(base_yaml), "--space", str(space), "--samples", "2",
                              "--storage", str(tmp_path / "store")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "model.moe.capacity_factor = -1.0" in r.stderr and "greater than 0" in r.stderr


# --------------------------------------------------------------------------- a 4-trial ASHA sweep
@pytest.fixture(scope="module")
def asha_sweep(tmp_path_factory, ray_session, base_yaml):
    """routing.yaml + the learning-rate grid: 4 trials of 48 steps, 2 at once on the session's
    4 CPUs, ASHA with its first rung at step 6 (the first eval). Returns (rc, sweep dir, seconds)."""
    tmp = tmp_path_factory.mktemp("tune")
    space = tmp / "space.yaml"
    space.write_text(ROUTING.read_text() + f"train.lr: {{grid: {LR_GRID}}}\n")
    t0 = time.time()
    rc = tune.run(_args("--config", str(base_yaml), "--space", str(space), "--samples", "1",
                        "--scheduler", "asha", "--grace-period", "6", "--storage", str(tmp), "--name", "asha",
                        "--seed", "0"))
    return rc, tmp / "asha", time.time() - t0


@pytest.mark.integration
@pytest.mark.slow
def test_asha_sweep_completes_and_stops_weak_trials_early(asha_sweep):
    rc, sweep, _ = asha_sweep
    assert rc == 0
    rows = _rows(sweep / "trials.csv")
    assert len(rows) == 4 and not any(r["status"] == "error" for r in rows), rows
    by_lr = {float(r["train.lr"]): r for r in rows}
    assert sorted(by_lr) == sorted(LR_GRID)
    for lr in HOPELESS:  # stopped at the first rung: one eval reported, at step 6 of 48
        r = by_lr[lr]
        assert (r["status"], int(r["step"]), int(r["iters"])) == ("stopped", 6, 1), r
    done = [r for r in rows if r["status"] == "completed"]
    assert done and all((int(r["step"]), int(r["iters"])) == (48, 8) for r in done)
    # Tune's own record agrees: the stopped trials' result.json ends after 1 iteration
    for r in rows:
        lines = (sweep / f"trial_{r['trial']}" / "result.json").read_text().splitlines()
        results = [json.loads(line) for line in lines]
        assert results[-1]["training_iteration"] == int(r["iters"]) and results[-1]["step"] == int(r["step"])
    for r in done:  # MoE routed for 30 of the 48 steps: the imbalance is a real number
        assert math.isfinite(float(r["eval_loss"])) and 0 <= float(r["imbalance"]) <= math.sqrt(4 - 1)
    front = _rows(sweep / "pareto.csv")
    assert front and {r["trial"] for r in front} <= {r["trial"] for r in done}


@pytest.mark.integration
@pytest.mark.slow
def test_best_yaml_is_the_best_complete_config_named_for_the_sweep(asha_sweep):
    rc, sweep, _ = asha_sweep
    rows = _rows(sweep / "trials.csv")
    best = min((r for r in rows if r["status"] == "completed"), key=lambda r: float(r["eval_loss"]))
    cfg = load_config(sweep / "best.yaml")
    assert cfg.train.lr == float(best["train.lr"])
    assert cfg.model.moe.aux_weight == pytest.approx(float(best["model.moe.aux_weight"]), rel=1e-12)
    assert cfg.model.mor.recursions == int(best["model.mor.recursions"])
    assert cfg.curriculum.total_steps == 48
    # a run trained from it is named after the sweep rather than "best" (training from a best.yaml
    # runs in test_sweep_on_s3_writes_its_results_there_and_best_yaml_trains)
    assert cfg.train.run_name == f"{sweep.name}-best"


# --------------------------------------------------------------------------- --resume
@pytest.mark.integration
@pytest.mark.slow
def test_resume_continues_an_interrupted_sweep_without_rerunning_finished_trials(tmp_path, ray_session, base_yaml):
    """A sweep of 2 trials, one at a time, is interrupted (SIGINT, as Ctrl+C) once the second has
    started; `--resume` then finishes the second and leaves the first alone."""
    space = tmp_path / "space.yaml"
    space.write_text("model.moe.aux_weight: {loguniform: [1e-4, 1e-1]}\nmodel.moe.top_k: {choice: [1, 2]}\n")
    argv = ["tune", "--config", str(base_yaml), "--space", str(space), "--samples", "2", "--scheduler", "none",
            "--max-concurrent", "1", "--max-steps", "12", "--storage", str(tmp_path), "--name", "sweep", "--seed", "1"]
    sweep, runs = tmp_path / "sweep", tmp_path / "sweep" / "runs"
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "hydra_ray.cli"]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd + argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if runs.is_dir() and len(list(runs.iterdir())) >= 2:  # the first trial ended, the second began
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.05)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == tune.EXIT_INTERRUPTED, (tmp_path / "first.log").read_text()[-3000:]
    first = {r["trial"]: r for r in _rows(sweep / "trials.csv")}
    assert sorted(r["status"] for r in first.values()) == ["completed", "unfinished"]
    finished = next(t for t, r in first.items() if r["status"] == "completed")
    before = {p: p.read_bytes() for p in [*(p for p in (runs / finished).rglob("*") if p.is_file()),
                                          sweep / f"trial_{finished}" / "result.json"]}
    assert any(p.name.endswith(".jsonl") for p in before)  # its metrics and events among them

    with pytest.raises(ConfigError, match="--samples"):  # a resume must be the same sweep
        tune.run(build_parser().parse_args([*argv[:6], "3", *argv[7:], "--resume"]))
    with pytest.raises(ConfigError, match="--resume"):  # and an existing sweep is only continued on request
        tune.run(build_parser().parse_args(argv))

    assert tune.run(build_parser().parse_args([*argv, "--resume"])) == 0
    rows = {r["trial"]: r for r in _rows(sweep / "trials.csv")}
    assert set(rows) == set(first) and all(r["status"] == "completed" and int(r["step"]) == 12 for r in rows.values())
    for p, data in before.items():  # the finished trial was not run again
        assert p.read_bytes() == data, p
    ended = [json.loads(line)["trial"] for line in (sweep / "trial_status.jsonl").read_text().splitlines()]
    assert sorted(ended) == sorted(first)  # each trial ended exactly once
    assert (sweep / "best.yaml").exists()


# --------------------------------------------------------------------------- K > 1
@pytest.mark.integration
@pytest.mark.slow
def test_two_worker_trials_run_ray_train_inside_tune(asha_sweep, tmp_path, ray_session, base_yaml):
    """--workers-per-trial 2: each trial is a Train v2 run of 2 workers launched from the Tune
    function, reporting through TuneReportCallback. It trains the model the one-worker trial of the
    same learning rate trained: the same eval loss at step 6 (MoE is still off there). With
    `--metric task_chat` the report carries the chat score of the checkpoint the workers wrote,
    the score `hydra-ray eval` gives that checkpoint."""
    _, one_worker_sweep, _ = asha_sweep
    space = tmp_path / "space.yaml"
    space.write_text("model.moe.aux_weight: {loguniform: [1e-4, 1e-1]}\n")
    rc = tune.run(_args("--config", str(base_yaml), "--space", str(space), "--samples", "1", "--scheduler", "none",
                        "--workers-per-trial", "2", "--max-steps", "6", "--storage", str(tmp_path), "--name", "k2",
                        "--metric", "task_chat", "--task-n", "3"))
    assert rc == 0
    (row,) = _rows(tmp_path / "k2" / "trials.csv")
    ckpt_dir = Path(row["run_dir"]) / "checkpoints" / "step_00000006"
    assert float(row["task_chat"]) == evaluation.task_scores(str(ckpt_dir), ("chat",), 3)["chat"]
    assert "best" in (tmp_path / "k2" / "best.yaml").read_text().splitlines()[0] and \
        "task_chat" in (tmp_path / "k2" / "best.yaml").read_text().splitlines()[1]
    assert (row["status"], int(row["step"]), int(row["iters"])) == ("completed", 6, 1)
    (result,) = [json.loads(line) for line in
                 (tmp_path / "k2" / f"trial_{row['trial']}" / "result.json").read_text().splitlines()]
    assert result["world_size"] == 2  # reported by rank 0 of the Train run, forwarded to Tune
    assert (Path(row["run_dir"]) / "checkpoints" / "step_00000006").is_dir()
    one = next(r for r in _rows(one_worker_sweep / "trials.csv") if float(r["train.lr"]) == 3.0e-3)
    first = json.loads((one_worker_sweep / f"trial_{one['trial']}" / "result.json").read_text().splitlines()[0])
    assert first["step"] == 6 and abs(first["eval_loss"] - float(row["eval_loss"])) < 1e-3


# --------------------------------------------------------------------------- on object storage
@pytest.mark.integration
@pytest.mark.slow
def test_sweep_on_s3_writes_its_results_there_and_best_yaml_trains(tmp_path, ray_session, base_yaml, s3,
                                                                    monkeypatch):
    """--storage s3://...: 2 one-worker trials of 6 steps; the runs, trials.csv and best.yaml are
    on S3 (nothing in a local folder named after the scheme, here or where the trials run), and
    `hydra-ray train --config s3://.../best.yaml` trains."""
    monkeypatch.chdir(tmp_path)
    stray = [d / "s3:" for d in (tmp_path, LAUNCH_DIR) if not (d / "s3:").exists()]
    space = tmp_path / "space.yaml"
    space.write_text("model.moe.aux_weight: {loguniform: [1e-4, 1e-1]}\n")
    rc = tune.run(_args("--config", str(base_yaml), "--space", str(space), "--samples", "2", "--scheduler", "none",
                        "--max-steps", "6", "--storage", f"{s3}/tune", "--name", "s3sweep", "--seed", "0",
                        "--metric", "task_mean", "--task-n", "2"))
    assert rc == 0
    sweep = f"{s3}/tune/s3sweep"
    rows = list(csv.DictReader(storage.read_text(f"{sweep}/trials.csv").splitlines()))
    assert len(rows) == 2 and all((r["status"], int(r["step"])) == ("completed", 6) for r in rows), rows
    for r in rows:  # the one-worker trials score their checkpoints too, here on S3
        scores = [float(r[f"task_{t}"]) for t in ("math", "code", "chat")]
        assert all(0 <= x <= 1 for x in scores) and float(r["task_mean"]) == pytest.approx(sum(scores) / 3)
    for r in rows:
        assert r["run_dir"] == f"{sweep}/runs/{r['trial']}"
        assert ("step_00000006", True) in storage.listdir(f"{r['run_dir']}/checkpoints")
    ended = [json.loads(line) for line in storage.read_text(f"{sweep}/trial_status.jsonl").splitlines()]
    assert sorted(e["trial"] for e in ended) == sorted(r["trial"] for r in rows)
    assert storage.is_file(f"{sweep}/pareto.csv") and storage.is_file(f"{sweep}/sweep.json")

    out = tmp_path / "train"
    assert main(["train", "--config", f"{sweep}/best.yaml", "--workers", "1", "--max-steps", "2",
                 "--storage", str(out)]) == 0
    assert (out / "s3sweep-best" / "checkpoints" / "step_00000002").is_dir()
    assert not [p for p in stray if p.exists()], "a local folder named after the scheme"


@pytest.mark.parametrize("where, says", [
    ("foo://x", ["foo://x", "unknown storage scheme 'foo'"]),
    pytest.param("s3://missing-bucket/x",
                 ["--storage s3://missing-bucket/x", "bucket 'missing-bucket' does not exist"],
                 marks=[pytest.mark.integration, pytest.mark.slow]),  # a real S3 server, started once
])
def test_unusable_storage_is_a_one_line_error(tmp_path, base_yaml, capsys, request, where, says):
    if where.startswith("s3://"):
        request.getfixturevalue("s3")  # the server's endpoint and credentials in the environment
    space = tmp_path / "space.yaml"
    space.write_text("model.moe.aux_weight: {loguniform: [1e-4, 1e-1]}\n")
    assert main(["tune", "--config", str(base_yaml), "--space", str(space), "--samples", "1",
                 "--storage", where]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for s in says:
        assert s in err, (s, err)
