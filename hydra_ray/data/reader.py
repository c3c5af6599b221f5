"""Each training worker reads its own rows of the run's order straight from the packed shards.

Design choices
- Rank r of W takes rows [r * G/W, (r+1) * G/W) of every global batch of G rows: the positions
  are computed, not streamed, so no worker reads or decodes another worker's rows (no W-fold
  re-execution of one shared stream) and any step can be read first (resume, resize).
- Row p is the same sequence for every worker count (mixture.py's order, `pipeline._gather`),
  so ranks are disjoint, cover each global batch, and a resumed or resized run reads exactly
  what an uninterrupted one reads.
- A background thread reads `prefetch` steps ahead (memory-mapped local shards, ranged reads on
  object storage) while the step computes; the time a step waits for its batch is measured
  (`data_wait_s` in the metrics).
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np

from hydra_ray.data.pipeline import PreparedData, _gather, phase_spans


class RankReader:
    """This rank's slice of global batches [start, end), in step order, as numpy arrays."""

    def __init__(self, prepared: PreparedData, cfg, global_batch: int, rank: int, world: int, start: int, end: int,
                 prefetch: int = 4):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} does not divide over {world} workers")
        self.spans = [s for s in phase_spans(cfg) if s.end_step > start and s.start_step < end]
        lens = {s.seq_len for s in self.spans}
        self.paths = {L: [prepared.shard("train", L, d) for d in prepared.domains] for L in lens}
        self.sizes = {L: prepared.train_sizes(L) for L in lens}
        self.G, self.per, self.rank, self.start, self.end = global_batch, global_batch // world, rank, start, end
        self.eos, self.pad = prepared.eos_id, prepared.pad_id
        self.wait_s = 0.0  # seconds `next` spent waiting for the reading thread
        self._q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()

    def rows(self, step: int) -> dict[str, np.ndarray]:
        pos = step * self.G + self.rank * self.per + np.arange(self.per, dtype=np.int64)
        return _gather({"id": pos}, self.spans, self.paths, self.sizes, self.G, self.eos, self.pad, offset=0)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for step in range(self.start, self.end):
                if not self._put((step, self.rows(step))):
                    return
            self._put((None, StopIteration()))
        except Exception as e:  # noqa: BLE001  (raised again in the training loop)
            self._put((None, e))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, dict[str, np.ndarray]]:
        t = time.perf_counter()
        step, batch = self._q.get()
        self.wait_s += time.perf_counter() - t
        if step is None:
            raise batch
        return step, batch

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.1)
