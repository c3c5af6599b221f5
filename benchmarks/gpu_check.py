"""`make gpu-check`: the GPU path run end to end on one CUDA device, written to docs/gpu-check.md.

    python benchmarks/gpu_check.py [--out docs/gpu-check.md] [--steps 30] [--cpu-rehearsal]

It runs where neither Ray nor hydra-ray is installed (a GPU image with its own torch and triton):
- the package is imported from this checkout through a temporary view that lays kernels/, serve/
  and benchmarks/ into hydra_ray/ as an install would;
- Python packages the image lacks (pydantic and friends) come from wheels in `.whl/`, made where a
  registry is reachable by `make gpu-wheels` and carried along; they are installed with
  `--no-index --no-deps` into a temporary folder;
- nothing uses Ray: the training loop runs in this process, the engine serves without Serve.

Steps, each timed, each recorded even when it fails (the check goes on and exits 1 at the end):
1. the kernel tests (tests/test_kernels.py) on CUDA, compiled, against the torch reference and the
   naive loops, float32 and bfloat16. If the Triton kernels fail under this triton, the report
   says so and the remaining steps use the torch path (HYDRA_KERNELS=torch);
2. `bench dispatch` on CUDA at the 500M width: permute+combine against a copy, the MoE layer
   against a dense FFN of equal active parameters, top-1 and top-2, bfloat16 and float32;
3. the 500M-shaped model (configs/hydra-500m.yaml, full width; its curriculum compressed into
   --steps steps) trained in bfloat16 autocast through the real per-worker loop, inside an NCCL
   process group of world size 1 with `Env(group_of_one=True)`, so DDP, the expert all-to-all and
   the gathers run on CUDA; a checkpoint is saved at the end;
4. that checkpoint restored on the CPU (model and optimizer, compared with the trained weights)
   and served: greedy tokens from the engine on the CPU and on CUDA;
5. `bench train --gpu` on the same config: tokens/s, MFU against the measured bf16 matmul of the
   model's FFN shape and against a large (8192^3) bf16 matmul, the step breakdown, HYDRA against
   dense of equal depth.

Without a CUDA device it prints one skip line and exits 0. `--cpu-rehearsal` runs every step on
the CPU instead, at toy size (kernels in the Triton interpreter, gloo for NCCL, float32), so the
script itself is tested where there is no GPU (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEEDED = ("pydantic", "yaml", "tensorboardX", "pyarrow", "safetensors", "numpy")  # importable names
# The toy model of the rehearsal: the same code paths, at a size the CPU runs in seconds.
REHEARSAL_MODEL = {"model.vocab_size": 264, "model.d_model": 64, "model.n_heads": 4, "model.n_kv_heads": 2,
                   "model.n_blocks": 2, "model.ffn_hidden": 96, "model.seq_len": 64, "model.moe.blocks": [1],
                   "train.batch_size": 4, "train.grad_accum": 1, "train.dtype": "float32"}


# --------------------------------------------------------------------------- bootstrap
def bootstrap(wheels: Path) -> Path:
    """Make `import hydra_ray` (with .kernels, .serve, .benchmarks) work from this checkout, and the
    carried wheels importable, here and in subprocesses (PYTHONPATH). Returns the view folder."""
    view = Path(tempfile.mkdtemp(prefix="hydra-gpu-check-"))
    pkg = view / "hydra_ray"
    pkg.mkdir()
    for child in (ROOT / "hydra_ray").iterdir():
        if child.name != "__pycache__":
            (pkg / child.name).symlink_to(child)
    for name in ("kernels", "serve", "benchmarks"):
        (pkg / name).symlink_to(ROOT / name)
    paths = [str(view)]
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if missing and found:
        site = view / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "--target", str(site), *map(str, found)], check=True)
        paths.append(str(site))
    sys.path[:0] = paths
    importlib.invalidate_caches()
    still = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if still:
        raise SystemExit(f"gpu-check: these Python packages are missing here: {', '.join(still)}. "
                         f"Run `make gpu-wheels` where pip reaches a registry and bring {wheels}/ along.")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return view


# --------------------------------------------------------------------------- report
class Report:
    def __init__(self, title: str):
        self.lines = [f"# {title}", ""]
        self.failed: list[str] = []
        self.results: dict = {}

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)
        for line in lines:
            print(line, flush=True)

    def step(self, name: str, fn, *args) -> dict | None:
        self.add("", f"## {name}", "")
        t0 = time.time()
        try:
            res = fn(self, *args)
            self.results[name] = res
            self.add("", f"({time.time() - t0:.1f} s)")
            return res
        except Exception as e:  # one failing step must not hide the others
            self.failed.append(name)
            tb = traceback.format_exc().strip().splitlines()
            self.add(f"**FAILED** after {time.time() - t0:.1f} s: `{type(e).__name__}: {str(e)[:500]}`", "",
                     "```", *tb[-25:], "```")
            return None

    def table(self, header: list[str], rows: list[list]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
                 *("| " + " | ".join(str(c) for c in row) + " |" for row in rows))


def _goal(value: float, ok: bool) -> str:
    return f"{value:.2f} ({'meets' if ok else 'misses'} the goal)"


# --------------------------------------------------------------------------- 1. kernels
def kernel_tests(rep: Report, device: str) -> dict:
    import triton

    env = {**os.environ, "HYDRA_TEST_DEVICE": device, "PYTHONUNBUFFERED": "1"}
    # the cubin build test is the CPU machine's stand-in for a GPU; here the kernels run for real
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py",
           "-k", "not cubin and not benchmark", "-o", "addopts="]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (r.stdout + r.stderr).strip().splitlines()
    summary = next((ln for ln in reversed(tail) if re.search(r"\d+ (passed|failed|error)", ln)), tail[-1] if tail else "")
    ok = r.returncode == 0
    rep.add(f"triton {triton.__version__}, tests on `{device}`: `{summary.strip('= ')}`")
    if not ok:
        rep.add("", "```", *tail[-40:], "```", "",
                f"**The Triton kernels do not pass under triton {triton.__version__}.** The remaining steps "
                "use the torch dispatch path (HYDRA_KERNELS=torch).")
        os.environ["HYDRA_KERNELS"] = "torch"
        raise RuntimeError(f"kernel tests failed under triton {triton.__version__}: {summary}")
    return {"triton": triton.__version__, "summary": summary}


# --------------------------------------------------------------------------- 2. dispatch
def dispatch_bench(rep: Report, device: str, rehearsal: bool) -> list[dict]:
    from hydra_ray.benchmarks import dispatch

    shape = dict(tokens=256, d_model=32, hidden=48, rounds=2) if rehearsal else \
        dict(tokens=32768, d_model=1792, hidden=1600, rounds=20)
    rows, out = [], []
    for dtype in ("bfloat16", "float32"):
        for k in (1, 2):
            r = dispatch.run(experts=4, top_k=k, device=device, dtype=dtype, log=lambda *_: None, **shape)
            out.append(r)
            rows.append([dtype, k, r["backend"], f"{r['dispatch_GBps']:.1f}", f"{r['copy_GBps']:.1f}",
                         _goal(r["dispatch_vs_copy"], r["dispatch_vs_copy"] >= 0.5), f"{r['moe_ms']:.2f}",
                         f"{r['dense_ms']:.2f}", _goal(r["moe_vs_dense_time"], r["moe_vs_dense_time"] <= 1.10)])
    rep.add(f"{shape['tokens']} tokens x d_model {shape['d_model']}, expert hidden {shape['hidden']}, 4 experts. "
            "Goals: permute+combine >= 0.50 of copy bandwidth; MoE layer <= 1.10x the dense FFN of equal "
            "active parameters.", "")
    rep.table(["dtype", "top-k", "backend", "dispatch GB/s", "copy GB/s", "dispatch/copy", "MoE ms", "dense ms",
               "MoE/dense"], rows)
    return out


# --------------------------------------------------------------------------- 3. training
def check_config(steps: int, rehearsal: bool):
    """configs/hydra-500m.yaml at full width, its curriculum compressed into `steps` steps, the
    byte tokenizer (the built-in corpus needs no download), a checkpoint and an eval at the end."""
    from hydra_ray.config import dump_config, load_config, parse_config, set_dotted
    from hydra_ray.train.curriculum import compressed

    data = json.loads(json.dumps(load_config(str(ROOT / "configs" / "hydra-500m.yaml")).model_dump(mode="json")))
    over = {"data.tokenizer": "byte", "train.log_every": 1, "train.save_every": steps, "train.eval_every": steps,
            "train.keep_checkpoints": 1, "train.eval_batches": 2}
    over.update(REHEARSAL_MODEL if rehearsal else {})
    for key, value in over.items():
        set_dotted(data, key, value, source="gpu-check")
    cfg = compressed(parse_config(data), steps)
    return cfg, dump_config(cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_steps(rep: Report, device: str, steps: int, rehearsal: bool) -> dict:
    import torch
    import torch.distributed as dist

    from hydra_ray.data.pipeline import prepare_data
    from hydra_ray.models import HydraLM
    from hydra_ray.runlog import read_records
    from hydra_ray.train.curriculum import segments
    from hydra_ray.train.env import Env
    from hydra_ray.train.loop import train_loop_per_worker

    cfg, _ = check_config(steps, rehearsal)
    with torch.device("meta"):
        params = sum(p.numel() for p in HydraLM(cfg.model).parameters())
    prepared = prepare_data(cfg, log=lambda *_: None)
    run_dir = tempfile.mkdtemp(prefix="hydra-gpu-check-run-")
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    try:
        res = train_loop_per_worker({"config": cfg.model_dump(mode="python"), "run_dir": run_dir, "end_step": steps,
                                     "segments": segments(cfg, 0, steps), "prepared": prepared, "smoke": False,
                                     "timing": True, "use_gpu": dev.type == "cuda"},
                                    Env(device=dev, group_of_one=True))
    finally:
        dist.destroy_process_group()
    wall = time.time() - t0
    recs = [r for r in read_records(run_dir) if "ce" in r]
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    m = cfg.model
    rep.add(f"Model: d_model {m.d_model}, {m.n_heads}/{m.n_kv_heads} heads, {m.n_blocks} blocks x {m.mor.recursions} "
            f"recursions, FFN {m.ffn_hidden}, {m.moe.num_experts} experts top-{m.moe.top_k} in blocks {m.moe.blocks}, "
            f"vocab {m.vocab_size}, seq {m.seq_len}: {params / 1e6:,.1f}M parameters. Batch {cfg.train.batch_size} "
            f"sequences (grad_accum {cfg.train.grad_accum}), {cfg.train.dtype}"
            f"{' autocast' if cfg.train.dtype == 'bfloat16' and dev.type == 'cuda' else ''}; "
            f"{backend.upper()} group of world size 1 (DDP + expert all-to-all paths).", "")
    by_phase: dict[str, list[dict]] = {}
    for r in recs:
        by_phase.setdefault(r["phase"], []).append(r)
    rows = []
    for name, rs in by_phase.items():
        tps = [r["tokens_per_s"] for r in rs if r.get("tokens_per_s")]
        rows.append([name, f"{rs[0]['step']}-{rs[-1]['step']}", f"{rs[0]['ce']:.3f}", f"{rs[-1]['ce']:.3f}",
                     f"{max(r['grad_norm'] for r in rs):.2f}", f"{sorted(tps)[len(tps) // 2]:,.0f}" if tps else "-"])
    rep.table(["phase", "steps", "first CE", "last CE", "max grad norm", "tokens/s (median)"], rows)
    a2a = [r["step_time_s"].get("all_to_all", 0.0) for r in recs if r.get("step_time_s")]
    finite = all(r["ce"] is not None and r["ce"] == r["ce"] for r in recs)
    ev = next((r["eval"] for r in reversed(recs) if r.get("eval")), None)
    rep.add("", f"{len(recs)} steps logged of {steps} in {wall:.1f} s (with start-up and the checkpoint); "
                f"stopped: {res.get('stopped')}; every CE finite: {finite}; expert all-to-all ran: "
                f"{any(t > 0 for t in a2a)}; peak GPU memory {'n/a' if peak is None else f'{peak:.1f} GiB'}; final eval "
                f"{json.dumps(ev)[:200] if ev else 'none'}.")
    if len(recs) != steps or not finite or res.get("stopped"):
        raise RuntimeError(f"training did not run {steps} clean steps: {len(recs)} logged, stopped={res.get('stopped')}")
    return {"run_dir": run_dir, "params": params, "steps": len(recs), "wall_s": wall, "peak_gib": peak,
            "last_ce": recs[-1]["ce"]}


# --------------------------------------------------------------------------- 4. restore + serve
def restore_and_serve(rep: Report, device: str, trained: dict) -> dict:
    import torch

    from hydra_ray import checkpoint as ckpt
    from hydra_ray.config import parse_config
    from hydra_ray.models import HydraLM
    from hydra_ray.serve.engine import Engine, GenRequest
    from hydra_ray.train.env import Env
    from hydra_ray.train.state import build_optimizer, restore

    if not trained:
        raise RuntimeError("no checkpoint: the training step failed")
    run_dir = trained["run_dir"]
    loaded = ckpt.latest_valid(run_dir)
    if loaded is None:
        raise RuntimeError(f"no valid checkpoint in {run_dir}")
    import yaml

    cfg = parse_config(yaml.safe_load(loaded.config_yaml))
    model = HydraLM(cfg.model)
    opt = build_optimizer(model, cfg)
    restore(model, opt, loaded, Env())  # on the CPU
    same = all(torch.equal(model.state_dict()[k], v) for k, v in loaded.model.items())
    moments = sum(1 for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    rep.add(f"Checkpoint step {loaded.step} ({ckpt.step_dir_name(loaded.step)}): restored on the CPU, "
            f"{len(loaded.model)} weight tensors equal to the saved ones: {same}; optimizer moment tensors "
            f"restored: {moments}.")
    prompts = ["def add(a, b):", "Question: what is 12 + 30?", "User: hello"]
    outs = {}
    for dev in ["cpu"] + ([device] if device != "cpu" else []):
        eng = Engine.from_checkpoint(loaded.path, device=dev)
        t0 = time.time()
        res = eng.complete([GenRequest(eng.encode(p), max_tokens=8, temperature=0.0) for p in prompts])
        outs[dev] = ([r["token_ids"] for r in res], time.time() - t0)
    rows = []
    for i, p in enumerate(prompts):
        rows.append([repr(p)] + [f"{outs[d][0][i]}" for d in outs])
    rep.add("", "Greedy tokens, 8 per prompt, from the engine on each device (float32 weights):", "")
    rep.table(["prompt"] + [f"{d} ({outs[d][1]:.2f} s)" for d in outs], rows)
    agree = None
    if len(outs) > 1:
        a, b = (sum(outs[d][0], []) for d in outs)
        agree = sum(x == y for x, y in zip(a, b)) / max(1, len(a))
        rep.add("", f"CPU and {device} agree on {100 * agree:.0f}% of the greedy tokens (different matmul "
                    "orders can flip near-ties).")
    if not same:
        raise RuntimeError("the restored weights differ from the checkpoint's")
    return {"restored_equal": same, "agreement": agree}


# --------------------------------------------------------------------------- 5. bench train
def bench_train(rep: Report, device: str, rehearsal: bool) -> dict:
    import torch

    from hydra_ray.benchmarks import train as train_bench
    from hydra_ray.benchmarks.common import compare

    _, yaml_text = check_config(12, rehearsal)
    path = Path(tempfile.mkdtemp(prefix="hydra-gpu-check-cfg-")) / "gpu-check.yaml"
    path.write_text(yaml_text)
    gpu = device != "cpu"
    res = train_bench.run(config=str(path), workers=1, gpu=gpu, steps=4 if rehearsal else 12,
                          rounds=2 if rehearsal else 5, log=rep.add)
    n = 512 if rehearsal else 8192
    dt = torch.bfloat16 if gpu else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    peak = 2 * n**3 / compare({"mm": lambda: a @ b}, torch.device(device), 10)["mm"]
    mfu_peak = 3 * res["flops_per_token"] * res["tokens_per_s"] / peak
    res["peak_matmul_flops"], res["mfu_vs_peak"] = peak, mfu_peak
    rep.add("", f"Large matmul ({n}^3, {str(dt).removeprefix('torch.')}): {peak / 1e12:,.1f} TFLOP/s. MFU against "
                f"it: {100 * mfu_peak:.1f}% ({'meets' if mfu_peak >= 0.40 else 'misses'} the goal of >= 40% of "
                f"measured bf16 peak); against the model's own FFN-shaped matmul: {100 * res['mfu']:.1f}%.")
    return res


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "gpu-check.md"), help="the report (markdown)")
    ap.add_argument("--steps", type=int, default=30, help="training steps of the 500M-shaped model")
    ap.add_argument("--wheels", default=str(ROOT / ".whl"), help="carried wheels, installed when packages are missing")
    ap.add_argument("--cpu-rehearsal", action="store_true",
                    help="every step on the CPU at toy size (tests the script where there is no GPU)")
    args = ap.parse_args(argv)
    import torch

    rehearsal = args.cpu_rehearsal
    if not rehearsal and not torch.cuda.is_available():
        print(f"gpu-check: SKIPPED, no CUDA device here (torch {torch.__version__}, CUDA available: False); "
              f"nothing was run and {args.out} is unchanged.")
        return 0
    if rehearsal:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton loads: kernels on CPU tensors
    bootstrap(Path(args.wheels))
    os.environ.setdefault("HYDRA_CACHE_DIR", tempfile.mkdtemp(prefix="hydra-gpu-check-cache-"))
    device = "cpu" if rehearsal else "cuda"
    name = "CPU rehearsal (no GPU)" if rehearsal else torch.cuda.get_device_name()
    rep = Report(f"GPU check: {name}")
    import triton

    rep.add(f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `make gpu-check` "
            f"(benchmarks/gpu_check.py). Python {platform.python_version()}, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), triton {triton.__version__}"
            + (f", {torch.cuda.get_device_properties(0).multi_processor_count} SMs, "
               f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB" if not rehearsal else "") + ".",
            "", "Expert parallelism over NCCL needs two GPUs; on one GPU the expert all-to-all runs in a group of "
            "one, and the gloo tests (tests/test_dispatch_parallel.py) remain the proof of the exchange itself.")
    t0 = time.time()
    rep.step("1. Kernel tests on the device", kernel_tests, device)
    rep.step("2. bench dispatch", dispatch_bench, device, rehearsal)
    trained = rep.step(f"3. {args.steps} training steps, 500M-shaped", train_steps, device, args.steps, rehearsal)
    rep.step("4. Save, restore on CPU, serve on CPU and GPU", restore_and_serve, device, trained)
    rep.step("5. bench train --gpu", bench_train, device, rehearsal)
    verdict = f"FAILED: {', '.join(rep.failed)}" if rep.failed else "all steps passed"
    rep.add("", f"**{verdict}** in {time.time() - t0:.0f} s.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(rep.lines) + "\n")
    (out.with_suffix(".json")).write_text(json.dumps(rep.results, default=str, indent=1))
    print(f"gpu-check: {verdict}; report in {out}")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
