"""`hydra-ray bench serve`: serving ratios measured side by side in one run.

1. Engine, no Ray: greedy decode tokens/s with the KV cache against recomputing the prefix every
   step (256 new tokens), and 8 requests decoded as one batch against the same 8 one after another,
   with the torch threads a model replica has (its num_cpus: 1 by default).
2. The real Serve app on a local Ray, 1 client against 16 concurrent clients (sessions of their
   own on one asyncio loop, as vLLM's serving benchmark drives its load), at the ingress
   replica's own address (direct ingress: the headline) and at Serve's proxy; 1 client and 16
   take turns, 1, 16, 16, 1, so that a machine whose speed drifts moves both sides alike:
   - streamed completions: completion tokens/s, and the p50 time to first token (continuous
     batching: a newcomer joins the running batch at the next token), once with 32 tokens per
     request (the 16 clients then come back in lockstep, a burst) and once with 16-48 (32 on
     average: they arrive spread out, as independent users do);
   - /v1/routing requests/s (Serve batches concurrent traces into one forward);
   - where the first token's time goes, from the app's /metrics histograms: the mean at the
     ingress, in the model replica the wait before the prefill (for the forward then running) and
     the prefill forward itself, and the trip between the ingress and the replica (Serve's
     routing, gRPC both ways).
3. Completions again at the direct address, with the app streaming every token in a message of its
   own (`stream_interval` 1, vLLM's default; the app's default, auto, sends more tokens a message as
   the batch grows: 4 with 16 sequences running).
4. The same app with the model in the ingress's own replica (`colocate`), at its direct address:
   one process per request, no hop.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import dataclass

import torch

from hydra_ray.benchmarks.common import compare, take_turns


def engine_ratios(engine, prompt_tokens: int = 256, new_tokens: int = 256, rounds: int = 3, log=print) -> dict:
    from hydra_ray.serve.engine import GenRequest

    text = ("Solve 12 * 7 = 84. def add(a, b): return a + b. " * 64)
    ids = engine.encode(text)[:prompt_tokens]
    one = [GenRequest(ids, max_tokens=new_tokens, temperature=0.0)]
    eight = [GenRequest(ids[: prompt_tokens - 7 * i], max_tokens=new_tokens, temperature=0.0) for i in range(8)]
    times = compare({
        "cache": lambda: engine.complete(one, use_cache=True),
        "recompute": lambda: engine.complete(one, use_cache=False),
        "batched8": lambda: engine.complete(eight),
        "sequential8": lambda: [engine.complete([r]) for r in eight],
    }, torch.device("cpu"), rounds=rounds, warmup=1)
    res = {
        "decode_tokens_per_s_cache": new_tokens / times["cache"],
        "decode_tokens_per_s_recompute": new_tokens / times["recompute"],
        "batched8_tokens_per_s": 8 * new_tokens / times["batched8"],
        "sequential8_tokens_per_s": 8 * new_tokens / times["sequential8"],
    }
    res["cache_vs_recompute"] = res["decode_tokens_per_s_cache"] / res["decode_tokens_per_s_recompute"]
    res["batched_vs_sequential"] = times["sequential8"] / times["batched8"]
    log(f"[decode] {torch.get_num_threads()} torch thread(s), prompt {len(ids)} tokens, {new_tokens} new, greedy, batch 1: "
        f"KV cache {res['decode_tokens_per_s_cache']:.0f} tok/s vs recompute {res['decode_tokens_per_s_recompute']:.0f} "
        f"tok/s = {res['cache_vs_recompute']:.2f}x")
    log(f"[decode] 8 requests: one batch {res['batched8_tokens_per_s']:.0f} tok/s vs one after another "
        f"{res['sequential8_tokens_per_s']:.0f} tok/s = {res['batched_vs_sequential']:.2f}x")
    return res


@dataclass
class Tally:
    """What load on one address gave: each successful call's result, the failed calls, wall seconds,
    the load generator's CPU seconds, and (`with_parts`) the first-token histograms' growth at the
    ingress, part -> (sum, count). Tallies of several runs add up (`+`)."""

    results: list
    errors: int
    wall: float
    cpu: float
    parts: dict[str, tuple[float, float]] | None = None

    def __add__(self, o: "Tally") -> "Tally":
        parts = None
        if self.parts is not None and o.parts is not None:
            parts = {k: (self.parts[k][0] + o.parts[k][0], self.parts[k][1] + o.parts[k][1]) for k in self.parts}
        return Tally(self.results + o.results, self.errors + o.errors, self.wall + o.wall, self.cpu + o.cpu, parts)


def _load(url: str, clients: int, seconds: float, headers: dict | None, request) -> Tally:
    """`clients` concurrent users on one asyncio loop, each with a session (and connection) of its
    own, calling `await request(session, i, n)` back to back for `seconds` (n counts its calls;
    None means the call failed), as vLLM's serving benchmark drives its load (aiohttp).

    (A thread per client with httpx cost the load generator 9-12 ms of CPU per 32-token streamed
    completion at 16 clients, against 3.3-5.4 with this, and its 16 threads took turns at one GIL on
    the server's 2 cores.)"""
    cpu = time.process_time()
    results, failures, wall = asyncio.run(_load_async(url, clients, seconds, headers, request))
    return Tally(results, failures, wall, time.process_time() - cpu)


async def _load_async(url: str, clients: int, seconds: float, headers: dict | None, request):
    import aiohttp

    results, failures = [], 0
    stop = time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=120)

    async def client(i: int) -> None:
        nonlocal failures
        async with aiohttp.ClientSession(base_url=url, headers=headers or {}, timeout=timeout) as session:
            n = 0
            while time.perf_counter() < stop:
                r = await request(session, i, n)
                if r is None:
                    failures += 1
                else:
                    results.append(r)
                n += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return results, failures, time.perf_counter() - t0


def _routing_tally(url: str, clients: int, seconds: float, headers: dict | None = None) -> Tally:
    async def one(s, i: int, n: int) -> float | None:
        t0 = time.perf_counter()
        async with s.post("/v1/routing", json={"text": f"Solve {i} * {n} = {i * n}; def f(x): return x + {n}"}) as r:
            await r.read()
            return time.perf_counter() - t0 if r.status == 200 else None

    return _load(url, clients, seconds, headers, one)


def _routing_summary(clients: int, t: Tally) -> dict:
    if not t.results:
        raise RuntimeError(f"/v1/routing answered no request successfully ({t.errors} errors)")
    return {"clients": clients, "requests": len(t.results), "errors": t.errors, "req_per_s": len(t.results) / t.wall,
            "p50_ms": 1000 * statistics.median(t.results),
            "load_cpu_ms_per_request": 1000 * t.cpu / (len(t.results) + t.errors)}


def routing_throughput(url: str, clients: int, seconds: float, headers: dict | None = None) -> dict:
    """/v1/routing requests/s and median latency with `clients` concurrent clients."""
    return _routing_summary(clients, _routing_tally(url, clients, seconds, headers))


def request_length(max_tokens: int | tuple[int, int], i: int, n: int) -> int:
    """max_tokens of call n of client i: `max_tokens` itself, or for (lo, hi) a stride of 13
    through lo..hi, which visits every length once in each hi - lo + 1 calls when 13 does not
    divide that count (clients start at different points)."""
    if isinstance(max_tokens, int):
        return max_tokens
    lo, hi = max_tokens
    return lo + (7 * i + 13 * n) % (hi - lo + 1)


def _completion_tally(url: str, clients: int, seconds: float, headers: dict | None = None,
                      max_tokens: int | tuple[int, int] = 32, with_parts: bool = False) -> Tally:
    """`clients` concurrent users streaming completions back to back; per completion (time to its
    first token, completion tokens). `max_tokens`: every request's, or (lo, hi): each request's
    own, spread evenly over lo..hi (`request_length`), the same spread for 1 client as for 16."""
    import json

    async def one(s, i: int, n: int) -> tuple[float, int] | None:
        body = {"prompt": f"def f{i}_{n}(x):", "max_tokens": request_length(max_tokens, i, n), "temperature": 0.8, "seed": n,
                "stream": True, "stream_options": {"include_usage": True}}
        t0, first, used = time.perf_counter(), None, 0
        async with s.post("/v1/completions", json=body) as r:
            if r.status != 200:
                await r.read()
                return None
            async for line in r.content:  # server-sent events, a line at a time
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"]:
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    used = chunk["usage"]["completion_tokens"]
        return None if first is None else (first, used)

    before = _histogram_totals(url, headers or {}) if with_parts else None
    t = _load(url, clients, seconds, headers, one)
    if with_parts:
        after = _histogram_totals(url, headers or {})
        t.parts = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in FIRST_TOKEN_PARTS}
    return t


def _completion_summary(clients: int, t: Tally) -> dict:
    """Completion tokens/s over the run, the median time from sending a request to its first token,
    and with the histograms the mean first-token time at the ingress and its parts (waiting to be
    prefilled and the prefill forward in the model replica, the trip between the ingress and the
    replica)."""
    if not t.results:
        raise RuntimeError(f"/v1/completions answered no request successfully ({t.errors} errors)")
    res = {"clients": clients, "completions": len(t.results), "errors": t.errors,
           "tokens_per_s": sum(u for _, u in t.results) / t.wall,
           "ttft_p50_ms": 1000 * statistics.median(f for f, _ in t.results),
           "load_cpu_ms_per_request": 1000 * t.cpu / (len(t.results) + t.errors)}
    for k, (total, n) in (t.parts or {}).items():
        res[f"{k}_mean_ms"] = 1000 * total / n if n else None
    return res


def completion_load(url: str, clients: int, seconds: float, headers: dict | None = None,
                    max_tokens: int | tuple[int, int] = 32) -> dict:
    """`clients` concurrent users streaming completions back to back (`_completion_tally`):
    completion tokens/s and the p50 time to first token."""
    return _completion_summary(clients, _completion_tally(url, clients, seconds, headers, max_tokens))


FIRST_TOKEN_PARTS = {"first_token": "hydra_time_to_first_token_seconds", "queue": "hydra_queue_seconds",
                     "prefill": "hydra_prefill_seconds", "transport": "hydra_first_token_transport_seconds"}


def _histogram_totals(url: str, headers: dict) -> dict[str, tuple[float, float]]:
    """(sum, count) of the first-token histograms at the ingress's /metrics, over every model."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {k: [0.0, 0.0] for k in FIRST_TOKEN_PARTS}
    names = {v: k for k, v in FIRST_TOKEN_PARTS.items()}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", headers=headers).text):
        if fam.name in names:
            for sample in fam.samples:
                if sample.name.endswith("_sum"):
                    out[names[fam.name]][0] += sample.value
                elif sample.name.endswith("_count"):
                    out[names[fam.name]][1] += sample.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def completion_load_with_parts(url: str, clients: int, seconds: float, headers: dict,
                               max_tokens: int | tuple[int, int] = 32) -> dict:
    """`completion_load`, plus the mean first-token time at the ingress and its parts, from the
    app's own histograms."""
    return _completion_summary(clients, _completion_tally(url, clients, seconds, headers, max_tokens, with_parts=True))


def one_against_many(run, seconds: float) -> tuple[Tally, Tally]:
    """`run(clients, seconds)` for 1 client and for 16, in the order 1, 16, 16, 1 (seconds / 2
    each): a machine that speeds up or slows down during the measurement moves both sides alike,
    where one run of each after the other put all of a drift into their ratio."""
    half = seconds / 2
    runs = take_turns({"one": lambda: run(1, half), "many": lambda: run(16, half)}, 2)
    (one_a, one_b), (many_a, many_b) = runs["one"], runs["many"]
    return one_a + one_b, many_a + many_b


def _parts(r: dict) -> str:
    if r.get("queue_mean_ms") is None:
        return "no first-token histograms"
    return (f"mean {r['first_token_mean_ms']:.0f} ms at the ingress: {r['queue_mean_ms']:.0f} waiting "
            f"+ {r['prefill_mean_ms']:.0f} prefill in the model replica, "
            f"{r['transport_mean_ms']:.0f} between the ingress and the replica")


SPREAD = (16, 48)  # requests of 16-48 tokens, 32 on average: clients that do not finish together
STREAM_INTERVAL = 1  # the second app's: tokens a streamed message carries after the first


def path_ratios(url: str, seconds: float, headers: dict, log, label: str, routing: bool = True) -> dict:
    """1 client against 16 on one address: routing requests/s, and streamed completions (tokens/s,
    p50 time to first token) twice: 32 tokens each, and 16-48 tokens each (32 on average).

    With 32 each, every client that started in one prefill finishes in the same decode step and
    sends its next request at the same moment: the 16 clients come back in lockstep, a burst that
    the ingress parses one request after another and the model prefills as one cohort. With
    lengths spread, they finish at different steps and arrive spread out, as independent users'
    requests do."""
    res: dict = {"url": url}
    if routing:
        routing_throughput(url, 4, 2.0, headers)  # warm-up: model loaded, batch queue running
        one, many = one_against_many(lambda n, s: _routing_tally(url, n, s, headers), seconds)
        one, many = _routing_summary(1, one), _routing_summary(16, many)
        res.update(routing_1_client=one, routing_16_clients=many, routing_16_vs_1=many["req_per_s"] / one["req_per_s"])
        log(f"[routing, {label}] /v1/routing: 1 client {one['req_per_s']:.1f} req/s (p50 {one['p50_ms']:.0f} ms), "
            f"16 clients {many['req_per_s']:.1f} req/s (p50 {many['p50_ms']:.0f} ms) = {res['routing_16_vs_1']:.2f}x; "
            f"errors {one['errors'] + many['errors']}")
    completion_load(url, 4, 2.0, headers)  # warm-up: the decode thread running
    for key, lengths, what in (("", 32, "32 tokens each"), ("_spread", SPREAD, f"{SPREAD[0]}-{SPREAD[1]} tokens each")):
        gen1, gen16 = one_against_many(lambda n, s: _completion_tally(url, n, s, headers, lengths, with_parts=True), seconds)
        gen1, gen16 = _completion_summary(1, gen1), _completion_summary(16, gen16)
        res.update({f"completions_1_client{key}": gen1, f"completions_16_clients{key}": gen16,
                    f"completions_16_vs_1{key}": gen16["tokens_per_s"] / gen1["tokens_per_s"],
                    f"ttft_16_vs_1{key}": gen16["ttft_p50_ms"] / gen1["ttft_p50_ms"]})
        log(f"[completions, {label}] {what}, streamed: 1 client {gen1['tokens_per_s']:.0f} tok/s (p50 first token "
            f"{gen1['ttft_p50_ms']:.0f} ms), 16 clients {gen16['tokens_per_s']:.0f} tok/s (p50 first token "
            f"{gen16['ttft_p50_ms']:.0f} ms) = {res[f'completions_16_vs_1{key}']:.2f}x tokens/s, "
            f"{res[f'ttft_16_vs_1{key}']:.2f}x time to first token; errors {gen1['errors'] + gen16['errors']}; "
            f"the load generator's CPU {gen16['load_cpu_ms_per_request']:.2f} ms a request")
        log(f"[first token, {label}] {what}: 1 client: {_parts(gen1)}; 16 clients: {_parts(gen16)}")
    return res


def run(run_dir: str, seconds: float = 10.0, port: int = 8765, log=print) -> dict:
    """The engine ratios, then the app's ratios at the ingress replica's own address (Serve's
    direct ingress, what a load balancer in front of the replicas reaches: the headline figures)
    and at the proxy's port (`proxy`)."""
    from ray import serve

    from hydra_ray.serve.args import ServeArgs
    from hydra_ray.serve.builder import build_app, ingress_urls, take_down
    from hydra_ray.serve.engine import Engine
    from hydra_ray.serve.store import CheckpointStore
    from hydra_ray.raystart import ray_init

    store, model_id = CheckpointStore.for_run(run_dir)
    args = ServeArgs(run=run_dir, max_batch_size=16, batch_wait_timeout_s=0.005, max_num_seqs=16)
    # the engine with the torch threads a model replica decodes with: Ray sets a replica's thread
    # count to its num_cpus (1 by default), whatever this process has
    threads, torch_threads = max(1, round(args.num_cpus)), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        res = {"model": model_id, "engine_threads": threads, **engine_ratios(Engine.from_store(store, model_id), log=log)}
    finally:
        torch.set_num_threads(torch_threads)
    ray_init(log, min_cpus=3)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    key = os.environ.get("HYDRA_API_KEY")  # the app picks it up too
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    proxy = f"http://127.0.0.1:{port}"
    try:
        serve.run(build_app(args), name="hydra-bench", route_prefix="/")
        direct = ingress_urls("hydra-bench", "127.0.0.1")
        if direct:
            res.update(path="direct ingress", **path_ratios(direct[0], seconds, headers, log, "direct ingress"))
            res["proxy"] = path_ratios(proxy, seconds, headers, log, "Serve proxy")
        else:
            log("[serve] no direct ingress address (Serve's high-throughput mode is off): the proxy only")
            res.update(path="Serve proxy", **path_ratios(proxy, seconds, headers, log, "Serve proxy"))
        serve.delete("hydra-bench")
        # the same app streaming STREAM_INTERVAL tokens a message after the first: completions only
        serve.run(build_app(args.model_copy(update={"stream_interval": STREAM_INTERVAL})), name="hydra-bench",
                  route_prefix="/")
        direct = ingress_urls("hydra-bench", "127.0.0.1")
        res[f"stream_interval_{STREAM_INTERVAL}"] = path_ratios(
            direct[0] if direct else proxy, seconds, headers, log,
            f"stream_interval {STREAM_INTERVAL}, " + ("direct ingress" if direct else "Serve proxy"), routing=False)
        serve.delete("hydra-bench")
        # the same, with the model in the ingress's replica (`colocate`): no hop between two processes
        serve.run(build_app(args.model_copy(update={"colocate": True})), name="hydra-bench", route_prefix="/")
        direct = ingress_urls("hydra-bench", "127.0.0.1")
        res["colocated"] = path_ratios(direct[0] if direct else proxy, seconds, headers, log,
                                       "colocated, " + ("direct ingress" if direct else "Serve proxy"))
    finally:
        take_down("hydra-bench")
    return res
