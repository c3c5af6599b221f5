"""The data pipeline on Ray Data: corpus -> records -> tokens -> packed sequences per domain ->
the run's training order as a Dataset that Ray Train workers read with `get_dataset_shard`.

Design choices
- Preparation (`prepare_data`) is a Ray Data job: shards are read in parallel tasks (one file per
  `map_batches` call), tokenised in `map_batches`, grouped by domain and packed
  (`groupby().map_groups()`) in corpus order, with a held-out eval split per domain chosen by a
  stable hash of each document's text (`_eval_rank`). The packed sequences go to the object store,
  one array per (domain, split, seq_len); bad records (corpus.py) are counted per domain and reason
  on the way. A corpus with bad records therefore packs to exactly the sequences of the same
  corpus without them, and every stage has a fixed pyarrow schema.
- No silent empty run: a domain that a mixture weights but whose good documents give no tokens or
  no training sequence is a CorpusError naming it and its bad records, before any training step.
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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from hydra_ray.config import HydraConfig
from hydra_ray.data.corpus import BAD_REASONS, RECORD_SCHEMA, CorpusError, CorpusFile, list_corpus, read_records
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
    stats: dict[str, dict]  # domain -> documents, tokens, bad records by reason, one example of each
    tokenizer: str
    eos_id: int
    pad_id: int
    vocab_size: int
    extra: dict = field(default_factory=dict)

    def train_sizes(self, seq_len: int) -> list[int]:
        return [self.counts[seq_len][d]["train"] for d in self.domains]

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
    root = Path(base).expanduser() / f"builtin-{cfg.data.builtin_size}-seed{cfg.data.builtin_seed}"
    marker = root / "summary.json"
    if not marker.exists():
        log(f"[data] building the built-in corpus ({cfg.data.builtin_size}) in {root}")
        summary = builtin.prepare(root, cfg.data.builtin_size, cfg.data.builtin_seed, progress=False)
        marker.write_text(json.dumps(summary, indent=1))
    return str(root)


# --------------------------------------------------------------------------- Ray Data stages
# Every stage returns pyarrow tables of a fixed schema, never types inferred per batch: blocks from
# files with and without bad records must concatenate (an all-good block once had a null-typed
# `error` column), and tokens are a plain list<int32> column.
TOKENS_SCHEMA = pa.schema([("domain", pa.string()), ("file", pa.int64()), ("row", pa.int64()),
                          ("error", pa.string()), ("key", pa.int64()), ("tokens", pa.list_(pa.int32()))])


def _read(batch: pa.Table, known: list[str]) -> Iterator[pa.Table]:
    """Shard rows (batch_size=1) -> records of RECORD_SCHEMA, a few thousand at a time."""
    for item in batch.to_pylist():
        f = CorpusFile(item["domain"], item["path"], item["index"], item["root"])
        rows = []
        for rec in read_records(f, set(known)):
            rows.append(rec)
            if len(rows) == 4096:
                yield pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def _tokenize(batch: pa.Table, spec: str, sha256: str | None = None) -> pa.Table:
    """Records -> TOKENS_SCHEMA: the tokens and eval key of good records; bad ones keep their row
    (to be counted) with no tokens."""
    tok = load_tokenizer(spec, sha256)
    texts = batch.column("text").to_pylist()
    ok = [i for i, e in enumerate(batch.column("error").to_pylist()) if e == ""]
    ids = dict(zip(ok, tok.encode_batch([texts[i] for i in ok]) if ok else []))
    lengths = np.array([len(ids.get(i, ())) for i in range(len(texts))], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate([np.asarray(ids[i], dtype=np.int32) for i in ok] or [np.zeros(0, np.int32)])
    keys = [_eval_rank(texts[i]) if i in ids else 0 for i in range(len(texts))]
    return pa.table([batch.column("domain"), batch.column("file"), batch.column("row"), batch.column("error"),
                     pa.array(keys, pa.int64()), pa.ListArray.from_arrays(offsets, values)], schema=TOKENS_SCHEMA)


def _eval_rank(text: str) -> int:
    """A document's place in the eval ranking: a stable hash of its text. Not of its place in the
    corpus: bad records, renamed or reordered files would move documents between train and eval.
    Exact duplicates share a key, so they sit side by side (one split unless the cut falls between)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8", errors="replace")).digest()[:8], "big", signed=True)


def _pack_domain(group, seq_lens: list[int], eval_fraction: float, eos: int, pad: int):
    import pandas as pd

    domain = group["domain"].iloc[0]
    group = group.sort_values(["file", "row"], kind="stable")  # corpus order: what packing follows
    error = group["error"].fillna("").to_numpy(dtype=object)  # never null (TOKENS_SCHEMA); "" is good
    tokens = group["tokens"].to_numpy(dtype=object)
    # a good text the tokenizer maps to no tokens would pack to EOS-only windows whose labels are
    # all ignored (a NaN loss): it counts as empty_text
    error[(error == "") & (np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens)) == 0)] = "empty_text"
    good = error == ""
    bad = {r: int((error == r).sum()) for r in BAD_REASONS}
    examples = {}  # the first record of each reason, to show where to look
    for f, r, e in zip(group["file"].to_numpy()[~good], group["row"].to_numpy()[~good], error[~good]):
        examples.setdefault(e, [int(f), int(r), e])
    docs, keys = list(tokens[good]), group["key"].to_numpy()[good]
    n_eval = 0
    if eval_fraction > 0 and len(docs) >= 2:
        n_eval = min(len(docs) - 1, max(1, round(eval_fraction * len(docs))))
    is_eval = np.zeros(len(docs), dtype=bool)
    is_eval[np.lexsort((np.arange(len(docs)), keys))[:n_eval]] = True  # by key; ties by corpus order
    rows = []
    for L in seq_lens:
        for split, sel in (("train", ~is_eval), ("eval", is_eval)):
            arr = pack([d for d, s in zip(docs, sel) if s], L, eos, pad)
            rows.append({"domain": domain, "split": split, "seq_len": L, "n": len(arr),
                         "data": arr.tobytes(), "stats": ""})
    stats = {"documents": len(docs), "eval_documents": n_eval, "tokens": int(sum(len(d) for d in docs)),
             "bad": bad, "bad_examples": [examples[r] for r in BAD_REASONS if r in examples]}
    rows.append({"domain": domain, "split": "stats", "seq_len": 0, "n": 0, "data": b"", "stats": json.dumps(stats)})
    return pd.DataFrame(rows)


def _bad_summary(bad: dict[str, int]) -> str:
    """Like "3 (malformed 2, empty_text 1)", or "none"."""
    shown = ", ".join(f"{r} {n}" for r, n in bad.items() if n)
    return f"{sum(bad.values())} ({shown})" if shown else "none"


def _where(path: str, row: int) -> str:
    if row < 0:
        return path
    return f"{path} row {row}" if path.endswith(".parquet") else f"{path} line {row}"


def prepare_data(cfg: HydraConfig, seq_lens: list[int] | None = None, log=print) -> PreparedData:
    """Read, tokenise and pack the configured corpus (a Ray Data job); needs ray.init()."""
    import ray

    domains = cfg.model.domains
    root = cfg.data.corpus or builtin_corpus(cfg, log)
    weighted = required_domains(cfg)
    files = list_corpus(root, domains, weighted)  # clear error before any Ray work
    try:
        tok = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_sha256)
    except ValueError as e:
        raise CorpusError(str(e)) from None
    if tok.vocab_size > cfg.model.vocab_size:
        raise CorpusError(f"tokenizer {tok.name} has {tok.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}")
    seq_lens = sorted(set(seq_lens or [p.seq_len or cfg.model.seq_len for p in cfg.curriculum.phases]))
    items = [{"domain": f.domain, "path": f.path, "index": f.index, "root": f.root}
             for fs in files.values() for f in fs]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
    ds = ds.map_batches(_read, fn_kwargs={"known": domains}, batch_format="pyarrow", batch_size=1)
    ds = ds.map_batches(_tokenize, fn_kwargs={"spec": cfg.data.tokenizer, "sha256": cfg.data.tokenizer_sha256}, batch_format="pyarrow", batch_size=64)
    ds = ds.groupby("domain").map_groups(
        _pack_domain, batch_format="pandas",
        fn_kwargs={"seq_lens": seq_lens, "eval_fraction": cfg.data.eval_fraction,
                   "eos": tok.eos_id, "pad": tok.pad_id})
    train = {L: {} for L in seq_lens}
    evals = {L: {} for L in seq_lens}
    counts = {L: {d: {"train": 0, "eval": 0} for d in domains} for L in seq_lens}
    stats: dict[str, dict] = {d: {"documents": 0, "eval_documents": 0, "tokens": 0,
                                  "bad": dict.fromkeys(BAD_REASONS, 0), "bad_examples": []} for d in domains}
    for row in ds.iter_rows():
        d = row["domain"]
        if row["split"] == "stats":
            stats[d] = json.loads(row["stats"])
            stats[d]["bad_examples"] = [_where(files[d][f].path, r) + f": {e}" for f, r, e in stats[d]["bad_examples"]]
            continue
        L = int(row["seq_len"])
        arr = np.frombuffer(row["data"], dtype=np.int32).reshape(int(row["n"]), L + 1)
        (train if row["split"] == "train" else evals)[L][d] = ray.put(arr)
        counts[L][d][row["split"]] = int(row["n"])
    # no silent empty run: a weighted domain without tokens would train on nothing (or NaN)
    empty = [d for d in weighted if stats[d]["tokens"] == 0 or any(counts[L][d]["train"] == 0 for L in seq_lens)]
    if empty:
        raise CorpusError("no usable training text for domain(s) weighted by the mixture: " + "; ".join(
            f"{d} ({stats[d]['documents']} good documents, bad records: {_bad_summary(stats[d]['bad'])}"
            + (f", e.g. {stats[d]['bad_examples'][0]}" if stats[d]["bad_examples"] else "") + ")" for d in empty))
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
