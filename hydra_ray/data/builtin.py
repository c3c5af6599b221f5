"""The built-in corpus: four domains from material every Python installation carries, no network.

- `math` (corpus_math.py): generated problems of 18 families with worked steps, each ending in
  `Answer: <answer>.`, a few to a worksheet.
- `code` (corpus_code.py): the standard library's own `.py` source, in chunks of up to 3 KB.
- `chat` (corpus_chat.py): dialogues about standard-library docstrings and language-reference
  terms, small computed tasks and small talk, written with `chat.render`.
- `finefineweb` (corpus_prose.py): prose from the bundled reference documentation (`pydoc_data`),
  standard-library docstrings and generated encyclopedic articles.
Standard-library files are read as text and parsed with `ast`: nothing is imported from them.

Design choices
- Sizes are byte budgets per domain, so a router sees every domain equally often: `tiny` 128K
  bytes per domain (about 3 s to build on 2 cores), `small` 2.2M (a routing curriculum; about
  8 s), `full` 8M (about 10 s; 85 % of the code the held-out split leaves, and prose and chat are
  mostly generated text by then, their reference and docstring sources being spent).
  The byte tokenizer makes bytes tokens; a domain ends at most one document past its budget.
- Same (size, seed, interpreter) -> same documents, byte for byte: every list is sorted before a
  seeded shuffle or choice, each source has its own `random.Random` seeded by a string, and Parquet
  is written with fixed compression and row groups.
- Evaluation material never meets training material: corpus_sources.held_out puts 1 in 20 keys
  (stdlib files, topic sections, problem statements, dialogues' user messages, article titles)
  in a held-out split that training skips at every size and seed. `math_tasks`, `code_tasks`,
  `chat_tasks` and `heldout_documents` draw only from it, with their own seed streams.
"""

from __future__ import annotations

import random
from pathlib import Path

from hydra_ray.data import corpus_chat, corpus_code, corpus_math, corpus_prose
from hydra_ray.data.corpus_chat import chat_tasks
from hydra_ray.data.corpus_code import code_tasks
from hydra_ray.data.corpus_math import math_tasks
from hydra_ray.data.corpus_sources import draw, stdlib_files

__all__ = ["SIZES", "DOMAINS", "documents", "heldout_documents", "prepare", "stdlib_files", "math_tasks",
           "code_tasks", "chat_tasks"]

VERSION = 3  # part of the cache folder's name: a change of content must never reuse an old build
SIZES = {"tiny": 128_000, "small": 2_200_000, "full": 8_000_000}  # UTF-8 bytes (= byte tokens) per domain
DOMAINS = ("math", "code", "chat", "finefineweb")


def _budget(size: str) -> int:
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    return SIZES[size]


def _sources(domain: str, heldout: bool, seed: str) -> list:
    """(weight, endless or bounded iterator of documents) pairs of one domain and split."""
    if domain not in DOMAINS:
        raise ValueError(f"the built-in corpus has no domain {domain!r}; it has {', '.join(DOMAINS)}")
    if domain == "math":
        return [(1.0, corpus_math.worksheets(heldout, random.Random(f"math-{seed}")))]
    if domain == "code":
        return [(1.0, corpus_code.code_docs(heldout, random.Random(f"code-{seed}")))]
    if domain == "chat":
        return corpus_chat.chat_docs(heldout, seed)
    return corpus_prose.sources(heldout, seed)


def documents(domain: str, size: str = "tiny", seed: int = 0) -> list[str]:
    """The training documents of one domain: about SIZES[size] bytes."""
    budget = _budget(size)
    return draw(_sources(domain, False, str(seed)), random.Random(f"draw-{domain}-{seed}"), budget=budget)


def heldout_documents(domain: str, n: int, seed: int = 0) -> list[str]:
    """n documents of the domain that no training size or seed contains (fewer for `code` when the
    held-out files have fewer chunks): for perplexity on unseen text."""
    return draw(_sources(domain, True, f"heldout-{seed}"), random.Random(f"heldout-{domain}-{seed}"), count=n)


def prepare(out: str | Path, size: str = "tiny", seed: int = 0, shard_docs: int = 256,
            progress: bool = True) -> dict[str, dict[str, int]]:
    """Write DIR/<domain>/part-NNNNN.parquet (columns text, domain); returns what was written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    _budget(size)
    out = Path(out)
    summary: dict[str, dict[str, int]] = {}
    bar = tqdm(DOMAINS, desc="building corpus", unit="domain", disable=not progress)
    for domain in bar:
        bar.set_postfix_str(domain)
        docs = documents(domain, size, seed)
        folder = out / domain
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("part-*.parquet"):
            old.unlink()
        nbytes = 0
        for i in range(0, len(docs), shard_docs):
            chunk = docs[i : i + shard_docs]
            table = pa.table({"text": pa.array(chunk, pa.string()), "domain": pa.array([domain] * len(chunk))})
            path = folder / f"part-{i // shard_docs:05d}.parquet"
            pq.write_table(table, path, compression="zstd", row_group_size=shard_docs, write_statistics=False)
            nbytes += path.stat().st_size
        summary[domain] = {"documents": len(docs), "text_bytes": sum(len(d.encode()) for d in docs),
                           "files": -(-len(docs) // shard_docs), "bytes": nbytes}
    return summary
