"""The OpenAI generation endpoints, POST /v1/completions and /v1/chat/completions, as functions of
the ingress replica (`me`, a HydraIngress): the ingress's routes call them. Parsing, limits and
tokenisation are the ingress's helpers; the response shapes are shapes.py's.

- Completions: `n` samples per prompt (choice j = prompt j // n, seed + j), prompts as text or
  token ids, `echo` (with the prompt's logprobs when `logprobs` is set), logprobs in the legacy
  shape; choices stream side by side (shapes.merged).
- Chat: the messages rendered with the checkpoint's chat template (hydra_ray/data/chat.py), routed
  as its domain, stopped where the next user turn starts; `chat.completion.chunk` deltas.
- Usage arrives last and alone when `stream_options.include_usage` asks for it.
"""

import logging
import time
import uuid

import orjson
from fastapi.responses import StreamingResponse

from hydra_ray.data import chat
from hydra_ray.serve import shapes
from hydra_ray.serve.bodies import ChatBody, CompletionBody
from hydra_ray.serve.decode import merge_events
from hydra_ray.serve.engine import context_of
from hydra_ray.serve.errors import ApiError

log = logging.getLogger(__name__)


def engine_request(body, ids: list[int], index: int, stop: list[str], domain: str | None, limit: int,
                   logprobs: int | None, prompt_logprobs: bool = False) -> dict:
    """The engine request of choice `index` (its seed is the body's + index)."""
    return dict(prompt_ids=ids, max_tokens=limit, temperature=body.temperature,
                top_p=body.top_p if body.top_p < 1 else None, top_k=body.top_k, stop=stop,
                seed=None if body.seed is None else body.seed + index, domain=domain, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, logit_bias=body.bias)


def check_sampling(me, body, cfg, limit: int | None) -> None:
    if limit is not None and limit > me.s["max_tokens"]:
        raise ApiError(400, f"max_tokens {limit} is over the limit of {me.s['max_tokens']}")
    vocab = me._tokenizer(cfg).vocab_size
    bad = [t for t in (body.bias or {}) if t >= vocab]
    if bad:
        raise ApiError(400, f"logit_bias: token id {bad[0]} is outside the vocabulary (size {vocab})")
    if body.user:
        log.info("request for user %r", body.user)


async def routing_extra(me, body, model_id: str, ids: list[int], toks: list[int], domain: str | None) -> dict:
    if not body.return_routing:
        return {}
    return {"routing": orjson.Fragment((await me._routing(model_id, ids + toks, domain))["json"])}


def finished(me, endpoint: str, model_id: str, comp: list[list[int]], t0: float) -> None:
    me.metrics.tokens.labels(model_id, "completion").inc(sum(len(x) for x in comp))
    me._done(endpoint, 200, t0)


async def completions(me, request):
    """POST /v1/completions."""
    t0 = time.perf_counter()
    body = await me._json(request, CompletionBody)
    model_id, cfg = me._model(body.model)
    check_sampling(me, body, cfg, body.max_tokens)
    me._domain(cfg, body.domain)
    tok = me._tokenizer(cfg)
    ids = [me._prompt_ids(cfg, p, body.max_tokens) for p in body.prompts]
    texts = [p if isinstance(p, str) else tok.decode(p) for p in body.prompts]
    n, want_lp = body.n, body.logprobs is not None
    reqs = [engine_request(body, ids[j // n], j, list(body.stop or []), body.domain, body.max_tokens,
                          body.logprobs, body.echo and want_lp) for j in range(len(ids) * n)]
    streams = await me._generate(model_id, reqs, body.use_cache, t0)
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": cid, "object": "text_completion", "created": created, "model": model_id}
    # where the next token of choice j starts in its text (which begins with the prompt's when echoed)
    offsets = [shapes.TextOffsets(tok.token_bytes, len(texts[j // n]) if body.echo else 0) for j in range(len(reqs))]

    def logprobs(j: int, ev: dict) -> dict | None:
        if not want_lp:
            return None
        toks, entries = list(ev["token_ids"]), list(ev["logprobs"] or [])
        at = offsets[j].of(toks)
        if body.echo and ev.get("prompt_logprobs") is not None:
            p = ids[j // n]
            toks, entries, at = p + toks, list(ev["prompt_logprobs"]) + entries, shapes.TextOffsets(tok.token_bytes).of(p) + at
        return shapes.completion_logprobs(entries, toks, tok.token_bytes, at)

    def prompt_tokens() -> int:
        return sum(len(x) for x in ids)

    if not body.stream:
        choices, comp = [None] * len(reqs), [[] for _ in reqs]
        evs: list[list[dict]] = [[] for _ in reqs]
        async for j, ev in shapes.merged(streams):
            evs[j].append(ev)
        for j, events in enumerate(evs):
            ev = merge_events(events)
            comp[j] = ev["token_ids"]
            choices[j] = {"text": (texts[j // n] if body.echo else "") + ev["text"], "index": j,
                          "logprobs": logprobs(j, ev), "finish_reason": ev["finish_reason"],
                          **(await routing_extra(me, body, model_id, ids[j // n], comp[j], body.domain))}
        finished(me, "completions", model_id, comp, t0)
        return shapes.JSON({**head, "choices": choices, "usage": shapes.usage(prompt_tokens(), sum(map(len, comp)))})

    async def sse():
        comp = [[] for _ in reqs]
        started = [False] * len(reqs)
        async for j, ev in shapes.merged(streams):
            text = ev["text"]
            if body.echo and not started[j]:
                text = texts[j // n] + text
            started[j] = True
            comp[j] += ev["token_ids"]
            lp = logprobs(j, ev)
            chunk = {**head, "choices": [{"text": text, "index": j, "logprobs": lp,
                                          "finish_reason": ev["finish_reason"]}]}
            if ev["finish_reason"]:
                chunk["choices"][0].update(await routing_extra(me, body, model_id, ids[j // n], comp[j], body.domain))
            yield shapes.sse(chunk)
        if body.stream_options and body.stream_options.include_usage:
            yield shapes.sse({**head, "choices": [], "usage": shapes.usage(prompt_tokens(), sum(map(len, comp)))})
        finished(me, "completions", model_id, comp, t0)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")


async def chat_completions(me, request):
    """POST /v1/chat/completions."""
    t0 = time.perf_counter()
    body = await me._json(request, ChatBody)
    model_id, cfg = me._model(body.model)
    limit = body.limit  # None: as much as the context and the server allow
    check_sampling(me, body, cfg, limit)
    template = cfg.data.chat_template
    domain = body.domain
    if domain is None and template.domain in cfg.model.domains:
        domain = template.domain
    me._domain(cfg, domain)
    text = chat.render([(m.role, m.content) for m in body.messages], template, reply=True)
    ids = me._prompt_ids(cfg, text, limit)
    if limit is None:
        limit = min(me.s["max_tokens"], context_of(cfg) - len(ids))
        if limit < 1:
            raise ApiError(413, f"the conversation ({len(ids)} tokens) fills the model's context of "
                                f"{context_of(cfg)}: no room for a reply")
    stop = list(body.stop or []) + chat.stop_strings(template)
    top = (body.top_logprobs or 0) if body.logprobs else None
    reqs = [engine_request(body, ids, j, stop, domain, limit, top) for j in range(body.n)]
    streams = await me._generate(model_id, reqs, body.use_cache, t0)
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    token_bytes = me._tokenizer(cfg).token_bytes

    def chunk(j: int, delta: dict, reason: str | None, lp=None) -> dict:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [{"index": j, "delta": delta, "logprobs": lp, "finish_reason": reason}]}

    def logprobs(ev: dict) -> dict | None:
        return shapes.chat_logprobs(ev["logprobs"] or [], ev["token_ids"], token_bytes) if body.logprobs else None

    if not body.stream:
        evs: list[list[dict]] = [[] for _ in reqs]
        async for j, ev in shapes.merged(streams):
            evs[j].append(ev)
        joined = [merge_events(events) for events in evs]
        comp = [ev["token_ids"] for ev in joined]
        choices = [{"index": j, "message": {"role": "assistant", "content": ev["text"]},
                    "logprobs": logprobs(ev), "finish_reason": ev["finish_reason"],
                    **(await routing_extra(me, body, model_id, ids, comp[j], domain))}
                   for j, ev in enumerate(joined)]
        finished(me, "chat", model_id, comp, t0)
        return shapes.JSON({"id": cid, "object": "chat.completion", "created": created, "model": model_id,
                             "choices": choices, "usage": shapes.usage(len(ids), sum(map(len, comp)))})

    async def sse():
        comp = [[] for _ in reqs]
        for j in range(len(reqs)):
            yield shapes.sse(chunk(j, {"role": "assistant", "content": ""}, None))
        async for j, ev in shapes.merged(streams):
            comp[j] += ev["token_ids"]
            c = chunk(j, {"content": ev["text"]} if ev["text"] else {}, ev["finish_reason"], logprobs(ev))
            if ev["finish_reason"]:
                c["choices"][0].update(await routing_extra(me, body, model_id, ids, comp[j], domain))
            yield shapes.sse(c)
        if body.stream_options and body.stream_options.include_usage:
            u = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                 "choices": [], "usage": shapes.usage(len(ids), sum(map(len, comp)))}
            yield shapes.sse(u)
        finished(me, "chat", model_id, comp, t0)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")
