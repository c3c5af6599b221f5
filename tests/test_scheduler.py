"""Continuous batching (serve/decode.py's Decoder and serve/scheduler.py's Scheduler) on a random
model, without Ray: sequences join and leave at token boundaries, a short request is not held
back by a long one, the running batch is bounded and the rest wait in order, cancelling frees a
row, and every sequence gets the tokens and routing counts it gets alone."""

import asyncio
import time
from dataclasses import asdict

import pytest

from hydra_ray.serve.decode import Decoder, GenEvent, merge_events
from hydra_ray.serve.engine import GenRequest
from hydra_ray.serve.scheduler import Scheduler, Schedulers
from conftest import random_engine_for_tests


@pytest.fixture(scope="module")
def engine():
    e = random_engine_for_tests()
    e.tokenizer = type(e.tokenizer)()  # the byte tokenizer, its EOS outside this model's vocabulary
    e.tokenizer.eos_id = -1
    return e


def _req(e, text, n, seed, **kw):
    return GenRequest(e.encode(text), max_tokens=n, temperature=0.9, seed=seed, **kw)


def _alone(e, req):
    return e.complete([req])[0]


def test_picking_a_batch_gives_each_row_the_token_and_logprobs_it_gets_alone(engine):
    """`pick` batches the masks, the softmax and the draw over the rows: greedy, plain sampling at
    two temperatures, top-k, top-p, penalties and logit bias side by side each give what the row
    gets on its own (the same generator state), and the logprobs are the raw logits' log-softmax."""
    import torch

    from hydra_ray.serve.decode import _Row, pick

    e = engine
    V = e.model.cfg.vocab_size
    kinds = [dict(temperature=0.0), dict(temperature=0.7), dict(temperature=1.3, logprobs=3),
             dict(temperature=1.0, top_k=5), dict(temperature=1.0, top_p=0.6),
             dict(temperature=0.9, presence_penalty=1.5, frequency_penalty=0.5, logit_bias={7: 4.0}, logprobs=0)]

    def rows():
        out = [_Row(GenRequest([1, 2], seed=10 + i, **kw), e.tokenizer) for i, kw in enumerate(kinds)]
        for r in out:
            r.seen = {3: 2, 7: 1}
        return out

    logits = torch.randn(len(kinds), V, generator=torch.Generator().manual_seed(0)) * 3
    batch, single = rows(), rows()
    for _ in range(20):  # each draw advances every row's generator
        together = pick(batch, logits)
        apart = [pick([r], logits[i:i + 1])[0] for i, r in enumerate(single)]
        assert together == apart
    lp = logits.log_softmax(-1)
    tok, entry = together[2]
    assert abs(entry[0] - float(lp[2, tok])) < 1e-5 and [t for t, _ in entry[1]] == lp[2].topk(3).indices.tolist()
    assert together[0][0] == int(logits[0, :e.tokenizer.vocab_size].argmax())


def test_sequences_join_mid_generation_and_get_the_tokens_they_get_alone(engine):
    e = engine
    dec = Decoder(e, max_num_seqs=4)
    long_req = _req(e, "def add(a, b):", 40, 1)
    short_req = _req(e, "Solve 3 + 4 =", 3, 2, domain="math", logprobs=2, prompt_logprobs=True)
    long_row = dec.submit(long_req)
    toks: dict[int, list[int]] = {id(long_row): []}
    finished_at: dict[int, int] = {}
    short_lp: list = []
    short_first_times: list = []
    step = 0
    while dec.busy:
        if step == 5:  # arrives while the long one is generating
            short_row = dec.submit(short_req)
            toks[id(short_row)] = []
        for row, ev in dec.step():
            toks[id(row)] += ev.token_ids
            if row is not long_row:
                short_lp.append((ev.prompt_logprobs, ev.logprobs))
                if ev.queue_s is not None:
                    short_first_times += [ev.queue_s, ev.prefill_s]
            if ev.finish_reason:
                finished_at[id(row)] = step
        step += 1
    assert toks[id(long_row)] == _alone(e, long_req)["token_ids"]
    assert toks[id(short_row)] == _alone(e, short_req)["token_ids"]
    alone_lp = [(ev.prompt_logprobs, ev.logprobs) for (ev,) in e.generate([short_req])]
    flat = lambda x: [v for i in x for v in (flat(i) if isinstance(i, (list, tuple)) else [i])]  # noqa: E731
    assert flat(short_lp) == pytest.approx(flat(alone_lp), abs=1e-4)  # the echo's prompt logprobs too
    # the first event carries the first token's two parts: waiting, then the prefill forward
    assert len(short_first_times) == 2 and short_first_times[0] >= 0 and short_first_times[1] > 0
    # the forwards recorded no autograd graph: the cache is made of inference tensors
    assert all(layer.k_BLGE.is_inference() for layer in dec.cache.layers.values() if layer.k_BLGE is not None)
    # joined at once (its first token from the step it arrived before), left after 3 tokens
    assert finished_at[id(short_row)] == 5 + 2 < finished_at[id(long_row)]


def test_a_newcomer_is_prefilled_in_the_same_forward_as_the_running_decode(engine):
    """Each step is one forward: the newcomers' prompts are packed beside the running sequences'
    newest tokens. One newcomer takes the row of a sequence cancelled just before; every sequence
    gets the tokens (and logprobs) it gets alone."""
    e = engine
    dec = Decoder(e, max_num_seqs=3)
    reqs = [_req(e, "def add(a, b):", 24, 1), _req(e, "hello there", 24, 2), _req(e, "Solve 3 + 4 =", 24, 3, domain="math")]
    rows = [dec.submit(r) for r in reqs]
    out: dict[int, list[int]] = {id(r): [] for r in rows}
    lps: dict[int, list] = {}
    for _ in range(3):
        for row, ev in dec.step():
            out[id(row)] += ev.token_ids
    dec.cancel(rows[1])  # its row (1) is free for a newcomer
    late = [_req(e, "A newcomer", 8, 4, logprobs=1), _req(e, "and another one", 6, 5, domain="code", logprobs=1)]
    late_rows = [dec.submit(r) for r in late]
    forwards = []
    hook = e.model.register_forward_hook(lambda m, args, kw_out: forwards.append(args[0].shape))
    try:
        events = dec.step()
    finally:
        hook.remove()
    assert len(forwards) == 1  # one forward: two decoding rows' newest tokens and the newcomer's prompt
    assert forwards[0] == (1, 2 + len(late[0].prompt_ids))
    assert [r.slot for r in late_rows] == [1, None]  # the second waits: the batch holds three
    assert {id(r) for r, _ in events} == {id(rows[0]), id(rows[2]), id(late_rows[0])}
    for row, ev in events:
        out.setdefault(id(row), []).extend(ev.token_ids)
        lps.setdefault(id(row), []).extend(ev.logprobs or [])
    while dec.busy:
        for row, ev in dec.step():
            out.setdefault(id(row), []).extend(ev.token_ids)
            lps.setdefault(id(row), []).extend(ev.logprobs or [])
    for row, req in zip([rows[0], rows[2]], [reqs[0], reqs[2]]):
        assert out[id(row)] == _alone(e, req)["token_ids"]
    for row, req in zip(late_rows, late):  # the same tokens, from the same distributions
        assert out[id(row)] == _alone(e, req)["token_ids"]
        alone = [lp for (ev,) in e.generate([req]) for lp in ev.logprobs]
        assert [lp[0] for lp in lps[id(row)]] == pytest.approx([lp[0] for lp in alone], abs=1e-4)


def test_a_newcomer_early_in_a_forward_restarts_it_and_a_late_one_waits(engine):
    """Decoder.step(arrivals): a newcomer that arrives before the first block application stops
    that forward, which starts over with its prompt packed in (its first token comes from this
    step); one that arrives past half the block applications waits for the next step. Every
    sequence still gets the tokens it gets alone."""
    e = engine
    dec = Decoder(e, max_num_seqs=4)
    reqs = [_req(e, "def add(a, b):", 12, 1), _req(e, "hello there", 12, 2)]
    rows = [dec.submit(r) for r in reqs]
    out: dict[int, list[int]] = {id(r): [] for r in rows}
    for row, ev in dec.step():
        out[id(row)] += ev.token_ids
    early, late = _req(e, "An early one", 6, 3, domain="math"), _req(e, "a late one", 6, 4)
    forwards, calls, mine = [], [0], {}
    hook = e.model.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape[1]))

    def arrivals(req, at):
        def fn() -> bool:
            calls[0] += 1
            if calls[0] == at:
                mine[id(req)] = dec.submit(req)
                return True
            return False
        return fn

    apps = e.block_applications
    try:
        events = dec.step(arrivals(early, 1))  # before the first block application
        assert len(forwards) == 2 and forwards[1] == forwards[0] + len(early.prompt_ids)  # restarted with it
        assert {id(r) for r, _ in events} == {id(rows[0]), id(rows[1]), id(mine[id(early)])}
        for row, ev in events:
            out.setdefault(id(row), []).extend(ev.token_ids)
        forwards.clear()
        calls[0] = 0
        events = dec.step(arrivals(late, apps // 2 + 1))  # past half: no restart, it waits
        assert len(forwards) == 1 and id(mine[id(late)]) not in {id(r) for r, _ in events}
        assert mine[id(late)] in dec.waiting
    finally:
        hook.remove()
    for row, ev in events:
        out[id(row)] += ev.token_ids
    while dec.busy:
        for row, ev in dec.step():
            out.setdefault(id(row), []).extend(ev.token_ids)
    for req in reqs + [early, late]:
        row = mine.get(id(req)) or rows[reqs.index(req)]
        assert out[id(row)] == _alone(e, req)["token_ids"]


def test_a_sequence_cancelled_while_a_newcomer_restarts_the_forward_harms_no_other(engine):
    """A client leaves during a forward in which a newcomer arrives early: the forward starts over
    without the one that left (whose row has no slot now), and the others, the newcomer among them,
    still get the tokens they get alone."""
    e = engine
    dec = Decoder(e, max_num_seqs=3)
    reqs = [_req(e, "def add(a, b):", 10, 1), _req(e, "hello there", 10, 2), _req(e, "Solve 3 + 4 =", 10, 3)]
    rows = [dec.submit(r) for r in reqs]
    out: dict[int, list[int]] = {id(r): [] for r in rows}
    for row, ev in dec.step():
        out[id(row)] += ev.token_ids
    newcomer, calls = _req(e, "An early one", 6, 4), [0]

    def arrivals() -> bool:
        calls[0] += 1
        if calls[0] == 1:  # before the first block application
            dec.cancel(rows[1])
            out[id(dec.submit(newcomer))] = []
            return True
        return False

    forwards = []
    hook = e.model.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape[1]))
    try:
        for row, ev in dec.step(arrivals):
            out[id(row)] += ev.token_ids
    finally:
        hook.remove()
    assert forwards == [3, 2 + len(newcomer.prompt_ids)]  # restarted without the one that left
    while dec.busy:
        for row, ev in dec.step():
            out[id(row)] += ev.token_ids
    assert out[id(rows[0])] == _alone(e, reqs[0])["token_ids"]
    assert out[id(rows[2])] == _alone(e, reqs[2])["token_ids"]
    assert len(out[id(rows[1])]) == 1  # its first token only: it left in the second step
    assert [t for k, t in out.items() if k not in {id(r) for r in rows}] == [_alone(e, newcomer)["token_ids"]]


def test_ids_that_are_no_text_are_never_sampled(engine):
    """The model's vocabulary is padded past the tokenizer's (264 against 258 ids here), and PAD is
    no text either: however the logits favour them, generation never picks them."""
    e = engine
    favour = {t: 60.0 for t in range(e.tokenizer.vocab_size, e.cfg.model.vocab_size)} | {e.tokenizer.pad_id: 60.0}
    for temperature in (0.0, 1.5):
        out = _alone(e, GenRequest(e.encode("hi"), max_tokens=12, temperature=temperature, seed=1, logit_bias=favour))
        assert len(out["token_ids"]) == 12 and all(t < 256 for t in out["token_ids"]), out["token_ids"]


def test_the_running_batch_is_bounded_and_the_rest_wait_in_order(engine):
    e = engine
    dec = Decoder(e, max_num_seqs=2)
    reqs = [_req(e, f"prompt {i}", 4 + i, i) for i in range(5)]
    rows = [dec.submit(r) for r in reqs]
    first_step: dict[int, int] = {}
    out: dict[int, list[int]] = {id(r): [] for r in rows}
    step = 0
    while dec.busy:
        for row, ev in dec.step():
            first_step.setdefault(id(row), step)
            out[id(row)] += ev.token_ids
        assert dec.running <= 2
        step += 1
    starts = [first_step[id(r)] for r in rows]
    assert starts == sorted(starts) and starts[:2] == [0, 0] and starts[2] > 0  # in arrival order
    for r, req in zip(rows, reqs):
        assert out[id(r)] == _alone(e, req)["token_ids"]


def test_expert_counts_of_a_batched_sequence_are_its_own_trace(engine):
    """Counts cover the tokens the model saw: the prompt and every generated token but the last."""
    e = engine
    reqs = [_req(e, "Solve 12 * 7 = ", 9, 3, domain="math"), _req(e, "hi", 5, 4)]
    last = {}
    for step in e.generate(reqs):
        for i, ev in enumerate(step):
            if ev is not None and ev.finish_reason:
                last[i] = ev
    for i, req in enumerate(reqs):
        toks = _alone(e, req)["token_ids"]
        want = e.trace_ids([req.prompt_ids + toks[:-1]], [req.domain])[0]["summary"]["expert_tokens_by_layer"]
        nonzero = lambda c: {k: v for k, v in c.items() if any(v)}  # a layer no token of this row reached  # noqa: E731
        assert nonzero(last[i].expert_counts) == nonzero(want)


def test_the_scheduler_serves_asyncio_callers_and_a_cancel_frees_the_row(engine):
    e = engine

    async def main():
        sched = Scheduler(e, max_num_seqs=1, idle_s=0.5)
        long_h, long_q = sched.submit(_req(e, "def add(a, b):", 60, 1))
        first = await long_q.get()
        assert first.token_ids and sched.running == 1
        short_req = _req(e, "hi", 3, 2)
        t0 = time.perf_counter()
        short_h, short_q = sched.submit(short_req)  # waits: the only row is taken
        sched.cancel(long_h)  # the long request's client left
        got = []
        while True:
            ev = await asyncio.wait_for(short_q.get(), 30)
            if not got:  # its wait and prefill, timed in the decode thread from submit on, fit in what the caller saw
                assert 0 <= ev.queue_s and 0 < ev.prefill_s and ev.queue_s + ev.prefill_s <= time.perf_counter() - t0
            got += ev.token_ids
            if ev.finish_reason:
                break
        sched.cancel(short_h)
        assert got == _alone(e, short_req)["token_ids"]
        for _ in range(100):  # the decode thread ends when idle
            if sched.thread is None:
                break
            await asyncio.sleep(0.05)
        assert sched.thread is None and not sched.decoder.busy
        assert sched.cancelled == 1  # the long one left unfinished; the short one finished

    asyncio.run(main())


async def _finish(sched, req) -> list[int]:
    h, q = sched.submit(req)
    toks = []
    while True:
        ev = await asyncio.wait_for(q.get(), 30)
        toks += ev.token_ids
        if ev.finish_reason:
            sched.cancel(h)
            return toks


def test_an_idle_scheduler_is_dropped_unless_a_request_restarted_it_first(engine):
    """The replica's registry drops a scheduler whose decode thread went idle (the engine it holds
    may have been evicted), but not one that a request restarted before the event loop heard of
    the idle exit: that request, and later ones, must find it there (not a second scheduler
    decoding beside it on the same engine)."""
    e = engine

    async def main():
        reg = Schedulers(max_num_seqs=2, idle_s=0.2)
        s1 = reg.get(e, True)
        await _finish(s1, _req(e, "hi", 3, 1))
        thread = s1.thread
        thread.join(5)  # idle: it has stopped and asked the loop to drop s1, which has not run yet
        assert not thread.is_alive() and reg.get(e, True) is s1
        h, q = s1.submit(_req(e, "def f(x):", 30, 2))  # the same turn of the loop: restarts s1
        await asyncio.sleep(0.05)  # the loop runs the drop: s1 is busy again and stays
        assert reg.of(e) == [s1] and reg.get(e, True) is s1
        while not (await asyncio.wait_for(q.get(), 30)).finish_reason:
            pass
        s1.cancel(h)
        for _ in range(100):  # idle again, nothing restarts it: dropped
            if not reg.of(e):
                break
            await asyncio.sleep(0.05)
        assert reg.of(e) == []
        s2 = reg.get(e, True)
        assert s2 is not s1 and await _finish(s2, _req(e, "hi", 3, 1)) == _alone(e, _req(e, "hi", 3, 1))["token_ids"]

    asyncio.run(main())


def test_an_engine_whose_idle_scheduler_is_dropped_is_freed_though_the_heap_was_frozen():
    """A replica freezes its heap after it loads an engine (serve/heap.py), and the collector never
    frees frozen cycles: an engine the multiplexer let go while its scheduler still held it (and
    decoded on it) must be freed when the idle scheduler is dropped."""
    import gc
    import weakref

    async def main():
        e = random_engine_for_tests()
        gone = weakref.ref(e)
        gc.collect()
        gc.freeze()  # as the replica does once the engine is loaded
        reg = Schedulers(max_num_seqs=2, idle_s=0.2)
        await _finish(reg.get(e, True), _req(e, "hi", 3, 1))
        del e  # the multiplexer evicted it: only the scheduler holds it now
        for _ in range(100):  # idle: dropped
            if not reg._by_key:
                break
            await asyncio.sleep(0.05)
        assert not reg._by_key
        return gone

    try:
        gone = asyncio.run(main())
        assert gone() is None
    finally:
        gc.unfreeze()


def test_a_colocated_streaming_call_starts_when_it_is_made():
    """In one process the model's generator is called the way a deployment handle is: `.remote()`
    starts it, so the n calls of one request are queued together before the first is awaited."""
    from hydra_ray.serve.model import Colocated

    started = []

    class Model:
        async def generate(self, i):
            started.append(i)
            yield i
            yield i + 10

        async def info(self):
            return "info"

    async def main():
        m = Colocated(Model())
        streams = [m.options(stream=True).generate.remote(i) for i in range(3)]
        await asyncio.sleep(0)
        assert started == [0, 1, 2]  # all began before anyone asked for an event
        got = []
        for s in streams:
            got.append([x async for x in s])
        assert got == [[0, 10], [1, 11], [2, 12]]
        assert await m.info.remote() == "info"

    asyncio.run(main())


def test_events_that_piled_up_travel_as_one():
    a = asdict(GenEvent("ab", [1], None, None, [[-0.1, []]], [None, [-1.0, []]]))
    b = asdict(GenEvent("", [2], None, None, [[-0.2, []]]))
    c = asdict(GenEvent("c", [3], "length", {"b0r0": [1, 2]}, [[-0.3, []]]))
    m = merge_events([a, b, c])
    assert (m["text"], m["token_ids"], m["finish_reason"], m["expert_counts"]) == \
        ("abc", [1, 2, 3], "length", {"b0r0": [1, 2]})
    assert m["logprobs"] == [[-0.1, []], [-0.2, []], [-0.3, []]] and m["prompt_logprobs"] == [None, [-1.0, []]]
    assert merge_events([b]) is b


def test_a_stream_sends_its_first_token_at_once_then_stream_interval_tokens_a_message(engine):
    """HydraModel.generate (the model deployment's method, here without Ray): after the first token,
    events go `stream_interval` tokens at a time (vLLM's stream_interval), and the last as soon as the
    sequence ends; the tokens, text and finish reason are those of a stream of single tokens."""
    from hydra_ray.serve.model import HydraModel

    def model(interval: int) -> HydraModel:
        m = object.__new__(HydraModel)  # no Serve around it: the multiplexer is one fixed engine

        async def one_engine(model_id):
            return engine

        m._engine, m._schedulers, m.stream_interval = one_engine, Schedulers(4), interval
        return m

    req = asdict(_req(engine, "def add(a, b):", 10, seed=3))

    async def stream(interval: int) -> list[dict]:
        return [ev async for ev in model(interval).generate("m", dict(req))]

    ones, fours = asyncio.run(stream(1)), asyncio.run(stream(4))
    # (events that pile up while the caller is busy travel together at any interval: hence >=)
    sizes = [len(ev["token_ids"]) for ev in fours]
    assert sizes[0] < 4 and all(n >= 4 for n in sizes[1:-1]) and len(sizes) <= 4, sizes  # e.g. 1, 4, 4, 1
    assert [t for ev in fours for t in ev["token_ids"]] == [t for ev in ones for t in ev["token_ids"]]
    assert "".join(ev["text"] for ev in fours) == "".join(ev["text"] for ev in ones)
    assert fours[-1]["finish_reason"] == ones[-1]["finish_reason"] == "length"
    assert fours[0]["replica_s"] > 0 and "replica_s" not in fours[1]


def test_auto_stream_interval_sends_every_token_of_a_small_batch_and_more_a_message_as_it_grows(engine):
    """stream_interval auto (the default): every token while up to 4 sequences run, one more a
    message for each 4 more, at most 8. Eight streams decoded together go 2 tokens a message, and
    carry the tokens and text each gets at interval 1."""
    from hydra_ray.serve.model import HydraModel, auto_interval

    assert [auto_interval(n) for n in (0, 1, 4, 5, 8, 9, 16, 17, 32, 64)] == [1, 1, 1, 2, 2, 3, 4, 5, 8, 8]

    def model(interval) -> HydraModel:
        m = object.__new__(HydraModel)

        async def one_engine(model_id):
            return engine

        m._engine, m._schedulers, m.stream_interval = one_engine, Schedulers(8), interval
        return m

    assert model("auto")._interval(3) == 1 and model("auto")._interval(16) == 4 and model(2)._interval(16) == 2
    reqs = [asdict(_req(engine, f"x = {i}", 10, seed=i)) for i in range(8)]

    async def streams(interval) -> list[list[dict]]:
        m = model(interval)

        async def one(req):
            return [ev async for ev in m.generate("m", dict(req))]

        return await asyncio.gather(*(one(r) for r in reqs))

    auto, ones = asyncio.run(streams("auto")), asyncio.run(streams(1))
    for a, o in zip(auto, ones):
        sizes = [len(ev["token_ids"]) for ev in a]
        assert all(n >= 2 for n in sizes[1:-1]) and len(sizes) <= 6, sizes  # e.g. 1, 2, 2, 2, 2, 1
        assert [t for ev in a for t in ev["token_ids"]] == [t for ev in o for t in ev["token_ids"]]
        assert "".join(ev["text"] for ev in a) == "".join(ev["text"] for ev in o)


def test_an_error_after_a_sequence_finished_is_not_sent_to_it(engine):
    """A finished sequence's sink is dropped with its last event, so a later decode-loop fault
    (which ends every request the scheduler holds a sink for) does not reach it: the replica would
    raise that error after the request had finished."""

    async def main():
        sched = Scheduler(engine, max_num_seqs=2, idle_s=0.5)
        h, q = sched.submit(_req(engine, "hi", 3, 1))
        while not (await asyncio.wait_for(q.get(), 30)).finish_reason:
            pass
        for _ in range(100):  # the decode thread drops it right after sending (this loop may run first)
            if id(h) not in sched.sinks:
                break
            await asyncio.sleep(0.01)
        assert id(h) not in sched.sinks  # before its caller has cancelled it
        sched._fail_all(RuntimeError("a bug in the loop"))
        await asyncio.sleep(0)
        assert q.empty()

    asyncio.run(main())


def test_a_fault_in_the_decode_loop_fails_its_callers_and_the_next_request_is_served(engine):
    """A bug outside the forward must not leave callers waiting on a thread that died: they get
    the error, and the scheduler serves what comes next."""
    e = engine

    async def main():
        sched = Scheduler(e, max_num_seqs=2, idle_s=0.5)
        send, calls = sched._send, []

        def faulty(handle, item):  # the first event sent raises inside the decode loop
            calls.append(item)
            if len(calls) == 1:
                raise RuntimeError("a bug in the loop")
            send(handle, item)

        sched._send = faulty
        _, q1 = sched.submit(_req(e, "def add(a, b):", 20, 1))
        _, q2 = sched.submit(_req(e, "hi", 20, 2))
        for q in (q1, q2):
            got = await asyncio.wait_for(q.get(), 30)
            assert isinstance(got, RuntimeError) and "a bug in the loop" in str(got)
        assert not sched.decoder.busy  # the batch started over, with the same settings
        assert len(sched.decoder.slots) == 2 and sched.decoder.cache is not None
        req = _req(e, "Solve 3 + 4 =", 4, 3)
        assert await _finish(sched, req) == _alone(e, req)["token_ids"]

    asyncio.run(main())
