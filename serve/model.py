"""HydraModel: the Serve deployment that holds engines, several checkpoints per replica, and
batches concurrent requests into one forward.

Design choices
- `serve.multiplexed` keeps an LRU of engines per replica, by model id; the ingress passes the id
  as the handle's multiplexed id, so Serve routes a request to a replica that has it loaded.
- `serve.batch` groups concurrent routing traces and concurrent generations; inside a batch the
  requests are grouped by engine (and by cache use), and an error reaches only its own group's
  callers. Generation always streams (one code path); the ingress collects it when asked to.
- It trusts its caller: the ingress has validated every request before any work is queued. The
  engine still refuses what it cannot serve (EngineError), which travels back intact.
- Replicas read the checkpoints themselves (local folder or object storage, with the standard
  AWS_* environment they were started with); the weights are streamed into memory.
"""

import asyncio
import dataclasses
from typing import Any

from ray import serve

from hydra_ray.serve.engine import Engine, GenRequest
from hydra_ray.serve.store import CheckpointStore


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
            if ev is not None:  # every GenEvent field travels: a new one needs no change here
                yield {**dataclasses.asdict(ev), "batch_size": batch_size}

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
