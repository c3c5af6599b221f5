"""Packing documents into fixed-length training sequences, and the labels that go with them.

Design choices
- Documents of one domain are concatenated in a fixed order, each followed by EOS, and cut into
  non-overlapping windows of seq_len + 1 tokens (inputs = window[:-1], labels = window[1:]), so a
  sequence carries exactly one domain id. Only the last window of a domain is padded.
- Labels are -100 where they must not reach the loss: padding, and the first token of a new
  document (predicted from the previous document's EOS). Predicting EOS itself is kept: the model
  learns where documents end.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100


def pack(docs: list[np.ndarray], seq_len: int, eos: int, pad: int) -> np.ndarray:
    """int32 [n, seq_len + 1] windows over the EOS-joined documents."""
    width = seq_len + 1
    if not docs:
        return np.zeros((0, width), dtype=np.int32)
    parts = []
    for d in docs:
        parts.append(np.asarray(d, dtype=np.int32))
        parts.append(np.array([eos], dtype=np.int32))
    stream = np.concatenate(parts)
    n = -(-len(stream) // width)
    out = np.full(n * width, pad, dtype=np.int32)
    out[: len(stream)] = stream
    return out.reshape(n, width)


class StreamPacker:
    """`pack` one document at a time: full windows go to `sink` in blocks as they fill, the padded
    last window at `close()`. The windows are exactly those of `pack` over the same documents."""

    def __init__(self, seq_len: int, eos: int, pad: int, sink, block_rows: int = 1024):
        self.width, self.eos, self.pad, self.sink = seq_len + 1, eos, pad, sink
        self.parts: list[np.ndarray] = []
        self.held = 0
        self.block = block_rows * self.width

    def add(self, doc: np.ndarray) -> None:
        # a copy, never a view: a view would keep the caller's whole token chunk alive until the
        # next emit (the eval packer fills slowly and would pin dozens of chunks)
        self.parts += [np.array(doc, dtype=np.int32), np.array([self.eos], dtype=np.int32)]
        self.held += len(doc) + 1
        if self.held >= self.block:
            self._emit()

    def _emit(self) -> None:
        stream = np.concatenate(self.parts)
        full = len(stream) // self.width * self.width
        self.sink(stream[:full].reshape(-1, self.width))
        self.parts, self.held = [stream[full:]], len(stream) - full

    def close(self) -> None:
        if self.held:
            self._emit()
        if self.held:
            last = np.full(self.width, self.pad, dtype=np.int32)
            last[: self.held] = np.concatenate(self.parts)
            self.sink(last[None])
        self.parts, self.held = [], 0


def inputs_and_labels(windows: np.ndarray, eos: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, L+1] windows -> (inputs [B, L], labels [B, L]) with -100 at padding and boundaries."""
    inputs = windows[:, :-1].astype(np.int64)
    labels = windows[:, 1:].astype(np.int64)
    is_pad_target = labels == pad
    if pad == eos:  # no separate pad token: padding is whatever follows the last real EOS
        real = np.cumsum((windows[:, ::-1] != pad), axis=1)[:, ::-1] > 0
        is_pad_target = ~real[:, 1:]
    mask = is_pad_target | (inputs == eos)
    if pad != eos:
        mask |= inputs == pad
    labels[mask] = IGNORE
    return inputs, labels
