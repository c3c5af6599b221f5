"""The data pipeline on Ray Data: corpus -> records -> tokens -> packed sequences per domain ->
the run's training order as a Dataset that Ray Train workers read with `get_dataset_shard`.

Design choices
- Preparation (`prepare_data`) is a Ray Data job: shards are read in parallel tasks (`flat_map`),
  tokenised in `map_batches`, grouped by domain and packed (`groupby().map_groups()`), with a
  held-out eval split per domain chosen by a stable hash of each document's place in the corpus.
  The packed sequences go to the object store, one array per (domain, split, seq_len); bad
  records are counted per domain and reason on the way.
- The training dataset (`train_dataset`) is `range(steps x global_batch)` mapped to sequences by
  the mixture order (mixture.py), so row p is always the same sequence: order depends only on
  (phase, seed, p). Every worker reads the same ordered stream (no split, `preserve_order`) and
  keeps its own fixed slice of each global batch (`rank_batches`): batches are reproducible, ranks
  are disjoint, and a resumed or resized run sees exactly the batches an uninterrupted one sees.
  (Ray Train's default split hands blocks to whichever worker asks first: not reproducible.)
- Limits, stated: packed arrays live in the object store, which suits the built-in corpus and
  corpora of some GB; larger corpora want pre-tokenised memory-mapped shards (not built yet).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from hydra_ray.config import HydraConfig
from hydra_ray.data.corpus import BAD_REASONS, CorpusError, list_corpus, read_records
from hydra_ray.data.mixture import PhaseOrder
from hydra_ray.data.packing import inputs_and_labels, pack
from hydra_ray.data.tokenizer import load_tokenizer


@dataclass
class PreparedData:
    domains: list[str]
    seq_lens: list[int]
    train: dict[int, dict[str, object]]  # seq_len -> domain -> ObjectRef of int32 [n, L+1]
    eval: dict[int, dict[str, object]]
    counts: dict[int, dict[str, dict[str, int]]]  # seq_len -> domain -> {"train": n, "eval": n}
    stats: dict[str, dict]  # domain -> documents, tokens, bad records by reason, examples
    tokenizer: str
    eos_id: int
    pad_id: int
    vocab_size: int
    extra: dict = field(default_factory=dict)

    def train_sizes(self, seq_len: int) -> list[int]:
        return [self.counts[seq_len][d]["train"] for d in self.domains]

    def report(self) -> str:
        lines = []
        for d in self.domains:
            s = self.stats.get(d, {})
            bad = {k: v for k, v in s.get("bad", {}).items() if v}
            seqs = ", ".join(f"L{L}: {self.counts[L][d]['train']} train / {self.counts[L][d]['eval']} eval"
                             for L in self.seq_lens)
            lines.append(f"  {d:<12} {s.get('documents', 0):6d} docs  {s.get('tokens', 0):9d} tokens  "
                         f"sequences {seqs}  bad records: {bad or 'none'}")
        return "\n".join(lines)


def required_domains(cfg: HydraConfig) -> list[str]:
    mixes = [cfg.data.mixture] + [p.mixture for p in cfg.curriculum.phases if p.mixture]
    return [d for d in cfg.model.domains if any(m.get(d, 0) > 0 for m in mixes)]


def builtin_corpus(cfg: HydraConfig, log=print) -> str:
    """The built-in corpus of the configured size, generated once into the cache folder."""
    from hydra_ray.data import builtin

    base = os.environ.get("HYDRA_CACHE_DIR") or cfg.data.cache_dir  # the env var wins (tests, CI)
    root = Path(base).expanduser() / f"builtin-{cfg.data.builtin_size}-seed{cfg.data.builtin_seed}"
    marker = root / "summary.json"
    if not marker.exists():
        log(f"[data] building the built-in corpus ({cfg.data.builtin_size}) in {root}")
        summary = builtin.prepare(root, cfg.data.builtin_size, cfg.data.builtin_seed, progress=False)
        marker.write_text(json.dumps(summary, indent=1))
    return str(root)


# --------------------------------------------------------------------------- Ray Data stages
def _read(row: dict, known: list[str]) -> Iterator[dict]:
    from hydra_ray.data.corpus import CorpusFile

    f = CorpusFile(row["domain"], row["path"], row["index"], row["root"])
    yield from read_records(f, set(known))


def _tokenize(batch, spec: str):
    tok = load_tokenizer(spec)
    texts = list(batch["text"])
    ok = [i for i, e in enumerate(batch["error"]) if e is None or (isinstance(e, float) and math.isnan(e))]
    ids = tok.encode_batch([texts[i] for i in ok]) if ok else []
    tokens = [np.zeros(0, dtype=np.int32)] * len(texts)
    for i, t in zip(ok, ids):
        tokens[i] = np.asarray(t, dtype=np.int32)
    batch = batch.drop(columns=["text"])
    batch["tokens"] = tokens
    return batch


def _eval_rank(domain: str, file: int, row: int) -> int:
    return int.from_bytes(hashlib.sha1(f"{domain}/{file}/{row}".encode()).digest()[:8], "big")


def _pack_domain(group, seq_lens: list[int], eval_fraction: float, eos: int, pad: int):
    import pandas as pd

    domain = group["domain"].iloc[0]
    group = group.sort_values(["file", "row"])
    errors = group["error"].where(group["error"].notna(), None)
    good = group[errors.isna()]
    bad = {r: int((errors == r).sum()) for r in BAD_REASONS}
    examples = [f"file {int(f)} row {int(r)}: {e}" for f, r, e in
                zip(group["file"], group["row"], errors) if e is not None][:5]
    keys = list(zip(good["file"].astype(int), good["row"].astype(int)))
    n_eval = 0
    if eval_fraction > 0 and len(keys) >= 2:
        n_eval = min(len(keys) - 1, max(1, round(eval_fraction * len(keys))))
    ranked = sorted(range(len(keys)), key=lambda i: _eval_rank(domain, *keys[i]))
    is_eval = np.zeros(len(keys), dtype=bool)
    is_eval[ranked[:n_eval]] = True
    docs = list(good["tokens"])
    rows = []
    for L in seq_lens:
        for split, sel in (("train", ~is_eval), ("eval", is_eval)):
            arr = pack([d for d, s in zip(docs, sel) if s], L, eos, pad)
            rows.append({"domain": domain, "split": split, "seq_len": L, "n": len(arr),
                         "data": arr.tobytes(), "stats": ""})
    stats = {"documents": len(keys), "eval_documents": n_eval, "tokens": int(sum(len(d) for d in docs)),
             "bad": bad, "bad_examples": examples}
    rows.append({"domain": domain, "split": "stats", "seq_len": 0, "n": 0, "data": b"", "stats": json.dumps(stats)})
    return pd.DataFrame(rows)


def prepare_data(cfg: HydraConfig, seq_lens: list[int] | None = None, log=print) -> PreparedData:
    """Read, tokenise and pack the configured corpus (a Ray Data job); needs ray.init()."""
    import ray

    domains = cfg.model.domains
    root = cfg.data.corpus or builtin_corpus(cfg, log)
    files = list_corpus(root, domains, required_domains(cfg))  # clear error before any Ray work
    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise CorpusError(f"tokenizer {tok.name} has {tok.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}")
    seq_lens = sorted(set(seq_lens or [p.seq_len or cfg.model.seq_len for p in cfg.curriculum.phases]))
    items = [{"domain": f.domain, "path": f.path, "index": f.index, "root": f.root}
             for fs in files.values() for f in fs]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
    ds = ds.flat_map(_read, fn_kwargs={"known": domains})
    ds = ds.map_batches(_tokenize, fn_kwargs={"spec": cfg.data.tokenizer}, batch_format="pandas", batch_size=64)
    ds = ds.groupby("domain").map_groups(
        _pack_domain, batch_format="pandas",
        fn_kwargs={"seq_lens": seq_lens, "eval_fraction": cfg.data.eval_fraction,
                   "eos": tok.eos_id, "pad": tok.pad_id})
    train = {L: {} for L in seq_lens}
    evals = {L: {} for L in seq_lens}
    counts = {L: {d: {"train": 0, "eval": 0} for d in domains} for L in seq_lens}
    stats: dict[str, dict] = {d: {"documents": 0, "tokens": 0, "bad": {r: 0 for r in BAD_REASONS}} for d in domains}
    for row in ds.iter_rows():
        d = row["domain"]
        if row["split"] == "stats":
            stats[d] = json.loads(row["stats"])
            continue
        L = int(row["seq_len"])
        arr = np.frombuffer(row["data"], dtype=np.int32).reshape(int(row["n"]), L + 1)
        (train if row["split"] == "train" else evals)[L][d] = ray.put(arr)
        counts[L][d][row["split"]] = int(row["n"])
    empty = [d for d in required_domains(cfg) if any(counts[L][d]["train"] == 0 for L in seq_lens)]
    if empty:
        raise CorpusError(f"no usable training text for domain(s) {', '.join(empty)} "
                          f"(every record was bad: {json.dumps({d: stats[d]['bad'] for d in empty})})")
    return PreparedData(domains, seq_lens, train, evals, counts, stats, cfg.data.tokenizer,
                        tok.eos_id, tok.pad_id, tok.vocab_size, {"corpus": root})


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


@functools.lru_cache(maxsize=64)
def _arrays(refs: tuple) -> list[np.ndarray]:
    import ray

    return ray.get(list(refs))


def _gather(batch, spans: list[PhaseSpan], refs: dict, sizes: dict, G: int, eos: int, pad: int, offset: int):
    pos = np.asarray(batch["id"], dtype=np.int64) + offset
    step = pos // G
    out: dict[str, list] = {"input_ids": [], "labels": [], "domain": [], "step": [], "slot": []}
    for span in spans:
        sel = (step >= span.start_step) & (step < span.end_step)
        if not sel.any():
            continue
        L = span.seq_len
        arrays = _arrays(tuple(refs[L]))
        order = _phase_order(span, tuple(sizes[L]), G)
        p = pos[sel] - span.start_step * G
        a, b = int(p.min()), int(p.max()) + 1
        dom, seq = order.lookup(a, b)
        dom, seq = dom[p - a], seq[p - a]
        windows = np.stack([arrays[d][s] for d, s in zip(dom, seq)])
        inputs, labels = inputs_and_labels(windows, eos, pad)
        out["input_ids"].append(inputs)
        out["labels"].append(labels)
        out["domain"].append(dom.astype(np.int64))
        out["step"].append(step[sel])
        out["slot"].append(pos[sel] % G)
    return {k: np.concatenate(v) for k, v in out.items()}


def train_dataset(prepared: PreparedData, cfg: HydraConfig, global_batch: int, start_step: int = 0,
                  end_step: int | None = None):
    """Rows [start_step * G, end_step * G) of the run's order as a Ray Dataset with columns
    input_ids, labels [L], domain, step, slot. All phases in the range must share one seq_len."""
    import ray

    end_step = cfg.curriculum.total_steps if end_step is None else end_step
    spans = [s for s in phase_spans(cfg) if s.end_step > start_step and s.start_step < end_step]
    lens = {s.seq_len for s in spans}
    if len(lens) != 1:
        raise ValueError(f"steps {start_step}..{end_step} span several seq_lens {sorted(lens)}: "
                         "build one dataset per seq_len")
    for s in spans:
        if any(w > 0 and n == 0 for w, n in zip(s.weights, prepared.train_sizes(s.seq_len))):
            raise CorpusError(f"a domain weighted in steps {s.start_step}..{s.end_step} has no sequences")
    refs = {L: [prepared.train[L][d] for d in prepared.domains] for L in lens}
    sizes = {L: prepared.train_sizes(L) for L in lens}
    n = (end_step - start_step) * global_batch
    ds = ray.data.range(n, override_num_blocks=max(1, min(64, n // max(global_batch, 1024) + 1)))
    ds = ds.map_batches(_gather, batch_format="numpy", batch_size=max(global_batch, 256),
                        fn_kwargs={"spans": spans, "refs": refs, "sizes": sizes, "G": global_batch,
                                   "eos": prepared.eos_id, "pad": prepared.pad_id,
                                   "offset": start_step * global_batch})
    ds.context.execution_options.preserve_order = True  # rows must arrive in position order
    return ds


def data_config():
    """Ray Train DataConfig for `train_dataset`: every worker reads the whole ordered stream (no
    split) and order is preserved, so `rank_batches` can take a fixed slice of each batch."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=[], execution_options=options)


def rank_batches(iterator, rank: int, world: int, global_batch: int, device="cpu", prefetch: int = 2):
    """This rank's fixed slice of every global batch, read in order from a dataset shard iterator
    (Ray Train: `get_dataset_shard(name)` of a dataset passed with `data_config()`)."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} does not divide over {world} workers")
    per = global_batch // world
    import torch

    for batch in iterator.iter_torch_batches(batch_size=global_batch, device=device, prefetch_batches=prefetch,
                                             dtypes=torch.int64, drop_last=False):
        steps, slots = batch["step"], batch["slot"]
        if len(slots) != global_batch or bool((steps != steps[0]).any()) or \
                not torch.equal(slots.cpu(), torch.arange(global_batch)):
            raise RuntimeError("training batches arrived out of order: pass the dataset with "
                               "hydra_ray.data.pipeline.data_config() (preserve_order, no split)")
        lo = rank * per
        yield {k: v[lo : lo + per] for k, v in batch.items()}


def eval_batches(prepared: PreparedData, domain: str, seq_len: int, batch_size: int, max_batches: int | None = None):
    """The held-out sequences of one domain, in a fixed order, as torch tensors."""
    import ray
    import torch

    ref = prepared.eval[seq_len].get(domain)
    if ref is None:
        return
    arr = ray.get(ref)
    for i, start in enumerate(range(0, len(arr), batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        x, y = inputs_and_labels(arr[start : start + batch_size], prepared.eos_id, prepared.pad_id)
        d = prepared.domains.index(domain)
        yield {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y),
               "domain": torch.full((len(x),), d, dtype=torch.int64)}
