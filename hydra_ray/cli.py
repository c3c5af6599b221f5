"""`hydra-ray` console entry point: thin argument parsing that calls the parts of the package.

Every subcommand validates its config before doing any work; a `ConfigError` (or any other
user mistake we can name) prints one line on stderr and exits with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

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
    from hydra_ray.train.smoke import run_smoke

    cfg = load_config(args.config)
    if args.steps is not None and args.steps < len(cfg.curriculum.phases):
        raise ConfigError(f"--steps {args.steps}: need at least one step per phase ({len(cfg.curriculum.phases)})")
    run_smoke(cfg, steps=args.steps, seed=args.seed)
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.name == "dispatch":
        from hydra_ray.benchmarks import dispatch

        for k in args.top_k:
            res = dispatch.run(tokens=args.tokens, d_model=args.d_model, hidden=args.hidden,
                               experts=args.experts, top_k=k, device=args.device, dtype=args.dtype,
                               rounds=args.rounds)
            if args.json:
                print(json.dumps(res))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hydra-ray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("summary", help="parameter counts and FLOPs of a config")
    s.add_argument("--config", required=True, help="YAML path or preset name (tiny, small, hydra-500m)")
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    s.set_defaults(func=_summary)

    s = sub.add_parser("smoke", help="single-process curriculum smoke run (no Ray)")
    s.add_argument("--config", required=True)
    s.add_argument("--steps", type=int, default=None, help="compress the curriculum into N steps")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_smoke)

    s = sub.add_parser("bench", help="benchmarks that print side-by-side ratios")
    s.add_argument("name", choices=["dispatch"])
    s.add_argument("--tokens", type=int, default=4096)
    s.add_argument("--d-model", type=int, default=256)
    s.add_argument("--hidden", type=int, default=704)
    s.add_argument("--experts", type=int, default=4)
    s.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    s.add_argument("--device", default="cuda" if _cuda() else "cpu")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--rounds", type=int, default=15)
    s.add_argument("--json", action="store_true", help="also print each result as one JSON line")
    s.set_defaults(func=_bench)
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
