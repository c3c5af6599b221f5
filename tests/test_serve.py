"""Serving: the request rules and the routing counts on a random model (the fast lane), the engine
on its own, then the real Serve app (ingress + multiplexed model deployment) on the session's local
Ray, against checkpoints of a real tiny run, from a local folder and from the session's S3 server;
and the inspector page in a real headless Chromium.

Every test past the first section needs the tiny run (Ray Data preparation and a 180-step
training on the session's Ray), the Serve app or the S3 server: all of them are marked
`integration` and `slow`. Over 400 lines: one file keeps the module-scoped store and app fixtures
shared by the engine, app and CLI tests, which would otherwise each start their own.
"""

import asyncio
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from hydra_ray.serve.engine import Engine, GenRequest, check_context, check_domain
from hydra_ray.serve.errors import EngineError
from hydra_ray.serve.store import CheckpointStore
from conftest import LoadClients, random_engine_for_tests

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(condition, timeout: float, what: str, every: float = 0.2):
    """Poll `condition()` until it returns something true (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# --------------------------------------------------------------------------- fast lane: no run, no Ray
def test_request_rules_are_one_function_each_with_the_status_and_message_the_api_answers():
    assert check_domain(["math", "code"], None) is None and check_domain(["math", "code"], "code") == 1
    with pytest.raises(EngineError) as e:
        check_domain(("math", "code"), "poetry")
    assert (e.value.status, e.value.message) == (400, "unknown domain 'poetry'; this model knows ['math', 'code']")
    check_context(10, 10)
    check_context(6, 10, max_tokens=4)
    with pytest.raises(EngineError) as e:
        check_context(11, 10)
    assert (e.value.status, e.value.message) == (413, "11 tokens exceed the model's context of 10")
    with pytest.raises(EngineError) as e:
        check_context(7, 10, max_tokens=4)
    assert (e.value.status, e.value.message) == (413, "7 prompt tokens + max_tokens 4 exceed the model's context of 10")


def test_logprob_tokens_and_offsets_follow_the_bytes_of_the_text():
    from hydra_ray.data.tokenizer import ByteTokenizer
    from hydra_ray.serve.shapes import TextOffsets, completion_logprobs, token_text

    tok = ByteTokenizer()
    assert (token_text(b"a"), token_text(b"\xc3"), token_text(b"\xe2\x82")) == ("a", "bytes:\\xc3", "bytes:\\xe2\\x82")
    ids = tok.encode_batch(["é€ ab"])[0]
    whole = TextOffsets(tok.token_bytes).of(ids)
    split = TextOffsets(tok.token_bytes)  # the same text arriving a few tokens at a time
    assert whole == [0, 0, 1, 1, 1, 2, 3, 4] == split.of(ids[:1]) + split.of(ids[1:4]) + split.of(ids[4:])
    assert TextOffsets(tok.token_bytes, 5).of([97, 256]) == [5, 6]  # from an echoed prompt's end; EOS adds nothing
    # the chosen token joins the top entries when it is not among them; byte tokens never share a key
    lp = completion_logprobs([[-2.0, [[0xC3, -0.5], [0xC2, -0.7]]], None], [0xA9, 97], tok.token_bytes, [0, 1])
    assert lp["top_logprobs"] == [{"bytes:\\xc3": -0.5, "bytes:\\xc2": -0.7, "bytes:\\xa9": -2.0}, None]
    assert (lp["tokens"], lp["token_logprobs"], lp["text_offset"]) == (["bytes:\\xa9", "a"], [-2.0, None], [0, 1])


def test_request_bodies_take_null_as_the_default_and_refuse_what_they_cannot_honour():
    from pydantic import ValidationError

    from hydra_ray.serve.bodies import ChatBody, CompletionBody

    b = CompletionBody.model_validate({"prompt": "x", "temperature": None, "n": None, "max_tokens": None, "echo": None})
    assert (b.temperature, b.n, b.max_tokens, b.echo) == (1.0, 1, 16, False)
    assert ChatBody.model_validate({"messages": [{"role": "user", "content": "hi"}], "logprobs": None}).limit is None
    assert CompletionBody.model_validate({"prompt": "x", "logit_bias": {"007": 5}}).bias == {7: 5}
    for bad, words in (({"frobnicate": None}, "frobnicate"), ({"logit_bias": {"\u00b2": 1}}, "token ids"),
                       ({"logit_bias": {"9" * 5000: 1}}, "token ids"), ({"logit_bias": {"05": 1, "5": 2}}, "twice"),
                       ({"stream_options": {"include_usage": True}}, "stream is true")):
        with pytest.raises(ValidationError, match=words):
            CompletionBody.model_validate({"prompt": "x", **bad})


@pytest.fixture(scope="module")
def random_engine():
    return random_engine_for_tests()


def test_routing_counts_are_the_traces_per_row_and_match_the_per_token_records(random_engine):
    """A ragged batch: each row's summary counts its own tokens only (not the padding, not the other
    rows), the same as its per-token records and as tracing it alone."""
    e = random_engine
    texts = ["Solve 12 * 7 = ", "def add(a, b):\n    return a + b", "hi"]
    batched = e.trace_ids([e.encode(t) for t in texts], ["math", None, "code"])
    for out, text, domain in zip(batched, texts, ["math", None, "code"]):
        by_layer: dict[str, list[int]] = {}
        for tok in out["tokens"]:
            for layer, d in tok["moe"].items():
                for x in d["experts"]:
                    by_layer.setdefault(layer, [0] * e.num_experts)[x] += 1
        s = out["summary"]
        assert s["expert_tokens_by_layer"] == by_layer and out["moe_layers"] == sorted(by_layer)
        counts = [sum(c[x] for c in by_layer.values()) for x in range(e.num_experts)]
        assert [x["tokens"] for x in s["experts"]] == counts
        assert [x["fraction"] for x in s["experts"]] == pytest.approx([c / sum(counts) for c in counts])
        assert {d: v["fraction"] for d, v in s["domains"].items()} == pytest.approx(
            {d: counts[x] / sum(counts) for d, x in zip(e.domains, e.domain_expert)})
        alone = e.trace_text(text, domain)["summary"]
        assert alone["expert_tokens_by_layer"] == s["expert_tokens_by_layer"]
        if domain is None:
            assert "domain_expert_agreement" not in s
            continue
        mapped = e.domain_expert[e.domains.index(domain)]
        firsts = [d["experts"][0] == mapped for tok in out["tokens"] for d in tok["moe"].values()]
        assert s["domain_expert_agreement"] == pytest.approx(sum(firsts) / len(firsts))
        assert alone["domain_expert_agreement"] == pytest.approx(s["domain_expert_agreement"])


def test_a_trace_leaves_the_model_replica_as_its_json_and_is_embedded_and_streamed_as_it_is(random_engine):
    """The model replica encodes a routing trace once (`routed`); the ingress sends those bytes on
    as `/v1/routing`'s body, and puts them unchanged inside a completion asked with return_routing."""
    import json
    import math

    import orjson

    from hydra_ray.serve import shapes
    from hydra_ray.serve.model import routed

    e = random_engine
    trace = e.trace_ids([e.encode("Solve 12 * 7 = é€")], ["math"])[0]
    out = routed(trace, 3)
    assert json.loads(out["json"]) == json.loads(json.dumps({**trace, "batch_size": 3}))
    assert out["batch_size"] == 3 and out["expert_tokens_by_layer"] == trace["summary"]["expert_tokens_by_layer"]
    choice = {"text": "x", "routing": orjson.Fragment(out["json"]), "logprob": -math.inf, "score": math.nan}
    assert json.loads(shapes.dumps(choice)) == {"text": "x", "routing": json.loads(out["json"]),
                                                "logprob": None, "score": None}  # valid JSON, never -Infinity
    event = shapes.sse({"choices": [choice]})
    assert event.startswith(b"data: {") and event.endswith(b"}\n\n") and event.count(b"\n") == 2
    assert json.loads(event[6:])["choices"][0]["routing"]["tokens"] == json.loads(out["json"])["tokens"]


def test_generation_counts_each_requests_tokens_once(random_engine):
    """The expert load returned with a finished request: every MoE layer's tokens of its prompt and
    of the tokens it generated (the last one is sampled, not fed back), cache or not."""
    e = random_engine
    reqs = [GenRequest(e.encode(p), max_tokens=n, temperature=0.0) for p, n in (("Solve 3 + 4", 6), ("x", 9))]
    for use_cache in (True, False):
        for req, events in zip(reqs, zip(*e.generate(reqs, use_cache))):
            last = [ev for ev in events if ev is not None][-1]
            ids = req.prompt_ids + [t for ev in events if ev is not None for t in ev.token_ids][:-1]
            ref = e.trace_ids([ids])[0]["summary"]["expert_tokens_by_layer"]
            assert {k: v for k, v in last.expert_counts.items() if any(v)} == ref, use_cache


@pytest.fixture(scope="module")
def store(tiny_run, tmp_path_factory):
    """A checkpoint store holding the tiny run (checkpoints 140, 160, 180), plus traps: a symlink
    to a run outside the store and a run whose checkpoint is corrupt."""
    _, run_dir = tiny_run
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(run_dir / "checkpoints", root / "tiny" / "checkpoints")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(run_dir / "checkpoints" / "step_00000180", outside / "secret" / "checkpoints" / "step_00000180")
    (root / "escape").symlink_to(outside / "secret")
    bad = root / "broken" / "checkpoints" / "step_00000010"
    shutil.copytree(run_dir / "checkpoints" / "step_00000180", bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    return root


@pytest.fixture(scope="module")
def engines(store):
    s = CheckpointStore(store)
    return {m: Engine.from_store(s, m) for m in ("tiny@160", "tiny@180")}


# --------------------------------------------------------------------------- engine (no Ray)
@pytest.mark.integration
@pytest.mark.slow
def test_engine_loads_a_checkpoint_with_its_features_and_generates_deterministically(engines):
    e = engines["tiny@180"]
    assert e.model_id == "tiny@180" and e.step == 180
    assert e.model.features["moe"] and e.model.features["mod"] and e.model.features["mor"]
    ids = e.encode("def add(a, b):")
    req = dict(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50)
    a = e.complete([GenRequest(ids, seed=3, **req)])[0]
    b = e.complete([GenRequest(ids, seed=3, **req)])[0]
    c = e.complete([GenRequest(ids, seed=4, **req)])[0]
    assert a == b and len(a["token_ids"]) == 24 and a["finish_reason"] == "length"
    assert a["token_ids"] != c["token_ids"]


@pytest.mark.integration
@pytest.mark.slow
def test_engine_batches_ragged_requests_exactly_and_the_cache_equals_recompute(engines):
    e = engines["tiny@180"]
    reqs = [GenRequest(e.encode(p), max_tokens=n, temperature=t, seed=s)
            for p, n, t, s in [("Solve 12 * 7 = ", 20, 0.0, None), ("x", 9, 0.8, 1), ("def f(x):\n    return", 14, 1.0, 2)]]
    alone = [e.complete([r])[0] for r in reqs]
    together = e.complete(reqs)
    recompute = e.complete(reqs, use_cache=False)
    for a, b, c in zip(alone, together, recompute):
        assert a["token_ids"] == b["token_ids"] == c["token_ids"]
        assert a["text"] == b["text"]


@pytest.mark.integration
@pytest.mark.slow
def test_a_row_reused_by_a_newcomer_decodes_as_in_a_fresh_cache(engines):
    """One-token prompts decoded in the cache row a longer sequence has just left get the tokens
    and logprobs they get in a fresh cache. (With the trained checkpoint, most such prompts skip
    some block application entirely; that layer of the row must not keep the previous keys.)"""
    from hydra_ray.serve.decode import Decoder

    e = engines["tiny@180"]

    def run(dec, req):
        row, toks, lps = dec.submit(req), [], []
        while dec.busy:
            for r, ev in dec.step():
                if r is row:
                    toks += ev.token_ids
                    lps += [entry[0] for entry in ev.logprobs or []]
        return toks, lps

    long_req = GenRequest(e.encode("def add(a, b):\n    return a + b\n"), max_tokens=24, temperature=0.0)
    differ = []
    for t in e.encode("x=7;(Qz!"):
        req = GenRequest([t], max_tokens=12, temperature=0.0, logprobs=0)
        fresh = run(Decoder(e, max_num_seqs=1), req)
        reused = Decoder(e, max_num_seqs=1)
        run(reused, long_req)  # row 0 now holds its keys
        toks, lps = run(reused, req)
        if toks != fresh[0] or max(abs(a - b) for a, b in zip(lps, fresh[1])) > 1e-4:
            differ.append(chr(t))
    assert not differ, f"prompts {differ} decode differently in a row another sequence used"


@pytest.mark.integration
@pytest.mark.slow
def test_engine_stop_strings_end_generation_and_are_never_emitted(engines):
    e = engines["tiny@180"]
    ids = e.encode("The answer is ")
    full = e.complete([GenRequest(ids, max_tokens=40, temperature=0.0)])[0]["text"]
    stop = full[5:7]  # a string the greedy continuation certainly produces
    events = list(e.generate([GenRequest(ids, max_tokens=40, temperature=0.0, stop=[stop])]))
    text = "".join(ev[0].text for ev in events if ev[0] is not None)
    assert events[-1][0].finish_reason == "stop"
    assert text == full[:full.find(stop)] and stop not in text


@pytest.mark.integration
@pytest.mark.slow
def test_engine_trace_is_per_token_and_batched_traces_match_single_ones(engines):
    e = engines["tiny@180"]
    texts = ["Solve 12 * 7 = ", "def add(a, b):\n    return a + b", "hi"]
    single = [e.trace_text(t) for t in texts]
    batched = e.trace_ids([e.encode(t) for t in texts])
    for s, b, t in zip(single, batched, texts):
        assert len(s["tokens"]) == len(e.encode(t))
        _same_routing(s["tokens"], b["tokens"])
    tok = single[0]["tokens"][0]
    assert set(tok) == {"index", "id", "text", "moe", "mod", "mor"}
    layers = {"b0r0", "b0r1", "b0r2", "b1r0", "b1r1", "b1r2"}  # 2 blocks x 3 recursions, MoE in both
    assert all(set(t["moe"]) <= layers for t in single[0]["tokens"])
    assert set().union(*(t["moe"] for t in single[0]["tokens"])) >= {"b0r0"} and set(tok["mor"]) == {"b0", "b1"}
    fr = [x["fraction"] for x in single[1]["summary"]["experts"]]
    assert abs(sum(fr) - 1) < 1e-9


@pytest.mark.integration
@pytest.mark.slow
def test_engine_traces_a_checkpoint_with_every_feature_off(engines):
    """A foundation-phase model routes nothing, but every token still gets its (empty) record."""
    from hydra_ray.models import HydraLM

    cfg = engines["tiny@180"].cfg
    e = Engine(HydraLM(cfg.model), cfg, "dense")
    out = e.trace_text("abc")
    assert [t["text"] for t in out["tokens"]] == ["a", "b", "c"]
    assert all(t["moe"] == t["mod"] == t["mor"] == {} for t in out["tokens"])


def _same_routing(a: list[dict], b: list[dict]) -> None:
    """Same decisions; scores and gates equal up to float noise of differently shaped matmuls."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x["id"], x["mor"]) == (y["id"], y["mor"])
        assert {k: v["experts"] for k, v in x["moe"].items()} == {k: v["experts"] for k, v in y["moe"].items()}
        for k in x["moe"]:
            assert x["moe"][k]["gates"] == pytest.approx(y["moe"][k]["gates"], abs=1e-4)
        assert {k: v["selected"] for k, v in x["mod"].items()} == {k: v["selected"] for k, v in y["mod"].items()}
        for k in x["mod"]:
            assert x["mod"][k]["score"] == pytest.approx(y["mod"][k]["score"], abs=1e-4)


@pytest.mark.integration
@pytest.mark.slow
def test_store_rejects_ids_that_leave_it_and_reports_missing_or_corrupt_checkpoints(store, tmp_path):
    s = CheckpointStore(store)
    for bad in ("../x", "/etc/passwd", "tiny/../../etc", "tiny/./checkpoints", "escape", "escape@180", "a\\b",
                "tiny@-1", "", "tiny@180/../x", "~root"):
        with pytest.raises(EngineError) as e:
            s.resolve(bad)
        assert e.value.status == 400, bad
    with pytest.raises(EngineError) as e:
        s.resolve("tiny@999")
    assert e.value.status == 404
    assert s.resolve("tiny").model_id == "tiny@180"  # newest
    with pytest.raises(EngineError) as e:  # a corrupt checkpoint never loads
        Engine.from_store(s, "broken@10")
    assert e.value.status == 404
    # a checkpoint whose weights file is a symlink out of the store
    link = store / "linked" / "checkpoints" / "step_00000001"
    link.mkdir(parents=True)
    for f in (store / "tiny" / "checkpoints" / "step_00000180").iterdir():
        (link / f.name).write_bytes(f.read_bytes())
    outside = tmp_path / "weights.safetensors"
    outside.write_bytes((link / "model.safetensors").read_bytes())
    (link / "model.safetensors").unlink()
    (link / "model.safetensors").symlink_to(outside)
    with pytest.raises(EngineError) as e:
        s.resolve("linked@1")
    assert e.value.status == 400
    assert {r.model_id for r in s.list()} >= {"tiny@140", "tiny@160", "tiny@180"}
    assert not any(r.model_id.startswith(("escape", "linked")) for r in s.list())
    shutil.rmtree(store / "linked")


@pytest.mark.integration
@pytest.mark.slow
def test_serving_a_run_lists_and_resolves_that_run_only(store):
    """`serve --run R` serves R, not the broken or linked runs that lie beside it; a store of
    runs is explicit (`--store`)."""
    s, default = CheckpointStore.for_run(store / "tiny")
    assert default == "tiny@180"
    assert [r.model_id for r in s.list()] == ["tiny@140", "tiny@160", "tiny@180"]
    with pytest.raises(EngineError) as e:
        s.resolve("broken@10")
    assert e.value.status == 404 and "serves run 'tiny' only" in e.value.message
    s, default = CheckpointStore.for_checkpoint(store / "tiny" / "checkpoints" / "step_00000160")
    assert default == "tiny@160" and {r.run for r in s.list()} == {"tiny"}
    assert "broken@10" in {r.model_id for r in CheckpointStore(store).list()}  # an explicit store: every run


@pytest.fixture(scope="module")
def s3_store(s3, tiny_run):
    """The tiny run's checkpoints on the session's S3 server; returns the store, s3://hydra/serve-store."""
    from hydra_ray import storage

    _, run_dir = tiny_run
    root = f"{s3}/serve-store"
    storage.upload_dir(run_dir / "checkpoints", f"{root}/tiny/checkpoints")
    return root


@pytest.mark.integration
@pytest.mark.slow
def test_a_store_on_s3_resolves_like_a_local_one_and_serves_the_same_tokens(s3_store, engines, tmp_path):
    from hydra_ray import storage
    from hydra_ray.config import dump_config
    from hydra_ray.data.tokenizer import load_tokenizer, train_bpe
    from hydra_ray.checkpoint import inference_config

    s = CheckpointStore(s3_store)
    assert [r.model_id for r in s.list()] == ["tiny@140", "tiny@160", "tiny@180"]
    newest = s.resolve("tiny")
    assert newest.model_id == "tiny@180" and newest.path == f"{s3_store}/tiny/checkpoints/step_00000180"
    assert s.resolve("tiny@160").step == 160
    for bad in ("../x", "/etc/passwd", "tiny/../../x", "tiny/./checkpoints", ""):
        with pytest.raises(EngineError) as e:
            s.resolve(bad)
        assert e.value.status == 400, bad
    for missing in ("tiny@999", "nope"):
        with pytest.raises(EngineError) as e:
            s.resolve(missing)
        assert e.value.status == 404, missing
    run_store, default = CheckpointStore.for_run(f"{s3_store}/tiny")  # `--run s3://...` serves that run only
    assert default == "tiny@180"
    with pytest.raises(EngineError) as e:
        run_store.resolve("other@1")
    assert e.value.status == 404 and "serves run 'tiny' only" in e.value.message
    assert CheckpointStore.for_checkpoint(f"{s3_store}/tiny/checkpoints/step_00000160")[1] == "tiny@160"

    local = engines["tiny@180"]
    remote = Engine.from_store(s, "tiny@180")
    req = GenRequest(local.encode("def add(a, b):"), max_tokens=16, temperature=0.8, seed=5)
    assert remote.complete([req])[0] == local.complete([req])[0]

    # a checkpoint's own tokenizer.json on S3: found beside it, read there, its sha256 checked
    tok = train_bpe(iter(["def add(a, b):\n    return a + b\n"] * 50), 264, tmp_path / "tokenizer.json")
    ckpt_uri = f"{s3_store}/bpe/checkpoints/step_00000001"
    storage.write_bytes(f"{ckpt_uri}/tokenizer.json", (tmp_path / "tokenizer.json").read_bytes())
    cfg = local.cfg.model_copy(deep=True)
    cfg.data.tokenizer, cfg.data.tokenizer_sha256 = "tokenizer.json", tok.sha256
    cfg = inference_config(ckpt_uri, dump_config(cfg))
    assert cfg.data.tokenizer == f"{ckpt_uri}/tokenizer.json"
    text = "def add(a, b): return a"
    assert load_tokenizer(cfg.data.tokenizer, tok.sha256).encode_batch([text]) == tok.encode_batch([text])
    with pytest.raises(ValueError, match="changed since the run recorded it"):
        load_tokenizer(cfg.data.tokenizer, "0" * 64)


# --------------------------------------------------------------------------- the Serve app
@pytest.fixture(scope="module")
def app(ray_session, store):
    from ray import serve

    from hydra_ray.serve.args import ServeArgs
    from hydra_ray.serve.builder import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = dict(store=str(store), default_model="tiny", api_key=KEY, num_cpus=0.5, max_tokens=64,
                max_prompt_tokens=200, max_batch_size=8, batch_wait_timeout_s=0.02, max_models_per_replica=2)
    serve.run(build_app(ServeArgs(**args)), name="hydra", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as client:
        yield {"url": url, "client": client, "args": args}
    serve.shutdown()


def _sse(text: str) -> list:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.integration
@pytest.mark.slow
def test_completions_are_openai_shaped_streamed_or_not_and_seeded(app, engines):
    c = app["client"]
    body = {"prompt": "def add(a, b):", "max_tokens": 20, "temperature": 0.8, "top_p": 0.9, "seed": 11}
    r1, r2 = c.post("/v1/completions", json=body), c.post("/v1/completions", json=body)
    assert r1.status_code == 200, r1.text
    out = r1.json()
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and isinstance(out["created"], int)
    assert out["model"] == "tiny@180"
    ch = out["choices"][0]
    assert set(ch) >= {"text", "index", "logprobs", "finish_reason"} and ch["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 14, "completion_tokens": 20, "total_tokens": 34}
    assert r2.json()["choices"][0]["text"] == ch["text"]  # same seed, same text
    # the engine in this process agrees token for token
    e = engines["tiny@180"]
    ref = e.complete([GenRequest(e.encode(body["prompt"]), max_tokens=20, temperature=0.8, top_p=0.9, seed=11)])[0]
    assert ref["text"] == ch["text"]

    r = c.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(r.text)
    assert all(k["object"] == "text_completion" and k["id"] == chunks[0]["id"] for k in chunks)
    chunks, last = chunks[:-1], chunks[-1]  # usage comes alone, last, when asked for
    assert last["choices"] == [] and last["usage"] == out["usage"]
    assert "".join(k["choices"][0]["text"] for k in chunks) == ch["text"]
    assert [k["choices"][0]["finish_reason"] for k in chunks][-1] == "length"
    assert all(k["choices"][0]["finish_reason"] is None and "usage" not in k for k in chunks[:-1])

    stop = ch["text"][3:5]
    r = c.post("/v1/completions", json={**body, "stop": stop})
    assert r.json()["choices"][0] == {**r.json()["choices"][0], "text": ch["text"][:ch["text"].find(stop)],
                                      "finish_reason": "stop"}
    r = c.post("/v1/completions", content=json.dumps({"prompt": ["a", "bb"], "max_tokens": 3, "temperature": 0}))
    assert [x["index"] for x in r.json()["choices"]] == [0, 1] and r.json()["usage"]["prompt_tokens"] == 3


def _openai(app):
    from openai import OpenAI

    return OpenAI(base_url=app["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat_request(e, messages, **kw):
    from hydra_ray.data import chat

    t = e.cfg.data.chat_template
    text = chat.render([(m["role"], m["content"]) for m in messages], t, reply=True)
    return GenRequest(e.encode(text), stop=chat.stop_strings(t), domain=t.domain, **kw)


@pytest.mark.integration
@pytest.mark.slow
def test_the_official_openai_client_chats_plain_and_streaming(app, engines):
    client, e = _openai(app), engines["tiny@180"]
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What does os.path.join do?"}]
    r = client.chat.completions.create(model="tiny@180", messages=messages, max_tokens=24, temperature=0.8, seed=7, n=2)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and len(r.choices) == 2
    for i, ch in enumerate(r.choices):  # choice i is the engine's text with seed + i, template and stops included
        ref = e.complete([_chat_request(e, messages, max_tokens=24, temperature=0.8, seed=7 + i)])[0]
        assert ch.index == i and ch.message.role == "assistant" and ch.message.content == ref["text"]
        assert ch.finish_reason == ref["finish_reason"]
    assert r.usage.prompt_tokens == len(_chat_request(e, messages).prompt_ids)
    assert r.usage.completion_tokens == sum(len(e.complete([_chat_request(e, messages, max_tokens=24, temperature=0.8,
                                                                          seed=7 + i)])[0]["token_ids"]) for i in range(2))

    stream = client.chat.completions.create(model="tiny@180", messages=messages, max_tokens=24, temperature=0.8, seed=7,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
        e.complete([_chat_request(e, messages, max_tokens=24, temperature=0.8, seed=7)])[0]["token_ids"])

    lp = client.chat.completions.create(model="tiny@180", messages=messages, max_tokens=6, temperature=0,
                                        logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == t.top_logprobs[0].logprob for t in content)  # greedy picks the top entry
    # a token's bytes are its own, also where it holds part of a character (byte-level tokens)
    half = client.chat.completions.create(model="tiny@180", messages=messages, max_tokens=1, temperature=0,
                                          logprobs=True, logit_bias={"195": 100})  # the first byte of "é"
    assert [(t.token, t.bytes) for t in half.choices[0].logprobs.content] == [("bytes:\\xc3", [195])]
    # without max_tokens, a reply may take what the server and the context allow (OpenAI's default)
    free = client.chat.completions.create(model="tiny@180", messages=messages, temperature=0)
    assert free.choices[0].finish_reason == "stop" or free.usage.completion_tokens == 64
    routed = client.chat.completions.create(model="tiny@180", messages=messages, max_tokens=4,
                                            extra_body={"return_routing": True})
    assert routed.choices[0].model_extra["routing"]["summary"]["experts"]


@pytest.mark.integration
@pytest.mark.slow
def test_the_official_openai_client_gets_n_logprobs_echo_token_prompts_and_penalties(app, engines):
    import torch

    client, e = _openai(app), engines["tiny@180"]
    prompt = "def add(a, b):"
    ids = e.encode(prompt)
    r = client.completions.create(model="tiny@180", prompt=prompt, max_tokens=8, temperature=0.9, seed=3, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for i, c in enumerate(r.choices):
        assert c.text == e.complete([GenRequest(ids, max_tokens=8, temperature=0.9, seed=3 + i)])[0]["text"]
    # the same prompt as token ids, alone and in a batch
    by_ids = client.completions.create(model="tiny@180", prompt=ids, max_tokens=8, temperature=0.9, seed=3)
    assert by_ids.choices[0].text == r.choices[0].text
    both = client.completions.create(model="tiny@180", prompt=[ids, ids[:3]], max_tokens=4, temperature=0)
    assert len(both.choices) == 2 and both.usage.prompt_tokens == len(ids) + 3

    # logprobs with echo: the prompt's tokens first (the first has none), then the completion's;
    # each chosen logprob is the model's own log-softmax, and greedy picks the top entry
    g = client.completions.create(model="tiny@180", prompt=prompt, max_tokens=6, temperature=0, logprobs=2, echo=True)
    c = g.choices[0]
    lp = c.logprobs
    assert c.text.startswith(prompt) and len(lp.tokens) == len(ids) + 6
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(len(t) <= 3 for t in lp.top_logprobs[1:])  # 2, and the chosen token when it is not among them
    assert "".join(lp.tokens) == c.text and all(c.text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens))
    full = ids + e.complete([GenRequest(ids, max_tokens=6, temperature=0)])[0]["token_ids"]
    with torch.no_grad():
        ref = e.model(torch.tensor([full]), causal=True).logits[0].float().log_softmax(-1)
    want = [float(ref[i - 1, full[i]]) for i in range(1, len(full))]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for i in range(len(ids), len(full)):
        assert lp.token_logprobs[i] == pytest.approx(max(lp.top_logprobs[i].values()), abs=1e-6)

    # streamed, the same logprobs and offsets, though the stream holds text back (a stop string's
    # possible start) and sends several tokens in one chunk when they pile up; top_logprobs always
    # hold the chosen token (up to logprobs + 1 entries, as in OpenAI's API)
    kw = dict(model="tiny@180", prompt=prompt, max_tokens=12, temperature=0.9, seed=3, logprobs=1, stop=[" =Q"])
    whole = client.completions.create(**kw).choices[0]
    parts = [ch.choices[0] for ch in client.completions.create(stream=True, **kw) if ch.choices]
    streamed = {k: [x for p in parts for x in getattr(p.logprobs, k)] for k in ("tokens", "text_offset", "token_logprobs")}
    assert streamed == {k: getattr(whole.logprobs, k) for k in streamed}
    assert "".join(p.text for p in parts) == whole.text
    assert whole.logprobs.text_offset == list(range(len(whole.text)))  # one byte, one character here
    assert all(t in top for t, top in zip(whole.logprobs.tokens, whole.logprobs.top_logprobs))
    # multi-byte characters, one byte token each: a token inside a character is shown by its bytes
    # and starts where the character does; the offsets index the returned text
    text = "é€ ab"
    m = client.completions.create(model="tiny@180", prompt=text, max_tokens=3, temperature=0, logprobs=1, echo=True)
    mlp = m.choices[0].logprobs
    assert mlp.tokens[:3] == ["bytes:\\xc3", "bytes:\\xa9", "bytes:\\xe2"]
    assert mlp.text_offset[:8] == [0, 0, 1, 1, 1, 2, 3, 4] and m.choices[0].text[4] == "b"
    assert all(len(top) == len(set(top)) >= 1 for top in mlp.top_logprobs[1:])

    # penalties are honoured: the engine with the same penalty agrees, and repeats drop
    plain = client.completions.create(model="tiny@180", prompt=prompt, max_tokens=24, temperature=0)
    pen = client.completions.create(model="tiny@180", prompt=prompt, max_tokens=24, temperature=0,
                                    frequency_penalty=2.0, presence_penalty=1.0)
    ref = e.complete([GenRequest(ids, max_tokens=24, temperature=0, frequency_penalty=2.0, presence_penalty=1.0)])[0]
    assert pen.choices[0].text == ref["text"]
    assert len(set(pen.choices[0].text)) >= len(set(plain.choices[0].text))
    if len(set(plain.choices[0].text)) < len(plain.choices[0].text):  # the plain text repeats itself
        assert pen.choices[0].text != plain.choices[0].text
    bias = client.completions.create(model="tiny@180", prompt=prompt, max_tokens=4, temperature=0,
                                     logit_bias={str(e.encode("Z")[0]): 100})
    assert bias.choices[0].text == "ZZZZ"


@pytest.mark.integration
@pytest.mark.slow
def test_bench_serve_measures_completions_and_decode_side_by_side(app, engines):
    from hydra_ray.benchmarks.serve import completion_load, completion_load_with_parts, engine_ratios

    one = completion_load(app["url"], 1, 1.0, AUTH, max_tokens=8)
    many = completion_load_with_parts(app["url"], 3, 1.0, AUTH)
    spread = completion_load(app["url"], 2, 1.0, AUTH, max_tokens=(2, 6))
    for r in (one, many, spread):
        assert r["errors"] == 0 and r["completions"] >= 1 and r["tokens_per_s"] > 0 and r["ttft_p50_ms"] > 0
    # the first token's parts, from the app's histograms over the same requests: they fit inside it
    assert 0 <= many["queue_mean_ms"] and 0 < many["prefill_mean_ms"] and 0 <= many["transport_mean_ms"]
    assert many["queue_mean_ms"] + many["prefill_mean_ms"] + many["transport_mean_ms"] <= many["first_token_mean_ms"]
    res = engine_ratios(engines["tiny@180"], prompt_tokens=64, new_tokens=8, rounds=1, log=lambda *_: None)
    assert res["cache_vs_recompute"] == pytest.approx(res["decode_tokens_per_s_cache"] / res["decode_tokens_per_s_recompute"])


@pytest.mark.integration
@pytest.mark.slow
def test_routing_endpoints_agree_with_the_engine_trace(app, engines):
    c, e = app["client"], engines["tiny@180"]
    text = "Solve 12 * 7 = "
    r = c.post("/v1/routing", json={"text": text})
    assert r.status_code == 200, r.text
    out = r.json()
    ref = e.trace_text(text)
    _same_routing(out["tokens"], ref["tokens"])
    assert [t["text"] for t in out["tokens"]] == list(text)
    s = out["summary"]
    assert [x["tokens"] for x in s["experts"]] == [x["tokens"] for x in ref["summary"]["experts"]]
    assert set(s["domains"]) == {"math", "code", "chat", "finefineweb"}
    assert s["mod_selected_frac"] == pytest.approx(ref["summary"]["mod_selected_frac"])
    assert s["mor_mean_depth"] == pytest.approx(ref["summary"]["mor_mean_depth"])
    r = c.post("/v1/routing", json={"text": text, "domain": "math"})
    assert 0 <= r.json()["summary"]["domain_expert_agreement"] <= 1

    body = {"prompt": "def f(x):", "max_tokens": 12, "temperature": 0, "return_routing": True}
    ch = c.post("/v1/completions", json=body).json()["choices"][0]
    ids = e.encode(body["prompt"]) + e.complete([GenRequest(e.encode(body["prompt"]), max_tokens=12, temperature=0)])[0]["token_ids"]
    _same_routing(ch["routing"]["tokens"], e.trace_ids([ids])[0]["tokens"])


@pytest.mark.integration
@pytest.mark.slow
def test_the_ingress_replicas_own_address_serves_the_same_api(app):
    """Serve's direct ingress (high-throughput mode): `hydra-ray serve` prints these addresses."""
    from hydra_ray.serve.builder import ingress_urls

    urls = ingress_urls("hydra", "127.0.0.1")
    assert len(urls) == 1 and urls[0] != app["url"], urls
    c, text = app["client"], "Solve 12 * 7 = "
    comp = {"prompt": "def f(x):", "max_tokens": 6, "temperature": 0}
    with httpx.Client(base_url=urls[0], timeout=60) as d:
        assert d.post("/v1/routing", json={"text": text}).status_code == 401  # the API key holds there too
        r = d.post("/v1/routing", json={"text": text}, headers=AUTH)
        assert r.status_code == 200, r.text
        _same_routing(r.json()["tokens"], c.post("/v1/routing", json={"text": text}).json()["tokens"])
        g = d.post("/v1/completions", json=comp, headers=AUTH)
        assert g.status_code == 200, g.text
        assert g.json()["choices"][0]["text"] == c.post("/v1/completions", json=comp).json()["choices"][0]["text"]
    assert ingress_urls("no-such-app", "127.0.0.1") == []


@pytest.mark.integration
@pytest.mark.slow
def test_two_checkpoints_are_multiplexed_side_by_side(app, engines):
    c = app["client"]
    texts = {"tiny@160": "Solve 3 + 4 = ", "tiny@180": "Solve 3 + 4 = "}
    results = {}

    def ask(model):
        results[model] = c.post("/v1/routing", json={"text": texts[model], "model": model}).json()

    threads = [threading.Thread(target=ask, args=(m,)) for m in texts for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for model, res in results.items():
        assert res["model"] == model and res["step"] == int(model.split("@")[1])
        _same_routing(res["tokens"], engines[model].trace_text(texts[model])["tokens"])
    g = [engines[m].model.units[0].block.attn.wq.weight for m in texts]
    assert not bool((g[0] == g[1]).all())  # really two different checkpoints
    models = c.get("/v1/models").json()
    assert models["object"] == "list"
    ids = {m["id"]: m for m in models["data"]}
    assert {"tiny@140", "tiny@160", "tiny@180"} <= set(ids) and ids["tiny@180"]["default"]
    assert all(m["object"] == "model" for m in models["data"])


@pytest.mark.integration
@pytest.mark.slow
def test_concurrent_requests_are_batched_and_counted(app):
    from hydra_ray.utilisation import imbalance

    c = app["client"]
    before = c.get("/v1/experts/stats").json()["models"].get("tiny@180", {"tokens_by_expert": [0] * 4})
    out = []

    def ask(i):
        out.append(c.post("/v1/routing", json={"text": f"batch me {i} " * 3}).json())

    def complete(i):
        r = c.post("/v1/completions", json={"prompt": f"request {i}", "max_tokens": 8, "seed": i})
        out_gen.append(r.status_code)

    out_gen = []
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=complete, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert max(o["batch_size"] for o in out) > 1
    assert out_gen == [200] * 6
    lines = httpx.get(app["url"] + "/metrics").text.splitlines()

    def value(prefix):
        return sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith(prefix))

    # some generations shared a batch: fewer of them fall in the "batch of 1" bucket than ran
    assert value('hydra_batch_size_bucket{kind="generation",le="1.0"}') < value('hydra_batch_size_count{kind="generation"}')
    # each completion's first token, and its wait and prefill in the model replica, were timed
    for name in ("hydra_time_to_first_token_seconds", "hydra_queue_seconds", "hydra_prefill_seconds",
                 "hydra_first_token_transport_seconds"):
        assert value(name + "_count") >= 6, name
    # the parts nest: the wait and the prefill in the replica, and the trip between it and the ingress
    assert value("hydra_queue_seconds_sum") + value("hydra_prefill_seconds_sum") + \
        value("hydra_first_token_transport_seconds_sum") <= value("hydra_time_to_first_token_seconds_sum")
    after = c.get("/v1/experts/stats").json()["models"]["tiny@180"]
    routed = sum(sum(x["summary"]["experts"][e]["tokens"] for x in out) for e in range(4))
    assert sum(after["tokens_by_expert"]) - sum(before["tokens_by_expert"]) >= routed
    assert abs(sum(after["fraction_by_expert"]) - 1) < 1e-9
    want = imbalance(after["by_layer"])  # the one definition training reports too; JSON has no inf
    assert set(after["imbalance"]) == set(want)
    for k, v in want.items():
        assert after["imbalance"][k] == (None if v == float("inf") else pytest.approx(v)), k
    metrics = httpx.get(app["url"] + "/metrics").text
    assert 'hydra_requests_total{endpoint="routing",status="200"}' in metrics
    assert "hydra_expert_tokens_total" in metrics and "hydra_batch_size_bucket" in metrics


@pytest.mark.integration
@pytest.mark.slow
def test_hot_swap_under_load_drops_no_request(app):
    from ray import serve

    from hydra_ray.serve.args import ServeArgs
    from hydra_ray.serve.builder import build_app

    clients = LoadClients(app["url"], 8, headers=AUTH)
    _wait_until(lambda: "tiny@180" in clients.seen or clients.errors, 60, "the clients' first answers")
    serve.run(build_app(ServeArgs(**{**app["args"], "default_model": "tiny@160"})), name="hydra", route_prefix="/")
    clients.wait_for("tiny@160")
    clients.stop()
    assert clients.errors == []
    assert clients.seen == {"tiny@180", "tiny@160"}
    assert app["client"].get("/healthz").json()["default_model"] == "tiny@160"
    serve.run(build_app(ServeArgs(**app["args"])), name="hydra", route_prefix="/")  # back to the newest
    assert app["client"].get("/healthz").json()["default_model"] == "tiny@180"


@pytest.mark.integration
@pytest.mark.slow
def test_a_cancelled_stream_frees_its_row_in_the_model_replica(app, engines):
    """What the ingress does when a streaming client disconnects: its call into the model replica is
    cancelled, and the replica's scheduler lets the sequence go at the next token boundary."""
    import asyncio

    from ray.serve.handle import DeploymentHandle

    e = engines["tiny@180"]

    async def main():
        # a handle of this event loop's own (not Serve's cached one): in Serve's throughput mode its
        # router runs on the caller's loop, so it is shut down here, before asyncio.run closes it
        handle = DeploymentHandle("HydraModel", app_name="hydra")
        try:
            await use(handle)
        finally:
            await handle.shutdown_async()

    async def use(handle):
        h = handle.options(multiplexed_model_id="tiny@180")
        # EOS banned: the row runs until it is cancelled or its 300 tokens are out
        req = dict(prompt_ids=e.encode("def add(a, b):"), max_tokens=300, temperature=1.0, seed=1,
                   logit_bias={e.tokenizer.eos_id: -100.0})
        stream = h.options(stream=True).generate.remote("tiny@180", req, False)  # recompute: slow enough
        first = await stream.__anext__()
        assert first["token_ids"]
        before = await h.sequences.remote("tiny@180")
        assert before["running"] >= 1
        stream.cancel()
        for _ in range(400):  # it leaves as cancelled (not by finishing its 300 tokens)
            now = await h.sequences.remote("tiny@180")
            if now["cancelled"] > before["cancelled"]:
                break
            await asyncio.sleep(0.05)
        assert now == {"running": 0, "waiting": 0, "cancelled": before["cancelled"] + 1}

    asyncio.run(main())


@pytest.mark.integration
@pytest.mark.slow
def test_a_colocated_app_serves_the_same_api_from_one_deployment(app, engines):
    """`colocate`: the engines live in the ingress's own replicas (one deployment, no hop between
    processes). The same tokens, traces and errors as the two-deployment app; a streaming client
    that disconnects frees its row; a new default checkpoint swaps in."""
    import asyncio

    from ray import serve
    from ray.serve.handle import DeploymentHandle

    from hydra_ray.serve.args import ServeArgs
    from hydra_ray.serve.builder import build_app

    args = {**app["args"], "colocate": True, "max_tokens": 900}
    serve.run(build_app(ServeArgs(**args)), name="hydra-colo", route_prefix="/colo")
    try:
        assert set(serve.status().applications["hydra-colo"].deployments) == {"HydraIngress"}
        two, e = app["client"], engines["tiny@180"]
        with httpx.Client(base_url=app["url"] + "/colo", headers=AUTH, timeout=120) as c:
            body = {"prompt": "def add(a, b):", "max_tokens": 12, "temperature": 0.8, "seed": 5}
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == two.post("/v1/completions", json=body).json()["choices"][0]["text"]
            streamed = _sse(c.post("/v1/completions", json={**body, "stream": True}).text)
            assert "".join(k["choices"][0]["text"] for k in streamed) == r.json()["choices"][0]["text"]
            text = "Solve 12 * 7 = "
            _same_routing(c.post("/v1/routing", json={"text": text}).json()["tokens"],
                          two.post("/v1/routing", json={"text": text}).json()["tokens"])
            chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            assert chat.status_code == 200 and chat.json()["object"] == "chat.completion"
            bad = c.post("/v1/completions", json={"prompt": "x", "suffix": "y"})
            assert bad.status_code == 400 and "suffix" in bad.json()["error"]["message"]
            assert httpx.post(app["url"] + "/colo/v1/completions", json=body).status_code == 401

        async def a_disconnect_frees_the_row():  # handles live on an event loop in Serve's throughput mode
            ingress = DeploymentHandle("HydraIngress", app_name="hydra-colo")
            try:
                before = await ingress.sequences.remote("tiny@180")
                # recompute and no EOS: the row runs for seconds unless its client's leaving frees it
                long = {"model": "tiny@180", "prompt": "def add(a, b):", "max_tokens": 880, "stream": True,
                        "use_cache": False, "logit_bias": {str(e.tokenizer.eos_id): -100}}
                async with httpx.AsyncClient(base_url=app["url"] + "/colo", headers=AUTH, timeout=120) as ac:
                    async with ac.stream("POST", "/v1/completions", json=long) as s:
                        assert s.status_code == 200
                        # held, not left to the loop: an async generator dropped after `break` is closed at
                        # once, and httpx then closes the connection (a disconnect before the test's own)
                        lines = s.aiter_lines()
                        async for line in lines:
                            if line.startswith("data:"):
                                break
                        for _ in range(50):  # the stream is open, so its row runs (seen at once but once)
                            live = await ingress.sequences.remote("tiny@180")
                            if live["running"] == 1:
                                break
                            await asyncio.sleep(0.2)
                        assert live["running"] == 1, (before, live)
                for _ in range(300):
                    now = await ingress.sequences.remote("tiny@180")
                    if now["cancelled"] > before["cancelled"]:
                        break
                    await asyncio.sleep(0.2)
                assert now == {"running": 0, "waiting": 0, "cancelled": before["cancelled"] + 1}
            finally:
                await ingress.shutdown_async()

        asyncio.run(a_disconnect_frees_the_row())

        serve.run(build_app(ServeArgs(**{**args, "default_model": "tiny@160"})), name="hydra-colo", route_prefix="/colo")
        assert two.get("/colo/healthz").json()["default_model"] == "tiny@160"
    finally:
        serve.delete("hydra-colo")


@pytest.mark.integration
@pytest.mark.slow
def test_bad_requests_are_4xx_json_never_5xx(app):
    url = app["url"]
    c = app["client"]
    assert httpx.get(url + "/healthz").status_code == 200  # no key needed
    for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/routing", {"text": "x"})):
        assert httpx.post(url + path, json=body).status_code == 401
        r = httpx.post(url + path, json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/v1/unknown").status_code == 401  # unknown /v1 paths are guarded too
    r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 1e-38})
    assert r.status_code == 200  # a vanishing temperature is greedy, not an overflow
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "seed": None}
    r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": None, "echo": None, **nulls})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1  # null is the default, as in OpenAI's API
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "logprobs": None, **nulls})
    assert r.status_code == 200

    cases = [
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 65}', 400),          # over the max_tokens limit
        ("/v1/completions", json.dumps({"prompt": "y" * 201}).encode(), 413),    # prompt over the token limit
        ("/v1/completions", b"x" * (2 << 20), 413),                               # body too large
        ("/v1/completions", b'{"prompt": "x",', 400),                             # malformed JSON
        ("/v1/completions", b'[1, 2]', 400),                                      # not an object
        ("/v1/completions", b'{"max_tokens": 3}', 400),                           # missing prompt
        ("/v1/completions", b'{"prompt": ""}', 400),                              # empty prompt
        ("/v1/completions", b'{"prompt": "x", "max_tokens": "ten"}', 400),        # wrong type
        ("/v1/completions", b'{"prompt": "x", "temperature": 7}', 400),           # out of range
        ("/v1/completions", b'{"prompt": "x", "n": 9}', 400),                     # n is 1..8
        ("/v1/completions", b'{"prompt": "x", "suffix": "y"}', 400),              # unsupported: named
        ("/v1/completions", b'{"prompt": "x", "best_of": 3}', 400),               # best_of > n
        ("/v1/completions", b'{"prompt": "x", "frobnicate": 1}', 400),            # unknown: named
        ("/v1/completions", b'{"prompt": "x", "logprobs": 6}', 400),
        ("/v1/completions", b'{"prompt": "x", "logit_bias": {"a": 1}}', 400),
        ("/v1/completions", '{"prompt": "x", "logit_bias": {"\u00b2": 1}}'.encode(), 400),  # a digit int() refuses
        ("/v1/completions", json.dumps({"prompt": "x", "logit_bias": {"9" * 5000: 1}}).encode(), 400),
        ("/v1/completions", b'{"prompt": "x", "logit_bias": {"05": 1, "5": 2}}', 400),  # one token twice
        ("/v1/completions", b'{"prompt": "x", "stream_options": {"include_usage": true}}', 400),  # not streaming
        ("/v1/completions", b'{"prompt": "x", "logit_bias": {"99999": 1}}', 400),  # outside the vocabulary
        ("/v1/completions", b'{"prompt": [1, 99999]}', 400),                      # token id outside it
        ("/v1/completions", b'{"prompt": [[]]}', 400),
        ("/v1/completions", b'{"prompt": [-1]}', 400),
        ("/v1/completions", b'{"prompt": "x", "presence_penalty": 3}', 400),
        ("/v1/chat/completions", b'{"messages": []}', 400),
        ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "hi"}]}', 400),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ""}]}', 400),
        ("/v1/chat/completions", b'{"messages": [{"role": "user"}]}', 400),
        ("/v1/chat/completions", b'{"messages": [{"role": "assistant", "content": "hi"}]}', 400),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}', 400),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "tools": []}', 400),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi", "name": "ann"}]}', 400),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "z" * 190}]}).encode(), 413),
        ("/v1/completions", b'{"prompt": "x", "stop": ["", "a"]}', 400),
        ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400),                      # invalid UTF-8
        ("/v1/completions", b'{"prompt": "x", "model": "../tiny"}', 400),         # traversal
        ("/v1/completions", b'{"prompt": "x", "model": "/etc/passwd"}', 400),
        ("/v1/completions", b'{"prompt": "x", "model": "escape"}', 400),          # symlink out of the store
        ("/v1/completions", b'{"prompt": "x", "model": "nope@5"}', 404),
        ("/v1/completions", b'{"prompt": "x", "model": "broken@10"}', 404),       # corrupt checkpoint
        ("/v1/completions", b'{"prompt": "x", "domain": "poetry"}', 400),
        ("/v1/completions", b'{"prompt": "x", "seed": 18446744073709551616}', 400),  # seed out of range
        ("/v1/completions", b'{"prompt": "x", "seed": -1}', 400),
        ("/v1/completions", b'{"prompt": "\\ud800"}', 400),                     # lone surrogate
        ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400),               # nesting too deep
        ("/v1/completions", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400),  # int too long
        ("/v1/completions", json.dumps({"prompt": "x", "model": "a" * 300}).encode(), 400),
        ("/v1/completions", json.dumps({"prompt": "x", "model": "a" * 100 + "/" + "b" * 100 + "@5"}).encode(), 404),
        ("/v1/routing", b'{"text": "\\udfff x"}', 400),
        ("/v1/routing", b'{"text": ""}', 400),
        ("/v1/routing", b'{"text": 5}', 400),
        ("/v1/routing", b'{"text": "x", "model": "tiny/../../x"}', 400),
        ("/v1/nothing", b"{}", 404),
    ]
    for path, raw, status in cases:
        r = c.post(path, content=raw)
        assert r.status_code == status, (path, raw[:60], r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == status and err["message"], raw[:60]
    for param in ("suffix", "frobnicate"):  # a parameter the server does not honour is named, never ignored
        r = c.post("/v1/completions", json={"prompt": "x", param: "y"})
        assert f"unsupported parameter '{param}'" in r.json()["error"]["message"]
    r = c.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": 2}',
               headers={"Content-Type": "application/x-www-form-urlencoded"})  # curl -d
    assert r.status_code == 200
    assert 'status="400"' in httpx.get(url + "/metrics").text


@pytest.mark.integration
@pytest.mark.slow
def test_the_serve_app_serves_a_run_on_s3(app, s3_store, engines):
    """ServeArgs(run="s3://..."), as `serve run serve/config.yaml` gives it: a second application
    beside the module's (Serve's HTTP options hold for the whole Ray session), under /s3."""
    from ray import serve

    from hydra_ray.serve.args import ServeArgs
    from hydra_ray.serve.builder import build_app

    args = ServeArgs(run=f"{s3_store}/tiny", api_key=KEY, num_cpus=0.5, max_tokens=64)
    serve.run(build_app(args), name="hydra-s3", route_prefix="/s3")
    try:
        c = app["client"]
        body = {"prompt": "def add(a, b):", "max_tokens": 12, "temperature": 0.8, "seed": 11}
        r = c.post("/s3/v1/completions", json=body)
        assert r.status_code == 200, r.text
        e = engines["tiny@180"]
        ref = e.complete([GenRequest(e.encode(body["prompt"]), max_tokens=12, temperature=0.8, seed=11)])[0]
        assert r.json()["model"] == "tiny@180" and r.json()["choices"][0]["text"] == ref["text"]
        r = c.post("/s3/v1/routing", json={"text": "Solve 3 + 4 = ", "model": "tiny@160"})
        assert r.status_code == 200, r.text
        assert r.json()["step"] == 160
        _same_routing(r.json()["tokens"], engines["tiny@160"].trace_text("Solve 3 + 4 = ")["tokens"])
        models = c.get("/s3/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["tiny@140", "tiny@160", "tiny@180"]
        assert all(m["created"] > 0 for m in models)
        for bad in ("../x", "tiny/../../x", "/etc/passwd"):
            r = c.post("/s3/v1/completions", json={"prompt": "x", "model": bad})
            assert r.status_code == 400 and r.json()["error"]["code"] == 400, (bad, r.text)
    finally:
        serve.delete("hydra-s3")


# --------------------------------------------------------------------------- config and CLI
@pytest.mark.integration
@pytest.mark.slow
def test_serve_config_yaml_is_a_valid_serve_deploy_file_whose_builder_accepts_its_args(store):
    from ray.serve.schema import ServeDeploySchema

    from hydra_ray.serve.args import ServeArgs

    cfg = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(cfg)
    (appcfg,) = cfg["applications"]
    assert appcfg["import_path"] == "hydra_ray.serve.builder:build_app"
    args = ServeArgs.model_validate({**appcfg["args"], "run": str(store / "tiny")})
    assert args.locate()[1] == "tiny@180"
    names = {d["name"] for d in appcfg["deployments"]}
    assert names == {"HydraIngress", "HydraModel"}


@pytest.mark.integration
@pytest.mark.slow
def test_serve_cli_validates_before_starting_ray(store, tmp_path, capsys):
    from hydra_ray.cli import main

    assert main(["serve", "--run", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path)]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    for bad in ("3-1", "x", "0-2"):
        assert main(["serve", "--run", str(store / "tiny"), "--autoscale", bad]) == 2
        assert "autoscale" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow
def test_serve_cli_names_the_uri_of_a_missing_run_or_bucket_or_refused_credentials(s3, capsys, monkeypatch):
    from hydra_ray.cli import main

    for uri, why in ((f"{s3}/nope", "is not a run directory"),
                     ("s3://missing-bucket/x", "bucket 'missing-bucket' does not exist")):
        assert main(["serve", "--run", uri]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {uri}") and why in err and err.count("\n") == 1, err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert main(["serve", "--run", f"{s3}/serve-store/tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {s3}/serve-store/tiny") and "access denied" in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_an_engine_let_go_is_freed_though_the_replica_froze_its_heap(store):
    """A model replica freezes its heap (serve/heap.py) after it starts and after each load, and
    the collector never frees frozen cycles: an engine the multiplexer lets go must be in none (its
    modules' forward hooks must not hold it), so that reference counting frees it."""
    import gc
    import weakref

    from hydra_ray.serve.model import HydraModel

    m = object.__new__(HydraModel)  # no Serve around it: _load is what the multiplexer calls
    m.store = CheckpointStore(str(store))
    try:
        engine = asyncio.run(m._load("tiny@160"))  # loaded, traced, then frozen with the heap
        engine.trace_text("def add(a, b):")
        first = weakref.ref(engine)
        del engine  # the multiplexer evicts it: no reference left
        assert first() is None
        assert asyncio.run(m._load("tiny@180")).model_id == "tiny@180"
    finally:
        gc.unfreeze()


def test_stream_interval_is_a_number_from_1_to_64_or_auto_on_the_command_line_and_in_serve_args():
    import argparse

    from pydantic import ValidationError

    from hydra_ray.serve.args import ServeArgs
    from hydra_ray.serve.cli import add_arguments

    p = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(p)
    assert p.parse_args(["--run", "r"]).stream_interval == "auto"
    assert p.parse_args(["--run", "r", "--stream-interval", "4"]).stream_interval == 4
    with pytest.raises(argparse.ArgumentError, match="neither a whole number nor auto"):
        p.parse_args(["--run", "r", "--stream-interval", "fast"])
    assert ServeArgs(run="r").stream_interval == "auto" and ServeArgs(run="r", stream_interval=64).stream_interval == 64
    for bad in (0, 65, "fast"):
        with pytest.raises(ValidationError, match="stream_interval"):
            ServeArgs(run="r", stream_interval=bad)


@pytest.mark.integration
@pytest.mark.slow
def test_builder_takes_replicas_autoscaling_and_the_default_from_serve_args(store):
    from hydra_ray.serve.args import ServeArgs
    from hydra_ray.serve.builder import build_app

    def model_deployment(app):
        return app._bound_deployment.init_args[0]._bound_deployment

    app = build_app(ServeArgs(run=str(store / "tiny"), autoscale=(1, 3), num_cpus=2, max_batch_size=4, stream_interval=4))
    assert app._bound_deployment.user_config == {"default_model": "tiny@180"}
    model = model_deployment(app)
    assert model.init_kwargs["stream_interval"] == 4 and model.init_kwargs["max_batch_size"] == 4
    auto = model._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas) == (1, 3) and model.ray_actor_options["num_cpus"] == 2
    model = model_deployment(build_app({"checkpoint": str(store / "tiny" / "checkpoints" / "step_00000160"),
                                        "replicas": 2}))
    assert model.num_replicas == 2 and model.init_kwargs["stream_interval"] == "auto"  # the default
    # colocated: one deployment, the ingress, with the model's replicas, CPUs and arguments
    one = build_app(ServeArgs(run=str(store / "tiny"), colocate=True, replicas=2, num_cpus=2, max_num_seqs=4))._bound_deployment
    assert one.name == "HydraIngress" and one.num_replicas == 2 and one.ray_actor_options["num_cpus"] == 2
    assert one.init_args[0]["max_num_seqs"] == 4 and one.user_config == {"default_model": "tiny@180"}


@pytest.mark.integration
@pytest.mark.slow
def test_serve_cli_runs_until_interrupted_and_shuts_down_cleanly(store, tmp_path):
    """`hydra-ray serve` in its own process (its own embedded Ray), stopped with SIGINT."""
    import signal
    import subprocess
    import sys

    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HYDRA_API_KEY": "env-key"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "hydra_ray.cli", "serve", "--run", str(store / "tiny"),
                             "--port", str(port), "--num-cpus", "0.5"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        url = f"http://127.0.0.1:{port}"

        def ready():
            if proc.poll() is not None:
                reader.join(10)
                pytest.fail(f"hydra-ray serve exited: {''.join(lines)}")
            if not any(line.startswith("direct ingress") for line in lines):  # printed once serve.run returned
                return False
            try:
                return httpx.get(url + "/healthz", timeout=2).json()["default_model"] == "tiny@180"
            except (httpx.HTTPError, ValueError):
                return False

        _wait_until(ready, 180, "the server to serve tiny@180", every=0.5)
        direct = next(line for line in lines if line.startswith("direct ingress")).split(": ")[-1].strip()
        assert direct.startswith("http://127.0.0.1:"), direct  # on the host asked for
        assert httpx.post(url + "/v1/routing", json={"text": "x"}).status_code == 401  # key from HYDRA_API_KEY
        for base in (url, direct):  # the proxy's port and the ingress replica's own
            r = httpx.post(base + "/v1/routing", json={"text": "x"}, headers={"Authorization": "Bearer env-key"})
            assert r.status_code == 200, (base, r.text)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(10)
        out = "".join(lines)
        assert proc.returncode == 0, out
        assert "shutting down" in out
        noise = [line for line in out.splitlines() if any(w in line for w in ("INFO", "failed", "Traceback", "killed"))]
        assert not noise, noise  # a clean shutdown says so and nothing else
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------- the inspector page
CHROMIUM = "/usr/bin/chromium"


@pytest.mark.integration
@pytest.mark.slow
def test_inspector_page_in_headless_chromium(app, engines):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package (make browser)")
    from playwright.sync_api import sync_playwright

    text = "def add(a, b):"
    ref = engines["tiny@180"].trace_text(text)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(app["url"] + "/")
            page.fill("#apikey", KEY)
            page.fill("#text", text)
            page.click("#submit")
            page.wait_for_selector("body[data-state=done]", timeout=30_000)
            spans = page.locator("#tokens .token")
            assert spans.count() == len(text)
            assert "".join(spans.all_text_contents()) == text
            layer = page.input_value("#layer")
            assert layer == ref["moe_layers"][0]
            want = [str(t["moe"][layer]["experts"][0]) if layer in t["moe"] else "" for t in ref["tokens"]]
            assert [spans.nth(i).get_attribute("data-expert") for i in range(len(text))] == want
            spans.nth(2).hover()
            detail = page.text_content("#detail")
            assert detail.startswith("#2") and "MoE b0r0" in detail and "MoR b0" in detail
            bars = page.locator("#bars .bar-row")
            assert bars.count() == 4
            pct = [float(x.rstrip("%")) for x in page.locator("#bars .pct").all_text_contents()]
            # shown with one decimal: within half a unit of the exact share (6.25 may show as 6.3 or 6.2)
            assert pct == pytest.approx([100 * e["fraction"] for e in ref["summary"]["experts"]], abs=0.0501)
            # the chat box: each reply token annotated from the engine's own trace of the conversation
            e = engines["tiny@180"]
            messages = [{"role": "user", "content": "What does os.path.join do?"}]
            req = _chat_request(e, messages, max_tokens=48, seed=0)
            toks = e.complete([req])[0]["token_ids"]
            want_tokens = e.trace_ids([req.prompt_ids + toks], [req.domain])[0]["tokens"][len(req.prompt_ids):]
            page.fill("#chatmsg", messages[0]["content"])
            page.click("#chatsend")
            page.wait_for_selector("body[data-chat=done]", timeout=60_000)
            reply = page.locator("#chatlog .turn.assistant").last.locator(".token")
            assert reply.count() == len(toks) == len(want_tokens)
            layer = page.input_value("#layer")
            want = [str(t["moe"][layer]["experts"][0]) if layer in t["moe"] else "" for t in want_tokens]
            assert [reply.nth(i).get_attribute("data-expert") for i in range(len(toks))] == want
            depth = [str(max(t["mor"].values())) if t["mor"] else "" for t in want_tokens]
            assert [reply.nth(i).get_attribute("data-depth") for i in range(len(toks))] == depth
            reply.nth(0).hover()
            assert "MoE" in page.text_content("#detail") and "MoD" in page.text_content("#detail")
            assert page.locator("#chatlog .turn.user").last.text_content().endswith(messages[0]["content"])
            page.fill("#apikey", "wrong")
            page.click("#submit")
            page.wait_for_selector("body[data-state=error]", timeout=30_000)
            assert "API key" in page.text_content("#status")
        finally:
            browser.close()
