"""`hydra-ray serve`: the Serve app on a local Ray (or the cluster of RAY_ADDRESS) until interrupted.

Design choices
- The same `build_app(ServeArgs)` as `serve run serve/config.yaml`: flags map onto ServeArgs, which
  validates them before Ray starts.
- --run, --checkpoint and --store take local paths or URIs (s3://bucket/runs/NAME, credentials
  from the standard AWS_* environment). The default checkpoint is read and verified before Ray
  starts, so a missing run or bucket and wrong credentials are one line naming the URI, exit 2.
- `--smoke` is the tiny mode every entry point has: start, send one greedy completion per
  built-in domain (chat through /v1/chat/completions) and one routing
  request over HTTP, print them, shut down (what `make demo` runs).
- SIGINT/SIGTERM take the app down cleanly (`builder.take_down`: the app deleted, a local Ray stopped), so
  the port and actors are freed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory or URI (s3://bucket/runs/NAME): serve its checkpoints, "
                                   "default the newest")
    src.add_argument("--checkpoint", help="one checkpoint directory or URI (RUN/checkpoints/step_XXXXXXXX)")
    src.add_argument("--store", help="a folder or URI of runs: serve every run in it (with --model as the default)")
    p.add_argument("--model", default=None, metavar="RUN[@STEP]",
                   help="the default model: with --store, a run inside it; with --run, RUN@STEP")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="model replicas")
    scale.add_argument("--autoscale", default=None, metavar="MIN-MAX", help="autoscale model replicas")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (or $HYDRA_API_KEY)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per model replica")
    p.add_argument("--colocate", action="store_true",
                   help="run the model inside the HTTP ingress's replicas (one deployment, no hop between "
                        "processes per request); --replicas, --autoscale and --num-cpus then apply to it")
    p.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=16,
                   help="sequences generating at once per model and replica (continuous batching); more wait in order")
    p.add_argument("--stream-interval", type=_interval, default="auto", metavar="N|auto",
                   help="after a stream's first token, send N tokens a message: fewer messages and SSE chunks "
                        "under load, text in steps of N tokens. auto (default): every token while a replica "
                        "runs up to 4 sequences, then one more a message for each 4 more, at most 8; "
                        "1: every token as it comes, always")
    p.add_argument("--smoke", action="store_true", help="query it once over HTTP, print, shut down")


def _interval(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number nor auto") from None


def serve_args(args: argparse.Namespace):
    from pydantic import ValidationError

    from hydra_ray.config import ConfigError, parse_min_max
    from hydra_ray.serve.args import ServeArgs
    from hydra_ray.serve.engine import Engine
    from hydra_ray.serve.errors import EngineError

    autoscale = parse_min_max(args.autoscale, "--autoscale") if args.autoscale else None
    if args.store and not args.model:
        raise ConfigError("--store needs --model RUN[@STEP]: the run served by default")
    if args.model and args.checkpoint:
        raise ConfigError("--model goes with --store or --run, not with --checkpoint")
    try:
        a = ServeArgs(run=args.run, checkpoint=args.checkpoint, store=args.store, default_model=args.model,
                      replicas=args.replicas, autoscale=autoscale,
                      api_key=args.api_key or os.environ.get("HYDRA_API_KEY"), num_cpus=args.num_cpus,
                      max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                      max_num_seqs=args.max_num_seqs, stream_interval=args.stream_interval, colocate=args.colocate)
        # before Ray starts: the checkpoint must exist, match its manifest and have its tokenizer
        store, default = a.locate()
        Engine.check(store.resolve(default).path)
    except ValidationError as e:
        raise ConfigError(str(e.errors()[0]["msg"]).removeprefix("Value error, ")) from None
    except EngineError as e:
        raise ConfigError(e.message) from None
    return a


def check_port(host: str, port: int) -> None:
    """A busy port is a one-line error before Ray starts, not a failed deployment later."""
    import socket

    from hydra_ray.config import ConfigError

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as e:
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}); "
                          "is another server running there? pick another --port") from None


def run(args: argparse.Namespace) -> int:
    a = serve_args(args)
    check_port(args.host, args.port)
    from ray import serve

    from hydra_ray.serve.builder import build_app, ingress_urls, take_down
    from hydra_ray.raystart import ray_init, requiet

    ray_init(print, min_cpus=a.num_cpus * (a.autoscale[1] if a.autoscale else a.replicas) + 1)
    serve.start(http_options={"host": args.host, "port": args.port})
    requiet()  # Serve configures its console logger when it starts
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
        try:
            serve.run(build_app(a), name="hydra", route_prefix="/")
        except RuntimeError as e:  # a deployment that failed after the checks above
            print(f"error: the Serve application failed to start ({' '.join(str(e).split())[:300]}); "
                  "details in Ray's logs: /tmp/ray/session_latest/logs/serve/", file=sys.stderr, flush=True)
            return 1
        started.set()
        url = f"http://{args.host}:{args.port}"
        print(f"serving {url}  (inspector: {url}/ , OpenAI API: {url}/v1/completions)", flush=True)
        direct = ingress_urls("hydra", args.host)
        if direct:
            print(f"direct ingress (the same API without Serve's proxy hop; faster): {', '.join(direct)}", flush=True)
        if args.smoke:
            return smoke(url, a.api_key)
        stop.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        started.set()
        print("shutting down", flush=True)
        take_down("hydra")


# one prompt per built-in domain: the demo ends by showing what the model learned of each
SMOKE_PROMPTS = {
    "math": "Problem: Compute 17 + 4 * 6.\nSolution:",
    "code": "def add(a, b):\n",
    "chat": None,  # asked through /v1/chat/completions, in the chat template
    "finefineweb": "The ",
}
SMOKE_CHAT = "What does json.dumps do?"


def smoke(url: str, api_key: str | None) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as c:
        r = c.get("/v1/models")
        _check(r)
        model = next((m for m in r.json()["data"] if m["default"]), r.json()["data"][0])
        print(f"[model] {model['id']}: one greedy completion per domain of the built-in corpus")
        for domain, prompt in SMOKE_PROMPTS.items():
            greedy = {"max_tokens": 48, "temperature": 0, "frequency_penalty": 1.0}  # no loops of one word
            if prompt is None:
                r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": SMOKE_CHAT}],
                                                         **greedy})
                _check(r)
                out = r.json()
                shown, text = SMOKE_CHAT, out["choices"][0]["message"]["content"]
            else:
                r = c.post("/v1/completions", json={"prompt": prompt, **greedy})
                _check(r)
                out = r.json()
                shown, text = prompt, out["choices"][0]["text"]
            print(f"[{domain}] {json.dumps(shown)} -> {json.dumps(text)} "
                  f"({out['usage']['completion_tokens']} tokens, {out['choices'][0]['finish_reason']})")
        r = c.post("/v1/routing", json={"text": "Solve 12 * 7 = "})
        _check(r)
        s = r.json()["summary"]
        util = ", ".join(f"E{e['expert']} {100 * e['fraction']:.0f}%" for e in s["experts"])
        print(f"[routing] {s['tokens']} tokens: {util}; closest domain {s['closest_domain']}; "
              f"MoD selected {_pct(s['mod_selected_frac'])}; MoR mean depth {_num(s['mor_mean_depth'])}")
    return 0


def _check(r) -> None:
    if r.status_code != 200:
        raise RuntimeError(f"{r.request.method} {r.request.url.path}: HTTP {r.status_code} {r.text}")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _num(x) -> str:
    return "-" if x is None else f"{x:.2f}"
