"""The built-in corpus: four domains from material every Python installation carries, no network.

- `math`: generated arithmetic and algebra problems with worked answers (seeded).
- `code`: the standard library's own `.py` source files.
- `chat`: user/assistant dialogues built from standard-library docstrings, read with `ast`
  (nothing is imported, so no module side effects).
- `finefineweb`: English prose from the interpreter's bundled documentation (`pydoc_data`),
  one document per section.

Design choices
- Same (size, seed, interpreter) -> same documents, byte for byte: every source list is sorted
  before a seeded choice, and Parquet is written with fixed compression and row groups.
- Sizes: `tiny` (a few dozen documents per domain, seconds), `small` (hundreds), `full`
  (everything available).
"""

from __future__ import annotations

import ast
import random
import sysconfig
from fractions import Fraction
from pathlib import Path

from hydra_ray.data import chat

SIZES = {"tiny": 48, "small": 400, "full": None}  # documents per domain (None = all available)
DOMAINS = ("math", "code", "chat", "finefineweb")
_STDLIB_PACKAGES = ("json", "email", "collections", "concurrent", "importlib", "logging", "urllib",
                    "http", "xml", "asyncio", "unittest", "html", "wsgiref", "sqlite3", "zoneinfo")


def _doc_count(size: str) -> int | None:
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    return SIZES[size]


# --------------------------------------------------------------------------- math
def _linear(rng: random.Random) -> str:
    a, x, b = rng.randint(2, 12), rng.randint(-20, 20), rng.randint(-30, 30)
    c = a * x + b
    op, bb = ("+", b) if b >= 0 else ("-", -b)
    return (f"Problem: Solve {a}x {op} {bb} = {c} for x.\n"
            f"Solution: Subtract {b} from both sides: {a}x = {c - b}.\n"
            f"Divide both sides by {a}: x = {x}.\n"
            f"Check: {a} * {x} {op} {bb} = {c}. Answer: x = {x}.\n")


def _arith(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 99)
    return (f"Problem: Compute {a} + {b} * {c}.\n"
            f"Solution: Multiplication comes first: {b} * {c} = {b * c}.\n"
            f"Then add: {a} + {b * c} = {a + b * c}. Answer: {a + b * c}.\n")


def _fraction(rng: random.Random) -> str:
    p, q = Fraction(rng.randint(1, 9), rng.randint(2, 12)), Fraction(rng.randint(1, 9), rng.randint(2, 12))
    s = p + q
    den = p.denominator * q.denominator
    return (f"Problem: Add {p} and {q}.\n"
            f"Solution: Use the common denominator {den}: "
            f"{p.numerator * q.denominator}/{den} + {q.numerator * p.denominator}/{den} = "
            f"{p.numerator * q.denominator + q.numerator * p.denominator}/{den}.\n"
            f"Simplify: {s}. Answer: {s}.\n")


def _quadratic(rng: random.Random) -> str:
    r1, r2 = rng.randint(-9, 9), rng.randint(-9, 9)
    b, c = -(r1 + r2), r1 * r2
    return (f"Problem: Find the roots of x^2 + ({b})x + ({c}) = 0.\n"
            f"Solution: We need two numbers with sum {r1 + r2} and product {c}: {r1} and {r2}.\n"
            f"So x^2 + ({b})x + ({c}) = (x - ({r1}))(x - ({r2})). Answer: x = {r1} or x = {r2}.\n")


def math_docs(n: int | None, seed: int) -> list[str]:
    rng = random.Random(f"math-{seed}")
    makers = (_linear, _arith, _fraction, _quadratic)
    count = n if n is not None else 20000
    # a document is a short worksheet of a few problems, so documents have some length
    return ["\n".join(rng.choice(makers)(rng) for _ in range(rng.randint(3, 6))) for _ in range(count)]


# --------------------------------------------------------------------------- code
def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    for pkg in _STDLIB_PACKAGES:
        files += sorted(p for p in (root / pkg).rglob("*.py") if "test" not in p.relative_to(root).parts[1:-1]
                        and not p.name.startswith("test"))
    return [f for f in files if f.is_file()]


def _pick(items: list, n: int | None, rng: random.Random) -> list:
    """n items chosen by the seed, in their original order (all when n is None or too large)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i] for i in sorted(rng.sample(range(len(items)), n))]


def code_docs(n: int | None, seed: int) -> list[str]:
    files = stdlib_files()
    out = []
    for f in _pick(files, n, random.Random(f"code-{seed}")):
        text = f.read_text(encoding="utf-8", errors="replace")
        out.append(f"# file: {f.name}\n{text}")
    return out


# --------------------------------------------------------------------------- chat
def _docstrings(files: list[Path]) -> list[tuple[str, str, str]]:
    """(qualified name, signature, first paragraph of the docstring) of public functions/classes."""
    found = []
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        mod = f.stem if f.parent.name in ("lib", "Lib") or f.parent == Path(sysconfig.get_paths()["stdlib"]) \
            else f"{f.parent.name}.{f.stem}"
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if not doc or len(doc) < 40:
                    continue
                para = doc.strip().split("\n\n")[0].replace("\n", " ")
                if isinstance(node, ast.FunctionDef):
                    sig = f"{node.name}({', '.join(a.arg for a in node.args.args)})"
                else:
                    sig = f"class {node.name}"
                found.append((f"{mod}.{node.name}", sig, para))
    return found


def chat_docs(n: int | None, seed: int) -> list[str]:
    entries = _docstrings(stdlib_files())
    rng = random.Random(f"chat-{seed}")
    out = []
    for name, sig, para in _pick(entries, n, rng):
        ask = rng.choice(["What does {} do?", "Can you explain {}?", "How do I use {}?", "Tell me about {}."])
        turns = [("user", ask.format(name)), ("assistant", para)]
        if rng.random() < 0.5:
            turns += [("user", "What is its signature?"), ("assistant", f"It is defined as `{sig}`.")]
        out.append(chat.render(turns))  # the template /v1/chat/completions renders requests with
    return out


# --------------------------------------------------------------------------- finefineweb
def web_docs(n: int | None, seed: int) -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # a stripped interpreter
        raise RuntimeError("this Python has no pydoc_data: the finefineweb domain cannot be built") from e
    sections = []
    for key in sorted(topics):
        for part in topics[key].split("\n\n\n"):
            part = part.strip()
            if len(part) > 200:
                sections.append(part + "\n")
    rng = random.Random(f"web-{seed}")
    return _pick(sections, n, rng)


GENERATORS = {"math": math_docs, "code": code_docs, "chat": chat_docs, "finefineweb": web_docs}


def documents(domain: str, size: str = "tiny", seed: int = 0) -> list[str]:
    if domain not in GENERATORS:
        raise ValueError(f"the built-in corpus has no domain {domain!r}; it has {', '.join(DOMAINS)}")
    return GENERATORS[domain](_doc_count(size), seed)


def prepare(out: str | Path, size: str = "tiny", seed: int = 0, shard_docs: int = 256,
            progress: bool = True) -> dict[str, dict[str, int]]:
    """Write DIR/<domain>/part-NNNNN.parquet (columns text, domain); returns what was written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    _doc_count(size)
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
