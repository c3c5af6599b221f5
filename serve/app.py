"""The Ray Serve application: a FastAPI ingress in front of a multiplexed, batching model deployment.

Design choices
- Two deployments. `HydraIngress` speaks HTTP: it parses and validates every request (JSON from
  the raw body whatever the content type, so `curl -d` works; pydantic models with strict types),
  enforces the API key and the limits, resolves the `model` field against the checkpoint store,
  tokenises, and keeps the live expert counters and Prometheus metrics. `HydraModel` holds
  engines: `serve.multiplexed` keeps an LRU of checkpoints per replica (the ingress passes the
  model id as the handle's multiplexed id, so Serve routes to a replica that has it loaded), and
  `serve.batch` groups concurrent routing traces and concurrent generations into one forward.
- Every client mistake is caught in the ingress, before any work is queued: a streamed response
  cannot change its status once started, and the model deployment then only ever sees requests it
  can serve. Errors are OpenAI-shaped JSON: {"error": {"message", "type", "code"}}.
- The default checkpoint lives in the ingress's `user_config`; `reconfigure` resolves the new id,
  loads it on a model replica first, then switches, so no request sees a missing model.
- Options come from `ServeArgs` (pydantic), through `build_app`, which `serve run`/`serve deploy`
  also call via `import_path: hydra_ray.serve.app:build_app`; nothing is fixed in decorators.
- Generation always streams inside the cluster (one code path); a non-streaming request simply
  collects the stream.
- The checkpoint store may be a local folder or object storage (s3://...), read through
  hydra_ray.storage: the ingress reads only each checkpoint's config.yaml (once per id), model
  replicas stream the weights into memory; every process reads the bucket with the standard
  AWS_* environment it was started with.
"""


import asyncio
import hmac
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from hydra_ray.serve.engine import CheckpointStore, Engine, EngineError, GenRequest, add_counts, context_of

STATIC = Path(__file__).resolve().parent / "static"


# --------------------------------------------------------------------------- options
class ServeArgs(BaseModel):
    """Everything `hydra-ray serve`, `serve run` and `serve deploy` can set."""

    model_config = ConfigDict(extra="forbid")

    run: str | None = Field(None, description="run directory or URI: its checkpoints, default = newest")
    checkpoint: str | None = Field(None, description="one checkpoint directory or URI RUN/checkpoints/step_X")
    store: str | None = Field(None, description="folder or URI (s3://bucket/runs) of runs; with default_model")
    default_model: str | None = Field(None, description="RUN or RUN@STEP inside the store")
    api_key: str | None = Field(None, description="Bearer key for /v1 (default: $HYDRA_API_KEY)")
    max_prompt_tokens: int = Field(1024, ge=1)
    max_tokens: int = Field(256, ge=1, description="largest max_tokens a request may ask for")
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_models_per_replica: int = Field(3, ge=1)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    replicas: int = Field(1, ge=1)
    autoscale: tuple[int, int] | None = None
    num_cpus: float = Field(1.0, ge=0, description="CPUs per model replica")
    torch_threads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self):
        given = [n for n in ("run", "checkpoint", "store") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError("give exactly one of run, checkpoint or store (+ default_model)")
        if self.store and not self.default_model:
            raise ValueError("store needs default_model")
        if self.autoscale and not 1 <= self.autoscale[0] <= self.autoscale[1]:
            raise ValueError(f"autoscale {self.autoscale}: need 1 <= min <= max")
        return self

    def locate(self) -> tuple[CheckpointStore, str]:
        if self.run:
            store, default = CheckpointStore.for_run(self.run)
        elif self.checkpoint:
            store, default = CheckpointStore.for_checkpoint(self.checkpoint)
        else:
            store, default = CheckpointStore(self.store), self.default_model
        if self.default_model and not self.store:
            default = self.default_model
        return store, store.resolve(default).model_id


# --------------------------------------------------------------------------- request bodies
def _encodable(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (not valid Unicode text)") from None
    return s


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class CompletionBody(_Body):
    prompt: str | list[str]
    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63, description="same seed, same text")
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")
    return_routing: bool = False
    domain: str | None = None
    use_cache: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt must be a non-empty string (or a non-empty list of them)")
        if len(prompts) > 16:
            raise ValueError("at most 16 prompts per request")
        for p in prompts:
            _encodable(p)
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: up to 4 non-empty strings")
        return [_encodable(x) for x in stops]


class RoutingBody(_Body):
    text: str = Field(min_length=1)
    model: str | None = None
    domain: str | None = None

    @field_validator("text")
    @classmethod
    def _text(cls, v):
        return _encodable(v)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _api_error_of(e: EngineError) -> ApiError:
    kind = {404: "not_found_error", 503: "server_error"}.get(e.status, "invalid_request_error")
    return ApiError(e.status, e.message, kind)


def _engine_error(e: BaseException) -> ApiError | None:
    """An EngineError raised in a model replica comes back wrapped by Ray; find it."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, EngineError):
            return _api_error_of(e)
        e = getattr(e, "cause", None) or e.__cause__
    return None


api = FastAPI(title="hydra-ray", description="HYDRA generation and routing inspection", version="1")


_METRICS: list["_Metrics"] = []  # the ingress replica's metrics and key, for the error handlers
_API_KEY: list[str] = []


_ENDPOINTS = {"/v1/completions": "completions", "/v1/routing": "routing", "/v1/models": "models",
              "/v1/experts/stats": "experts_stats"}


def _count_error(request: Request, status: int) -> None:
    if _METRICS:  # unknown paths share one label: clients must not be able to grow the label set
        _METRICS[0].requests.labels(_ENDPOINTS.get(request.url.path, "other"), str(status)).inc()


@api.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError):
    _count_error(request, e.status)
    return _error(e.status, e.message, e.kind)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):
    key = _API_KEY[0] if _API_KEY else None
    if key and request.url.path.startswith("/v1") and not hmac.compare_digest(
            request.headers.get("authorization", "").encode(), f"Bearer {key}".encode()):
        _count_error(request, 401)  # unknown /v1 paths do not tell an unauthenticated caller they do not exist
        return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error")
    _count_error(request, e.status_code)
    return _error(e.status_code, str(e.detail), "invalid_request_error")


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    return _error(400, str(e.errors()[:3]))


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:4]:
        where = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- metrics
class _Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("hydra_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("hydra_request_seconds", "request latency", ["endpoint"], registry=self.registry)
        self.tokens = Counter("hydra_tokens", "tokens processed", ["model", "kind"], registry=self.registry)
        self.expert = Counter("hydra_expert_tokens", "tokens routed to each expert (all MoE layers)",
                              ["model", "expert"], registry=self.registry)
        self.batch = Histogram("hydra_batch_size", "requests served by one batched forward", ["kind"],
                               buckets=(1, 2, 4, 8, 16, 32), registry=self.registry)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# --------------------------------------------------------------------------- model deployment
class HydraModel:
    """Engines by model id (LRU via serve.multiplexed); batched traces and generation."""

    def __init__(self, store: dict, max_models_per_replica: int = 3, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.005, torch_threads: int | None = None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.store = CheckpointStore(**store)

        async def load(model_id: str) -> Engine:
            return await asyncio.to_thread(Engine.from_store, self.store, model_id)

        self._engine = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(load)
        for batched in (self._trace_batch, self._generate_batch):
            batched.set_max_batch_size(max_batch_size)
            batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def warm(self, model_id: str) -> dict:
        return (await self._engine(model_id)).info

    async def routing(self, model_id: str, ids: list[int], domain: str | None) -> dict:
        engine = await self._engine(model_id)
        res = await self._trace_batch((engine, ids, domain))
        if isinstance(res, Exception):
            raise res
        return res

    async def generate(self, model_id: str, req: dict, use_cache: bool = True):
        engine = await self._engine(model_id)
        async for ev, batch_size in self._generate_batch((engine, GenRequest(**req), use_cache)):
            if isinstance(ev, Exception):
                raise ev
            if ev is not None:
                yield {"text": ev.text, "token_ids": ev.token_ids, "finish_reason": ev.finish_reason,
                       "expert_counts": ev.expert_counts, "batch_size": batch_size}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _trace_batch(self, items: list[tuple[Engine, list[int], str | None]]) -> list[dict]:
        out: list[Any] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (engine, _, _) in enumerate(items):
            groups.setdefault(id(engine), []).append(i)
        for idxs in groups.values():
            engine = items[idxs[0]][0]
            try:
                res = await asyncio.to_thread(engine.trace_ids, [items[i][1] for i in idxs], [items[i][2] for i in idxs])
            except Exception as e:  # handed to its own callers only: never fail the whole batch
                res = [e] * len(idxs)
            for i, r in zip(idxs, res):
                out[i] = r if isinstance(r, Exception) else {**r, "batch_size": len(idxs)}
        return out

    # a request arriving while a long generation runs starts the next batch instead of waiting
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, max_concurrent_batches=2)
    async def _generate_batch(self, items: list[tuple[Engine, GenRequest, bool]]):
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, (engine, _, use_cache) in enumerate(items):
            groups.setdefault((id(engine), use_cache), []).append(i)
        runs = [(idxs, items[idxs[0]][0].generate([items[i][1] for i in idxs], items[idxs[0]][2]))
                for idxs in groups.values()]
        size = {i: len(idxs) for idxs, _ in runs for i in idxs}
        finished = [False] * len(items)
        while not all(finished):
            out: list[Any] = [None] * len(items)
            for idxs, gen in runs:
                if all(finished[i] for i in idxs):
                    continue
                try:
                    events = await asyncio.to_thread(next, gen)
                except Exception as e:  # this group's callers get the error; other groups go on
                    events = [e] * len(idxs)
                for i, ev in zip(idxs, events):
                    out[i] = ev
            yield [StopIteration if finished[i] else (out[i], size[i]) for i in range(len(items))]
            for i, ev in enumerate(out):
                if isinstance(ev, Exception) or (ev is not None and ev.finish_reason):
                    finished[i] = True


# --------------------------------------------------------------------------- ingress
@serve.ingress(api)
class HydraIngress:
    def __init__(self, model, store: dict, settings: dict):
        self.model = model
        self.store = CheckpointStore(**store)
        self.s = settings
        self.api_key = settings.get("api_key") or os.environ.get("HYDRA_API_KEY") or None
        self.default: str | None = None
        self.metrics = _Metrics()
        # through the module: Serve pickles this class by value, with copies of its globals
        import hydra_ray.serve.app as module

        module._METRICS[:] = [self.metrics]
        module._API_KEY[:] = [self.api_key] if self.api_key else []
        self.counts: dict[str, dict[str, list[int]]] = {}  # model -> layer -> tokens per expert
        self.served: dict[str, int] = {}
        self._configs: dict[str, Any] = {}

    async def reconfigure(self, user_config: dict) -> None:
        target = (user_config or {}).get("default_model")
        if not target:
            raise ValueError("user_config needs default_model")
        model_id = self.store.resolve(target).model_id
        await self.model.options(multiplexed_model_id=model_id).warm.remote(model_id)  # load before switching
        self.default = model_id

    # ----------------------------------------------------------------- helpers
    def _auth(self, request: Request) -> None:
        if self.api_key and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                    f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "authentication_error")

    async def _json(self, request: Request, schema: type[BaseModel]):
        self._auth(request)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.s["max_body_bytes"]:
            raise ApiError(413, f"request body over {self.s['max_body_bytes']} bytes")
        body = await request.body()
        if len(body) > self.s["max_body_bytes"]:
            raise ApiError(413, f"request body over {self.s['max_body_bytes']} bytes")
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
            raise ApiError(400, _describe(e)) from None

    def _model(self, requested: str | None):
        """(canonical id, its config) for the request's model field (default when absent)."""
        from hydra_ray import storage
        from hydra_ray import checkpoint as ckpt

        if self.default is None:
            raise ApiError(503, "no default model configured yet", "server_error")
        model_id = requested or self.default
        if model_id in self._configs:  # RUN@STEP ids seen before: no filesystem walk per request
            return model_id, self._configs[model_id]
        try:
            ref = self.store.resolve(model_id)
        except EngineError as e:
            raise _api_error_of(e) from None
        if ref.model_id not in self._configs:
            try:
                config_yaml = storage.read_text(storage.join(ref.path, "config.yaml"))
                self._configs[ref.model_id] = ckpt.inference_config(ref.path, config_yaml)
            except Exception as e:
                raise ApiError(404, f"model {ref.model_id!r}: unreadable checkpoint config ({e})", "not_found_error")
        return ref.model_id, self._configs[ref.model_id]

    def _tokenize(self, cfg, text: str) -> list[int]:
        from hydra_ray.data.tokenizer import load_tokenizer

        try:
            ids = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_sha256).encode_batch([text])[0]
        except ValueError as e:  # e.g. the checkpoint names a tokenizer.json this node lacks
            raise ApiError(404, f"this model's tokenizer is not available: {e}", "not_found_error") from None
        if len(ids) > self.s["max_prompt_tokens"]:
            raise ApiError(413, f"{len(ids)} prompt tokens exceed the limit of {self.s['max_prompt_tokens']}")
        return ids

    def _count(self, model_id: str, counts: dict[str, list[int]] | None) -> None:
        if not counts:
            return
        add_counts(self.counts.setdefault(model_id, {}), counts)
        per_expert = [sum(c[i] for c in counts.values()) for i in range(len(next(iter(counts.values()))))]
        for e, n in enumerate(per_expert):
            if n:
                self.metrics.expert.labels(model_id, str(e)).inc(n)

    def _final(self, model_id: str, ev: dict) -> None:
        if ev["finish_reason"]:
            self._count(model_id, ev["expert_counts"])
            self.metrics.batch.labels("generation").observe(ev["batch_size"])

    def _done(self, endpoint: str, status: int, t0: float) -> None:
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    # ----------------------------------------------------------------- open endpoints
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

    # ----------------------------------------------------------------- /v1
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
            raise _api_error_of(e) from None
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
                             "fraction_by_expert": [t / s if s else 0.0 for t in total], "by_layer": by_layer}
        return {"default_model": self.default, "models": out}

    @api.post("/v1/routing")
    async def routing(self, request: Request):
        t0 = time.perf_counter()
        body = await self._json(request, RoutingBody)
        model_id, cfg = self._model(body.model)
        if body.domain is not None and body.domain not in cfg.model.domains:
            raise ApiError(400, f"unknown domain {body.domain!r}; this model knows {list(cfg.model.domains)}")
        ids = self._tokenize(cfg, body.text)
        if len(ids) > context_of(cfg):
            raise ApiError(413, f"{len(ids)} tokens exceed the model's context of {context_of(cfg)}")
        try:
            res = await self.model.options(multiplexed_model_id=model_id).routing.remote(model_id, ids, body.domain)
        except Exception as e:
            err = _engine_error(e)
            if err is None:
                raise
            raise err from None
        self._count(model_id, res["summary"]["expert_tokens_by_layer"])
        self.metrics.batch.labels("routing").observe(res["batch_size"])
        self.served[model_id] = self.served.get(model_id, 0) + 1
        self._done("routing", 200, t0)
        return res

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        t0 = time.perf_counter()
        body = await self._json(request, CompletionBody)
        model_id, cfg = self._model(body.model)
        if body.max_tokens > self.s["max_tokens"]:
            raise ApiError(400, f"max_tokens {body.max_tokens} is over the limit of {self.s['max_tokens']}")
        if body.domain is not None and body.domain not in cfg.model.domains:
            raise ApiError(400, f"unknown domain {body.domain!r}; this model knows {list(cfg.model.domains)}")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        ids = [self._tokenize(cfg, p) for p in prompts]
        context = context_of(cfg)
        for x in ids:
            if len(x) + body.max_tokens > context:
                raise ApiError(413, f"{len(x)} prompt tokens + max_tokens {body.max_tokens} exceed "
                                    f"the model's context of {context}")
        reqs = [dict(prompt_ids=x, max_tokens=body.max_tokens, temperature=body.temperature,
                     top_p=body.top_p if body.top_p < 1 else None, top_k=body.top_k, stop=list(body.stop or []),
                     seed=None if body.seed is None else body.seed + i, domain=body.domain)
                for i, x in enumerate(ids)]
        handle = self.model.options(multiplexed_model_id=model_id, stream=True)
        streams = [handle.generate.remote(model_id, r, body.use_cache) for r in reqs]
        firsts = []
        try:  # the first event of each stream surfaces replica errors before any byte is sent
            for s in streams:
                firsts.append(await s.__anext__())
        except Exception as e:
            err = _engine_error(e)
            if err is None:
                raise
            raise err from None
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        self.served[model_id] = self.served.get(model_id, 0) + len(reqs)

        async def events(i: int):
            ev = firsts[i]
            yield ev
            while not ev["finish_reason"]:
                ev = await streams[i].__anext__()
                yield ev

        async def finish(i: int, toks: list[int]) -> dict:
            extra = {}
            if body.return_routing:
                extra["routing"] = await self.model.options(multiplexed_model_id=model_id).routing.remote(
                    model_id, ids[i] + toks, body.domain)
            return extra

        def usage(comp: list[list[int]]) -> dict:
            p, c = sum(len(x) for x in ids), sum(len(x) for x in comp)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        if not body.stream:
            choices, comp = [], []
            for i in range(len(reqs)):
                text, toks, reason = "", [], None
                async for ev in events(i):
                    text, toks, reason = text + ev["text"], toks + ev["token_ids"], ev["finish_reason"]
                    self._final(model_id, ev)
                choices.append({"text": text, "index": i, "logprobs": None, "finish_reason": reason,
                                **(await finish(i, toks))})
                comp.append(toks)
            self.metrics.tokens.labels(model_id, "completion").inc(sum(len(x) for x in comp))
            self._done("completions", 200, t0)
            return {"id": cid, "object": "text_completion", "created": created, "model": model_id,
                    "choices": choices, "usage": usage(comp)}

        async def sse():
            comp = []
            for i in range(len(reqs)):
                toks = []
                async for ev in events(i):
                    toks += ev["token_ids"]
                    self._final(model_id, ev)
                    choice = {"text": ev["text"], "index": i, "logprobs": None, "finish_reason": ev["finish_reason"]}
                    if ev["finish_reason"]:
                        choice.update(await finish(i, toks))
                    chunk = {"id": cid, "object": "text_completion", "created": created, "model": model_id,
                             "choices": [choice]}
                    if ev["finish_reason"] and i == len(reqs) - 1:
                        chunk["usage"] = usage(comp + [toks])
                    yield f"data: {json.dumps(chunk)}\n\n"
                comp.append(toks)
            self.metrics.tokens.labels(model_id, "completion").inc(sum(len(x) for x in comp))
            self._done("completions", 200, t0)
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")


# --------------------------------------------------------------------------- builder
def build_app(args: ServeArgs | dict) -> serve.Application:
    """`serve.deployment(...).bind(...)` with every option from `ServeArgs`; also the import path
    that `serve run` / `serve deploy` use (serve/config.yaml)."""
    a = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args or {})
    store, default = a.locate()
    model_opts: dict[str, Any] = {
        "name": "HydraModel",
        "ray_actor_options": {"num_cpus": a.num_cpus},
        "max_ongoing_requests": max(16, 4 * a.max_batch_size),
    }
    if a.autoscale:
        model_opts["autoscaling_config"] = {"min_replicas": a.autoscale[0], "max_replicas": a.autoscale[1],
                                            "target_ongoing_requests": a.max_batch_size}
    else:
        model_opts["num_replicas"] = a.replicas
    model = serve.deployment(HydraModel, **model_opts).bind(
        store.spec, a.max_models_per_replica, a.max_batch_size, a.batch_wait_timeout_s, a.torch_threads)
    settings = {"api_key": a.api_key, "max_prompt_tokens": a.max_prompt_tokens, "max_tokens": a.max_tokens,
                "max_body_bytes": a.max_body_bytes}
    ingress = serve.deployment(HydraIngress, name="HydraIngress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=256, user_config={"default_model": default})
    return ingress.bind(model, store.spec, settings)

