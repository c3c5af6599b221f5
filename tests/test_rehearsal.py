"""The cluster path rehearsed on one machine (`make cluster-rehearsal`): cluster-local.yaml's
autoscaler (Ray's fake_multinode provider) adds worker nodes because a `ray job submit`ted training
asks for them, a whole worker node is killed under the running job, `serve deploy` serves the
run's checkpoint from the same cluster and hot-swaps it under load, and `ray job logs / status /
stop` behave. Storage is the session's S3 server. Measurements are printed (run with -s)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
import yaml

from hydra_ray.runlog import read_records

from conftest import LoadClients
from local_cluster import ROOT, LocalCluster, free_ports

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.rehearsal]

# Timers shortened for a rehearsal that fits a test run (a real cluster keeps Ray's defaults):
# the autoscaler loop every second, and Ray Train gives up a worker group that cannot start
# (it still counts a node that just died) after 20 s instead of 60 s.
FAST = {"AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
KILL_AFTER_STEP = 70  # mid-way between the checkpoints at 60 and 80


def _job_status(cluster: LocalCluster, job: str) -> str:
    """What `ray job status JOB` says: "Job 'JOB' succeeded / failed / was stopped", else
    "Status for job 'JOB': RUNNING"."""
    r = cluster.cli("job", "status", job)
    text = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr)  # the CLI prints colour codes
    for phrase, status in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("was stopped", "STOPPED")):
        if f"Job '{job}' {phrase}" in text:
            return status
    found = re.search(rf"Status for job '{re.escape(job)}': (?:JobStatus\.)?(\w+)", text)
    return found.group(1) if found else "UNKNOWN"


def _api_status(cluster: LocalCluster, job: str) -> str:
    """The job's status from the dashboard's REST API: what the polling loops use (a `ray` CLI
    process per poll would take a core of this 2-core machine from the training)."""
    try:
        return httpx.get(f"{cluster.dashboard}/api/jobs/{job}", timeout=10).json()["status"]
    except (httpx.HTTPError, ValueError, KeyError):
        return "UNKNOWN"


def _wait_job(cluster: LocalCluster, job: str, done=("SUCCEEDED", "FAILED", "STOPPED"), timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = _api_status(cluster, job)
        if status in done:
            return status
        time.sleep(1)
    return "TIMEOUT"


def _crashed_at_start(cluster: LocalCluster, job: str) -> bool:
    """Whether `job` failed because a Ray worker process died while it started. On this one-machine
    cluster, Ray's fake_multinode nodes share one session folder, and each node's runtime-env agent,
    the first time it sees the job's working_dir, deletes and unpacks it again in the one shared
    place. A process that is starting on another node at that moment loses its working directory
    and can crash (seen: MKL "Cannot load libtorch_cpu.so" in the TrainController as a new node
    came up, and the job's own entrypoint failing in `import torch` because os.getcwd() no longer
    exists). Separate machines have separate folders, so the rehearsal resubmits such a job once
    and notes it; any other failure stands, and so does this one if it happens twice."""
    if _api_status(cluster, job) != "FAILED":
        return False
    logs = cluster.cli("job", "logs", job).stdout
    died = "ActorDiedError" in logs and "worker process has died" in logs
    lost_cwd = "in abspath" in logs and "FileNotFoundError: [Errno 2] No such file or directory" in logs
    return died or lost_cwd


def _records(run: str, kind: str = "metrics") -> list[dict]:
    try:
        return read_records(run, kind)
    except Exception:  # noqa: BLE001  (the run has written nothing yet)
        return []


def _submit(cluster: LocalCluster, job: str, *train_args: str) -> None:
    r = cluster.cli("job", "submit", "--no-wait", "--submission-id", job, "--working-dir", ".", "--",
                    "hydra-ray", "train", *train_args)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, s3, builtin_cache, tiny_prepared):
    """The scenario, on a cluster with no worker nodes at first:
    1. job `other` trains on 1 worker: the autoscaler adds a node for it;
    2. job `rehearsal` (the run under test) asks for 1-3 workers: the autoscaler adds the 2 nodes
       the cluster still has room for, and the run starts on 2 workers;
    3. once it is past its first checkpoint, `ray job stop other` frees the third node: the run
       grows to 3 workers at its next resize check (a restart from its last checkpoint);
    4. once it is past step 70 on 3 workers, one worker node's raylet is killed (SIGKILL): the run
       goes on with 2 workers from its last checkpoint, and finishes.
    Yields what the tests look at; prints the measurements."""
    tmp = tmp_path_factory.mktemp("rehearsal")
    bin_dir = str(Path(os.sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TRITON_INTERPRET")}
    env.update({"RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                "PATH": bin_dir + os.pathsep + env["PATH"], "HYDRA_CACHE_DIR": builtin_cache,
                "OMP_NUM_THREADS": "1", **FAST})
    # the tiny curriculum with 3x the batch, so that its 180 steps outlast node start-up and restarts
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["train"]["batch_size"] = 36
    config = tmp / "tiny36.yaml"
    config.write_text(yaml.safe_dump(cfg))
    storage = f"{s3}/rehearsal-{os.getpid()}"
    run = f"{storage}/tiny36"
    elastic = ("--resources-per-worker", '{"trainer": 1}', "--storage", storage)
    cluster = LocalCluster(tmp, env)
    cluster.start()
    m = {}
    jobs = {"other": "other", "rehearsal": "rehearsal"}  # submission ids (see _crashed_at_start)
    out = {"cluster": cluster, "run": run, "storage": storage, "measure": m, "tmp": tmp, "log": [], "jobs": jobs}

    def note(what, **kw):
        out["log"].append({"t": round(time.time() - t0, 1), "what": what, **kw})

    try:
        t0 = time.time()
        other_args = ("--config", str(config), "--workers", "1", "--name", "other", *elastic)
        _submit(cluster, jobs["other"], *other_args)
        deadline = time.time() + 240
        while time.time() < deadline and not cluster.train_workers_by_raylet():
            if jobs["other"] == "other" and _crashed_at_start(cluster, "other"):
                note("other: a worker crashed at start, resubmitted")
                jobs["other"] = "other-again"
                _submit(cluster, jobs["other"], *other_args)
            time.sleep(1)
        other_workers = [p for ps in cluster.train_workers_by_raylet().values() for p in ps]
        assert other_workers, cluster.cli("job", "logs", jobs["other"]).stdout[-3000:]
        m["node_for_other_s"] = time.time() - t0
        note("other: worker on a new node")

        t1 = time.time()
        run_args = ("--config", str(config), "--workers", "1-3", "--resize-interval", "10", *elastic)
        _submit(cluster, jobs["rehearsal"], *run_args)
        stopped = killed = None
        deadline = time.time() + 600
        while time.time() < deadline:
            if _api_status(cluster, jobs["rehearsal"]) not in ("PENDING", "RUNNING", "UNKNOWN"):
                if jobs["rehearsal"] == "rehearsal" and not _records(run) and _crashed_at_start(cluster, "rehearsal"):
                    note("rehearsal: a worker crashed at start, resubmitted")
                    jobs["rehearsal"] = "rehearsal-again"
                    _submit(cluster, jobs["rehearsal"], *run_args)
                    continue
                break
            on_nodes = cluster.train_workers_by_raylet()
            mine = {r: ps for r, ps in on_nodes.items() if not set(ps) & set(other_workers)}
            if mine and "node_for_run_s" not in m:
                m["node_for_run_s"] = time.time() - t1
                note("rehearsal: worker on a new node")
            metrics = _records(run)
            last = metrics[-1] if metrics else {"step": 0, "world_size": 0}
            if stopped is None and last["world_size"] == 2 and last["step"] >= 25:
                note("stopping other", step=last["step"])
                stop = cluster.cli("job", "stop", jobs["other"])
                stopped = {"step": last["step"], "returncode": stop.returncode, "output": stop.stdout + stop.stderr,
                           "status": _wait_job(cluster, jobs["other"], timeout=60), "other_workers": other_workers}
                note("other stopped", status=stopped["status"])
            if stopped and killed is None and len(mine) == 3 and last["world_size"] == 3 and last["step"] >= KILL_AFTER_STEP:
                raylet = sorted(mine)[-1]
                killed = {"step": last["step"], "raylet": raylet, "seen": last["step"]}
                os.kill(raylet, signal.SIGKILL)
                note("killed a worker node", step=last["step"])
            elif killed and last["world_size"] == 3:  # a killed raylet's worker may run on for a while
                killed["seen"] = max(killed["seen"], last["step"])
            time.sleep(1)
        m["total_s"] = time.time() - t1
        note("done", worlds=[(r["step"], r["world_size"]) for r in _records(run)],
             events=[(e["event"], e.get("world_size"), e.get("step")) for e in _records(run, "events")
                     if e["event"] != "switch_on"])
        out.update(status=_job_status(cluster, jobs["rehearsal"]), stopped=stopped, killed=killed)
        yield out
    finally:
        print("\n[rehearsal] " + json.dumps(m) + "\n[rehearsal] " + json.dumps(out["log"]))
        cluster.stop()


def test_the_run_grows_when_a_node_frees_and_survives_a_lost_node(rehearsal):
    cluster, run, killed, stopped = rehearsal["cluster"], rehearsal["run"], rehearsal["killed"], rehearsal["stopped"]
    assert rehearsal["status"] == "SUCCEEDED", cluster.cli("job", "logs", rehearsal["jobs"]["rehearsal"]).stdout[-4000:]
    assert stopped, f"the run never logged step 25 on 2 workers: {rehearsal['log']}"
    assert killed, f"the run never reached step {KILL_AFTER_STEP} on 3 workers: {rehearsal['log']}"
    metrics = read_records(run, "metrics")
    events = read_records(run, "events")
    steps = [m["step"] for m in metrics]
    assert len(steps) == len(set(steps)) and steps == sorted(steps), "a logged step is repeated"
    assert set(range(5, 181, 5)) <= set(steps) and steps[-1] == 180, "a logged step is missing"
    worlds = [m["world_size"] for m in metrics]
    # 2 workers (the third node was busy), 3 (it freed), 2 (a node was lost): in this order
    runs = [w for i, w in enumerate(worlds) if i == 0 or worlds[i - 1] != w]
    assert runs == [2, 3, 2], list(zip(steps, worlds))
    grown_at = steps[worlds.index(3)]
    assert grown_at > 20, "the run grew before its first checkpoint: not mid-run"
    restored = [e for e in events if e["event"] == "restored"]
    assert [e["world_size"] for e in restored] == [3, 2], restored
    # the group fails once Ray declares the node dead, some seconds after the kill: the restore
    # point is at most one checkpoint interval before the last step logged on 3 workers
    last_on_3 = max(s for s, w in zip(steps, worlds) if w == 3)
    redone = max(killed["seen"], last_on_3) - restored[-1]["step"]
    assert 0 <= redone <= 20 + 5, (killed, restored)  # at most one checkpoint interval (+ a log interval)
    rehearsal["measure"]["steps_redone_after_node_loss"] = redone
    rehearsal["measure"]["grew_at_step"] = grown_at
    # the 4 experts resharded over 3 workers and back over 2: the last checkpoint holds all of them
    from hydra_ray import checkpoint as ckpt

    last = ckpt.latest_valid(run)
    assert last.step == 180
    experts = [v for k, v in last.model.items() if k.endswith(".experts.w1")]
    assert experts and all(v.shape[0] == 4 for v in experts)


def test_job_logs_status_and_stop(rehearsal):
    from local_cluster import cmdline, descendants

    cluster, stopped, jobs = rehearsal["cluster"], rehearsal["stopped"], rehearsal["jobs"]
    logs = cluster.cli("job", "logs", jobs["rehearsal"]).stdout
    assert "[train] done" in logs and "step    180/180" in logs
    assert _job_status(cluster, jobs["rehearsal"]) == "SUCCEEDED"
    listed = cluster.cli("job", "list").stdout
    assert jobs["rehearsal"] in listed and jobs["other"] in listed
    # `ray job stop` ended the other run: STOPPED, and its training worker is gone
    assert stopped and stopped["returncode"] == 0, stopped
    assert stopped["status"] == "STOPPED" and _job_status(cluster, jobs["other"]) == "STOPPED"
    alive = {p for p in descendants(cluster.proc.pid) if cmdline(p).startswith("ray::RayTrainWorker")}
    assert not alive & set(stopped["other_workers"])
    assert "step " in cluster.cli("job", "logs", jobs["other"]).stdout  # it had been training


def test_serve_deploy_serves_the_run_and_hot_swaps_without_dropping_a_request(rehearsal):
    cluster, run = rehearsal["cluster"], rehearsal["run"]
    (port,) = free_ports(1)
    conf = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    conf["proxy_location"] = "HeadOnly"  # every fake node shares this machine's ports
    conf["http_options"] = {"host": "127.0.0.1", "port": port}
    app = conf["applications"][0]
    app["args"]["run"] = run
    ingress = next(d for d in app["deployments"] if d["name"] == "HydraIngress")
    ingress["user_config"]["default_model"] = "tiny36"
    path = rehearsal["tmp"] / "serve.yaml"
    path.write_text(yaml.safe_dump(conf))
    t0 = time.time()
    r = cluster.cli("serve", "deploy", str(path), "--address", cluster.dashboard)
    assert r.returncode == 0, r.stdout + r.stderr
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=2).json().get("default_model") == "tiny36@180":
                break
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    rehearsal["measure"]["serve_ready_s"] = time.time() - t0
    c = httpx.Client(base_url=url, timeout=60)
    r = c.post("/v1/completions", json={"prompt": "def ", "max_tokens": 8, "seed": 0})
    assert r.status_code == 200 and r.json()["model"] == "tiny36@180", r.text
    clients = LoadClients(url, 4, routing=False)
    clients.wait_for("tiny36@180", timeout=60)  # the load is flowing before the swap
    ingress["user_config"]["default_model"] = "tiny36@160"
    path.write_text(yaml.safe_dump(conf))
    r = cluster.cli("serve", "deploy", str(path), "--address", cluster.dashboard)
    clients.wait_for("tiny36@160", timeout=120)
    clients.stop()
    assert r.returncode == 0, r.stderr
    assert clients.errors == []
    assert clients.seen == {"tiny36@180", "tiny36@160"}
