"""HydraIngress: the HTTP face of the application (FastAPI in a Serve deployment).

Design choices
- It parses and validates every request (JSON from the raw body whatever the content type, so
  `curl -d` works; the pydantic bodies of bodies.py), enforces the API key and the limits,
  resolves the `model` field against the checkpoint store, tokenises, and keeps the live expert
  counters and the Prometheus metrics. The model deployment (model.py) does the work.
- Every client mistake is caught here, before any work is queued: a streamed response cannot
  change its status once started, and the model deployment then only ever sees requests it can
  serve. The rules that depend on the model are the engine's own functions (`check_domain`,
  `check_context`); an EngineError becomes its HTTP error. Errors are OpenAI-shaped JSON:
  {"error": {"message", "type", "code"}}.
- No module state: `make_ingress(settings)` builds a FastAPI app, its error handlers and the
  deployment class around it (`serve.ingress` needs the app when the class is defined, and Serve
  ships the class by value). The key, the metrics and the counters belong to the replica's
  instance; the error handlers, which run outside any route, find that instance the way Serve
  injects `self` into routes (`serve.get_replica_context().servable_object`). A closure cannot
  share them: `serve.ingress` serves a frozen copy of the app, with copies of its handlers.
- Responses that are plain JSON types go out encoded by orjson (`shapes.JSON`, `shapes.sse`):
  FastAPI's encoder walk over a routing trace was nearly half of the route's CPU, and json.dumps
  then an eighth of the replica's. A routing trace arrives from the model replica already encoded
  (model.routed) and goes out as it came.
- The default checkpoint lives in `user_config`; `reconfigure` resolves the new id, loads it on a
  model replica first, then switches, so no request sees a missing model.
- Generation always streams inside the cluster; `_generate` opens the streams (surfacing replica
  errors before any byte is sent), and each endpoint shapes the events: a non-streaming request
  collects them, a streaming one sends them as server-sent events.
- The store may be a local folder or object storage: the ingress reads only each checkpoint's
  config.yaml (once per id), the model replicas read the weights.
"""

import asyncio
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from hydra_ray.runlog import json_safe
from hydra_ray.utilisation import imbalance
from hydra_ray.serve import generation, heap
from hydra_ray.serve.bodies import UNSUPPORTED, RoutingBody
from hydra_ray.serve.decode import add_counts
from hydra_ray.serve.engine import check_context, check_domain, context_of
from hydra_ray.serve.errors import ApiError, EngineError, api_error, describe, engine_error_in
from hydra_ray.serve.metrics import Metrics
from hydra_ray.serve.store import CheckpointStore

STATIC = Path(__file__).resolve().parent / "static"

UNAUTHORIZED = "missing or wrong API key: send 'Authorization: Bearer <key>'"


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def grpc_between_deployments() -> bool:
    """Whether this process's Serve talks gRPC between deployments (its high-throughput mode). A
    handle keeps the transport of the process that made it: the one bound into the ingress comes
    from the driver, which may have imported Serve before the mode was set (16 clients on
    /v1/routing: 112-130 requests/s by actor calls, 174-178 by gRPC)."""
    try:
        from ray.serve._private.constants import RAY_SERVE_USE_GRPC_BY_DEFAULT
    except ImportError:  # another Ray: keep its default
        return False
    return bool(RAY_SERVE_USE_GRPC_BY_DEFAULT)


def authorized(key: str | None, request: Request) -> bool:
    return not key or hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                          f"Bearer {key}".encode())


# --------------------------------------------------------------------------- the app
def make_ingress(settings: dict) -> type:
    """The ingress deployment class, with a FastAPI app of its own. `settings`: the API key (else
    $HYDRA_API_KEY, read in the replica) and the limits, see ServeArgs.ingress_settings."""
    api = FastAPI(title="hydra-ray", description="HYDRA generation and routing inspection", version="1")

    def replica() -> "HydraIngress":
        return serve.get_replica_context().servable_object

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        replica().metrics.failed(request, e.status)
        return error_response(e.status, e.message, e.kind)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        me = replica()
        if request.url.path.startswith("/v1") and not authorized(me.api_key, request):
            me.metrics.failed(request, 401)  # unknown /v1 paths do not tell an unauthenticated caller they do not exist
            return error_response(401, UNAUTHORIZED, "authentication_error")
        me.metrics.failed(request, e.status_code)
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error_response(400, str(e.errors()[:3]))

    @serve.ingress(api)
    class HydraIngress:
        def __init__(self, model, store: dict):
            if isinstance(model, dict):  # colocated: the model deployment's class, in this replica
                from hydra_ray.serve.model import Colocated, HydraModel

                self.model = Colocated(HydraModel(**model))
            else:
                self.model = model.options(_by_reference=not grpc_between_deployments())
            self.store = CheckpointStore(**store)
            self.s = settings
            self.api_key = settings.get("api_key") or os.environ.get("HYDRA_API_KEY") or None
            self.default: str | None = None
            self.metrics = Metrics()
            self.counts: dict[str, dict[str, list[int]]] = {}  # model -> layer -> tokens per expert
            self.served: dict[str, int] = {}
            self._configs: dict[str, Any] = {}
            heap.freeze()  # the replica is up: its long-lived objects out of the collector's way

        async def sequences(self, model_id: str) -> dict:
            """A model's sequences (generating, waiting, cancelled before the end) on the model
            replica a call reaches, or this replica's own when colocated. For operators, by handle."""
            return await self.model.options(multiplexed_model_id=model_id).sequences.remote(model_id)

        async def reconfigure(self, user_config: dict) -> None:
            target = (user_config or {}).get("default_model")
            if not target:
                raise ValueError("user_config needs default_model")
            model_id = self.store.resolve(target).model_id
            await self.model.options(multiplexed_model_id=model_id).warm.remote(model_id)  # load before switching
            self.default = model_id

        # ------------------------------------------------------------- helpers
        def _auth(self, request: Request) -> None:
            if not authorized(self.api_key, request):
                raise ApiError(401, UNAUTHORIZED, "authentication_error")

        async def _json(self, request: Request, schema: type[BaseModel]):
            self._auth(request)
            limit = self.s["max_body_bytes"]
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > limit:
                raise ApiError(413, f"request body over {limit} bytes")
            body = await request.body()
            if len(body) > limit:
                raise ApiError(413, f"request body over {limit} bytes")
            try:
                obj = json.loads(body.decode("utf-8"))
            except UnicodeDecodeError:
                raise ApiError(400, "the request body is not valid UTF-8") from None
            except json.JSONDecodeError as e:
                raise ApiError(400, f"the request body is not valid JSON ({e.msg} at position {e.pos})") from None
            except (ValueError, RecursionError) as e:  # e.g. nesting too deep, an integer too long
                raise ApiError(400, f"the request body is not acceptable JSON ({type(e).__name__})") from None
            if not isinstance(obj, dict):
                raise ApiError(400, "the request body must be a JSON object")
            try:
                return schema.model_validate(obj)
            except ValidationError as e:
                raise ApiError(400, describe(e, UNSUPPORTED)) from None

        def _model(self, requested: str | None):
            """(canonical id, its config) for the request's model field (default when absent)."""
            from hydra_ray import checkpoint as ckpt
            from hydra_ray import storage

            if self.default is None:
                raise ApiError(503, "no default model configured yet", "server_error")
            model_id = requested or self.default
            if model_id not in self._configs:  # RUN@STEP ids seen before: no filesystem walk per request
                try:
                    ref = self.store.resolve(model_id)
                except EngineError as e:
                    raise api_error(e) from None
                if ref.model_id not in self._configs:
                    try:
                        config_yaml = storage.read_text(storage.join(ref.path, "config.yaml"))
                        self._configs[ref.model_id] = ckpt.inference_config(ref.path, config_yaml)
                    except Exception as e:
                        raise ApiError(404, f"model {ref.model_id!r}: unreadable checkpoint config ({e})",
                                       "not_found_error")
                model_id = ref.model_id
            return model_id, self._configs[model_id]

        @staticmethod
        def _domain(cfg, domain: str | None) -> None:
            try:
                check_domain(cfg.model.domains, domain)
            except EngineError as e:
                raise api_error(e) from None

        @staticmethod
        def _tokenizer(cfg):
            from hydra_ray.data.tokenizer import load_tokenizer

            try:
                return load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_sha256)
            except ValueError as e:  # e.g. the checkpoint names a tokenizer.json this node lacks
                raise ApiError(404, f"this model's tokenizer is not available: {e}", "not_found_error") from None

        def _prompt_ids(self, cfg, prompt: str | list[int], max_tokens: int) -> list[int]:
            """A prompt given as text or as token ids -> ids, checked like `_tokenize` checks text."""
            if isinstance(prompt, str):
                return self._tokenize(cfg, prompt, max_tokens)
            vocab = self._tokenizer(cfg).vocab_size
            if max(prompt) >= vocab:
                raise ApiError(400, f"prompt: token id {max(prompt)} is outside the vocabulary (size {vocab})")
            return self._check_length(cfg, list(prompt), max_tokens)

        def _tokenize(self, cfg, text: str, max_tokens: int | None = None) -> list[int]:
            """The text's token ids, within the prompt limit and (with `max_tokens` to generate)
            the model's context."""
            return self._check_length(cfg, self._tokenizer(cfg).encode_batch([text])[0], max_tokens)

        def _check_length(self, cfg, ids: list[int], max_tokens: int | None) -> list[int]:
            if len(ids) > self.s["max_prompt_tokens"]:
                raise ApiError(413, f"{len(ids)} prompt tokens exceed the limit of {self.s['max_prompt_tokens']}")
            try:
                check_context(len(ids), context_of(cfg), max_tokens)
            except EngineError as e:
                raise api_error(e) from None
            return ids

        def _count(self, model_id: str, counts: dict[str, list[int]] | None) -> None:
            if not counts:
                return
            add_counts(self.counts.setdefault(model_id, {}), counts)
            per_expert = [sum(c[i] for c in counts.values()) for i in range(len(next(iter(counts.values()))))]
            for e, n in enumerate(per_expert):
                if n:
                    self.metrics.expert.labels(model_id, str(e)).inc(n)

        def _done(self, endpoint: str, status: int, t0: float) -> None:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

        async def _routing(self, model_id: str, ids: list[int], domain: str | None) -> dict:
            """The trace as the model replica sends it (model.routed): its JSON, and its counts."""
            try:
                return await self.model.options(multiplexed_model_id=model_id).routing.remote(model_id, ids, domain)
            except Exception as e:
                err = engine_error_in(e)
                if err is None:
                    raise
                raise err from None

        async def _generate(self, model_id: str, reqs: list[dict], use_cache: bool,
                            t0: float | None = None) -> list[AsyncIterator[dict]]:
            """One event stream per request, each already past its first event: replica errors
            surface here, before any byte is sent. The last event of each carries its finish
            reason; the expert counters and the batch-size metric are kept as they finish."""
            called = time.perf_counter()
            handle = self.model.options(multiplexed_model_id=model_id, stream=True)
            streams = [handle.generate.remote(model_id, r, use_cache) for r in reqs]
            try:
                firsts = [await streams[0].__anext__()]
                back = time.perf_counter()  # the first stream's first event: exact for it
                firsts += [await s.__anext__() for s in streams[1:]]
            except Exception as e:
                err = engine_error_in(e)
                if err is None:
                    raise
                raise err from None
            self.served[model_id] = self.served.get(model_id, 0) + len(reqs)
            now = time.perf_counter()
            if firsts[0].get("replica_s") is not None:  # the trip there and back, less the replica's own time
                self.metrics.transport.labels(model_id).observe(max(0.0, back - called - firsts[0]["replica_s"]))
            for f in firsts:
                if t0 is not None:  # when the request came in
                    self.metrics.first_token.labels(model_id).observe(now - t0)
                if f.get("queue_s") is not None:
                    self.metrics.queue.labels(model_id).observe(f["queue_s"])
                    self.metrics.prefill.labels(model_id).observe(f["prefill_s"])

            async def events(first: dict, rest) -> AsyncIterator[dict]:
                ev = first
                while True:
                    if ev["finish_reason"]:
                        self._count(model_id, ev["expert_counts"])
                        self.metrics.batch.labels("generation").observe(ev["batch_size"])
                    yield ev
                    if ev["finish_reason"]:
                        return
                    ev = await rest.__anext__()

            return [events(f, s) for f, s in zip(firsts, streams)]

        # ------------------------------------------------------------- open endpoints
        @api.get("/healthz")
        async def healthz(self):
            return {"status": "ok" if self.default else "starting", "default_model": self.default}

        @api.get("/metrics")
        async def prometheus(self):
            from prometheus_client import CONTENT_TYPE_LATEST

            return Response(self.metrics.text(), media_type=CONTENT_TYPE_LATEST)

        @api.get("/", response_class=HTMLResponse)
        async def inspector(self):
            return HTMLResponse((STATIC / "index.html").read_text())

        # ------------------------------------------------------------- /v1
        @api.get("/v1/models")
        async def models(self, request: Request):
            self._auth(request)
            from hydra_ray import storage

            def listing():  # a walk of the store (local or object storage): off the event loop
                out = []
                for ref in self.store.list():
                    written = storage.info(storage.join(ref.path, "manifest.json")).mtime  # the manifest comes last
                    out.append((ref, int(written.timestamp()) if written else 0))
                return out

            try:
                refs = await asyncio.to_thread(listing)
            except EngineError as e:  # the store stopped answering
                raise api_error(e) from None
            except storage.StorageError as e:
                raise ApiError(503, str(e), "server_error") from None
            data = [{"id": ref.model_id, "object": "model", "created": created, "owned_by": "hydra-ray",
                     "run": ref.run, "step": ref.step, "default": ref.model_id == self.default}
                    for ref, created in refs]
            return {"object": "list", "data": data}

        @api.get("/v1/experts/stats")
        async def expert_stats(self, request: Request):
            self._auth(request)
            out = {}
            for model_id, by_layer in self.counts.items():
                n = len(next(iter(by_layer.values())))
                total = [sum(c[i] for c in by_layer.values()) for i in range(n)]
                s = sum(total)
                out[model_id] = {"requests": self.served.get(model_id, 0), "tokens_by_expert": total,
                                 "fraction_by_expert": [t / s if s else 0.0 for t in total],
                                 "imbalance": json_safe(imbalance(by_layer)), "by_layer": by_layer}
            return {"default_model": self.default, "models": out}

        @api.post("/v1/routing")
        async def routing(self, request: Request):
            t0 = time.perf_counter()
            body = await self._json(request, RoutingBody)
            model_id, cfg = self._model(body.model)
            self._domain(cfg, body.domain)
            ids = self._tokenize(cfg, body.text)
            res = await self._routing(model_id, ids, body.domain)
            self._count(model_id, res["expert_tokens_by_layer"])
            self.metrics.batch.labels("routing").observe(res["batch_size"])
            self.served[model_id] = self.served.get(model_id, 0) + 1
            self._done("routing", 200, t0)
            return Response(res["json"], media_type="application/json")  # as the model replica encoded it

        @api.post("/v1/completions")
        async def completions(self, request: Request):
            return await generation.completions(self, request)

        @api.post("/v1/chat/completions")
        async def chat_completions(self, request: Request):
            return await generation.chat_completions(self, request)

    return HydraIngress
