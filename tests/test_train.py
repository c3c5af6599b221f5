"""Training on Ray Train: checkpoints, exact resume, NaN handling, the elastic two-worker curriculum
with a worker killed mid-run, the same on S3 (killed, then --resume), resharding checkpoints
between worker counts. (`ray job submit` against a real cluster: tests/test_rehearsal.py.)"""

import os
import shutil
import signal
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hydra_ray import storage
from hydra_ray.config import parse_config
from hydra_ray import checkpoint as ckpt
from hydra_ray.runlog import read_lines, read_records

from conftest import tiny_config, train_worker_pids



def _metrics(run_dir):
    return read_records(str(run_dir), "metrics")


def _events(run_dir):
    return read_records(str(run_dir), "events")


# --------------------------------------------------------------------------- checkpoints (no Ray)
def test_checkpoints_skip_incomplete_and_corrupt_ones(tmp_path, caplog):
    run = tmp_path / "run"
    for step in (10, 20, 30):
        ckpt.save_local(str(run), step, keep=5, model_state={"w": torch.full((3,), float(step))},
                        opt_state={"w::exp_avg": torch.zeros(3)}, trainer_state={"step": step}, config_yaml="a: 1\n")
    assert [s for s, _ in ckpt.list_steps(str(run))] == [10, 20, 30]
    (run / "checkpoints" / "step_00000030" / "model.safetensors").write_bytes(b"garbage")  # corrupt
    (run / "checkpoints" / "step_00000020" / "manifest.json").unlink()  # half-written
    with caplog.at_level("WARNING"):
        loaded = ckpt.latest_valid(str(run))
    assert loaded.step == 10 and torch.equal(loaded.model["w"], torch.full((3,), 10.0))
    assert "step_00000030" in caplog.text and "step_00000020" in caplog.text
    ckpt.save_local(str(run), 40, keep=2, model_state={"w": torch.zeros(1)}, opt_state={},
                    trainer_state={"step": 40}, config_yaml="")
    assert [s for s, _ in ckpt.list_steps(str(run))] == [30, 40]  # keeps the last K


def _save(run, step, keep, **state):
    ckpt.save_local(str(run), step, keep=keep, model_state={"w": torch.full((1,), float(step))}, opt_state={},
                    trainer_state={"step": step, **state}, config_yaml="")


def test_pruning_never_lets_a_half_written_or_later_folder_push_out_a_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    _save(run, 100, 1)
    later = run / "checkpoints" / "step_00000300"  # a run that went further crashed mid-copy there
    later.mkdir()
    (later / "model.safetensors").write_bytes(b"half")
    _save(run, 200, 1)  # ... and was resumed to an earlier end
    assert [s for s, _ in ckpt.list_steps(str(run))] == [200, 300] and ckpt.latest_valid(str(run)).step == 200
    half = run / "checkpoints" / "step_00000250"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half")
    _save(run, 260, 2)  # the complete 200 stays (keep 2); the half-written 250 before it goes
    assert [s for s, _ in ckpt.list_steps(str(run))] == [200, 260, 300]


def _agree_on_a_checkpoint(rank: int, port: int, run: str, out: str) -> None:
    """A rank of a 2-rank gloo group: rank 1's listing lags (it sees step 10 only), rank 0 sees
    10 and 20. Both must restore 20. Then rank 1 cannot read 20: it must raise, not fall back,
    and rank 0 must raise too rather than go on alone."""
    import json

    import torch.distributed as dist

    from hydra_ray.train.env import Env

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        env = Env(rank=rank, world=2)
        if rank == 1:
            full = ckpt.list_steps
            ckpt.list_steps = lambda run_dir: [p for p in full(run_dir) if p[0] == 10] if lagging else full(run_dir)
        lagging = True
        alone = ckpt.latest_valid(run).step
        agreed = ckpt.agreed_latest(run, env)
        lagging = False
        if rank == 1:
            ckpt._read_verified = lambda fs, path: (_ for _ in ()).throw(ValueError("model.safetensors does not match"))
        try:
            ckpt.agreed_latest(run, env)
            second = "loaded"
        except (ValueError, RuntimeError) as e:
            second = f"{type(e).__name__}: {e}"
        if rank == 0:  # rank 0's store cannot be read: rank 1 must not wait for it, nor go on alone
            def unreadable(run_dir, before=None):
                raise storage.StorageError("checkpoint step_00000020: cannot be read (timeout)")

            ckpt.latest_valid = unreadable
        try:
            ckpt.agreed_latest(run, env)
            third = "loaded"
        except (ValueError, RuntimeError) as e:
            third = f"{type(e).__name__}: {e}"
        Path(out, f"rank{rank}.json").write_text(json.dumps({"alone": alone, "agreed": agreed.step,
                                                            "w": float(agreed.model["w"][0]), "second": second,
                                                            "third": third}))
    finally:
        dist.destroy_process_group()


def test_every_rank_restores_the_checkpoint_rank_0_chose(tmp_path):
    import json

    import torch.multiprocessing as mp

    from test_dispatch_parallel import _free_port

    run = tmp_path / "run"
    _save(run, 10, 5)
    _save(run, 20, 5)
    mp.spawn(_agree_on_a_checkpoint, args=(_free_port(), str(run), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["alone"], r1["alone"]) == (20, 10)  # alone, they would restore different steps
    assert r0["agreed"] == r1["agreed"] == 20 and r0["w"] == r1["w"] == 20.0
    assert r1["second"].startswith("ValueError") and "step_00000020 is incomplete or corrupt" in r1["second"]
    assert r0["second"].startswith("RuntimeError: another rank could not read the checkpoint to restore (step 20)")
    assert r0["third"].startswith("StorageError: checkpoint step_00000020: cannot be read")
    assert r1["third"].startswith("RuntimeError: another rank could not read the checkpoint to restore "
                                  "(rank 0 could not choose one)")


def test_an_unreadable_store_is_an_error_not_a_corrupt_checkpoint(tmp_path, monkeypatch):
    """A network or credentials failure while reading checkpoints must not look like corruption:
    falling back to an older checkpoint (or none) would redo or discard training."""
    run = tmp_path / "run"
    _save(run, 10, 3, global_batch=12)
    _save(run, 20, 3, global_batch=12)

    def unreachable(fs, path, *files):
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7")

    with monkeypatch.context() as m:
        m.setattr(ckpt, "_read_verified", unreachable)
        with pytest.raises(storage.StorageError, match="step_00000020: cannot be read .*NETWORK_CONNECTION"):
            ckpt.latest_valid(str(run))
    loaded = ckpt.latest_valid(str(run))
    assert loaded.step == 20
    ckpt.check_resumable(loaded, 12)
    with pytest.raises(ValueError, match="train.batch_size 12: resuming it with 24 would skip or repeat data"):
        ckpt.check_resumable(loaded, 24)


def test_a_run_given_as_a_file_uri_writes_tensorboard_into_its_own_folder(tmp_path, monkeypatch):
    from hydra_ray.runlog import TensorBoard

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    tb = TensorBoard(f"file://{tmp_path}/run", None)
    tb.add({"step": 1, "loss": 2.0})
    tb.writer.close()
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    assert not list((tmp_path / "cwd").rglob("*"))  # no folder named after the scheme
    with pytest.raises(storage.StorageError, match="query string"):
        storage.check_storage("s3://bucket/runs?endpoint_override=localhost:9000&scheme=http")


# --------------------------------------------------------------------------- in-process loop
@pytest.fixture(scope="module")
def tiny_data(tiny_prepared):
    return tiny_prepared


def test_checkpoints_carry_the_cuda_generator_once_cuda_is_in_use(monkeypatch):
    """MoE router jitter on a GPU draws from the CUDA generator: its state travels in
    trainer_state.json beside the CPU's and is put back on resume. This machine has no CUDA, so
    torch.cuda's calls are stand-ins that hand out and record a state."""
    import json

    import torch

    from hydra_ray.train import state

    assert "cuda_rng" not in state.rng_state()  # no CUDA: the CPU generator alone
    saved, put = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: saved.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", put.append)
    trainer_state = json.loads(json.dumps(state.rng_state()))  # as trainer_state.json keeps it
    assert trainer_state["cuda_rng"] == list(range(16))
    cpu = torch.get_rng_state()
    torch.rand(3)  # the run goes on, then resumes from the checkpoint
    state.set_rng_state(trainer_state)
    assert torch.equal(torch.get_rng_state(), cpu) and len(put) == 1 and torch.equal(put[0], saved)


@pytest.mark.integration
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, builtin_cache, tiny_data):
    from hydra_ray.train.loop import run_local

    cfg = tiny_config(builtin_cache, log_every=1, save_every=50, eval_every=1000)
    run_local(cfg, str(tmp_path / "A"), tiny_data, end_step=120)
    run_local(cfg, str(tmp_path / "B"), tiny_data, end_step=100)  # stops at S = 100 ...
    run_local(cfg, str(tmp_path / "B"), tiny_data, end_step=120)  # ... and resumes to 2S (MoE switches on at 104)
    a = {m["step"]: m for m in _metrics(tmp_path / "A")}
    b = {m["step"]: m for m in _metrics(tmp_path / "B")}
    assert sorted(b) == sorted(a) == list(range(1, 121))
    for step in range(101, 121):
        assert (a[step]["loss"], a[step]["ce"]) == (b[step]["loss"], b[step]["ce"]), step
        assert a[step]["expert_util"] == b[step]["expert_util"]
    assert any(e["event"] == "restored" and e["step"] == 100 for e in _events(tmp_path / "B"))


@pytest.mark.integration
def test_nan_steps_are_skipped_and_repeated_nans_roll_back(tmp_path, builtin_cache, tiny_data):
    from hydra_ray.train.loop import run_local

    cfg = tiny_config(builtin_cache, log_every=1, save_every=20, eval_every=1000, max_nan_skips=3,
                      inject_nan_steps=[24, 44, 45, 46])  # 0-based step indices
    run_local(cfg, str(tmp_path / "run"), tiny_data, end_step=60)
    events = _events(tmp_path / "run")
    skipped = [e["step"] for e in events if e["event"] == "nan_skipped"]
    assert skipped == [25, 45, 46, 47]
    rolled = [e for e in events if e["event"] == "rolled_back"]
    assert len(rolled) == 1 and rolled[0]["to_step"] == 40
    metrics = {m["step"]: m for m in _metrics(tmp_path / "run")}
    assert sorted(metrics) == list(range(1, 61))  # every step present once after the rollback
    assert metrics[25]["nan_skipped"] and metrics[25]["loss"] is None
    assert all(np.isfinite(metrics[s]["loss"]) for s in range(41, 61))


# --------------------------------------------------------------------------- two workers on Ray Train
@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory, ray_session, builtin_cache):
    """The whole tiny curriculum, --workers 1-3 with room for 2 (4 CPUs, 1.5 per worker), and
    one worker killed (SIGKILL, found by its process title: nothing in the run says which
    processes are workers) once the run is past step 60 with a checkpoint written."""
    from hydra_ray.train.driver import train

    cfg = tiny_config(builtin_cache)
    storage = tmp_path_factory.mktemp("runs")
    run_dir = storage / "elastic"
    killed = {}

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline:
            steps = ckpt.list_steps(str(run_dir))
            metrics = _metrics(run_dir)
            workers = train_worker_pids()
            if steps and steps[-1][0] >= 60 and metrics and metrics[-1]["step"] >= 65 and len(workers) == 2:
                killed["step"] = metrics[-1]["step"]
                killed["pid"] = workers[-1]
                os.kill(killed["pid"], signal.SIGKILL)
                return
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = train(cfg, "tiny", workers="1-3", storage=str(storage), name="elastic", cpus_per_worker=1.5,
                log=lambda *_: None)
    t.join(timeout=5)
    return cfg, run_dir, res, killed


@pytest.mark.integration
@pytest.mark.slow
def test_elastic_two_workers_survive_a_killed_worker_and_follow_the_curriculum(elastic_run):
    cfg, run_dir, res, killed = elastic_run
    assert res["step"] == 180 and res.get("error") is None
    assert "pid" in killed, "the worker was never killed"
    metrics = _metrics(run_dir)
    steps = [m["step"] for m in metrics]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    assert set(range(5, 181, 5)) <= set(steps)  # every logged step, once, despite the restart
    assert {m["world_size"] for m in metrics} == {2}  # elastic 1-3 with room for 2
    restored = [e for e in _events(run_dir) if e["event"] == "restored"]
    assert restored and killed["step"] - restored[0]["step"] <= cfg.train.save_every + cfg.train.log_every
    phases = {p.name: p for p in cfg.curriculum.phases}
    for m in metrics:
        p = phases[m["phase"]]
        assert m["routing_mode"] == (p.routing if p.moe else None)
        if p.routing == "forced":
            assert m["domain_expert_agreement"] == 1.0
        if p.moe:
            assert abs(sum(m["expert_util"]) - 1.0) < 1e-6
    switches = [m["switch_on"] for m in metrics if "switch_on" in m]
    assert {f for s in switches for f in s["features"]} == {"mor", "mod", "moe"}
    for s in switches:
        assert abs(s["ce_after"] - s["ce_before"]) / s["ce_before"] < 0.05, s
    final = metrics[-1]
    assert final["eval"]["loss"] is not None and set(final["eval"]["by_domain"]) == set(cfg.model.domains)


def _scalar_tags(folder: str) -> set[str]:
    """Scalar tags in TensorBoard event files (TFRecord framing: length, crc, Event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    tags = set()
    for rel in storage.walk_files(folder):
        data = storage.read_bytes(storage.join(folder, rel))
        at = 0
        while at + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            ev = Event.FromString(data[at + 12:at + 12 + n])
            tags |= {v.tag for v in ev.summary.value}
            at += 12 + n + 4
    return tags


@pytest.fixture(scope="module")
def s3_run(s3, ray_session, builtin_cache):
    """The tiny curriculum's first 60 steps on 2 workers on S3: a worker killed after the step-20
    checkpoint (Ray Train restarts the group), stopped at 40, then resumed with --resume to 60.
    The uninterrupted reference is `elastic_run`'s steps 1..60 (2 workers on local disk; its own
    worker is killed only after step 65, and it restarts from checkpoint 60 or later)."""
    from hydra_ray.train.driver import train

    cfg = tiny_config(builtin_cache)
    storage_uri = f"{s3}/runs-{os.getpid()}"
    run = f"{storage_uri}/killed"
    killed = {}

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and "pid" not in killed:
            try:
                steps = [r["step"] for r in read_records(run, "metrics")]
                workers = train_worker_pids()
                if steps and steps[-1] >= 25 and len(workers) == 2:
                    killed["step"], killed["pid"] = steps[-1], workers[-1]
                    os.kill(workers[-1], signal.SIGKILL)
            except Exception:  # noqa: BLE001  (the run may not exist yet)
                pass
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    first = train(cfg, "tiny", workers="2", storage=storage_uri, name="killed", max_steps=40, log=lambda *_: None)
    t.join(timeout=5)
    second = train(cfg, "tiny", workers="2", storage=storage_uri, name="killed", max_steps=60, resume=True,
                   log=lambda *_: None)
    return {"run": run, "killed": killed, "results": (first, second)}


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_on_s3_survives_a_killed_worker_and_resumes_like_an_uninterrupted_run(s3_run, elastic_run):
    run, ref = s3_run["run"], str(elastic_run[1])
    first, second = s3_run["results"]
    assert "pid" in s3_run["killed"], "the worker was never killed"
    assert (first["step"], second["step"]) == (40, 60)
    assert not any(r.get("error") for r in (first, second))
    # every step once, in the raw parts (not only after the reader's de-duplication)
    raw = [line for _, _, line in read_lines(run, "metrics")]
    steps = [r["step"] for r in read_records(run, "metrics")]
    assert len(raw) == len(steps) and set(range(5, 61, 5)) <= set(steps)
    a = {r["step"]: r for r in read_records(run, "metrics")}
    b = {r["step"]: r for r in read_records(ref, "metrics") if r["step"] <= 60}
    assert sorted(a) == sorted(b)
    for step in sorted(a):
        assert (a[step]["loss"], a[step]["ce"]) == pytest.approx((b[step]["loss"], b[step]["ce"]), rel=1e-6), step
    events = [e["event"] for e in read_records(run, "events")]
    assert events.count("restored") >= 2  # after the kill, and at --resume
    # everything of the run is in the bucket; nothing went to a local folder named after the scheme
    files = storage.walk_files(run)
    for f in ("config.yaml", "data_report.txt", "checkpoints/step_00000060/manifest.json"):
        assert f in files, f
    assert not any(f.startswith("workers/") for f in files)  # no PID files in shared storage
    assert not list(Path.cwd().glob("s3:*"))
    tags = _scalar_tags(storage.join(run, "tensorboard"))
    assert {"train/loss", "train/ce", "train/lr", "train/grad_norm", "eval/loss", "eval/math"} <= tags
    assert {"train/loss", "eval/loss"} <= _scalar_tags(storage.join(ref, "tensorboard"))  # local: written directly
    assert not any(Path(ref).rglob("*.pid"))


@pytest.mark.integration
def test_checkpoints_reshard_between_two_workers_and_one(elastic_run, tmp_path, builtin_cache, tiny_data):
    """The 2-worker checkpoint loads on 1 process, and a 1-process checkpoint on 2 workers: the
    logits of a fixed batch agree with what the other worker count computes."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from hydra_ray.models import HydraLM
    from hydra_ray.train.loop import run_local

    cfg, two_worker_run, _, _ = elastic_run
    one_worker_run = tmp_path / "one"
    run_local(tiny_config(builtin_cache, eval_every=1000), str(one_worker_run), tiny_data, end_step=120)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 32), generator=g)
    dom = torch.randint(0, 4, (4, 32), generator=g)

    def logits_on_one(run):
        loaded = ckpt.latest_valid(str(run))
        model = HydraLM(parse_config(__import__("yaml").safe_load(loaded.config_yaml)).model)
        model.load_state_dict(loaded.model)
        return model.eval()(x, x, dom).logits.detach().numpy()

    def loop(config):
        import ray.train
        import yaml

        from hydra_ray.config import parse_config as parse
        from hydra_ray.models import HydraLM as Model
        from hydra_ray.parallel.parallelize import parallelize as par
        from hydra_ray import checkpoint as ck
        from hydra_ray.train.env import Env
        from hydra_ray.train.state import restore

        ctx = ray.train.get_context()
        env = Env(rank=ctx.get_world_rank(), world=ctx.get_world_size())
        for name in ("two", "one"):
            loaded = ck.latest_valid(config[name])
            model = Model(parse(yaml.safe_load(loaded.config_yaml)).model)
            par(model)  # experts sharded over the two workers before the checkpoint is loaded
            restore(model, None, loaded, env)
            out = model.eval()(config["x"], config["x"], config["dom"]).logits.detach().numpy()
            if env.rank == 0:
                np.save(Path(config["out"]) / f"{name}.npy", out)

    TorchTrainer(loop, train_loop_config={"two": str(two_worker_run), "one": str(one_worker_run), "x": x,
                                          "dom": dom, "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(storage_path=str(tmp_path / "store"), name="reshard")).fit()
    for name, run in (("two", two_worker_run), ("one", one_worker_run)):
        on_two = np.load(tmp_path / f"{name}.npy")
        on_one = logits_on_one(run)
        assert np.abs(on_two - on_one).max() < 1e-5, (name, np.abs(on_two - on_one).max())


@pytest.mark.integration
def test_three_workers_shard_four_experts_unevenly_and_checkpoints_reshard(elastic_run, tmp_path, builtin_cache,
                                                                         tiny_data):
    """4 experts over 3 Ray Train workers (2/1/1): the elastic run's 2-worker checkpoint at step 160
    resumes on 3 workers for steps 161-162, and their checkpoint resumes on one process for step 163.
    The reference is one process resuming the same checkpoint with grad_accum 3 (the 3 workers'
    slices of each batch as its micro-batches: the same losses and gradients), so an exact reshard
    leaves only float summation order between the runs: every loss, and the 3-worker checkpoint's
    weights and optimizer state (every expert under its global index), agree to float rounding."""
    from hydra_ray.train.driver import train
    from hydra_ray.train.loop import run_local

    _, elastic_dir, _, _ = elastic_run
    knobs = dict(log_every=1, save_every=1000, eval_every=1000)
    on_three, on_one = tiny_config(builtin_cache, **knobs), tiny_config(builtin_cache, grad_accum=3, **knobs)
    one, three, back = tmp_path / "one", tmp_path / "runs" / "three", tmp_path / "back"

    def copy_checkpoint(src, step, dst):
        path = dict(ckpt.list_steps(str(src)))[step]
        shutil.copytree(path, dst / "checkpoints" / Path(path).name)

    copy_checkpoint(elastic_dir, 160, one)
    run_local(on_one, str(one), tiny_data, end_step=162)
    want = ckpt.latest_valid(str(one))
    run_local(on_one, str(one), tiny_data, end_step=163)  # resuming on one process is bitwise exact
    copy_checkpoint(elastic_dir, 160, three)
    res = train(on_three, "tiny", workers="3", storage=str(three.parent), name="three", max_steps=162, resume=True,
                log=lambda *_: None)
    assert res["step"] == 162 and res.get("error") is None
    copy_checkpoint(three, 162, back)
    run_local(on_one, str(back), tiny_data, end_step=163)

    a, b, c = ({m["step"]: m for m in _metrics(run)} for run in (one, three, back))
    assert [b[161]["world_size"], b[162]["world_size"], c[163]["world_size"]] == [3, 3, 1]
    for step, other in ((161, b), (162, b), (163, c)):
        for key in ("loss", "ce"):
            assert other[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=0), (step, key)
    got = ckpt.latest_valid(str(three))
    assert (got.step, want.step, got.trainer_state["world_size"]) == (162, 162, 3)
    for have, ref in ((got.model, want.model), (got.optimizer, want.optimizer)):
        assert sorted(have) == sorted(ref)
        for k, v in ref.items():
            torch.testing.assert_close(have[k], v, atol=1e-6, rtol=1e-5, msg=k)
    # that tolerance tells experts apart: one stored under the wrong index would be far outside it
    w1 = want.model[next(k for k in want.model if k.endswith(".experts.w1"))]
    assert min((w1[i] - w1[j]).abs().max() for i in range(4) for j in range(i)) > 1e-3
