"""`hydra-ray bench train`: how fast a config trains, and where the time goes, side by side in one run.

Figures (ratios of things measured in this run, on this machine):
- tokens/s of the real per-worker loop (`train_loop_per_worker`, in this process, the smoke flag:
  no checkpoints or evals) on one phase of the config (default: the first with MoE on);
- MFU: 3 x the phase's forward FLOPs per token x tokens/s, over the measured rate of a matmul of
  the model's own shape (2048 x d_model @ d_model x ffn) in the run's dtype on the device;
- the step-time breakdown from the loop's synchronised section timers (hydra_ray/timing.py):
  data wait, forward, backward, optimizer; inside forward+backward, MoE dispatch (route, permute,
  combine and their backward) and the all-to-all exchanges;
- HYDRA against the dense model of equal depth: the same weights with every token through every
  recursion and no MoD or MoE, forward+backward interleaved on one batch. The time ratio beside
  the FLOPs ratio; their quotient is the routing overhead (1.0: time scales exactly with FLOPs).
  Where the phase both selects tokens (MoD/MoR) and routes them to experts (MoE), each mechanism
  alone runs in the same interleaved rounds, so the overhead splits into what each one costs;
- 1 -> N workers: N processes with a torch.distributed group (gloo on CPU, NCCL on GPUs; experts
  sharded, the rest DDP; then experts replicated, all DDP) running the same loop, each with
  `--threads` threads, against 1 such process. No Ray: the processes are spawned here, so this also
  runs where Ray is not installed. Beside them, the ceiling: N processes that each train 1/N of the
  batch alone, at the same time, with no group. What they reach is what the machine gives N
  workers with no communication at all (shared memory bandwidth, caches, other load), so each
  placement's scaling is also shown as a share of it. The four take turns over `--scaling-rounds`
  rounds (1, ceiling, sharded, replicated, then the reverse order), and each ratio is of their mean
  tokens/s, so a machine whose speed drifts during the runs moves them alike.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile

import torch

from hydra_ray.benchmarks.common import compare, take_turns

MATMUL_M = 2048
# the routing mechanisms timed alone beside HYDRA and its dense twin (`hydra_vs_dense`)
MECHANISMS = {"selection": "token selection alone (MoD/MoR, dense FFN)",
              "experts": "experts alone (MoE at full depth)"}


def matmul_rate(d_model: int, ffn: int, device: torch.device, dtype: torch.dtype, rounds: int = 10) -> float:
    """FLOP/s of a [2048, d_model] @ [d_model, ffn] matmul: the model's own FFN shape."""
    a = torch.randn(MATMUL_M, d_model, device=device, dtype=dtype)
    b = torch.randn(d_model, ffn, device=device, dtype=dtype)
    t = compare({"mm": lambda: a @ b}, device, rounds)["mm"]
    return 2 * MATMUL_M * d_model * ffn / t


def bench_config(cfg, phase: str | None, steps: int, log_every: int):
    """The config trained for `steps` steps of one phase only (MoD at its target capacity at once)."""
    phases = cfg.curriculum.phases
    pick = next((p for p in phases if p.name == phase), None) if phase else next((p for p in phases if p.moe), None)
    if pick is None:
        from hydra_ray.config import ConfigError

        raise ConfigError(f"--phase {phase}: the config has phases {[p.name for p in phases]}" if phase
                          else "the config has no phase with MoE on: name one with --phase")
    out = cfg.model_copy(deep=True)
    one = pick.model_copy(deep=True)
    one.until_step = steps
    out.curriculum.phases = [one]
    out.model.mod.capacity_warmup_steps = 0
    out.train.warmup_steps = 0
    out.train.log_every = log_every
    return out, one


def feature_model(model_cfg, mor: bool, mod: bool, moe: bool, full_depth: bool = False):
    """The model config with only these features built (the rest left out): what a phase, or an
    ablation arm, computes with. `full_depth`: every recursion on every token."""
    m = model_cfg.model_copy(deep=True)
    if full_depth:
        m.mor.capacity_schedule = [1.0] * m.mor.recursions
    elif not mor:
        m.mor.recursions, m.mor.capacity_schedule = 1, None
    if not mod:
        m.mod.blocks = []
    if not moe:
        m.moe.blocks = []
    return m


def phase_flops(cfg, mor: bool, mod: bool, moe: bool, full_depth: bool = False) -> int:
    """Forward FLOPs per token of the model with these features (hydra.flops_per_token)."""
    from hydra_ray.models import HydraLM

    with torch.device("meta"):
        return HydraLM(feature_model(cfg.model, mor, mod, moe, full_depth)).flops_per_token(selectors=not full_depth)


def _records_tokens_per_s(run_dir: str) -> tuple[float, dict | None]:
    from hydra_ray.runlog import read_records

    recs = read_records(run_dir)[1:]  # the first interval holds the warm-up
    if not recs:
        raise RuntimeError("the benchmark run logged no steps past its warm-up: raise --steps")
    tps = statistics.median(r["tokens_per_s"] for r in recs)
    times = [r["step_time_s"] for r in recs if r.get("step_time_s")]
    breakdown = {k: statistics.median(t.get(k, 0.0) for t in times) for k in times[0]} if times else None
    return tps, breakdown


def _loop_config(cfg, prepared, run_dir: str, steps: int, timing: bool, use_gpu: bool) -> dict:
    from hydra_ray.train.curriculum import segments

    return {"config": cfg.model_dump(mode="python"), "run_dir": run_dir, "end_step": steps,
            "segments": segments(cfg, 0, steps), "prepared": prepared, "smoke": True, "timing": timing,
            "use_gpu": use_gpu}


def _process_device(rank: int, threads: int, device_type: str) -> torch.device:
    """A spawned benchmark process's set-up: its torch threads, and its device (GPU `rank` on CUDA)."""
    torch.set_num_threads(threads)
    os.environ["HYDRA_THREADS"] = str(threads)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    return device


def _worker(rank: int, world: int, port: int, threads: int, loop_config: dict, device_type: str) -> None:
    import torch.distributed as dist

    from hydra_ray.train.env import Env
    from hydra_ray.train.loop import train_loop_per_worker

    device = _process_device(rank, threads, device_type)
    if world > 1:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world)
    try:
        train_loop_per_worker(loop_config, Env(rank=rank, world=world, device=device))
        if world > 1:
            # no rank leaves (and takes down the TCP store rank 0 hosts) while another still uses
            # the group: a rank left alone aborted in gloo ("terminate called without an active
            # exception"), once in a full test run
            dist.barrier()
    finally:
        if world > 1:
            dist.destroy_process_group()
    if world > 1:
        # The run's records are closed and on disk. Leave without the interpreter's finalization,
        # where gloo's worker threads can still release tensors and abort the process (SIGABRT)
        # after its work is done, which would fail the whole benchmark.
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)


def _spawned(world: int, threads: int, cfg, prepared, steps: int, device_type: str) -> tuple[float, dict | None]:
    """(tokens/s, rank 0's step-time breakdown) of `world` spawned worker processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix=f"hydra-bench-{world}w-") as run_dir:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(world, port, threads, _loop_config(cfg, prepared, run_dir, steps, True,
                                                                     device_type == "cuda"), device_type),
                 nprocs=world, join=True)
        return _records_tokens_per_s(run_dir)


def hydra_vs_dense(cfg, phase, device: torch.device, amp, rounds: int) -> dict:
    """Forward+backward of the phase's model and of its dense twin of equal depth, interleaved.
    When the phase routes both ways (MoD/MoR and MoE), each mechanism alone runs beside them:
    `selection` (the phase's MoD/MoR with the dense FFN) and `experts` (MoE at full depth: the
    dense twin with its FFN routed), so the overhead splits into what each costs."""
    from hydra_ray.models import HydraLM

    torch.manual_seed(0)
    hydra = HydraLM(cfg.model).to(device)
    hydra.set_features(mor=phase.mor, mod=phase.mod, moe=phase.moe, routing=phase.routing,
                       mod_capacity=cfg.model.mod.capacity if phase.mod else None)

    def twin(mor: bool, mod: bool, moe: bool, full_depth: bool):
        m = HydraLM(cfg.model).to(device)
        m.load_state_dict(hydra.state_dict(), strict=False)  # hydra's upcycled experts, not new ones
        m.set_features(mor=mor, mod=mod, moe=moe, routing=phase.routing,
                       mod_capacity=cfg.model.mod.capacity if mod else None)
        m.set_full_depth(full_depth)
        return m

    models = {"hydra": hydra, "dense": twin(False, False, False, True)}
    flops = {"hydra": phase_flops(cfg, phase.mor, phase.mod, phase.moe),
             "dense": phase_flops(cfg, False, False, False, full_depth=True)}
    if phase.moe and (phase.mor or phase.mod):
        models["selection"] = twin(phase.mor, phase.mod, False, False)
        flops["selection"] = phase_flops(cfg, phase.mor, phase.mod, False)
        models["experts"] = twin(False, False, True, True)
        flops["experts"] = phase_flops(cfg, False, False, True, full_depth=True)
    # one micro-batch, as the loop runs it (a step of grad_accum micro-batches scales both models alike)
    B, T, V = max(1, cfg.train.batch_size // cfg.train.grad_accum), cfg.model.seq_len, cfg.model.vocab_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (B, T), generator=gen).to(device)
    y = torch.randint(0, V, (B, T), generator=gen).to(device)
    dom = torch.randint(0, len(cfg.model.domains), (B, 1), generator=gen).expand(B, T).to(device)

    def step(model):
        def run():
            with amp:
                loss = model(x, y, dom).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    t = compare({name: step(m) for name, m in models.items()}, device, rounds)

    def against_dense(name: str) -> dict:
        time_ratio, flops_ratio = t[name] / t["dense"], flops[name] / flops["dense"]
        return {"time_ratio": time_ratio, "flops_ratio": flops_ratio, "routing_overhead": time_ratio / flops_ratio}

    return {"hydra_ms": t["hydra"] * 1e3, "dense_ms": t["dense"] * 1e3, **against_dense("hydra"),
            "by_mechanism": {name: {"ms": t[name] * 1e3, **against_dense(name)}
                             for name in MECHANISMS if name in models}}


def _alone(rank: int, threads: int, loop_configs: list[dict], device_type: str) -> None:
    """One of the independent processes: its own run, no group."""
    from hydra_ray.train.env import Env
    from hydra_ray.train.loop import train_loop_per_worker

    train_loop_per_worker(loop_configs[rank], Env(device=_process_device(rank, threads, device_type)))


def _independent(n: int, threads: int, cfg, prepared, steps: int, device_type: str) -> tuple[float, dict | None]:
    """(summed tokens/s, process 0's step-time breakdown) of `n` processes that each train 1/n of
    the batch alone, at the same time."""
    import torch.multiprocessing as mp

    part = cfg.model_copy(deep=True)
    part.train.batch_size = cfg.train.batch_size // n
    dirs = [tempfile.TemporaryDirectory(prefix=f"hydra-bench-alone{i}-") for i in range(n)]
    try:
        configs = [_loop_config(part, prepared, d.name, steps, True, device_type == "cuda") for d in dirs]
        mp.spawn(_alone, args=(threads, configs, device_type), nprocs=n, join=True)
        each = [_records_tokens_per_s(d.name) for d in dirs]
        return sum(tps for tps, _ in each), each[0][1]
    finally:
        for d in dirs:
            d.cleanup()


def _log_mechanisms(vs: dict, log) -> None:
    if vs["by_mechanism"]:
        log("      by mechanism: " + "; ".join(
            f"{MECHANISMS[k]}: time {m['time_ratio']:.2f}x, FLOPs {m['flops_ratio']:.2f}x -> {m['routing_overhead']:.2f}"
            for k, m in vs["by_mechanism"].items()))


def run(config: str = "small", phase: str | None = None, workers: int = 2, gpu: bool = False, steps: int = 12,
        threads: int = 1, rounds: int = 15, scaling_rounds: int = 2, log=print) -> dict:
    from contextlib import nullcontext

    from hydra_ray.config import ConfigError, load_config
    from hydra_ray.data.pipeline import prepare_data
    from hydra_ray.train.env import Env
    from hydra_ray.train.loop import train_loop_per_worker

    if gpu and not torch.cuda.is_available():
        raise ConfigError("--gpu: no CUDA device here")
    if workers < 1 or steps < 4 or threads < 1 or scaling_rounds < 1:
        raise ConfigError("bench train: --workers, --threads and --scaling-rounds must be at least 1, --steps at least 4")
    if gpu and workers > torch.cuda.device_count():
        raise ConfigError(f"--workers {workers}: only {torch.cuda.device_count()} GPU(s) here")
    device = torch.device("cuda") if gpu else torch.device("cpu")
    base = load_config(config)
    log_every = max(1, steps // 4)
    cfg, ph = bench_config(base, phase, steps, log_every)
    dtype = torch.bfloat16 if gpu and cfg.train.dtype == "bfloat16" else torch.float32
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    prepared = prepare_data(cfg, log=lambda *_: None)  # in-process: no Ray needed
    tokens_per_step = cfg.train.batch_size * (ph.seq_len or cfg.model.seq_len)
    log(f"bench train: {config}, phase {ph.name} (mor={ph.mor} mod={ph.mod} moe={ph.moe} routing={ph.routing}), "
        f"{steps} steps of {tokens_per_step} tokens, {device.type} {str(dtype).removeprefix('torch.')}")

    rate = matmul_rate(cfg.model.d_model, cfg.model.ffn_width, device, dtype)
    with tempfile.TemporaryDirectory(prefix="hydra-bench-") as run_dir:
        train_loop_per_worker(_loop_config(cfg, prepared, run_dir, steps, True, gpu), Env(device=device))
        tps, breakdown = _records_tokens_per_s(run_dir)
    flops = phase_flops(cfg, ph.mor, ph.mod, ph.moe)
    mfu = 3 * flops * tps / rate
    step_s = tokens_per_step / tps
    vs = hydra_vs_dense(cfg, ph, device, amp, rounds)
    vs_worker = None
    if not gpu and threads != torch.get_num_threads():  # as each worker of the scaling runs computes
        all_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            vs_worker = {**hydra_vs_dense(cfg, ph, device, amp, rounds), "threads": threads}
        finally:
            torch.set_num_threads(all_threads)
    res = {"config": config, "phase": ph.name, "device": torch.cuda.get_device_name() if gpu else "cpu",
           "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
           "tokens_per_s": tps, "flops_per_token": flops, "matmul_flops": rate, "mfu": mfu,
           "step_s": step_s, "breakdown_s": breakdown,
           "breakdown_share": {k: v / step_s for k, v in (breakdown or {}).items()}, "hydra_vs_dense": vs,
           "hydra_vs_dense_worker_threads": vs_worker}
    log(f"  tokens/s {tps:,.0f}; MFU {100 * mfu:.1f}% of the measured {rate / 1e9:,.1f} GFLOP/s matmul "
        f"(3 x {flops / 1e6:,.1f} MFLOP/token)")
    if breakdown:
        log("  step " + f"{step_s * 1e3:.0f} ms: " + ", ".join(
            f"{k} {v * 1e3:.0f} ms ({100 * v / step_s:.0f}%)" for k, v in breakdown.items()))
    log(f"  HYDRA vs dense of equal depth: time {vs['time_ratio']:.2f}x, FLOPs {vs['flops_ratio']:.2f}x -> "
        f"routing overhead {vs['routing_overhead']:.2f} (1.00 = time follows FLOPs; {torch.get_num_threads()} threads)")
    _log_mechanisms(vs, log)
    if vs_worker:
        log(f"    at {threads} thread(s), as each worker runs: time {vs_worker['time_ratio']:.2f}x -> "
            f"routing overhead {vs_worker['routing_overhead']:.2f}")
        _log_mechanisms(vs_worker, log)
    if workers > 1:
        res["scaling"] = _scaling(cfg, prepared, steps, device.type, workers, threads, scaling_rounds,
                                  tokens_per_step, log)
    return res


def _scaling(cfg, prepared, steps: int, device_type: str, workers: int, threads: int, rounds: int,
             tokens_per_step: int, log) -> dict:
    """1 -> N workers: one worker, the ceiling (N independent processes), and N workers with experts
    sharded and replicated, taking turns over `rounds` rounds. Each figure is the ratio of the
    arms' mean tokens/s; `speedup_rounds` lists the ratio within each round, to show the spread.
    Each arm's step breakdown (rank 0's; the ceiling's process 0 steps 1/N of the batch) is the
    mean over the rounds, so where N workers lose time against the ceiling shows section by section."""
    placed = {}
    for placement in ("sharded", "replicated"):
        placed[placement] = cfg.model_copy(deep=True)
        placed[placement].train.expert_placement = placement
    runs = take_turns({
        "one": lambda: _spawned(1, threads, cfg, prepared, steps, device_type),
        "independent": lambda: _independent(workers, threads, cfg, prepared, steps, device_type),
        **{p: (lambda c=c: _spawned(workers, threads, c, prepared, steps, device_type)) for p, c in placed.items()},
    }, rounds)
    tps = {arm: [t for t, _ in r] for arm, r in runs.items()}
    mean_tps = {arm: statistics.fmean(t) for arm, t in tps.items()}
    parts = {}
    for arm, r in runs.items():
        got = [p for _, p in r if p]
        parts[arm] = {k: statistics.fmean([p.get(k, 0.0) for p in got]) for k in got[0]} if got else None
    one, ceiling = mean_tps["one"], mean_tps["independent"]

    def figure(arm: str) -> dict:
        return {"tokens_per_s_n": mean_tps[arm], "speedup": mean_tps[arm] / one,
                "speedup_rounds": [t / o for t, o in zip(tps[arm], tps["one"])], "breakdown_s_n": parts[arm]}

    def line(arm: str) -> str:
        f = figure(arm)
        spread = "" if rounds < 2 else " (rounds " + ", ".join(f"{r:.2f}x" for r in f["speedup_rounds"]) + ")"
        return f"{one:,.0f} -> {mean_tps[arm]:,.0f} tokens/s, {f['speedup']:.2f}x{spread}"

    def step(label: str, arm: str) -> None:
        if parts[arm]:
            step_s = tokens_per_step / mean_tps[arm]  # the ceiling: 1/N of the batch at 1/N of the rate
            log(f"    step {label} {step_s * 1e3:.0f} ms: " + ", ".join(
                f"{k} {v * 1e3:.0f} ms ({100 * v / step_s:.0f}%)" for k, v in parts[arm].items()))

    out = {"workers": workers, "threads_per_worker": threads, "rounds": rounds, "tokens_per_s_1": one,
           "breakdown_s_1": parts["one"], "independent": figure("independent")}
    step("on 1 worker", "one")
    log(f"  ceiling: {workers} independent processes ({threads} thread(s) each, 1/{workers} of the batch "
        f"each, no communication): {line('independent')}")
    step("of each process", "independent")
    for placement in placed:
        out[placement] = {**figure(placement), "of_ceiling": mean_tps[placement] / ceiling}
        log(f"  1 -> {workers} workers ({threads} thread(s) each), experts {placement}: {line(placement)} "
            f"({100 * mean_tps[placement] / ceiling:.0f}% of the ceiling)")
        step(f"on {workers} workers", placement)
    out["speedup"] = out[cfg.train.expert_placement]["speedup"]
    return out
