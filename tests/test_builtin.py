"""The built-in corpus: balanced byte budgets, determinism, the shape of each domain's documents,
and held-out evaluation material that never meets training material. Math answers are checked by
solving the problems again here, independently of the generator."""

from __future__ import annotations

import ast
import math
import re
import statistics
from fractions import Fraction

import pytest

from hydra_ray.config import ChatTemplate
from hydra_ray.data import builtin, chat
from hydra_ray.data.corpus_sources import rel, split_files

TINY = builtin.SIZES["tiny"]


@pytest.fixture(scope="module")
def tiny():
    return {d: builtin.documents(d, "tiny", 0) for d in builtin.DOMAINS}


def _bytes(docs: list[str]) -> int:
    return sum(len(d.encode()) for d in docs)


# --------------------------------------------------------------------------- sizes and determinism
def test_tiny_domains_hold_about_128k_bytes_each(tiny):
    for domain, docs in tiny.items():
        assert 100_000 <= _bytes(docs) <= 1.15 * TINY, domain
        assert len(docs) >= 36, domain  # dozens of documents, not a handful of whole files
    sizes = [_bytes(d) for d in tiny.values()]
    assert max(sizes) / min(sizes) < 1.15


@pytest.mark.slow
def test_small_domains_hold_over_2m_bytes_each_and_keep_held_out_code_out():
    small = builtin.SIZES["small"]
    for domain in builtin.DOMAINS:
        docs = builtin.documents(domain, "small", 0)
        assert 2_000_000 <= _bytes(docs) <= 1.15 * small, domain
        if domain == "code":
            _assert_no_code_task_in(docs)


def test_same_seed_same_documents_other_seed_other_documents(tiny):
    for domain in builtin.DOMAINS:
        assert builtin.documents(domain, "tiny", 0) == tiny[domain]
    for domain in ("math", "chat", "finefineweb"):
        assert builtin.documents(domain, "tiny", 1) != tiny[domain]
    assert builtin.math_tasks(20, 3) == builtin.math_tasks(20, 3) != builtin.math_tasks(20, 4)
    assert builtin.chat_tasks(20, 3) == builtin.chat_tasks(20, 3) != builtin.chat_tasks(20, 4)
    assert builtin.code_tasks(20, 3) == builtin.code_tasks(20, 3) != builtin.code_tasks(20, 4)
    assert builtin.heldout_documents("math", 5, 0) == builtin.heldout_documents("math", 5, 0)


def test_domains_differ_in_surface_form(tiny):
    starts = {"math": ("Problem: ",), "code": ("# file: ",), "chat": ("User: ", "System: ")}
    for domain, prefixes in starts.items():
        assert all(d.startswith(prefixes) for d in tiny[domain]), domain
    for doc in tiny["finefineweb"]:  # prose: no turns, worksheets or code at the margin
        for line in doc.splitlines():
            assert not line.startswith(("Problem: ", "Answer: ", "User: ", "Assistant: ", "# file: ")), doc[:200]
            assert not re.match(r"(def|class) \w+.*:$|(from \w+ )?import \w+$", line), doc[:200]


# --------------------------------------------------------------------------- math
def _problems(doc: str) -> list[str]:
    parts = re.split(r"(?m)^(?=Problem: )", doc)
    return [p for p in parts if p.strip()]


def _fmt(x: Fraction) -> str:
    if x.denominator == 1:
        return str(x.numerator)
    return str(float(x)) if x.denominator in (2, 4, 5, 10) else f"{x.numerator}/{x.denominator}"


def _solve(statement: str) -> str | None:
    """The answer of some families, computed here from the statement alone; None for the rest."""
    n = r"(-?\d+)"
    linear = rf"(?:Solve|Find x if|What value of x makes) {n}x(?: ([+-]) (\d+))? = {n}(?: for x| true)?[.?]"
    if m := re.fullmatch(linear, statement):
        a, sign, b, c = int(m[1]), m[2], int(m[3] or 0), int(m[4])
        return f"x = {_fmt(Fraction(c - (b if sign == '+' else -b), a))}"
    if m := re.fullmatch(r"Compute ([\d ()+*/-]+)\.", statement):
        return _fmt(Fraction(eval(m[1].replace("/", "//"))))  # only digits and operators reach eval
    if m := re.fullmatch(r"Find the (greatest common divisor|least common multiple) of (\d+) and (\d+)\.", statement):
        a, b = int(m[2]), int(m[3])
        return str(math.gcd(a, b) if m[1].startswith("greatest") else math.lcm(a, b))
    if m := re.fullmatch(r"What is (\d+)% of (\d+)\?", statement):
        return _fmt(Fraction(int(m[1]) * int(m[2]), 100))
    if m := re.fullmatch(r"(Add|Multiply|Subtract) (\d+/\d+) (?:and|by|from) (\d+/\d+)\.", statement):
        p, q = Fraction(m[2]), Fraction(m[3])
        return str({"Add": p + q, "Multiply": p * q, "Subtract": q - p}[m[1]])
    if m := re.fullmatch(r"Which is larger, (\d+/\d+) or (\d+/\d+)\?", statement):
        return str(max(Fraction(m[1]), Fraction(m[2])))
    if m := re.fullmatch(r"Is (\d+) divisible by (\d+)\?", statement):
        return "yes" if int(m[1]) % int(m[2]) == 0 else "no"
    if m := re.fullmatch(r"Find the (mean|median) of ([\d, ]+)\.", statement):
        xs = [Fraction(int(x)) for x in m[2].split(", ")]
        return _fmt(Fraction(statistics.mean(xs) if m[1] == "mean" else statistics.median(xs)))
    if m := re.fullmatch(r"Solve the system (.+) and (.+)\.", statement):
        rows = []
        for eq in (m[1], m[2]):
            e = re.fullmatch(r"(-?\d*)x ([+-]) (\d*)y = (-?\d+)", eq)
            a = int(e[1]) if e[1] not in ("", "-") else (-1 if e[1] == "-" else 1)
            b = (int(e[3]) if e[3] else 1) * (1 if e[2] == "+" else -1)
            rows.append((a, b, int(e[4])))
        (a1, b1, c1), (a2, b2, c2) = rows
        det = a1 * b2 - a2 * b1
        return f"x = {_fmt(Fraction(c1 * b2 - c2 * b1, det))}, y = {_fmt(Fraction(a1 * c2 - a2 * c1, det))}"
    return None


def test_every_math_problem_ends_in_one_answer_line(tiny):
    for doc in tiny["math"]:
        problems = _problems(doc)
        assert 3 <= len(problems) <= 6
        for p in problems:
            lines = p.strip("\n").split("\n")
            assert lines[1].startswith("Solution: ") and re.fullmatch(r"Answer: \S.*\.", lines[-1]), p
            assert sum(line.startswith("Answer:") for line in lines) == 1


def test_math_answers_match_an_independent_solution_in_training_and_held_out_tasks(tiny):
    checked = 0
    for doc in tiny["math"]:
        for p in _problems(doc):
            statement = p.split("\n", 1)[0].removeprefix("Problem: ")
            answer = re.search(r"(?m)^Answer: (.*)\.$", p)[1]
            if (want := _solve(statement)) is not None:
                assert answer == want, p
                checked += 1
    assert checked > 100
    tasks = builtin.math_tasks(600, 0)
    assert len(tasks) == 600 and len({p for p, _ in tasks}) > 500
    solved = 0
    for prompt, answer in tasks:
        assert prompt.startswith("Problem: ") and prompt.endswith("\nSolution:") and not answer.endswith(".")
        if (want := _solve(prompt[len("Problem: "): -len("\nSolution:")])) is not None:
            assert answer == want, prompt
            solved += 1
    assert solved > 200


def test_math_tasks_and_held_out_worksheets_never_appear_in_training(tiny):
    training = {p.split("\n", 1)[0] for doc in tiny["math"] for p in _problems(doc)}
    held = [prompt.split("\n", 1)[0] for prompt, _ in builtin.math_tasks(2000, 0)]
    held += [p.split("\n", 1)[0] for doc in builtin.heldout_documents("math", 50, 0) for p in _problems(doc)]
    assert not training & set(held)


# --------------------------------------------------------------------------- code
def _assert_no_code_task_in(code_docs: list[str]) -> None:
    held = {rel(f) for f in split_files(True)}
    assert held and not held & {d.split("\n", 1)[0].removeprefix("# file: ") for d in code_docs}
    training = " ".join(" ".join(d.split()) for d in code_docs)
    assert not [t for t in builtin.code_tasks(1000, 0) if " ".join(t.split()) in training]


def test_held_out_files_are_a_fixed_twentieth_disjoint_from_training(tiny):
    held, train = {rel(f) for f in split_files(True)}, {rel(f) for f in split_files(False)}
    assert not held & train and held | train == {rel(f) for f in builtin.stdlib_files()}
    assert 0.02 < len(held) / len(builtin.stdlib_files()) < 0.09
    _assert_no_code_task_in(tiny["code"])


def test_code_tasks_are_docstring_headers_that_parse_once_given_a_body():
    tasks = builtin.code_tasks(200, 0)
    assert len(tasks) == 200 and len(set(tasks)) == 200
    for t in tasks:
        indent = t.rsplit("\n", 1)[1]
        assert t.startswith(("def ", "async def ")) and indent and not indent.strip()
        tree = ast.parse(t + "pass\n")
        fn = tree.body[0]
        assert isinstance(fn.body[0].value, ast.Constant) and isinstance(fn.body[1], ast.Pass)
    held = {rel(f) for f in split_files(True)}
    assert builtin.heldout_documents("code", 10, 0)[0].split("\n", 1)[0].removeprefix("# file: ") in held


# --------------------------------------------------------------------------- chat
def _turns(doc: str) -> list[tuple[str, str]]:
    t = ChatTemplate()
    prefixes = {"system": t.system, "user": t.user, "assistant": t.assistant}
    out = []
    for line in doc.split(t.separator)[:-1]:
        role = next(r for r, p in prefixes.items() if line.startswith(p))
        out.append((role, line[len(prefixes[role]):]))
    return out


def test_chat_documents_parse_back_into_alternating_turns(tiny):
    for doc in tiny["chat"]:
        turns = _turns(doc)
        assert chat.render(turns) == doc
        roles = [r for r, _ in turns if r != "system"]
        assert roles[0] == "user" and all(a != b for a, b in zip(roles, roles[1:])) and roles[-1] == "assistant"
        assert "Problem:" not in doc and "Answer:" not in doc
    firsts = {_turns(doc)[0][1].split()[0] for doc in tiny["chat"]}
    assert len(firsts) > 20  # many phrasings and sources


def test_chat_tasks_end_with_a_user_turn_of_a_held_out_conversation(tiny):
    tasks = builtin.chat_tasks(300, 0)
    assert len(tasks) == 300
    training = {tuple(c for r, c in _turns(doc) if r == "user") for doc in tiny["chat"]}
    for turns in tasks:
        assert turns[-1][0] == "user" and all(r in ("system", "user", "assistant") for r, _ in turns)
        assert tuple(c for r, c in turns if r == "user") not in training
    asked = " ".join(c for t in tasks for r, c in t if r == "user")
    held = {rel(f)[:-3].replace("/", ".") for f in split_files(True)}
    assert any(m in asked for m in held)  # docstring questions about held-out modules


# --------------------------------------------------------------------------- held-out documents
def test_held_out_documents_are_never_training_documents(tiny):
    for domain in builtin.DOMAINS:
        held = builtin.heldout_documents(domain, 40, 0)
        assert len(held) == 40 and held == builtin.heldout_documents(domain, 40, 0)
        assert not set(held) & set(tiny[domain]), domain
