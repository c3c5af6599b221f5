"""The `code` domain: the standard library's own source, in chunks, and held-out function headers.

Design choices
- A document is a chunk of one file of at most `CHUNK` bytes, headed `# file: <path>`. Chunks end
  at top-level `def` / `class` / decorator lines (a comment block stays with the definition under
  it); a single definition longer than `CHUNK` is cut at line boundaries. Chunks rather than whole
  files: a budget of 128K bytes then holds dozens of documents from dozens of files instead of four
  files, and the last document overshoots the budget by at most one chunk. 3 KB is still several
  times the longest configured seq_len (512).
- Chunks are drawn one per file per pass over the files in seeded order, so a small budget sees
  many files and reads only those.
- Evaluation prompts (`function_prompts`) come only from held-out files (corpus_sources.held_out
  of the path), so a header the model is asked to complete never appeared in its training code,
  chat or prose.
"""

from __future__ import annotations

import ast
import random
import textwrap
from pathlib import Path
from typing import Iterator

from hydra_ray.data.corpus_sources import in_training, parse, read, rel, round_robin, split_files

CHUNK = 3072
_TOP = ("def ", "class ", "async def ", "@", 'if __name__ == "__main__"', "if __name__ == '__main__'")
MAX_BODY_LINES = 40  # held-out functions longer than this make poor completion prompts


def _blocks(text: str) -> list[list[str]]:
    """Lines grouped into top-level blocks: a block starts at a def/class/decorator line."""
    blocks: list[list[str]] = [[]]
    for line in text.splitlines(keepends=True):
        cur = blocks[-1]
        if line.startswith(_TOP) and cur and not cur[-1].startswith("@"):
            lead = len(cur)
            while lead > 0 and cur[lead - 1].startswith("#"):  # comments introduce what follows
                lead -= 1
            blocks[-1], moved = cur[:lead], cur[lead:]
            blocks.append(moved)
        blocks[-1].append(line)
    return [b for b in blocks if b]


def _packed(items: list[str], cap: int) -> list[str]:
    """Consecutive items joined into runs of at most `cap` characters (an item longer than `cap`
    is a run of its own)."""
    out, cur, size = [], [], 0
    for item in items:
        if cur and size + len(item) > cap:
            out.append("".join(cur))
            cur, size = [], 0
        cur.append(item)
        size += len(item)
    if cur:
        out.append("".join(cur))
    return out


def chunks(text: str, cap: int = CHUNK) -> list[str]:
    pieces: list[str] = []
    for block in _blocks(text):
        b = "".join(block)
        # a definition longer than a chunk is cut at line boundaries
        pieces += [b] if len(b) <= cap else _packed(block, cap)
    return [c for c in _packed(pieces, cap) if c.strip()]


def file_chunks(path: Path) -> list[str]:
    return [f"# file: {rel(path)}\n{c}" for c in chunks(read(path))]


def code_docs(heldout: bool, rng: random.Random) -> Iterator[str]:
    """Chunks of the split's files: one chunk of each file (in seeded order) per pass."""
    return round_robin(heldout, file_chunks, rng, per_pass=1)


def _prompt(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The def line(s) and docstring of `node`, dedented, ending in the body's indentation; None
    unless the function parses alone."""
    body = node.body
    if len(body) < 2 or not (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                             and isinstance(body[0].value.value, str)):
        return None
    if node.end_lineno - node.lineno > MAX_BODY_LINES or len(body[0].value.value.strip()) < 20:
        return None
    src = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))
    if not src.startswith(("def ", "async def ")):
        return None
    try:
        alone = ast.parse(src).body[0]
    except SyntaxError:
        return None
    src_lines = src.splitlines()
    head = "\n".join(src_lines[: alone.body[0].end_lineno])
    first = src_lines[alone.body[1].lineno - 1]
    return f"{head}\n{first[: len(first) - len(first.lstrip())]}"


def function_prompts(path: Path) -> list[str]:
    tree = parse(path)
    if tree is None:
        return []
    lines = read(path).splitlines(keepends=True)
    found = (_prompt(lines, n) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return [p for p in found if p]


def code_tasks(n: int, seed: int) -> list[str]:
    """Up to n held-out function headers (def line + docstring + the body's indentation), chosen by
    the seed; fewer when the held-out files hold fewer."""
    pool = sorted({p for f in split_files(True) for p in function_prompts(f)})
    pool = [p for p in pool if not in_training(p)]
    rng = random.Random(f"code-eval-{seed}")
    return rng.sample(pool, min(n, len(pool)))
