"""Keep Python's cyclic garbage collector off the objects a replica holds for its whole life.

A Serve replica holds a few hundred thousand long-lived Python objects (torch, Ray, Serve,
FastAPI, pydantic, the loaded engines). Each full collection walks all of them, with the GIL
held, and serving allocates fast enough (events, dicts, routing records) to set off a full
collection every few seconds under load: measured in `bench serve`'s replicas, 15-18 ms each (and
90-165 ms while a replica starts), a stall for the event loop and the decode thread alike. Frozen,
they take 0.6-5 ms. `freeze()` moves what is alive into the permanent generation, which
collections skip (vLLM freezes its heap the same way once its engine is up). Called once a
replica has started and again after each engine it loads. What those objects later drop is still
freed by reference counting; only cycles among them would wait for good, so an engine holds none
(its forward hooks hold a thread-local, not the engine): one the multiplexer lets go is freed at
once. (A Ray Train worker's steps allocate little that survives, a few young collections a
minute: training does not need this.)
"""

import gc


def freeze() -> None:
    gc.collect()
    gc.freeze()

