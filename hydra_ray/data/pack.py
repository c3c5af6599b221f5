"""Packing a corpus once into token shards (`hydra-ray data pack`), and reusing the result.

Design choices
- Two stages, both bounded in memory whatever the corpus size; nothing is collected on the driver
  but per-file counts, and nothing goes through the object store.
  1. A Ray Data job over the corpus files: each file is read, checked and tokenised in chunks of
     4096 records, and every chunk's good documents are spilled to the packer's own `_work-*/`
     folder under the output (their tokens, and the eval key of each: a stable hash of its text).
     Files run in parallel; bad records are counted per file by reason.
  2. One Ray task per domain reads its chunks back in corpus order (file, then row): first the
     eval keys only, to choose the held-out documents (the `eval_fraction` smallest keys, ties by
     corpus order: the same rule as ever, one 8-byte key per document in memory), then the tokens,
     packing train and eval documents into windows (`StreamPacker`) that stream into the shards.
  Without a running Ray (the smoke run) both stages run in this process, with the same functions.
- The output is complete when `manifest.json` is written (shards.py). The cache folder of a pack
  is named by the pack key: a hash of the corpus fingerprint (every file's path, size and
  modification time), the tokenizer's sha256, seq_lens, eval fraction and the format. A changed
  corpus, tokenizer or seq_len gives another key and a new pack; stale data is never read. A local
  cache is packed under a temporary name and renamed into place, so two runs packing the same
  corpus at once cannot corrupt it (the second rename loses and its copy is dropped).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid

import numpy as np
import pyarrow as pa

from hydra_ray import storage as st
from hydra_ray.data import shards as sh
from hydra_ray.data.corpus import BAD_REASONS, CorpusError, CorpusFile, list_corpus, read_records
from hydra_ray.data.packing import StreamPacker
from hydra_ray.data.tokenizer import load_tokenizer

CHUNK = 4096  # records per tokenised chunk


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _load(path: str) -> np.ndarray:
    return np.load(io.BytesIO(st.read_bytes(path)), allow_pickle=False)


def eval_rank(text: str) -> int:
    """A document's place in the eval ranking: a stable hash of its text. Not of its place in the
    corpus: bad records, renamed or reordered files would move documents between train and eval.
    Exact duplicates share a key, so they sit side by side (one split unless the cut falls between)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8", errors="replace")).digest()[:8], "big", signed=True)


# --------------------------------------------------------------------------- stage 1 (Ray Data)
def _tokenize_file(batch: pa.Table, known: list[str], spec: str, sha256: str | None, work: str,
                   text_field: str = "text") -> pa.Table:
    """One corpus file (batch_size=1) -> its chunks spilled to `work`, and one row of counts."""
    item = batch.to_pylist()[0]
    f = CorpusFile(item["domain"], item["path"], item["index"], item["root"])
    tok = load_tokenizer(spec, sha256)
    bad = dict.fromkeys(BAD_REASONS, 0)
    examples: dict[str, list] = {}
    chunks = docs = tokens = 0
    pending: list[dict] = []

    def spill(records: list[dict]) -> None:
        nonlocal chunks, docs, tokens
        texts = [r["text"] for r in records if not r["error"]]
        ids = tok.encode_batch(texts) if texts else []
        keep = []
        for text, t, rec in zip(texts, ids, (r for r in records if not r["error"])):
            if len(t):
                keep.append((text, t))
            else:  # a good text the tokenizer maps to nothing would pack to label-less windows
                bad["empty_text"] += 1
                examples.setdefault("empty_text", [f.index, rec["row"], "empty_text"])
        for r in records:
            if r["error"]:
                bad[r["error"]] += 1
                examples.setdefault(r["error"], [f.index, r["row"], r["error"]])
        if not keep:
            return
        lengths = np.array([len(t) for _, t in keep], dtype=np.int32)
        stem = st.join(work, f"{f.domain}/{f.index:07d}-{chunks:07d}")
        st.write_bytes(stem + ".keys.npy", _npy(np.array([eval_rank(x) for x, _ in keep], dtype=np.int64)))
        st.write_bytes(stem + ".lengths.npy", _npy(lengths))
        st.write_bytes(stem + ".tokens.npy", _npy(np.concatenate([np.asarray(t, dtype=np.int32) for _, t in keep])))
        chunks += 1
        docs += len(keep)
        tokens += int(lengths.sum())

    for rec in read_records(f, set(known), text_field):
        pending.append(rec)
        if len(pending) == CHUNK:
            spill(pending)
            pending = []
    if pending:
        spill(pending)
    return pa.table({"domain": [f.domain], "file": [f.index], "chunks": [chunks], "documents": [docs],
                     "tokens": [tokens], "bad": [json.dumps(bad)], "examples": [json.dumps(list(examples.values()))]})


# --------------------------------------------------------------------------- stage 2 (a task per domain)
def _pack_domain(domain: str, chunks: list[str], out: str, seq_lens: list[int], eval_fraction: float,
                 eos: int, pad: int) -> dict:
    """Chunk stems of one domain, in corpus order -> its shards (train and eval per seq_len)."""
    keys = np.concatenate([_load(c + ".keys.npy") for c in chunks]) if chunks else np.zeros(0, np.int64)
    n = len(keys)
    n_eval = min(n - 1, max(1, round(eval_fraction * n))) if eval_fraction > 0 and n >= 2 else 0
    is_eval = np.zeros(n, dtype=bool)
    is_eval[np.lexsort((np.arange(n), keys))[:n_eval]] = True  # by key; ties by corpus order
    del keys
    writers = {(s, L): sh.ShardWriter(out, domain, s, L) for L in seq_lens for s in ("train", "eval")}
    packers = {k: StreamPacker(k[1], eos, pad, w.write) for k, w in writers.items()}
    at = 0
    for c in chunks:
        lengths, tokens = _load(c + ".lengths.npy"), _load(c + ".tokens.npy")
        ends = np.cumsum(lengths)
        for i, end in enumerate(ends):
            split = "eval" if is_eval[at + i] else "train"
            doc = tokens[end - lengths[i]:end]
            for L in seq_lens:
                packers[(split, L)].add(doc)
        at += len(lengths)
    for p in packers.values():
        p.close()
    shards = {f"{s}-L{L}": w.close() for (s, L), w in writers.items()}
    return {"domain": domain, "documents": n, "eval_documents": n_eval, "shards": shards}


# --------------------------------------------------------------------------- the whole job
def fingerprint(files: dict[str, list[CorpusFile]]) -> list[list]:
    """[domain, path, size, mtime_ns] of every corpus file, in corpus order (from the listing:
    no request per file)."""
    return [[d, f.path, f.size, f.mtime_ns] for d, fs_ in files.items() for f in fs_]


def pack_key(fp: list, tokenizer_sha: str, seq_lens: list[int], eval_fraction: float, domains: list[str],
             text_field: str = "text") -> str:
    blob = json.dumps({"format": sh.FORMAT, "files": fp, "tokenizer": tokenizer_sha, "seq_lens": sorted(seq_lens),
                       "eval_fraction": eval_fraction, "domains": domains, "text_field": text_field}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenizer_sha(spec: str, sha256: str | None) -> str:
    if spec == "byte":
        return "byte"
    return sha256 or hashlib.sha256(st.read_bytes(spec)).hexdigest()


def run_pack(out: str, files: dict[str, list[CorpusFile]], domains: list[str], seq_lens: list[int],
             eval_fraction: float, spec: str, sha256: str | None, header: dict, text_field: str = "text") -> dict:
    """Pack `files` into `out` (a local folder or URI); returns the manifest (written last)."""
    try:
        import ray
    except ImportError:  # a machine without Ray (the GPU check's): pack in this process
        ray = None
    tok = load_tokenizer(spec, sha256)
    work = st.join(out, f"_work-{uuid.uuid4().hex[:12]}")  # this packer's own: another may pack here too
    items = [{"domain": f.domain, "path": f.path, "index": f.index, "root": f.root}
             for fs_ in files.values() for f in fs_]
    counts = []
    kwargs = {"known": domains, "spec": spec, "sha256": sha256, "work": work, "text_field": text_field}
    on_ray = ray is not None and ray.is_initialized()  # else in this process, one file after another (smoke runs, small corpora)
    if items and on_ray:
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 256)))
        ds = ds.map_batches(_tokenize_file, batch_size=1, batch_format="pyarrow", fn_kwargs=kwargs)
        counts = list(ds.iter_rows())  # one small row per corpus file
    elif items:
        counts = [row for it in items for row in _tokenize_file(pa.Table.from_pylist([it]), **kwargs).to_pylist()]
    per_file = {(r["domain"], r["file"]): r for r in counts}
    task = ray.remote(num_cpus=1)(_pack_domain).remote if on_ray else _pack_domain
    refs = []
    for d in domains:
        stems = [st.join(work, f"{d}/{f.index:07d}-{c:07d}") for f in files.get(d, [])
                 for c in range(per_file.get((d, f.index), {}).get("chunks", 0))]
        refs.append(task(d, stems, out, seq_lens, eval_fraction, tok.eos_id, tok.pad_id))
    if on_ray:
        try:
            refs = ray.get(refs)
        except BaseException:  # one domain failed (or Ctrl-C): stop the others writing into `out`
            for ref in refs:
                ray.cancel(ref, force=True)
            ray.wait(refs, num_returns=len(refs), timeout=60)
            raise
    packed = {r["domain"]: r for r in refs}
    stats = {}
    for d in domains:
        rows = sorted((r for r in counts if r["domain"] == d), key=lambda r: r["file"])
        bad = dict.fromkeys(BAD_REASONS, 0)
        examples: dict[str, str] = {}
        for r in rows:
            for k, v in json.loads(r["bad"]).items():
                bad[k] += v
            for f_index, row, reason in json.loads(r["examples"]):
                path = files[d][f_index].path
                where = path if row < 0 else f"{path} row {row}" if path.endswith(".parquet") else f"{path} line {row}"
                examples.setdefault(reason, f"{where}: {reason}")
        stats[d] = {"documents": packed[d]["documents"], "eval_documents": packed[d]["eval_documents"],
                    "tokens": sum(r["tokens"] for r in rows), "bad": bad,
                    "bad_examples": [examples[r] for r in BAD_REASONS if r in examples]}
    st.delete_dir(work)
    manifest = {**header, "format": sh.FORMAT, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                "vocab_size": tok.vocab_size, "tokenizer_name": tok.name,
                "shards": {d: packed[d]["shards"] for d in domains}, "stats": stats}
    st.write_text(st.join(out, sh.MANIFEST), json.dumps(manifest, indent=1))
    return manifest


def ensure_packed(cfg, seq_lens: list[int], corpus: str, cache_root: str, log=print,
                  out: str | None = None, before_pack=None) -> tuple[str, dict]:
    """The packed data of `cfg` as (root, manifest): `data.packed` when set, else the cache entry of
    this corpus, tokenizer and seq_lens (or the folder `out`), packed now unless it holds this very
    pack already (`before_pack()`, if given, runs first). Shards are verified (sizes and sha256)
    before they are used. Raises CorpusError (also for bad shards)."""
    domains = cfg.model.domains
    if cfg.data.packed and out is None:
        root = cfg.data.packed
        manifest = sh.read_manifest(root)
        if manifest is None:
            raise CorpusError(f"data.packed: {root} holds no complete pack (no {sh.MANIFEST}); "
                              "write one with `hydra-ray data pack --config C --out URI`")
        want = tokenizer_sha(cfg.data.tokenizer, cfg.data.tokenizer_sha256)
        if manifest["tokenizer_sha256"] != want:
            raise CorpusError(f"data.packed: {root} was packed with another tokenizer than data.tokenizer")
        missing = sorted(set(seq_lens) - set(manifest["seq_lens"])) + sorted(set(domains) - set(manifest["domains"]))
        if missing:
            raise CorpusError(f"data.packed: {root} has no shards for {missing} (packed for seq_lens "
                              f"{manifest['seq_lens']} and domains {manifest['domains']}); pack again")
        _verify(root, manifest)
        log(f"[data] using packed data {root} (fingerprint {manifest['key'][:12]})")
        return root, manifest
    from hydra_ray.data.pipeline import required_domains

    files = list_corpus(corpus, domains, required_domains(cfg))
    header = pack_header(cfg, files, seq_lens, corpus)
    root = out or st.join(cache_root, header["key"])
    manifest = sh.read_manifest(root)
    if manifest is not None and manifest.get("key") == header["key"]:
        _verify(root, manifest)
        log(f"[data] reusing packed data {root} (fingerprint {header['key'][:12]})")
        return root, manifest
    if before_pack is not None:
        before_pack()
    log(f"[data] packing {corpus} into {root} (fingerprint {header['key'][:12]})")
    if out is not None:  # a folder of the user's: its old pack (another corpus or tokenizer) goes first
        if manifest is not None:
            st.delete(st.join(out, sh.MANIFEST))
        manifest = run_pack(out, files, domains, seq_lens, cfg.data.eval_fraction, cfg.data.tokenizer,
                            cfg.data.tokenizer_sha256, header, cfg.data.text_field)
    elif st.is_local(root):
        tmp = f"{root}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            manifest = run_pack(tmp, files, domains, seq_lens, cfg.data.eval_fraction, cfg.data.tokenizer,
                                cfg.data.tokenizer_sha256, header, cfg.data.text_field)
        except BaseException:  # a failed or interrupted pack leaves no copy of the corpus in the cache
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.isdir(root) and sh.read_manifest(root) is None:  # a stale, incomplete folder
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:  # another run finished the same pack first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
            manifest = sh.read_manifest(root)
            if manifest is None:
                raise CorpusError(f"cannot move the pack into {root} (a folder is in the way); remove it") from None
    else:
        manifest = run_pack(root, files, domains, seq_lens, cfg.data.eval_fraction, cfg.data.tokenizer,
                            cfg.data.tokenizer_sha256, header, cfg.data.text_field)
    return root, manifest


def pack_header(cfg, files, seq_lens: list[int], corpus: str) -> dict:
    tsha = tokenizer_sha(cfg.data.tokenizer, cfg.data.tokenizer_sha256)
    fp = fingerprint(files)
    return {"key": pack_key(fp, tsha, seq_lens, cfg.data.eval_fraction, cfg.model.domains, cfg.data.text_field),
            "corpus": corpus, "text_field": cfg.data.text_field,
            "fingerprint": fp, "tokenizer_sha256": tsha, "seq_lens": sorted(seq_lens),
            "eval_fraction": cfg.data.eval_fraction, "domains": list(cfg.model.domains),
            "builtin_seed": cfg.data.builtin_seed if cfg.data.corpus is None else None}


def _verify(root: str, manifest: dict) -> None:
    try:
        sh.verify(root, manifest)
    except sh.ShardError as e:
        raise CorpusError(str(e)) from None
