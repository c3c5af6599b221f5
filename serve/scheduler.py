"""Scheduler: one engine's continuous batch (decode.Decoder) run by a thread of its own, fed from
asyncio. No Ray here: the model deployment (model.py) holds one per loaded engine and cache mode.

Design choices
- The decode loop runs in a thread, so the replica's event loop stays free to accept requests
  while a forward runs. (Running the forwards on the loop itself, yielding at each token
  boundary, was tried: a newcomer then advances through the request path one loop turn per
  forward, and the p50 time to first token with 16 streaming clients doubled.) Requests and
  cancellations reach the thread through a thread-safe inbox, applied at the next token
  boundary; events go back to each request's asyncio queue with `call_soon_threadsafe`.
- Each iteration takes what arrived (submits join the queue, cancels free their rows) and runs
  one `Decoder.step`: one packed forward in which newcomers are prefilled beside the running
  sequences' decode, so a newcomer's first token comes at the end of the first forward that
  begins after it arrived. Before each block application the thread takes what arrived
  (`_arrivals`); a newcomer that arrives in the first half of a forward's blocks restarts that
  forward with its prompt packed in (Decoder.step). (Before, newcomers were prefilled in
  forwards of their own, one of them between two blocks of a decode forward then running to
  save the wait; with 16 clients whose requests end at different steps, the lone prefills took
  about a third of the time.)
- `submit` validates against the engine at once (an EngineError is raised to the caller, before
  anything is queued). A request that is cancelled (its client left) leaves the batch at the next
  boundary and frees its row for the next waiting one.
- A forward that fails ends every sequence then running or waiting with that error (they shared
  the batch), and the loop goes on with what arrives next.
- The thread stops after `idle_s` seconds without work; the next request starts a new one. A
  replica's `Schedulers` then drops the scheduler on its event loop, unless a request restarted it.
- A fault outside the forward (a bug in the loop itself) is logged and ends every queued and
  running request with that error, and the batch starts over: no caller waits forever on a
  thread that is gone.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Callable

from hydra_ray.serve.decode import Decoder, GenRequest

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, engine, max_num_seqs: int = 16, use_cache: bool = True, idle_s: float = 30.0,
                 on_exit: Callable[["Scheduler"], None] | None = None):
        self.decoder = Decoder(engine, max_num_seqs, use_cache)
        self.inbox: queue.Queue = queue.Queue()
        self.idle_s, self.on_exit = idle_s, on_exit
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.sinks: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.cancelled = 0  # sequences that left before they finished (their callers went away)
        # the decode thread's bookkeeping, new with each thread (_loop)
        self._rows: dict[int, object] = {}  # id(row) -> handle
        self._by_handle: dict[int, object] = {}  # id(handle) -> row

    @property
    def running(self) -> int:
        return self.decoder.running

    def submit(self, req: GenRequest) -> tuple[object, asyncio.Queue]:
        """Queue a request; returns its handle (for `cancel`) and the asyncio queue its events
        (GenEvent, or an exception) arrive on. Must be called from the event loop."""
        self.decoder.engine.check_request(req)  # EngineError now, not on the queue
        q: asyncio.Queue = asyncio.Queue()
        handle = object()
        with self.lock:  # against _fail_all: a submit is wholly before it (and gets its error) or after
            self.sinks[id(handle)] = (asyncio.get_running_loop(), q)
            self.inbox.put(("submit", handle, (req, time.perf_counter())))  # when it arrived: the queue time starts
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="hydra-decode", daemon=True)
                self.thread.start()
        return handle, q

    def cancel(self, handle) -> None:
        """The request's client is gone (or it finished): free its row at the next boundary."""
        self.inbox.put(("cancel", handle, None))

    # ----------------------------------------------------------------- the decode thread
    def _send(self, handle, item) -> None:
        sink = self.sinks.get(id(handle))
        if sink is not None:
            loop, q = sink
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a fault outside the forward (a bug): no caller may be left waiting
            log.exception("the decode loop failed; every queued and running request ends with the error")
            self._fail_all(e)

    def _fail_all(self, err: Exception) -> None:
        """Every request this scheduler holds gets `err`; the batch starts over empty. Under the
        lock, so a `submit` racing with it either gets the error or starts a fresh thread."""
        with self.lock:
            while True:
                try:
                    self.inbox.get_nowait()
                except queue.Empty:
                    break
            # the new batch and the emptied sinks first: a caller that hears of the error may submit
            # again at once, and its sink must survive (its submit waits for this lock only after it)
            self.decoder = self.decoder.empty()
            self.thread = None
            sinks = list(self.sinks.values())
            self.sinks.clear()
            for loop, q in sinks:
                loop.call_soon_threadsafe(q.put_nowait, err)

    def _drain(self, msgs: list) -> list:
        while True:
            try:
                msgs.append(self.inbox.get_nowait())
            except queue.Empty:
                return msgs

    def _take(self, dec: Decoder, msgs: list) -> None:
        """Apply what arrived: submits join the decoder's queue, cancels free their rows."""
        for kind, handle, item in msgs:  # item: (request, when it arrived) for a submit
            if kind == "submit":
                try:
                    row = dec.submit(*item)
                except Exception as e:
                    self._send(handle, e)
                    self.sinks.pop(id(handle), None)
                    continue
                self._rows[id(row)], self._by_handle[id(handle)] = handle, row
            else:
                row = self._by_handle.pop(id(handle), None)
                if row is not None:  # not finished: its caller went away
                    dec.cancel(row)
                    self.cancelled += 1
                    self._rows.pop(id(row), None)
                self.sinks.pop(id(handle), None)

    def _deliver(self, events) -> None:
        for row, ev in events:
            handle = self._rows.get(id(row))
            if handle is None:
                continue
            self._send(handle, ev)
            if ev.finish_reason:  # its last event: nothing more goes to it, not even a later fault
                self._rows.pop(id(row), None)
                self._by_handle.pop(id(handle), None)
                self.sinks.pop(id(handle), None)

    def _arrivals(self, dec: Decoder) -> bool:
        """Between two blocks of a forward: take what arrived since it began (Decoder.step may
        start the forward over with a newcomer packed in)."""
        if self.inbox.empty():
            return False
        self._take(dec, self._drain([]))
        return True

    def _loop(self) -> None:
        self._rows, self._by_handle = {}, {}
        dec = self.decoder
        while True:
            try:  # block for work only when the batch is idle
                msgs = [self.inbox.get(timeout=self.idle_s)] if not dec.busy else []
            except queue.Empty:
                with self.lock:
                    if self.inbox.empty():
                        self.thread = None
                        if self.on_exit:
                            self.on_exit(self)
                        return
                continue
            self._take(dec, self._drain(msgs))
            if not dec.busy:
                continue
            try:
                events = dec.step(lambda: self._arrivals(dec))
            except Exception as e:  # the batch's forward failed: every sequence in it ends with the error
                for row in [r for r in dec.slots if r is not None] + list(dec.waiting):
                    handle = self._rows.pop(id(row), None)
                    dec.cancel(row)
                    if handle is not None:
                        self._by_handle.pop(id(handle), None)
                        self._send(handle, e)
                continue
            self._deliver(events)


class Schedulers:
    """A replica's schedulers, one per (engine, cache mode), made on first use and dropped once
    idle, so that an engine the multiplexer evicted is not kept alive by its scheduler. Only the
    event loop touches the registry: a decode thread that goes idle asks the loop to drop its
    scheduler, and the loop does so unless a request restarted it meanwhile (a request looks its
    scheduler up and submits to it in one turn of the loop, so it never submits to a dropped one)."""

    def __init__(self, max_num_seqs: int = 16, idle_s: float = 30.0):
        self.max_num_seqs, self.idle_s = max_num_seqs, idle_s
        self._by_key: dict[tuple[int, bool], Scheduler] = {}

    def get(self, engine, use_cache: bool) -> Scheduler:
        """This engine's scheduler for the cache mode. Call from the event loop."""
        key = (id(engine), use_cache)
        if key not in self._by_key:
            loop = asyncio.get_running_loop()

            def idle(s: Scheduler) -> None:  # on the decode thread, which has just stopped
                try:
                    loop.call_soon_threadsafe(self._drop, key, s)
                except RuntimeError:  # the loop is closed: the replica is going away with it
                    pass

            self._by_key[key] = Scheduler(engine, self.max_num_seqs, use_cache, self.idle_s, on_exit=idle)
        return self._by_key[key]

    def of(self, engine) -> list[Scheduler]:
        return [s for (eid, _), s in self._by_key.items() if eid == id(engine)]

    def _drop(self, key: tuple[int, bool], s: Scheduler) -> None:
        if self._by_key.get(key) is s and s.thread is None:
            del self._by_key[key]
