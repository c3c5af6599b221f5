"""Packed token shards: the on-storage form of a packed corpus, and how it is read back.

Design choices
- One flat file per (domain, split, seq_len), `DOMAIN/SPLIT-L{seq_len}.bin`: int32 rows of
  seq_len + 1 tokens, little-endian, no header (Megatron-style fixed-width rows: no offsets table
  is needed). Row p lives at bytes [p * 4 * (L+1), (p+1) * 4 * (L+1)), so a reader fetches any
  row with one ranged read, or memory-maps a local file, without reading the rest.
- `manifest.json`, written last, describes a complete pack: the corpus fingerprint, the tokenizer
  hash, seq_lens, eval fraction, and per shard its rows, bytes and sha256. A folder without a
  manifest is an unfinished pack and is never read.
- Writers stream (a local file or an object-store multipart upload) and hash as they go, so a
  shard of any size costs a bounded buffer.
"""

from __future__ import annotations

import functools
import hashlib
import json

import numpy as np

from hydra_ray import storage as st

FORMAT = "hydra-packed-v1"
MANIFEST = "manifest.json"
DTYPE = np.dtype("<i4")


class ShardError(ValueError):
    """A packed shard is missing or no longer matches its manifest."""


def shard_name(domain: str, split: str, seq_len: int) -> str:
    return f"{domain}/{split}-L{seq_len}.bin"


class ShardWriter:
    """Appends int32 windows [n, L+1] to one shard, hashing as it writes."""

    def __init__(self, root: str, domain: str, split: str, seq_len: int):
        self.name, self.width = shard_name(domain, split, seq_len), seq_len + 1
        fs, path = st.resolve(st.join(root, self.name))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        self._out = fs.open_output_stream(path)
        self._sha = hashlib.sha256()
        self.rows = 0

    def write(self, windows: np.ndarray) -> None:
        if len(windows):
            data = np.ascontiguousarray(windows, dtype=DTYPE).tobytes()
            self._out.write(data)
            self._sha.update(data)
            self.rows += len(windows)

    def close(self) -> dict:
        self._out.close()
        return {"rows": self.rows, "width": self.width, "bytes": self.rows * self.width * DTYPE.itemsize,
                "sha256": self._sha.hexdigest()}


def read_manifest(root: str) -> dict | None:
    """The manifest of a complete pack at `root`, or None."""
    path = st.join(root, MANIFEST)
    if not st.is_file(path):
        return None
    manifest = json.loads(st.read_text(path))
    return manifest if manifest.get("format") == FORMAT else None


def verify(root: str, manifest: dict) -> None:
    """Every shard of the manifest exists with its size and sha256; else ShardError naming it.
    Shards are hashed on a few threads (hashlib releases the GIL on large buffers)."""
    from concurrent.futures import ThreadPoolExecutor

    def check(item) -> None:
        name, meta = item
        path = st.join(root, name)
        fs, p = st.resolve(path)
        info = fs.get_file_info(p)
        if info.size is None or info.type.name != "File":
            raise ShardError(f"packed shard {path} is missing (re-pack with `hydra-ray data pack`)")
        if info.size != meta["bytes"]:
            raise ShardError(f"packed shard {path} has {info.size} bytes, its manifest says {meta['bytes']}")
        sha = hashlib.sha256()
        with fs.open_input_stream(p) as fh:
            while chunk := fh.read(8 << 20):
                sha.update(chunk)
        if sha.hexdigest() != meta["sha256"]:
            raise ShardError(f"packed shard {path} does not match the sha256 in its manifest (changed since "
                             "it was packed)")

    items = [(f"{domain}/{key}.bin", meta) for domain, shards in manifest["shards"].items()
             for key, meta in shards.items()]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in pool.map(check, items):  # the first failure raises, in manifest order
            pass


@functools.lru_cache(maxsize=64)
def _open(path: str, width: int):
    """A local shard as a read-only memory map [rows, width]; a remote one as a random-access file."""
    fs, p = st.resolve(path)
    if st.is_local(path):
        size = fs.get_file_info(p).size
        if size == 0:
            return np.zeros((0, width), dtype=DTYPE)
        return np.memmap(p, dtype=DTYPE, mode="r", shape=(size // (width * DTYPE.itemsize), width))
    return fs.open_input_file(p)


def read_rows(path: str, width: int, rows: np.ndarray) -> np.ndarray:
    """int32 [len(rows), width]: the given rows of one shard (ranged reads; a memory map locally)."""
    rows = np.asarray(rows, dtype=np.int64)
    src = _open(path, width)
    if isinstance(src, np.ndarray):
        return np.asarray(src[rows])
    nbytes = width * DTYPE.itemsize
    out = np.empty((len(rows), width), dtype=DTYPE)
    for i, r in enumerate(rows):
        out[i] = np.frombuffer(src.read_at(nbytes, int(r) * nbytes), dtype=DTYPE)
    return out


def read_range(path: str, width: int, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of one shard with a single read."""
    src = _open(path, width)
    if isinstance(src, np.ndarray):
        return np.array(src[start:stop])
    nbytes = width * DTYPE.itemsize
    data = src.read_at((stop - start) * nbytes, start * nbytes) if stop > start else b""
    return np.frombuffer(data, dtype=DTYPE).reshape(-1, width)
