"""`hydra-ray bench serve`: serving ratios measured side by side in one run.

1. Engine, no Ray: greedy decode tokens/s with the KV cache against recomputing the prefix every
   step (256 new tokens), and 8 requests decoded as one batch against the same 8 one after another,
   with the torch threads a model replica has (its num_cpus: 1 by default).
2. The real Serve app on a local Ray, 1 client against 16 concurrent clients, at the ingress
   replica's own address (direct ingress: the headline) and at Serve's proxy:
   - streamed completions: completion tokens/s, and the p50 time to first token (continuous
     batching: a newcomer joins the running batch at the next token), once with 32 tokens per
     request (the 16 clients then come back in lockstep, a burst) and once with 16-48 (32 on
     average: they arrive spread out, as independent users do);
   - /v1/routing requests/s (Serve batches concurrent traces into one forward);
   - where the first token's time goes, from the app's /metrics histograms: the mean at the
     ingress, in the model replica the wait before the prefill (for the forward then running) and
     the prefill forward itself, and the trip between the ingress and the replica (Serve's
     routing, gRPC both ways).
3. The same app with the model in the ingress's own replica (`colocate`), at its direct address:
   one process per request, no hop.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import torch


def engine_ratios(engine, prompt_tokens: int = 256, new_tokens: int = 256, rounds: int = 3, log=print) -> dict:
    from hydra_ray.benchmarks.common import compare
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


def _load(url: str, clients: int, seconds: float, headers: dict | None, request) -> tuple[list, int, float]:
    """`clients` threads, each with its own HTTP client, calling `request(client, i, n)` back to
    back for `seconds` (n counts its calls). Returns (the results that were not None, the number
    of calls that returned None (failures), wall seconds)."""
    import httpx

    results, failures = [], [0]
    stop = time.perf_counter() + seconds
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, headers=headers or {}, timeout=120) as c:
            n = 0
            while time.perf_counter() < stop:
                r = request(c, i, n)
                with lock:
                    if r is None:
                        failures[0] += 1
                    else:
                        results.append(r)
                n += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return results, failures[0], time.perf_counter() - t0


def routing_throughput(url: str, clients: int, seconds: float, headers: dict | None = None) -> dict:
    """/v1/routing requests/s and median latency with `clients` concurrent clients."""
    def one(c, i: int, n: int) -> float | None:
        t0 = time.perf_counter()
        r = c.post("/v1/routing", json={"text": f"Solve {i} * {n} = {i * n}; def f(x): return x + {n}"})
        return time.perf_counter() - t0 if r.status_code == 200 else None

    lat, errors, wall = _load(url, clients, seconds, headers, one)
    if not lat:
        raise RuntimeError(f"/v1/routing answered no request successfully ({errors} errors)")
    return {"clients": clients, "requests": len(lat), "errors": errors, "req_per_s": len(lat) / wall,
            "p50_ms": 1000 * statistics.median(lat)}


def request_length(max_tokens: int | tuple[int, int], i: int, n: int) -> int:
    """max_tokens of call n of client i: `max_tokens` itself, or for (lo, hi) a stride of 13
    through lo..hi, which visits every length once in each hi - lo + 1 calls when 13 does not
    divide that count (clients start at different points)."""
    if isinstance(max_tokens, int):
        return max_tokens
    lo, hi = max_tokens
    return lo + (7 * i + 13 * n) % (hi - lo + 1)


def completion_load(url: str, clients: int, seconds: float, headers: dict | None = None,
                    max_tokens: int | tuple[int, int] = 32) -> dict:
    """`clients` threads streaming completions back to back: completion tokens/s over the run and
    the median time from sending a request to its first token. `max_tokens`: every request's, or
    (lo, hi): each request's own, spread evenly over lo..hi (`request_length`), the same spread
    for 1 client as for 16."""
    import json

    def one(c, i: int, n: int) -> tuple[float, int] | None:
        body = {"prompt": f"def f{i}_{n}(x):", "max_tokens": request_length(max_tokens, i, n), "temperature": 0.8, "seed": n,
                "stream": True, "stream_options": {"include_usage": True}}
        t0, first, used = time.perf_counter(), None, 0
        with c.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return None
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"]:
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    used = chunk["usage"]["completion_tokens"]
        return None if first is None else (first, used)

    done, errors, wall = _load(url, clients, seconds, headers, one)
    if not done:
        raise RuntimeError(f"/v1/completions answered no request successfully ({errors} errors)")
    return {"clients": clients, "completions": len(done), "errors": errors,
            "tokens_per_s": sum(u for _, u in done) / wall, "ttft_p50_ms": 1000 * statistics.median(f for f, _ in done)}


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
    """`completion_load`, plus the mean first-token time at the ingress and its parts (waiting to be
    prefilled and the prefill forward in the model replica, the trip between the ingress and the
    replica) from the app's own histograms."""
    before = _histogram_totals(url, headers)
    res = completion_load(url, clients, seconds, headers, max_tokens)
    after = _histogram_totals(url, headers)
    for k in FIRST_TOKEN_PARTS:
        n = after[k][1] - before[k][1]
        res[f"{k}_mean_ms"] = 1000 * (after[k][0] - before[k][0]) / n if n else None
    return res


def _parts(r: dict) -> str:
    if r.get("queue_mean_ms") is None:
        return "no first-token histograms"
    return (f"mean {r['first_token_mean_ms']:.0f} ms at the ingress: {r['queue_mean_ms']:.0f} waiting "
            f"+ {r['prefill_mean_ms']:.0f} prefill in the model replica, "
            f"{r['transport_mean_ms']:.0f} between the ingress and the replica")


SPREAD = (16, 48)  # requests of 16-48 tokens, 32 on average: clients that do not finish together


def path_ratios(url: str, seconds: float, headers: dict, log, label: str) -> dict:
    """1 client against 16 on one address: routing requests/s, and streamed completions (tokens/s,
    p50 time to first token) twice: 32 tokens each, and 16-48 tokens each (32 on average).

    With 32 each, every client that started in one prefill finishes in the same decode step and
    sends its next request at the same moment: the 16 clients come back in lockstep, a burst that
    the ingress parses one request after another and the model prefills as one cohort. With
    lengths spread, they finish at different steps and arrive spread out, as independent users'
    requests do."""
    routing_throughput(url, 4, 2.0, headers)  # warm-up: model loaded, batch queue running
    one = routing_throughput(url, 1, seconds, headers)
    many = routing_throughput(url, 16, seconds, headers)
    completion_load(url, 4, 2.0, headers)  # warm-up: the decode thread running
    res = dict(url=url, routing_1_client=one, routing_16_clients=many, routing_16_vs_1=many["req_per_s"] / one["req_per_s"])
    for key, lengths, what in (("", 32, "32 tokens each"), ("_spread", SPREAD, f"{SPREAD[0]}-{SPREAD[1]} tokens each")):
        gen1 = completion_load_with_parts(url, 1, seconds, headers, lengths)
        gen16 = completion_load_with_parts(url, 16, seconds, headers, lengths)
        res.update({f"completions_1_client{key}": gen1, f"completions_16_clients{key}": gen16,
                    f"completions_16_vs_1{key}": gen16["tokens_per_s"] / gen1["tokens_per_s"],
                    f"ttft_16_vs_1{key}": gen16["ttft_p50_ms"] / gen1["ttft_p50_ms"]})
        log(f"[completions, {label}] {what}, streamed: 1 client {gen1['tokens_per_s']:.0f} tok/s (p50 first token "
            f"{gen1['ttft_p50_ms']:.0f} ms), 16 clients {gen16['tokens_per_s']:.0f} tok/s (p50 first token "
            f"{gen16['ttft_p50_ms']:.0f} ms) = {res[f'completions_16_vs_1{key}']:.2f}x tokens/s, "
            f"{res[f'ttft_16_vs_1{key}']:.2f}x time to first token; errors {gen1['errors'] + gen16['errors']}")
        log(f"[first token, {label}] {what}: 1 client: {_parts(gen1)}; 16 clients: {_parts(gen16)}")
    log(f"[routing, {label}] /v1/routing: 1 client {one['req_per_s']:.1f} req/s (p50 {one['p50_ms']:.0f} ms), "
        f"16 clients {many['req_per_s']:.1f} req/s (p50 {many['p50_ms']:.0f} ms) = {res['routing_16_vs_1']:.2f}x; "
        f"errors {one['errors'] + many['errors']}")
    return res


def run(run_dir: str, seconds: float = 10.0, port: int = 8765, log=print) -> dict:
    """The engine ratios, then the app's ratios at the ingress replica's own address (Serve's
    direct ingress, what a load balancer in front of the replicas reaches: the headline figures)
    and at the proxy's port (`proxy`)."""
    from ray import serve

    from hydra_ray.serve.args import ServeArgs
    from hydra_ray.serve.builder import build_app, ingress_urls
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
        # the same, with the model in the ingress's replica (`colocate`): no hop between two processes
        serve.run(build_app(args.model_copy(update={"colocate": True})), name="hydra-bench", route_prefix="/")
        direct = ingress_urls("hydra-bench", "127.0.0.1")
        res["colocated"] = path_ratios(direct[0] if direct else proxy, seconds, headers, log,
                                       "colocated, " + ("direct ingress" if direct else "Serve proxy"))
    finally:
        serve.shutdown()
    return res
