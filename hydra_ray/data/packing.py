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
