"""`hydra-ray serve`: the Serve app on a local Ray (or the cluster of RAY_ADDRESS) until interrupted.

Design choices
- The same `build_app(ServeArgs)` as `serve run serve/config.yaml`: flags map onto ServeArgs, which
  validates them before Ray starts.
- `--smoke` is the tiny mode every entry point has: start, send one completion and one routing
  request over HTTP, print them, shut down (what `make demo` runs).
- SIGINT/SIGTERM shut Serve down cleanly (`serve.shutdown()`), so the port and actors are freed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory: serve its checkpoints, default the newest")
    src.add_argument("--checkpoint", help="one checkpoint directory (RUN/checkpoints/step_XXXXXXXX)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="model replicas")
    scale.add_argument("--autoscale", default=None, metavar="MIN-MAX", help="autoscale model replicas")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (or $HYDRA_API_KEY)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per model replica")
    p.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--smoke", action="store_true", help="query it once over HTTP, print, shut down")


def serve_args(args: argparse.Namespace):
    from pydantic import ValidationError

    from hydra_ray.config import ConfigError
    from hydra_ray.serve.app import ServeArgs
    from hydra_ray.serve.engine import EngineError

    autoscale = None
    if args.autoscale:
        try:
            lo, hi = (int(x) for x in args.autoscale.split("-"))
        except ValueError:
            raise ConfigError(f"--autoscale {args.autoscale!r}: expected MIN-MAX, e.g. 1-4") from None
        autoscale = (lo, hi)
    try:
        a = ServeArgs(run=args.run, checkpoint=args.checkpoint, replicas=args.replicas, autoscale=autoscale,
                      api_key=args.api_key or os.environ.get("HYDRA_API_KEY"), num_cpus=args.num_cpus,
                      max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens)
        a.locate()  # the run/checkpoint must exist and hold a valid checkpoint before Ray starts
    except ValidationError as e:
        raise ConfigError(str(e.errors()[0]["msg"])) from None
    except EngineError as e:
        raise ConfigError(e.message) from None
    return a


def run(args: argparse.Namespace) -> int:
    a = serve_args(args)
    from ray import serve

    from hydra_ray.serve.app import build_app
    from hydra_ray.train.driver import ray_init

    ray_init(print, min_cpus=a.num_cpus * (a.autoscale[1] if a.autoscale else a.replicas) + 1)
    serve.start(http_options={"host": args.host, "port": args.port})
    stop = threading.Event()
    started = threading.Event()

    def on_signal(*_):
        stop.set()
        if not started.is_set():  # still starting (maybe waiting for resources): leave serve.run now
            raise KeyboardInterrupt

    if not args.smoke:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
    try:
        serve.run(build_app(a), name="hydra", route_prefix="/")
        started.set()
        url = f"http://{args.host}:{args.port}"
        print(f"serving {url}  (inspector: {url}/ , OpenAI API: {url}/v1/completions)", flush=True)
        if args.smoke:
            return smoke(url, a.api_key)
        stop.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        started.set()
        print("shutting down", flush=True)
        if os.environ.get("RAY_ADDRESS"):
            serve.delete("hydra")  # a shared cluster keeps its other Serve applications
        else:
            serve.shutdown()


def smoke(url: str, api_key: str | None) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as c:
        r = c.post("/v1/completions", json={"prompt": "def add(a, b):", "max_tokens": 32, "temperature": 0.7,
                                            "seed": 0})
        _check(r)
        out = r.json()
        print(f"[completion] {out['model']}: {json.dumps(out['choices'][0]['text'])} "
              f"({out['usage']['completion_tokens']} tokens, {out['choices'][0]['finish_reason']})")
        r = c.post("/v1/routing", json={"text": "Solve 12 * 7 = "})
        _check(r)
        s = r.json()["summary"]
        util = ", ".join(f"E{e['expert']} {100 * e['fraction']:.0f}%" for e in s["experts"])
        print(f"[routing] {s['tokens']} tokens: {util}; closest domain {s['closest_domain']}; "
              f"MoD selected {s['mod_selected_frac']}; MoR depth {s['mor_mean_depth']}")
    return 0




def _check(r) -> None:
    if r.status_code != 200:
        raise RuntimeError(f"{r.request.method} {r.request.url.path}: HTTP {r.status_code} {r.text}")
