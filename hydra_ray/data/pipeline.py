"""The data pipeline: corpus -> packed token shards (pack.py, once per corpus) -> the run's
training order, which every worker reads for itself (reader.py).

Design choices
- `prepare_data` packs the configured corpus into token shards, or reuses the pack that matches
  it (`data.packed`, else the cache keyed by the corpus fingerprint, tokenizer and seq_lens; see
  pack.py), and returns a small description of it (`PreparedData`): shard locations, counts and
  the data report. Nothing of the corpus passes through the driver or the object store.
- No silent empty run: a domain that a mixture weights but whose good documents give no tokens or
  no training sequence is a CorpusError naming it and its bad records, before any training step.
- The training order maps position p (step x global batch + slot) to a sequence through the
  mixture order (mixture.py): the domain of p, then its row in that domain's shard (`_gather`).
  Order depends only on (phase, seed, p), so a resumed or resized run reads exactly the batches
  an uninterrupted one reads.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hydra_ray.config import HydraConfig
from hydra_ray import storage as st
from hydra_ray.data.corpus import CorpusError
from hydra_ray.data.mixture import PhaseOrder
from hydra_ray.data.packing import inputs_and_labels
from hydra_ray.data.shards import read_range, read_rows, shard_name
from hydra_ray.data.tokenizer import load_tokenizer


@dataclass
class PreparedData:
    domains: list[str]
    seq_lens: list[int]
    root: str  # the packed data: DOMAIN/SPLIT-L{L}.bin shards and manifest.json (shards.py)
    counts: dict[int, dict[str, dict[str, int]]]  # seq_len -> domain -> {"train": n, "eval": n}
    stats: dict[str, dict]  # domain -> documents, tokens, bad records by reason, one example of each
    tokenizer: str
    eos_id: int
    pad_id: int
    vocab_size: int
    extra: dict = field(default_factory=dict)

    def train_sizes(self, seq_len: int) -> list[int]:
        return [self.counts[seq_len][d]["train"] for d in self.domains]

    def shard(self, split: str, seq_len: int, domain: str) -> str:
        return st.join(self.root, shard_name(domain, split, seq_len))

    def windows(self, split: str, seq_len: int, domain: str, rows=None) -> np.ndarray:
        """int32 [n, L+1] windows of one shard: the given rows, or all of them."""
        path, n = self.shard(split, seq_len, domain), self.counts[seq_len][domain][split]
        if rows is None:
            return read_range(path, seq_len + 1, 0, n)
        return read_rows(path, seq_len + 1, rows)

    def report(self) -> str:
        """One line per domain (documents, tokens, sequences, bad records by reason), then where
        the first bad record of each reason is."""
        lines = []
        for d in self.domains:
            s = self.stats.get(d, {})
            seqs = ", ".join(f"L{L}: {self.counts[L][d]['train']} train / {self.counts[L][d]['eval']} eval"
                             for L in self.seq_lens)
            lines.append(f"  {d:<12} {s.get('documents', 0):6d} docs  {s.get('tokens', 0):9d} tokens  "
                         f"sequences {seqs}  bad records: {_bad_summary(s.get('bad', {}))}")
            lines += [f"      e.g. {e}" for e in s.get("bad_examples", [])]
        return "\n".join(lines)


def required_domains(cfg: HydraConfig) -> list[str]:
    mixes = [cfg.data.mixture] + [p.mixture for p in cfg.curriculum.phases if p.mixture]
    return [d for d in cfg.model.domains if any(m.get(d, 0) > 0 for m in mixes)]


def builtin_corpus(cfg: HydraConfig, log=print) -> str:
    """The built-in corpus of the configured size, generated once into the cache folder."""
    from hydra_ray.data import builtin

    base = os.environ.get("HYDRA_CACHE_DIR") or cfg.data.cache_dir  # the env var wins (tests, CI)
    root = Path(base).expanduser() / f"builtin-v{builtin.VERSION}-{cfg.data.builtin_size}-seed{cfg.data.builtin_seed}"
    marker = root / "summary.json"
    if not marker.exists():
        log(f"[data] building the built-in corpus ({cfg.data.builtin_size}) in {root}")
        summary = builtin.prepare(root, cfg.data.builtin_size, cfg.data.builtin_seed, progress=False)
        marker.write_text(json.dumps(summary, indent=1))
    return str(root)


def _bad_summary(bad: dict[str, int]) -> str:
    """Like "3 (malformed 2, empty_text 1)", or "none"."""
    shown = ", ".join(f"{r} {n}" for r, n in bad.items() if n)
    return f"{sum(bad.values())} ({shown})" if shown else "none"


def pack_cache(storage: str) -> str | None:
    """Where a run on `storage` keeps packed data: beside its runs (`STORAGE/_packed`) when that is
    object storage, so every node of a cluster reads the same pack; else None (the local cache)."""
    return None if st.is_local(storage) else st.join(storage, "_packed")


def prepare_data(cfg: HydraConfig, seq_lens: list[int] | None = None, log=print, cache: str | None = None,
                 out: str | None = None, before_pack=None) -> PreparedData:
    """The configured corpus packed into token shards (pack.py: packed now, or reused when the
    pack of this corpus, tokenizer and seq_lens exists), described for the training order.
    `cache` is where packs are kept (default: `packed/` in the cache folder); `out` packs into that
    folder instead. Packs on Ray when it is running, else in this process; `before_pack()` runs
    only when there is packing to do (`data pack` starts Ray there, not for a pack it reuses)."""
    from hydra_ray.data.pack import ensure_packed

    try:
        tok = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_sha256)
    except ValueError as e:
        raise CorpusError(str(e)) from None
    if tok.vocab_size > cfg.model.vocab_size:
        raise CorpusError(f"tokenizer {tok.name} has {tok.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}")
    seq_lens = sorted(set(seq_lens or [p.seq_len or cfg.model.seq_len for p in cfg.curriculum.phases]))
    corpus = cfg.data.corpus or (None if cfg.data.packed and out is None else builtin_corpus(cfg, log))
    cache = cache or str(Path(os.environ.get("HYDRA_CACHE_DIR") or cfg.data.cache_dir).expanduser() / "packed")
    root, manifest = ensure_packed(cfg, seq_lens, corpus, cache, log, out=out, before_pack=before_pack)
    domains = cfg.model.domains
    counts = {L: {d: {s: manifest["shards"][d][f"{s}-L{L}"]["rows"] for s in ("train", "eval")} for d in domains}
              for L in seq_lens}
    stats = manifest["stats"]
    # no silent empty run: a weighted domain without tokens would train on nothing (or NaN)
    empty = [d for d in required_domains(cfg) if stats[d]["tokens"] == 0 or any(counts[L][d]["train"] == 0 for L in seq_lens)]
    if empty:
        raise CorpusError("no usable training text for domain(s) weighted by the mixture: " + "; ".join(
            f"{d} ({stats[d]['documents']} good documents, bad records: {_bad_summary(stats[d]['bad'])}"
            + (f", e.g. {stats[d]['bad_examples'][0]}" if stats[d]["bad_examples"] else "") + ")" for d in empty))
    return PreparedData(domains, seq_lens, root, counts, stats, cfg.data.tokenizer, tok.eos_id, tok.pad_id,
                        tok.vocab_size, {"corpus": manifest.get("corpus", corpus), "packed": root,
                                         "key": manifest["key"]})


# --------------------------------------------------------------------------- the training order
@dataclass(frozen=True)
class PhaseSpan:
    start_step: int
    end_step: int
    weights: tuple[float, ...]
    seq_len: int
    seed: int


def phase_spans(cfg: HydraConfig) -> list[PhaseSpan]:
    """Per phase: steps, domain weights (phase mixture or the data default), seq_len and data seed
    (the phase's locked seed, or one derived from train.seed and the phase index when unlocked)."""
    spans, start = [], 0
    for i, p in enumerate(cfg.curriculum.phases):
        mix = p.mixture or cfg.data.mixture
        seed = p.seed if p.seed is not None else cfg.train.seed * 1000 + i
        spans.append(PhaseSpan(start, p.until_step, tuple(float(mix.get(d, 0.0)) for d in cfg.model.domains),
                               p.seq_len or cfg.model.seq_len, seed))
        start = p.until_step
    return spans


@functools.lru_cache(maxsize=16)
def _phase_order(span: PhaseSpan, sizes: tuple[int, ...], global_batch: int) -> PhaseOrder:
    return PhaseOrder(list(span.weights), list(sizes), (span.end_step - span.start_step) * global_batch, span.seed)


def _gather(batch, spans: list[PhaseSpan], paths: dict, sizes: dict, G: int, eos: int, pad: int, offset: int):
    pos = np.asarray(batch["id"], dtype=np.int64) + offset
    step = pos // G
    out: dict[str, list] = {"input_ids": [], "labels": [], "domain": [], "step": [], "slot": []}
    for span in spans:
        sel = (step >= span.start_step) & (step < span.end_step)
        if not sel.any():
            continue
        L = span.seq_len
        order = _phase_order(span, tuple(sizes[L]), G)
        p = pos[sel] - span.start_step * G
        a, b = int(p.min()), int(p.max()) + 1
        dom, seq = order.lookup(a, b)
        dom, seq = dom[p - a], seq[p - a]
        windows = np.empty((len(dom), L + 1), dtype=np.int32)
        for d in np.unique(dom):
            at = dom == d
            windows[at] = read_rows(paths[L][d], L + 1, seq[at])
        inputs, labels = inputs_and_labels(windows, eos, pad)
        out["input_ids"].append(inputs)
        out["labels"].append(labels)
        out["domain"].append(dom.astype(np.int64))
        out["step"].append(step[sel])
        out["slot"].append(pos[sel] % G)
    return {k: np.concatenate(v) for k, v in out.items()}


def eval_batches(prepared: PreparedData, domain: str, seq_len: int, batch_size: int, max_batches: int | None = None):
    """The held-out sequences of one domain, in a fixed order, as torch tensors (read from its shard,
    only as many as asked for)."""
    import torch

    n = prepared.counts[seq_len][domain]["eval"]
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    arr = read_range(prepared.shard("eval", seq_len, domain), seq_len + 1, 0, n)
    d = prepared.domains.index(domain)
    for start in range(0, len(arr), batch_size):
        x, y = inputs_and_labels(arr[start : start + batch_size], prepared.eos_id, prepared.pad_id)
        yield {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y),
               "domain": torch.full((len(x),), d, dtype=torch.int64)}
