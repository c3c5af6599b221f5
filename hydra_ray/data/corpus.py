"""Reading a domain-tagged corpus: one folder per domain, JSONL or Parquet shards with a `text`
field (and optionally `domain`), on a local path or any pyarrow filesystem URI (s3://, gs://, ...).

Design choices
- The folder names the domain; a record's own `domain` field, when present, must agree with a
  known domain (FineFineWeb-style corpora carry both). Folders that no configured domain names
  are ignored and reported.
- A bad record never stops a run: malformed JSON lines, missing or empty texts, unknown domains
  and unreadable files are counted by reason (and the first few examples kept) and reported.
- `list_corpus` runs on the driver before any Ray work, so a config that names a domain with no
  data fails at once with a clear message.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".parquet")
BAD_REASONS = ("malformed", "empty_text", "unknown_domain", "unreadable_file")


class CorpusError(ValueError):
    """The corpus cannot serve the configured domains (reported before any work starts)."""


def _fs(root: str):
    import pyarrow.fs as pafs

    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), str(Path(root).expanduser().resolve())


@dataclass(frozen=True)
class CorpusFile:
    domain: str
    path: str  # path inside the filesystem
    index: int  # position in the sorted listing of its domain
    root: str  # the corpus URI, to reopen the filesystem in a worker


def list_corpus(root: str, domains: list[str], required: list[str] | None = None) -> dict[str, list[CorpusFile]]:
    """Sorted shards per configured domain. `required` domains (those with mixture weight > 0)
    must have at least one shard, else CorpusError."""
    import pyarrow.fs as pafs

    try:
        fs, base = _fs(root)
        info = fs.get_file_info(base)
    except Exception as e:  # pyarrow raises several types for bad URIs
        raise CorpusError(f"corpus {root!r}: cannot open ({e})") from None
    if info.type != pafs.FileType.Directory:
        raise CorpusError(f"corpus {root!r}: not a folder (expected one sub-folder per domain)")
    found: dict[str, list[CorpusFile]] = {d: [] for d in domains}
    ignored = []
    for entry in fs.get_file_info(pafs.FileSelector(base, recursive=False)):
        if entry.type != pafs.FileType.Directory:
            continue
        name = entry.base_name
        if name not in found:
            ignored.append(name)
            continue
        files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(entry.path, recursive=True))
                       if f.type == pafs.FileType.File and f.path.endswith(SUFFIXES))
        found[name] = [CorpusFile(name, p, i, root) for i, p in enumerate(files)]
    if ignored:
        log.warning("corpus %s: ignoring folders that name no configured domain: %s", root, ", ".join(sorted(ignored)))
    missing = [d for d in (required or domains) if not found.get(d)]
    if missing:
        raise CorpusError(
            f"corpus {root!r} has no data for domain(s) {', '.join(missing)} named by the config "
            f"(expected {root}/<domain>/*.jsonl or *.parquet)"
        )
    return found


def read_records(f: CorpusFile, known: set[str]) -> Iterator[dict]:
    """Rows {domain, file, row, text, error}; `error` is None or one of BAD_REASONS."""

    def row(i, text=None, error=None, domain=f.domain):
        return {"domain": domain, "file": f.index, "row": i, "text": text if error is None else "", "error": error}

    fs, _ = _fs(f.root)
    try:
        if f.path.endswith(".parquet"):
            import pyarrow.parquet as pq

            with fs.open_input_file(f.path) as fh:
                table = pq.read_table(fh, columns=None)
            if "text" not in table.column_names:
                log.warning("%s: no 'text' column; skipped", f.path)
                yield row(0, error="unreadable_file")
                return
            texts = table.column("text").to_pylist()
            doms = table.column("domain").to_pylist() if "domain" in table.column_names else [None] * len(texts)
            items = ((i, {"text": t, "domain": d}) for i, (t, d) in enumerate(zip(texts, doms)))
        else:
            with fs.open_input_stream(f.path) as fh:
                raw = fh.read().decode("utf-8", errors="replace")
            items = ((i, line) for i, line in enumerate(raw.splitlines()) if line.strip())
        for i, rec in items:
            if isinstance(rec, str):
                try:
                    rec = json.loads(rec)
                except json.JSONDecodeError:
                    yield row(i, error="malformed")
                    continue
                if not isinstance(rec, dict):
                    yield row(i, error="malformed")
                    continue
            text, dom = rec.get("text"), rec.get("domain")
            if dom is not None and dom not in known:
                yield row(i, error="unknown_domain")
            elif not isinstance(text, str) or not text.strip():
                yield row(i, error="empty_text")
            else:
                yield row(i, text=text, domain=dom or f.domain)
    except Exception as e:  # a corrupt or unreadable shard is skipped with a warning
        log.warning("%s: unreadable, skipped (%s)", f.path, e)
        yield row(-1, error="unreadable_file")
