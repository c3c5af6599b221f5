"""The order of training sequences: which domain, and which of its sequences, at every position.

Design choices
- Positions are global: row p of the run is slot p % G of step p // G (G = global batch). A
  position's sequence is a pure function of (phase, seed, p), so a run resumed at step N reads
  exactly what an uninterrupted run reads from N on, whatever the number of workers.
- Domain at a position: a golden-ratio (Weyl) sequence u_i = frac(theta + i * phi) bucketed by the
  cumulative mixture weights. It is low-discrepancy: after n positions every domain's share is
  within O(log n / n) of its weight (deterministic, far inside 1 point at 10k sequences), where
  independent sampling would wander by ~1/sqrt(n).
- Sequence within a domain: the k-th time domain d is drawn in a phase it yields
  perm(seed, epoch=k // n_d, d)[k % n_d]: every sequence once per epoch, reshuffled per epoch.
- Random access: occurrence counts are checkpointed every CHUNK positions when a phase order is
  built (one vectorised pass), so any [a, b) costs O(CHUNK + b - a).
"""

from __future__ import annotations

import functools
import math

import numpy as np

PHI = (math.sqrt(5.0) - 1.0) / 2.0
CHUNK = 1 << 16


class PhaseOrder:
    def __init__(self, weights: list[float], sizes: list[int], n_positions: int, seed: int):
        w = np.asarray(weights, dtype=np.float64)
        if w.min() < 0 or w.sum() <= 0:
            raise ValueError(f"mixture weights must be non-negative and not all zero: {weights}")
        if any(s == 0 and wi > 0 for s, wi in zip(sizes, w)):
            raise ValueError("a domain with mixture weight > 0 has no sequences")
        self.cum = np.cumsum(w / w.sum())
        self.cum[-1] = 1.0
        self.sizes, self.seed, self.n = list(sizes), seed, n_positions
        self.theta = (seed * 0.7548776662466927) % 1.0  # plastic-number offset: seeds decorrelate
        self.D = len(w)
        n_chunks = n_positions // CHUNK + 1
        self.checkpoints = np.zeros((n_chunks, self.D), dtype=np.int64)
        for c in range(1, n_chunks):
            d = self._domains((c - 1) * CHUNK, c * CHUNK)
            self.checkpoints[c] = self.checkpoints[c - 1] + np.bincount(d, minlength=self.D)

    def _domains(self, a: int, b: int) -> np.ndarray:
        i = np.arange(a, b, dtype=np.float64)
        u = np.modf(self.theta + i * PHI)[0]
        return np.searchsorted(self.cum, u, side="right").clip(max=self.D - 1)

    def lookup(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain index, sequence index within that domain) for positions [a, b) of the phase."""
        c = a // CHUNK
        base = c * CHUNK
        dom = self._domains(base, b)
        occ = np.empty(len(dom), dtype=np.int64)
        for d in range(self.D):
            hit = dom == d
            occ[hit] = self.checkpoints[c, d] + np.arange(int(hit.sum()))
        dom, occ = dom[a - base :], occ[a - base :]
        seq = np.empty_like(occ)
        for d in np.unique(dom):
            hit = dom == d
            k = occ[hit]
            n_d = self.sizes[d]
            epochs = k // n_d
            out = np.empty_like(k)
            for e in np.unique(epochs):
                sel = epochs == e
                out[sel] = _perm(self.seed, int(e), int(d), n_d)[k[sel] % n_d]
            seq[hit] = out
        return dom, seq


@functools.lru_cache(maxsize=256)
def _perm(seed: int, epoch: int, domain: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, domain]).permutation(n)
