"""`hydra-ray` console entry point: thin argument parsing that calls the parts of the package.

Every subcommand validates its config before doing any work; a `ConfigError` (or any other
user mistake we can name) prints one line on stderr and exits with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hydra_ray.config import ConfigError, load_config


def _summary(args: argparse.Namespace) -> int:
    import torch

    from hydra_ray.models import HydraLM

    cfg = load_config(args.config)
    with torch.device("meta"):  # shapes only: a 500M summary allocates nothing
        model = HydraLM(cfg.model)
    counts = model.param_counts()
    info = {
        "total_params": counts["total_params"],
        "active_params": counts["active_params"],
        "flops_per_token": model.flops_per_token(),
        "stored_params": counts["stored_params"],
        "effective_depth": cfg.model.n_blocks * cfg.model.mor.recursions,
        "moe_layers": len(cfg.model.moe_blocks()) * cfg.model.mor.recursions,
        "phases": [p.name for p in cfg.curriculum.phases],
    }
    if args.json:
        print(json.dumps(info))
        return 0
    m = cfg.model
    print(f"config           {args.config}")
    print(f"shape            d_model {m.d_model}, {m.n_heads} heads / {m.n_kv_heads} KV, "
          f"{m.n_blocks} shared blocks x {m.mor.recursions} recursions, ffn {m.ffn_width}, vocab {m.vocab_size}")
    print(f"MoE              {m.moe.num_experts} experts top-{m.moe.top_k} in blocks {m.moe_blocks()}")
    print(f"MoD              capacity {m.mod.capacity} in blocks {m.mod_blocks()}")
    print(f"total params     {info['total_params'] / 1e6:,.2f}M")
    print(f"active params    {info['active_params'] / 1e6:,.2f}M")
    print(f"FLOPs / token    {info['flops_per_token'] / 1e9:,.3f} GFLOP (forward)")
    print(f"curriculum       {' -> '.join(info['phases'])} ({cfg.curriculum.total_steps} steps)")
    return 0


def _smoke(args: argparse.Namespace) -> int:
    """The curriculum compressed into --steps steps, in this process (no Ray): the real training
    loop (`run_local` with its smoke flag: no checkpoints, no evals) on the config's data, packed
    in-process; prints the phases as they start and the mean CE of each."""
    import tempfile

    from hydra_ray.data.corpus import CorpusError
    from hydra_ray.data.pipeline import prepare_data
    from hydra_ray.runlog import read_records
    from hydra_ray.train.curriculum import compressed
    from hydra_ray.train.loop import run_local

    cfg = load_config(args.config)
    steps = args.steps or cfg.curriculum.total_steps
    if steps < len(cfg.curriculum.phases):
        raise ConfigError(f"--steps {steps}: need at least one step per phase ({len(cfg.curriculum.phases)})")
    cfg = compressed(cfg, steps)
    cfg.train.seed, cfg.train.log_every = args.seed, 1
    try:
        prepared = prepare_data(cfg, log=print)
    except CorpusError as e:
        raise ConfigError(str(e)) from None
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="hydra-smoke-") as run_dir:
        res = run_local(cfg, run_dir, prepared, smoke=True)
        records = read_records(run_dir)
    per_phase: dict[str, list[float]] = {}
    for r in records:
        if r["phase"] not in per_phase:
            p = cfg.curriculum.phases[[q.name for q in cfg.curriculum.phases].index(r["phase"])]
            print(f"[smoke] step {r['step'] - 1:4d}  phase {p.name:<11} mor={p.mor} mod={p.mod} moe={p.moe} "
                  f"routing={p.routing}")
        if r.get("ce") is not None:
            per_phase.setdefault(r["phase"], []).append(r["ce"])
    if res.get("stopped"):
        raise ConfigError(f"the smoke run stopped: {res['stopped']}")
    means = {k: sum(v) / len(v) for k, v in per_phase.items()}
    print(f"[smoke] {steps} steps in {time.time() - t0:.1f}s; mean CE per phase: "
          + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.name == "data":
        from hydra_ray.benchmarks import data

        res = data.run(config=args.config, steps=args.steps or 60)
        if args.json:
            print(json.dumps(res))
    if args.name == "pack":
        from hydra_ray.benchmarks import pack as pack_bench

        res = pack_bench.run(sizes_gb=tuple(args.sizes), workdir=args.workdir)
        if args.json:
            print(json.dumps(res))
    if args.name == "serve":
        from hydra_ray.benchmarks import serve as serve_bench

        if not args.run:
            raise ConfigError("bench serve needs --run RUN_DIR (a run with checkpoints)")
        res = serve_bench.run(args.run, seconds=args.seconds)
        if args.json:
            print(json.dumps(res))
    if args.name == "storage":
        from hydra_ray.benchmarks import storage as storage_bench

        if not args.storage:
            raise ConfigError("bench storage needs --storage URI (e.g. s3://bucket/prefix)")
        res = storage_bench.run(args.storage, config=args.config, rounds=args.rounds)
        if args.json:
            print(json.dumps(res))
    if args.name == "train":
        from hydra_ray.benchmarks import train as train_bench

        res = train_bench.run(config=args.config, phase=args.phase, workers=args.workers, gpu=args.gpu,
                              steps=args.steps or 12, threads=args.threads, rounds=args.rounds,
                              scaling_rounds=args.scaling_rounds)
        if args.json:
            print(json.dumps(res))
    if args.name == "dispatch":
        from hydra_ray.benchmarks import dispatch

        for k in args.top_k:
            res = dispatch.run(tokens=args.tokens, d_model=args.d_model, hidden=args.hidden,
                               experts=args.experts, top_k=k, device=args.device, dtype=args.dtype,
                               rounds=args.rounds)
            if args.json:
                print(json.dumps(res))
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from hydra_ray.data import builtin

    try:
        summary = builtin.prepare(args.out, size=args.size, seed=args.seed, progress=not args.quiet)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    total_docs = sum(v["documents"] for v in summary.values())
    total_bytes = sum(v["bytes"] for v in summary.values())
    print(f"wrote {args.out}: {len(summary)} domains, {total_docs} documents, {total_bytes / 1e6:.2f} MB of Parquet")
    for d, v in summary.items():
        print(f"  {d:<12} {v['documents']:6d} documents  {v['files']:3d} shard(s)  "
              f"{v['text_bytes'] / 1e6:7.2f} MB text  {v['bytes'] / 1e6:7.2f} MB on disk")
    return 0


def _data_tokenizer(args: argparse.Namespace) -> int:
    from hydra_ray.data.corpus import CorpusError, list_corpus, read_records
    from hydra_ray.data.tokenizer import train_bpe

    try:
        domains = sorted(p.name for p in Path(args.corpus).iterdir() if p.is_dir())
        files = list_corpus(args.corpus, domains)
    except (OSError, CorpusError) as e:
        raise ConfigError(f"--corpus {args.corpus}: {e}") from None

    def texts():
        for fs in files.values():
            for f in fs:
                for rec in read_records(f, set(domains)):
                    if not rec["error"]:
                        yield rec["text"]

    try:
        tok = train_bpe(texts(), args.vocab, args.out)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f"trained a byte-level BPE of {tok.vocab_size} tokens on {args.corpus} ({', '.join(domains)}) "
          f"-> {args.out}")
    return 0


def _data_pack(args: argparse.Namespace) -> int:
    from hydra_ray import storage as st
    from hydra_ray.data.corpus import CorpusError
    from hydra_ray.data.pipeline import prepare_data

    cfg = load_config(args.config)
    out = st.check_storage(args.out, "--out") if args.out else None
    try:  # Ray starts only if there is packing to do: a pack that exists is verified and reused at once
        prepared = prepare_data(cfg, out=out, before_pack=_ray_init)
    except CorpusError as e:
        raise ConfigError(str(e)) from None
    print(f"packed {prepared.extra['corpus']} with tokenizer {prepared.tokenizer} -> {prepared.root}")
    print(prepared.report())
    if out:
        print(f"train from it with `data: {{packed: {prepared.root}}}` in the config")
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    from hydra_ray.data.corpus import CorpusError
    from hydra_ray.data.pipeline import prepare_data

    cfg = load_config(args.config)
    _ray_init()
    try:
        prepared = prepare_data(cfg)
    except CorpusError as e:
        raise ConfigError(str(e)) from None
    print(f"corpus {prepared.extra['corpus']} with tokenizer {prepared.tokenizer}:")
    print(prepared.report())
    return 0


def _ray_init() -> None:
    from hydra_ray.raystart import ray_init

    ray_init()


def _train(args: argparse.Namespace) -> int:
    from hydra_ray.data.corpus import CorpusError
    from hydra_ray.train.driver import train

    cfg = load_config(args.config)
    try:
        res = train(cfg, args.config, workers=args.workers, gpu=args.gpu, storage=args.storage, name=args.name,
                    max_steps=args.max_steps, resume=args.resume, cpus_per_worker=args.cpus_per_worker,
                    resize_interval_s=args.resize_interval, resources_per_worker=args.resources_per_worker)
    except CorpusError as e:
        raise ConfigError(str(e)) from None
    if res.get("error"):
        print(f"error: training failed: {res['error']}", file=sys.stderr)
        return 1
    return 0


def _eval(args: argparse.Namespace) -> int:
    from hydra_ray import evaluation

    return evaluation.run(args)


def _ablate(args: argparse.Namespace) -> int:
    from hydra_ray import ablation

    return ablation.run(args)


RAY_COMMANDS = ("train", "data", "tune", "serve", "bench")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show Ray's own start-up and progress messages")
    p = argparse.ArgumentParser(prog="hydra-ray", description=__doc__.splitlines()[0], parents=[common])
    sub = p.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: _add_parser(*a, parents=[common], **k)  # --verbose after any command

    s = sub.add_parser("summary", help="parameter counts and FLOPs of a config")
    s.add_argument("--config", required=True, help="YAML path or preset name (tiny, small, hydra-500m)")
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    s.set_defaults(func=_summary)

    s = sub.add_parser("smoke", help="single-process curriculum smoke run (no Ray)")
    s.add_argument("--config", required=True)
    s.add_argument("--steps", type=int, default=None, help="compress the curriculum into N steps")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_smoke)

    s = sub.add_parser("train", help="train a config on Ray Train (local Ray, or the cluster of RAY_ADDRESS)")
    s.add_argument("--config", required=True)
    s.add_argument("--workers", default="2", help="N, or MIN-MAX for elastic training")
    s.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL")
    s.add_argument("--storage", default="runs", help="run directories go to STORAGE/NAME (local path or URI)")
    s.add_argument("--name", default=None, help="run name (default: the config file's stem)")
    s.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    s.add_argument("--resume", action="store_true", help="continue an existing run from its last checkpoint")
    s.add_argument("--cpus-per-worker", type=float, default=1.0)
    s.add_argument("--resources-per-worker", default=None, metavar="JSON",
                   help='extra Ray resources each training worker needs, e.g. \'{"trainer": 1}\' to keep training '
                        "on the node types that declare them (cluster-local.yaml's worker nodes do)")
    s.add_argument("--resize-interval", type=float, default=60.0, metavar="SECONDS",
                   help="elastic --workers MIN-MAX: how often Ray Train checks whether the cluster has room for "
                        "more workers (growing restarts the group from the last checkpoint)")
    s.set_defaults(func=_train)

    d = sub.add_parser("data", help="corpus preparation and tokenizers").add_subparsers(dest="data_command", required=True)
    _add_data = d.add_parser
    d.add_parser = lambda *a, **k: _add_data(*a, parents=[common], **k)
    s = d.add_parser("prepare", help="write the built-in corpus (no network): one Parquet folder per domain")
    s.add_argument("--out", required=True)
    s.add_argument("--size", default="tiny", choices=["tiny", "small", "full"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_data_prepare)
    s = d.add_parser("tokenizer", help="train a byte-level BPE tokenizer.json on a corpus")
    s.add_argument("--corpus", required=True)
    s.add_argument("--vocab", type=int, required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_data_tokenizer)
    s = d.add_parser("pack", help="pack a config's corpus into token shards once (train, tune and data stats "
                     "reuse them)")
    s.add_argument("--config", required=True)
    s.add_argument("--out", default=None, help="folder or URI for the shards (default: the cache, keyed by the "
                   "corpus fingerprint); name it as data.packed in the config to train from it")
    s.set_defaults(func=_data_pack)
    s = d.add_parser("stats", help="run the data pipeline of a config and report documents, tokens, bad records")
    s.add_argument("--config", required=True)
    s.set_defaults(func=_data_stats)

    s = sub.add_parser("bench", help="benchmarks that print side-by-side ratios")
    s.add_argument("name", choices=["dispatch", "data", "pack", "serve", "storage", "train"])
    s.add_argument("--storage", default=None, help="bench storage: where checkpoints are written (local path or URI)")
    s.add_argument("--run", default=None, help="bench serve: the run whose newest checkpoint is served")
    s.add_argument("--seconds", type=float, default=10.0, help="bench serve: seconds per client count")
    s.add_argument("--config", default="small", help="bench data / storage / train: the preset whose pipeline, "
                   "model or checkpoint is timed")
    s.add_argument("--steps", type=int, default=None,
                   help="bench data: training steps of data to stream (60); bench train: steps per run (12)")
    s.add_argument("--phase", default=None, help="bench train: the phase timed (default: the first with MoE on)")
    s.add_argument("--workers", type=int, default=2, help="bench train: N of the 1 -> N worker scaling")
    s.add_argument("--threads", type=int, default=1, help="bench train: torch threads per worker in the scaling runs")
    s.add_argument("--scaling-rounds", type=int, default=2,
                   help="bench train: rounds of the 1 -> N worker runs, taking turns (1, ceiling, sharded, "
                        "replicated, then the reverse order) so a drifting machine moves every arm alike (2)")
    s.add_argument("--gpu", action="store_true", help="bench train: on CUDA (bf16 when the config says so)")
    s.add_argument("--sizes", type=float, nargs="+", default=[0.5, 2.0], help="bench pack: GB of generated text")
    s.add_argument("--workdir", default=None, help="bench pack: keep the generated corpora here (reused)")
    s.add_argument("--tokens", type=int, default=4096)
    s.add_argument("--d-model", type=int, default=256)
    s.add_argument("--hidden", type=int, default=704)
    s.add_argument("--experts", type=int, default=4)
    s.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    s.add_argument("--device", default="cuda" if _cuda() else "cpu")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--rounds", type=int, default=15,
                   help="interleaved rounds per side-by-side timing (15): bench train's HYDRA-vs-dense "
                        "rounds, bench dispatch, bench storage")
    s.add_argument("--json", action="store_true", help="also print each result as one JSON line")
    s.set_defaults(func=_bench)

    s = sub.add_parser("eval", help="score a checkpoint on held-out generated tasks per domain (math answers, "
                                    "code that parses, chat format, perplexity)")
    s.add_argument("checkpoint", metavar="RUN[@STEP]", help="a run (folder or URI): its newest checkpoint, or @STEP")
    s.add_argument("--n", type=int, default=32, help="held-out items per task (32)")
    s.add_argument("--seed", type=int, default=0, help="which held-out items (the same seed scores runs alike)")
    s.add_argument("--no-chance", action="store_true", help="skip the untrained-model reference (half the time)")
    s.add_argument("--no-save", action="store_true", help="do not write RUN/eval/step_XXXXXXXX.json")
    s.add_argument("--cpu", action="store_true", help="decode on the CPU even where CUDA is present")
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    s.set_defaults(func=_eval)

    s = sub.add_parser("ablate", help="HYDRA against dense at equal tokens and equal training FLOPs: train each arm, "
                                      "compare eval loss by domain, FLOPs and wall-clock (ablation.md/json/png)")
    s.add_argument("--config", required=True)
    s.add_argument("--out", required=True, help="local folder: runs/<arm>/, ablation.json, ablation.md, ablation.png")
    s.add_argument("--workers", type=int, default=1, help="1: each arm in this process; N > 1: on Ray Train")
    s.add_argument("--arms", default="dense,mor,mor+mod,full,dense-flops", help="comma-separated, of the default")
    s.add_argument("--max-steps", type=int, default=None, help="compress the curriculum into S steps")
    s.add_argument("--eval-n", type=int, default=16, help="held-out items per task scored on each arm's last "
                                                          "checkpoint (0 skips)")
    s.set_defaults(func=_ablate)

    # analyze / tune / serve own their arguments; their modules import nothing heavy at the top.
    from hydra_ray.analysis import report
    from hydra_ray.serve import cli as serve_cli
    from hydra_ray.tune import cli as tune_cli

    for name, mod, help_ in (("analyze", report, "training-analysis report (report.md, plots, summary.json) of runs or HYDRA logs"),
                             ("tune", tune_cli, "Ray Tune sweep of routing hyper-parameters"),
                             ("serve", serve_cli, "serve checkpoints over HTTP with Ray Serve (generation, routing inspection)")):
        s = sub.add_parser(name, help=help_)
        mod.add_arguments(s)
        s.set_defaults(func=mod.run)
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in RAY_COMMANDS and not getattr(args, "verbose", False):
        from hydra_ray.raystart import quiet_ray

        quiet_ray()
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
