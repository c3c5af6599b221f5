"""Reading a domain-tagged corpus: one folder per domain, JSONL (plain, `.gz` or `.zst`) or
Parquet shards with a `text` field (and optionally `domain`), on a local path or any pyarrow
filesystem URI (s3://, gs://, ...).

Design choices
- The folder names the domain. A record's own `domain` field (FineFineWeb-style corpora carry
  both), when present, must name that folder's domain; it never moves a record elsewhere.
  Folders that no configured domain names, and files in a domain folder that are not shards, are
  ignored with a warning (names starting with "." or "_", such as Spark's `_SUCCESS`, quietly).
- A bad record never stops a run and never costs a good one: each is counted under exactly one
  reason of BAD_REASONS (the first that applies, in that order) and skipped, and the place of the
  first record of each reason is reported. Record reasons: `malformed` (not JSON, or not a JSON object), `missing_text`
  (no `text` field, or null: Parquet has no other way to say "missing"), `text_not_string`,
  `empty_text` (empty or whitespace only), `unknown_domain` (a `domain` value that names no
  configured domain: a typo, or a domain to add to model.domains) and `domain_mismatch` (another
  configured domain: a record filed in the wrong folder). The last two are separate reasons
  because they ask for different fixes. File reasons, counted once per file: `unreadable_file`
  (nothing could be read: cannot open, not Parquet, not gzip) and `truncated_file` (the file
  breaks off part-way: every complete record before the damage is kept). Blank lines are no
  records and are not counted.
- Records have one fixed shape (RECORD_SCHEMA: `error` is "" for a good record, `text` is "" for
  a bad one), so Ray Data blocks from files with and without errors always concatenate.
- Compressed JSONL is streamed through pyarrow (`compression="detect"` picks the codec from the
  suffix), never read whole into memory.
- `list_corpus` runs on the driver before any Ray work, so a config that names a domain with no
  data fails at once with a clear message.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

from hydra_ray import storage

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".jsonl.zst")
SUFFIXES = JSONL_SUFFIXES + (".parquet",)
BAD_REASONS = ("unreadable_file", "truncated_file", "malformed", "missing_text", "text_not_string", "empty_text",
               "unknown_domain", "domain_mismatch")
# row: the record's 1-based line in a JSONL file or 0-based row in a Parquet file (-1: the file)
RECORD_SCHEMA = pa.schema([("domain", pa.string()), ("file", pa.int64()), ("row", pa.int64()),
                           ("text", pa.string()), ("error", pa.string())])
_CHUNK = 1 << 20  # bytes of decompressed JSONL per read; Parquet rows per batch below


class CorpusError(ValueError):
    """The corpus cannot serve the configured domains (reported before any work starts)."""


@dataclass(frozen=True)
class CorpusFile:
    domain: str
    path: str  # path inside the filesystem
    index: int  # position in the sorted listing of its domain
    root: str  # the corpus URI, to reopen the filesystem in a worker
    size: int = -1  # bytes and modification time from the listing (the pack's fingerprint)
    mtime_ns: int = -1


def list_corpus(root: str, domains: list[str], required: list[str] | None = None) -> dict[str, list[CorpusFile]]:
    """Sorted shards per configured domain. `required` domains (those with mixture weight > 0)
    must have at least one shard, else CorpusError."""
    import pyarrow.fs as pafs

    try:
        fs, base = storage.resolve(root)
        info = fs.get_file_info(base)
    except Exception as e:  # pyarrow raises several types for bad URIs
        raise CorpusError(f"corpus {root!r}: cannot open ({e})") from None
    if info.type != pafs.FileType.Directory:
        raise CorpusError(f"corpus {root!r}: not a folder (expected one sub-folder per domain)")
    found: dict[str, list[CorpusFile]] = {d: [] for d in domains}
    ignored, skipped = [], {}
    for entry in fs.get_file_info(pafs.FileSelector(base, recursive=False)):
        if entry.type != pafs.FileType.Directory:
            continue
        name = entry.base_name
        if name not in found:
            ignored.append(name)
            continue
        files = [f for f in fs.get_file_info(pafs.FileSelector(entry.path, recursive=True))
                 if f.type == pafs.FileType.File and not f.base_name.startswith((".", "_"))]
        shards = sorted((f for f in files if f.path.endswith(SUFFIXES)), key=lambda f: f.path)
        skipped[name] = sorted(f.base_name for f in files if not f.path.endswith(SUFFIXES))
        found[name] = [CorpusFile(name, f.path, i, root, f.size if f.size is not None else -1,
                                  f.mtime_ns if f.mtime_ns is not None else -1) for i, f in enumerate(shards)]
    if ignored:
        log.warning("corpus %s: ignoring folders that name no configured domain: %s", root, ", ".join(sorted(ignored)))
    for name, names in skipped.items():
        if names:
            log.warning("corpus %s/%s: ignoring %d file(s) that are not %s: %s", root, name, len(names),
                        " / ".join(SUFFIXES), ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""))
    missing = [d for d in (required or domains) if not found.get(d)]
    if missing:
        also = "; ".join(f"{d}/ holds only {', '.join(skipped[d][:3])}" for d in missing if skipped.get(d))
        raise CorpusError(
            f"corpus {root!r} has no data for domain(s) {', '.join(missing)} named by the config "
            f"(expected {root}/<domain>/*.jsonl[.gz|.zst] or *.parquet{'; ' + also if also else ''})"
        )
    return found


class _Damaged(Exception):
    """A compressed stream that broke off after `good` decoded bytes."""

    def __init__(self, cause: Exception, good: int):
        super().__init__(str(cause))
        self.good = good


def _decoded(fs, path: str) -> Iterator[bytes]:
    """The file's (decompressed) bytes in chunks; raises _Damaged after the last good byte.
    pyarrow drops the output of a read that runs into damage, so that stretch is read again a
    byte at a time (a damaged file only): no complete record before the damage is lost."""
    done = 0
    try:
        with fs.open_input_stream(path, compression="detect") as fh:
            while data := fh.read(_CHUNK):
                done += len(data)
                yield data
        return
    except OSError as e:
        cause = e
    tail = bytearray()
    try:
        with fs.open_input_stream(path, compression="detect") as fh:
            left = done
            while left > 0:
                left -= len(fh.read(min(left, _CHUNK)))
            while len(tail) < _CHUNK and (b := fh.read(1)):
                tail += b
    except OSError:
        pass
    if tail:
        yield bytes(tail)
    raise _Damaged(cause, done + len(tail))


def _jsonl(fs, path: str) -> Iterator[tuple[int, object]]:
    """(1-based line number, parsed JSON or None when malformed) for every non-blank line. A last
    line cut off by damage is dropped: it is no complete record."""
    buf, n = b"", 0
    for chunk in _decoded(fs, path):  # _Damaged passes through, after the complete lines
        lines = (buf + chunk).split(b"\n")
        buf = lines.pop()
        for line in lines:
            n += 1
            yield from _parse(n, line)
    if buf:
        yield from _parse(n + 1, buf)


def _parse(n: int, line: bytes) -> Iterator[tuple[int, object]]:
    if n == 1:
        line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
    if not line.strip():
        return
    try:  # stray invalid bytes are replaced, not fatal: one bad byte must not cost a document
        yield n, json.loads(line.decode("utf-8", errors="replace"))
    except ValueError:
        yield n, None


def _parquet(fs, path: str, text_field: str = "text") -> Iterator[tuple[int, object]]:
    """(row, {text_field: ..., "domain": ...}) per row, a batch of rows at a time. A file with no
    text column yields empty rows (each counts as missing_text)."""
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh)
        cols = [c for c in dict.fromkeys((text_field, "domain")) if c in pf.schema_arrow.names]
        if text_field not in cols:
            log.warning("%s: no %r column (has %s); every row counts as missing_text", path, text_field,
                        ", ".join(pf.schema_arrow.names))
            yield from ((i, {}) for i in range(pf.metadata.num_rows))
            return
        i = 0
        for batch in pf.iter_batches(batch_size=4096, columns=cols):
            for rec in batch.to_pylist():
                yield i, rec
                i += 1


def _check_record(rec: object, folder: str, known: set[str], text_field: str = "text") -> tuple[str, str]:
    """(text, "") for a good record, ("", reason) for a bad one; `rec` is the parsed JSON (None
    when it did not parse) or a Parquet row."""
    if not isinstance(rec, dict):
        return "", "malformed"
    text, dom = rec.get(text_field), rec.get("domain")
    if text is None:
        return "", "missing_text"
    if not isinstance(text, str):
        return "", "text_not_string"
    if not text.strip():
        return "", "empty_text"
    if dom not in (None, "", folder):
        return "", "domain_mismatch" if isinstance(dom, str) and dom in known else "unknown_domain"
    return text, ""


def read_records(f: CorpusFile, known: set[str], text_field: str = "text") -> Iterator[dict]:
    """Rows of RECORD_SCHEMA {domain, file, row, text, error}: `error` is "" for a good record,
    else one of BAD_REASONS (and `text` is ""). `text_field` names the records' text field (a
    Hugging Face `datasets` export may call it `content`)."""

    def row(i: int, text: str = "", error: str = "") -> dict:
        return {"domain": f.domain, "file": f.index, "row": i, "text": text, "error": error}

    got = 0
    try:
        fs, _ = storage.resolve(f.root)
        items = _parquet(fs, f.path, text_field) if f.path.endswith(".parquet") else _jsonl(fs, f.path)
        for i, rec in items:
            got += 1
            text, error = _check_record(rec, f.domain, known, text_field)
            yield row(i, text, error)
    except _Damaged as e:
        if e.good:
            log.warning("%s: damaged after %d decoded bytes (%s); read the %d complete record(s) before it",
                        f.path, e.good, e, got)
            yield row(-1, error="truncated_file")
        else:
            log.warning("%s: unreadable, skipped (%s)", f.path, e)
            yield row(-1, error="unreadable_file")
    except Exception as e:  # not Parquet, a damaged row group, a lost connection: skipped with a warning
        log.warning("%s: unreadable%s, skipped (%s)", f.path, f" after {got} record(s)" if got else "", e)
        yield row(-1, error="unreadable_file" if got == 0 else "truncated_file")
