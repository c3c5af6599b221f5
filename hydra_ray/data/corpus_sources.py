"""Raw material of the built-in corpus, its one train / held-out split, and the byte-budget draw.

Design choices
- One split for every domain: `held_out(key)` puts a fixed 1 in 20 of all keys in the held-out
  split by a hash of the key (never Python's salted `hash`). Keys are stable names: a file's path
  relative to the standard library, a pydoc topic section's text, a generated problem's statement,
  a generated dialogue's user messages, an article's title. Training generators skip held-out
  keys and evaluation generators keep only them, so the two are disjoint at every size and seed.
  A held-out stdlib file is held out for every domain that reads it: its code, its docstrings as
  chat answers, its docstrings as prose.
- Nothing is imported from the standard library's modules: files are read as text and parsed
  with `ast` (no side effects), and each file is parsed at most once per process (cached).
- `draw` fills a domain from weighted sources until a byte budget (1 byte = 1 token for the byte
  tokenizer): each document comes from a source picked by weight, so sources are interleaved at
  every size; a bounded source that runs dry drops out and the others fill its share.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import random
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator

HELD_OUT_EVERY = 20  # 5 % of keys are held out
_STDLIB_PACKAGES = ("json", "email", "collections", "concurrent", "importlib", "logging", "urllib",
                    "http", "xml", "asyncio", "unittest", "html", "wsgiref", "sqlite3", "zoneinfo",
                    "multiprocessing", "ctypes", "re", "xmlrpc", "tomllib", "dbm", "curses", "venv",
                    "tkinter", "lib2to3", "distutils", "idlelib")


def held_out(key: str) -> bool:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELD_OUT_EVERY == 0


# --------------------------------------------------------------------------- standard library files
@lru_cache(maxsize=1)
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def _stdlib_files() -> tuple[Path, ...]:
    root = stdlib_root()
    files = sorted(root.glob("*.py"))
    for pkg in _STDLIB_PACKAGES:
        files += sorted(p for p in (root / pkg).rglob("*.py")
                        if not any(part.startswith(("test", "idle_test")) for part in p.relative_to(root).parts))
    return tuple(f for f in files if f.is_file())


def stdlib_files() -> list[Path]:
    """The standard library's `.py` files the corpus reads, sorted; tests and test helpers excluded."""
    return list(_stdlib_files())


def rel(path: Path) -> str:
    return path.relative_to(stdlib_root()).as_posix()


def split_files(heldout: bool) -> list[Path]:
    return [f for f in stdlib_files() if held_out(rel(f)) == heldout]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


@lru_cache(maxsize=1)
def training_text() -> str:
    """All training files' text, whitespace collapsed: to check that a held-out item has no copy
    in training (the standard library repeats a few functions and docstrings between modules)."""
    return " ".join(" ".join(read(f).split()) for f in split_files(False))


def in_training(text: str) -> bool:
    return " ".join(text.split()) in training_text()


@lru_cache(maxsize=None)
def parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(read(path))
    except (SyntaxError, ValueError):
        return None


# --------------------------------------------------------------------------- docstrings
@dataclass(frozen=True)
class Doc:
    """A docstring of a module, or of a public top-level function, class or method."""

    module: str  # dotted: "json.decoder"
    name: str  # "JSONDecoder.decode"; "" for the module's own docstring
    kind: str  # module, function, class or method
    signature: str  # "decode(self, s, _w=WHITESPACE.match)"; "" for a module
    text: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}" if self.name else self.module


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        return f"class {node.name}({bases})" if bases else f"class {node.name}"
    return f"{node.name}({ast.unparse(node.args)})"


@lru_cache(maxsize=None)
def file_docs(path: Path) -> tuple[Doc, ...]:
    tree = parse(path)
    if tree is None:
        return ()
    module = rel(path)[:-3].replace("/", ".").removesuffix(".__init__")
    out = []
    if text := ast.get_docstring(tree):
        out.append(Doc(module, "", "module", "", text))
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in tree.body:
        if not isinstance(node, defs) or node.name.startswith("_"):
            continue
        if text := ast.get_docstring(node):
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            out.append(Doc(module, node.name, kind, _signature(node), text))
        if isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, defs[:2]) and not sub.name.startswith("_") and (text := ast.get_docstring(sub)):
                    out.append(Doc(module, f"{node.name}.{sub.name}", "method", _signature(sub), text))
    return tuple(out)


def round_robin(heldout: bool, items: Callable[[Path], Iterable], rng: random.Random, per_pass: int) -> Iterator:
    """items(file) of the split's files: files in seeded order, each file's items shuffled, `per_pass`
    from each file per pass. A small budget reads few files (lazily) and still sees many of them."""
    files = split_files(heldout)
    rng.shuffle(files)
    taken: dict[Path, list] = {}
    for start in itertools.count(0, per_pass):
        any_left = False
        for f in files:
            if f not in taken:
                taken[f] = list(items(f))
                rng.shuffle(taken[f])
            yield from taken[f][start : start + per_pass]
            any_left |= len(taken[f]) > start + per_pass
        if not any_left:
            return


def docstrings(heldout: bool, rng: random.Random, per_pass: int = 3) -> Iterator[Doc]:
    return round_robin(heldout, file_docs, rng, per_pass)


# --------------------------------------------------------------------------- pydoc topics
@lru_cache(maxsize=1)
def topic_sections() -> tuple[str, ...]:
    """The interpreter's bundled reference documentation, one entry per section (sorted by topic)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # a stripped interpreter
        raise RuntimeError("this Python has no pydoc_data: the built-in corpus cannot be built") from e
    return tuple(part.strip() + "\n" for key in sorted(topics) for part in topics[key].split("\n\n\n")
                 if len(part.strip()) > 200)


def split_sections(heldout: bool) -> list[str]:
    return [s for s in topic_sections() if held_out(s) == heldout]


# --------------------------------------------------------------------------- drawing documents
def shuffled(items: Iterable, rng: random.Random) -> Iterator:
    items = list(items)
    rng.shuffle(items)
    return iter(items)


def draw(sources: list[tuple[float, Iterable]], rng: random.Random, budget: int | None = None,
         count: int | None = None) -> list:
    """Documents from (weight, source) pairs until `budget` UTF-8 bytes or `count` documents,
    or until every source has run dry."""
    live = [[w, iter(s)] for w, s in sources]
    out, total = [], 0
    while live and (budget is None or total < budget) and (count is None or len(out) < count):
        k = rng.choices(range(len(live)), weights=[w for w, _ in live])[0]
        doc = next(live[k][1], None)
        if doc is None:
            del live[k]
            continue
        out.append(doc)
        if budget is not None:
            total += len(doc.encode())
    return out
