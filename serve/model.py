"""HydraModel: the Serve deployment that holds engines, several checkpoints per replica, and
batches concurrent requests into one forward.

Design choices
- `serve.multiplexed` keeps an LRU of engines per replica, by model id; the ingress passes the id
  as the handle's multiplexed id, so Serve routes a request to a replica that has it loaded.
- Generation is continuously batched: each engine (and cache mode) has a Scheduler (scheduler.py)
  whose decode thread runs up to `max_num_seqs` sequences, admitting and retiring them at token
  boundaries; more wait in order. A request whose caller goes away (a streaming client that
  disconnects) is cancelled and frees its row. Events that pile up while the caller is busy travel
  as one message (several tokens), so a loaded replica spends its time decoding, not messaging.
  After the first token, a stream's events go `stream_interval` tokens a message; `auto` sends
  every token while few sequences run and more per message as the batch grows (`auto_interval`):
  each message costs the ingress about 0.45 ms of CPU (a gRPC message, a wake-up, an SSE write),
  so 16 sequences streaming token by token cost it about a third of a core in messages alone.
  Generation always streams (one code path); the ingress collects it when asked to.
- `serve.batch` groups concurrent routing traces; inside a batch they are grouped by engine, and
  an error reaches only its own group's callers. The batch's forward runs on the replica's event
  loop, blocking it: calls that arrive meanwhile wait in the transport and all join the next batch.
  In a worker thread the forward holds the GIL against the loop, calls trickle in one per forward,
  and 16 clients got batches of 1 (16 client processes: 58 -> 106 requests/s).
- It trusts its caller: the ingress has validated every request before any work is queued. The
  engine still refuses what it cannot serve (EngineError), which travels back intact.
- `Colocated` runs this class inside the ingress's replica (`colocate`): the ingress calls it as it
  calls the handle, and the events never leave the process.
- Replicas read the checkpoints themselves (local folder or object storage, with the standard
  AWS_* environment they were started with); the weights are streamed into memory.
"""

import asyncio
import inspect
import time
from typing import Any

from ray import serve

from hydra_ray.serve import heap, shapes
from hydra_ray.serve.decode import merge_events
from hydra_ray.serve.engine import Engine, GenRequest
from hydra_ray.serve.scheduler import Schedulers
from hydra_ray.serve.store import CheckpointStore


AUTO_ROWS = 4  # auto: every token while this many sequences run; one more a message per this many more
AUTO_MAX = 8  # auto: at most this many tokens a message


def auto_interval(running: int) -> int:
    """`stream_interval: auto`: tokens a message with `running` sequences in the batch."""
    return min(AUTO_MAX, max(1, -(-running // AUTO_ROWS)))


def routed(trace: dict, batch_size: int) -> dict:
    """A routing trace as it leaves the replica: the response's JSON, encoded here (bytes cross the
    wire and reach the client as they are: the ingress neither unpickles a 12 kB structure nor
    encodes it again), and what the ingress keeps counters of."""
    return {"json": shapes.dumps({**trace, "batch_size": batch_size}), "batch_size": batch_size,
            "expert_tokens_by_layer": trace["summary"]["expert_tokens_by_layer"]}


class HydraModel:
    """Engines by model id (LRU via serve.multiplexed); batched traces and generation."""

    def __init__(self, store: dict, max_models_per_replica: int = 3, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.005, torch_threads: int | None = None, max_num_seqs: int = 16,
                 stream_interval: int | str = "auto"):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.store = CheckpointStore(**store)

        async def load(model_id: str) -> Engine:  # a function: the multiplexer keeps its state on it
            return await self._load(model_id)

        self._engine = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(load)
        self._trace_batch.set_max_batch_size(max_batch_size)
        self._trace_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._schedulers = Schedulers(max_num_seqs)
        self.stream_interval = stream_interval
        heap.freeze()

    async def _load(self, model_id: str) -> Engine:
        engine = await asyncio.to_thread(Engine.from_store, self.store, model_id)
        heap.freeze()  # the new engine's objects too (serve/heap.py)
        return engine

    async def warm(self, model_id: str) -> dict:
        return (await self._engine(model_id)).info

    async def routing(self, model_id: str, ids: list[int], domain: str | None) -> dict:
        """A routing trace as `routed` gives it."""
        engine = await self._engine(model_id)
        res = await self._trace_batch((engine, ids, domain))
        if isinstance(res, Exception):
            raise res
        return res

    async def sequences(self, model_id: str) -> dict:
        """This model's sequences on this replica: generating, waiting, and cancelled before the end."""
        engine = await self._engine(model_id)
        scheds = self._schedulers.of(engine)
        return {"running": sum(s.running for s in scheds), "waiting": sum(len(s.decoder.waiting) for s in scheds),
                "cancelled": sum(s.cancelled for s in scheds)}

    async def generate(self, model_id: str, req: dict, use_cache: bool = True):
        entered = time.perf_counter()  # the first event carries how long this replica took to produce it
        engine = await self._engine(model_id)
        sched = self._schedulers.get(engine, use_cache)
        handle, events = sched.submit(GenRequest(**req))  # in the same turn of the loop as the lookup
        held: list = []  # events not sent yet: after the first, they go `stream_interval` tokens at a time
        tokens = 0  # in `held`
        try:
            while True:
                got = [await events.get()]
                while not events.empty():  # a caller that lags gets what piled up in one message
                    got.append(events.get_nowait())
                bad = next((e for e in got if isinstance(e, Exception)), None)
                if bad is not None:
                    raise bad
                held += got
                tokens += sum(len(e.token_ids) for e in got)
                last = held[-1].finish_reason is not None
                if entered is None and not last and tokens < self._interval(sched.running):
                    continue
                # every GenEvent field travels: a new one needs no change here. A shallow copy: an
                # event is not touched once sent (asdict's deep copy cost 15-80 us an event)
                ev = merge_events([dict(vars(e)) for e in held])
                held, tokens = [], 0
                if entered is not None:
                    ev["replica_s"], entered = time.perf_counter() - entered, None
                yield {**ev, "batch_size": sched.running}
                if last:
                    return
        finally:  # finished, failed, or the caller went away (cancelled): the row is freed
            sched.cancel(handle)

    def _interval(self, running: int) -> int:
        return auto_interval(running) if self.stream_interval == "auto" else self.stream_interval

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _trace_batch(self, items: list[tuple[Engine, list[int], str | None]]) -> list[dict]:
        out: list[Any] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (engine, _, _) in enumerate(items):
            groups.setdefault(id(engine), []).append(i)
        for idxs in groups.values():
            engine = items[idxs[0]][0]
            try:
                res = engine.trace_ids([items[i][1] for i in idxs], [items[i][2] for i in idxs])
            except Exception as e:  # handed to its own callers only: never fail the whole batch
                res = [e] * len(idxs)
            for i, r in zip(idxs, res):
                out[i] = r if isinstance(r, Exception) else routed(r, len(idxs))
        return out


class Colocated:
    """A HydraModel in the ingress's own replica, called the way the ingress calls the model
    deployment's handle (`options(...).method.remote(...)`), minus the hop between two processes:
    a request's events reach the ingress as Python objects on its own event loop."""

    def __init__(self, model: HydraModel):
        self._model = model

    def options(self, **_) -> "Colocated":  # the model id travels as an argument anyway
        return self

    def __getattr__(self, name: str):
        return _Local(getattr(self._model, name))


class _Local:
    def __init__(self, method):
        self._method = method

    def remote(self, *args, **kwargs):
        out = self._method(*args, **kwargs)
        return _Started(out) if inspect.isasyncgen(out) else out


class _Started:
    """A streaming call that began when it was made, as a handle's does: the ingress makes all of
    a request's `n` calls before it waits for the first event of any, so they are queued together
    and share one prefill (a bare async generator would not start until it is first awaited)."""

    def __init__(self, gen):
        self._gen = gen
        self._first: asyncio.Future | None = asyncio.ensure_future(gen.__anext__())

    def __aiter__(self) -> "_Started":
        return self

    async def __anext__(self):
        if self._first is not None:
            first, self._first = self._first, None
            return await first
        return await self._gen.__anext__()
