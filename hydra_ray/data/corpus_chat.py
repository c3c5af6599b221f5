"""The `chat` domain: user/assistant dialogues from four sources, written with `chat.render`.

Sources (weights in `sources`):
- docstrings: "what does json.dumps do?" answered with the first paragraph of its docstring, then
  0-2 follow-ups (signature, module and import, function or class, more detail), sometimes thanks;
- definitions: terms of the language reference (pydoc topic section titles) defined by the
  section's first paragraph, sometimes with a "say more" follow-up;
- tasks: small instructions whose answers are computed: reverse / sort / count words, count a
  letter, spell a number, capitals, acronyms, palindromes, weekdays and day counts of dates;
- small talk: greetings, how-are-you, what-can-you-do, farewells, sometimes around a task.
Any dialogue may open with a system turn. Every source has several phrasings per turn.

Design choices
- Each message is one line (whitespace collapsed), so a document parses back into its turns by
  the template's role prefixes; the template itself is the one serving uses (chat.py).
- Answers are conversational sentences, never the math domain's Problem / Solution / Answer form.
- Held out: dialogues about held-out files' docstrings and held-out topic sections; task and
  small-talk dialogues whose user messages hash into the held-out split (corpus_sources).
"""

from __future__ import annotations

import datetime
import random
import re
from typing import Iterator

from hydra_ray.data import chat
from hydra_ray.data.corpus_sources import Doc, docstrings, draw, held_out, split_sections

Turns = list[tuple[str, str]]
SYSTEMS = ("You are a helpful assistant.", "You are a concise assistant. Answer in one or two sentences.",
           "You are a friendly assistant who knows the Python standard library well.",
           "Answer the user's questions accurately and briefly.", "You are a patient tutor.")
_NOUNS = ("river", "lamp", "garden", "teacher", "window", "letter", "mountain", "bicycle", "kettle", "library",
          "violin", "harbor", "lantern", "orchard", "painter", "market", "castle", "meadow", "engine", "island")
_ADJS = ("quiet", "bright", "old", "small", "curious", "green", "heavy", "gentle", "distant", "busy", "golden")
_VERBS = ("found", "painted", "carried", "visited", "fixed", "watched", "borrowed", "described", "cleaned")
_NAMES = ("Ada", "Bruno", "Carmen", "Dev", "Elif", "Femi", "Greta", "Hugo", "Ines", "Jun", "Kofi", "Lena")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


def one_line(text: str) -> str:
    return " ".join(text.split())


def brief(text: str, limit: int = 240) -> str:
    """At most `limit` characters, cut after a sentence when it is longer."""
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[: cut + 1] if cut > 0 else text


def _prose(paragraph: str) -> bool:
    return (len(paragraph) >= 40 and ">>>" not in paragraph and not paragraph.startswith((" ", "\t"))
            and sum(c.isalpha() or c == " " for c in paragraph) > 0.8 * len(paragraph))


# --------------------------------------------------------------------------- docstrings
def _ask_doc(d: Doc, rng: random.Random) -> Turns | None:
    paras = [one_line(p) for p in d.text.split("\n\n") if _prose(p)]
    if not paras or d.kind == "module":
        return None
    q = d.qualname
    ask = rng.choice(["What does {} do?", "Can you explain {}?", "How do I use {}?", "Tell me about {}.",
                      "I'm reading code that calls {}. What is it for?", "What is {} in the standard library?",
                      "Quick question: what's {} for?", "Explain `{}` briefly, please."])
    lead = rng.choice(["", "", f"`{d.name}`: ", "In short: ", "According to its documentation: ", "Sure. "])
    turns = [("user", ask.format(q)), ("assistant", lead + brief(paras[0]))]
    top = d.name.split(".")[0]
    follow = [
        (rng.choice(["What is its signature?", "How is it declared?", "What arguments does it take?"]),
         rng.choice([f"It is defined as `{d.signature}`.", f"The definition reads `{d.signature}`."])),
        (rng.choice(["Which module is it in?", "Where do I import it from?"]),
         f"It lives in `{d.module}`: `from {d.module} import {top}`."),
        (rng.choice(["Is it a function or a class?", "What kind of object is it?"]),
         f"It is a method of the class `{top}`." if d.kind == "method" else f"It is a {d.kind}."),
    ]
    if len(paras) > 1:
        more = rng.choice(["Can you tell me more?", "Anything else I should know?", "Go on."])
        follow.append((more, brief(paras[1])))
    for user, reply in rng.sample(follow, rng.randint(0, min(2, len(follow)))):
        turns += [("user", user), ("assistant", reply)]
    if rng.random() < 0.2:
        turns += [("user", rng.choice(["Thanks!", "Great, thank you.", "Got it."])),
                  ("assistant", rng.choice(["You're welcome.", "Glad to help!", "Happy coding."]))]
    return turns


def docstring_chats(heldout: bool, rng: random.Random) -> Iterator[Turns]:
    for d in docstrings(heldout, rng):
        if turns := _ask_doc(d, rng):
            yield turns


# --------------------------------------------------------------------------- definitions
_TITLED = re.compile(r"([^\n]+)\n[*=-]{3,}\n\n")


def definition_chats(heldout: bool, rng: random.Random) -> Iterator[Turns]:
    sections = split_sections(heldout)
    rng.shuffle(sections)
    for s in sections:
        if not (m := _TITLED.match(s)):
            continue
        paras = [brief(one_line(p)) for p in s[m.end():].split("\n\n") if _prose(p) and p.rstrip().endswith(".")]
        if not paras:
            continue
        title = one_line(m.group(1))
        term = title[0].lower() + title[1:] if title[1:2].islower() else title
        ask = rng.choice(["What is {} in Python?", "Define {} for me.", "Explain {} in a sentence or two.",
                          "I keep seeing \"{}\" in the Python docs. What is it about?",
                          "What does the language reference say about {}?"])
        turns = [("user", ask.format(term)), ("assistant", paras[0])]
        if len(paras) > 1 and rng.random() < 0.5:
            turns += [("user", rng.choice(["Can you say more?", "And then?", "Go on, please."])),
                      ("assistant", paras[1])]
        yield turns


# --------------------------------------------------------------------------- tasks
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def spell(n: int) -> str:
    """0 <= n < 1,000,000 in English words: 4321 -> 'four thousand three hundred twenty-one'."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")
    if n < 1000:
        return f"{_ONES[n // 100]} hundred" + (f" {spell(n % 100)}" if n % 100 else "")
    return f"{spell(n // 1000)} thousand" + (f" {spell(n % 1000)}" if n % 1000 else "")


def times(k: int) -> str:
    return {0: "no times", 1: "once", 2: "twice"}.get(k, f"{k} times")


def sentence(rng: random.Random) -> str:
    return (f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} the {rng.choice(_ADJS)} {rng.choice(_NOUNS)} near the "
            f"{rng.choice(_NOUNS)}")


def _date(rng: random.Random) -> datetime.date:
    return datetime.date(1900, 1, 1) + datetime.timedelta(days=rng.randrange(47000))


def _says(d: datetime.date) -> str:
    return f"{d.day} {MONTHS[d.month - 1]} {d.year}"


def task(rng: random.Random) -> Turns:
    kind = rng.randrange(11)
    s = sentence(rng)
    words = s.split()
    if kind == 0:
        q = rng.choice(["Reverse the order of the words in: {}", "Can you say this backwards, word by word? {}"])
        a = f"Here it is: {' '.join(reversed(words))}"
    elif kind == 1:
        ws = rng.sample(_NOUNS + _ADJS, rng.randint(3, 7))
        q = rng.choice(["Sort these words alphabetically: {}", "Put these in alphabetical order: {}"])
        q = q.format(", ".join(ws))
        return [("user", q), ("assistant", f"In alphabetical order: {', '.join(sorted(ws))}.")]
    elif kind == 2:
        q = rng.choice(['How many words are in this sentence: "{}"?', 'Count the words in "{}", please.'])
        a = rng.choice([f"It has {len(words)} words.", f"That sentence has {len(words)} words."])
    elif kind == 3:
        w = rng.choice(_NOUNS + _ADJS)
        c = rng.choice(sorted(set(w))) if rng.random() < 0.8 else rng.choice("aeiou")
        return [("user", rng.choice([f"How many times does the letter '{c}' appear in \"{w}\"?",
                                     f"Count the letter '{c}' in the word \"{w}\"."])),
                ("assistant", f"The letter '{c}' appears {times(w.count(c))} in \"{w}\".")]
    elif kind == 4:
        n = rng.choice([rng.randint(0, 100), rng.randint(100, 9999), rng.randint(10000, 999999)])
        return [("user", rng.choice([f"How do you write {n} in words?", f"Spell out the number {n}."])),
                ("assistant", rng.choice([f"{n} is written \"{spell(n)}\".", f"In words: {spell(n)}."]))]
    elif kind == 5:
        q = rng.choice(["Can you put this in capital letters: {}", "Make this all caps: {}"])
        a = s.upper()
    elif kind == 6:
        q = "Capitalise each word of: {}"
        a = s.title()
    elif kind == 7:
        q = rng.choice(['What acronym do the words "{}" make?', 'Take the first letter of each word in "{}".'])
        a = f"The first letters spell {''.join(w[0] for w in words).upper()}."
    elif kind == 8:
        w = rng.choice(["level", "radar", "civic", "refer", "rotor", "kayak"] + list(_NOUNS))
        yes = w == w[::-1]
        return [("user", rng.choice([f'Is "{w}" a palindrome?', f'Does "{w}" read the same backwards?'])),
                ("assistant", f"{'Yes' if yes else 'No'}: backwards it is \"{w[::-1]}\".")]
    elif kind == 9:
        d = _date(rng)
        return [("user", rng.choice([f"What day of the week was {_says(d)}?", f"Which weekday fell on {_says(d)}?"])),
                ("assistant", f"{_says(d)} was a {WEEKDAYS[d.weekday()]}.")]
    else:
        d1 = _date(rng)
        d2 = d1 + datetime.timedelta(days=rng.randint(1, 800))
        return [("user", f"How many days are there from {_says(d1)} to {_says(d2)}?"),
                ("assistant", f"There are {(d2 - d1).days} days between them.")]
    return [("user", q.format(s)), ("assistant", a)]


_HELLO = (("Hi!", "Hello! How can I help you today?"), ("Hello there.", "Hi! What can I do for you?"),
          ("Hey, how's it going?", "Pretty well, thanks. What do you need?"),
          ("Good morning!", "Good morning! What can I help with?"), ("Hi, are you there?", "I'm here. Go ahead."))
_CHAT = (("How are you?", "I'm doing well, thanks for asking. How about you?"),
         ("What can you do?", "I can explain parts of the Python standard library and the language reference, "
                              "and help with small text tasks like sorting, counting or spelling things out."),
         ("What's your name?", "I'm the assistant of this project; you can just call me Assistant."),
         ("Do you like your job?", "I enjoy questions, especially ones with a clear answer."))
_BYE = (("Thanks, bye!", "Goodbye, and good luck!"), ("That's all for now.", "Alright. Come back any time."),
        ("Thank you, that helps.", "You're welcome. Have a good day!"))


def small_talk(rng: random.Random) -> Turns:
    pairs = [rng.choice(_HELLO)] + ([rng.choice(_CHAT)] if rng.random() < 0.6 else [])
    turns = [turn for user, reply in pairs for turn in (("user", user), ("assistant", reply))]
    if rng.random() < 0.5:
        turns += task(rng)
    if rng.random() < 0.6:
        user, reply = rng.choice(_BYE)
        turns += [("user", user), ("assistant", reply)]
    return turns


def generated(make, heldout: bool, rng: random.Random) -> Iterator[Turns]:
    """Endless dialogues of one generator, keyed by their user messages into the split."""
    while True:
        turns = make(rng)
        if held_out(" | ".join(c for r, c in turns if r == "user")) == heldout:
            yield turns


# --------------------------------------------------------------------------- documents
def sources(heldout: bool, seed: str) -> list[tuple[float, Iterator[Turns]]]:
    def rng(part: str) -> random.Random:  # one stream per source: adding a source leaves the others alone
        return random.Random(f"chat-{part}-{seed}")

    # short turns: a window of a dialogue almost always holds a role prefix
    return [(0.35, docstring_chats(heldout, rng("doc"))), (0.1, definition_chats(heldout, rng("def"))),
            (0.45, generated(task, heldout, rng("task"))), (0.1, generated(small_talk, heldout, rng("talk")))]


def with_system(dialogues: Iterator[Turns], rng: random.Random) -> Iterator[Turns]:
    for turns in dialogues:
        system = [("system", rng.choice(SYSTEMS))] if rng.random() < 0.25 else []
        yield system + [(role, one_line(text)) for role, text in turns]


def chat_docs(heldout: bool, seed: str) -> list[tuple[float, Iterator[str]]]:
    rng = random.Random(f"chat-system-{seed}")
    return [(w, map(chat.render, with_system(s, rng))) for w, s in sources(heldout, seed)]


def chat_tasks(n: int, seed: int) -> list[Turns]:
    """n held-out conversations, each cut after its last user turn (the model writes the reply)."""
    rng = random.Random(f"chat-eval-{seed}")
    picked = draw([(w, with_system(s, rng)) for w, s in sources(True, f"eval-{seed}")], rng, count=n)
    return [t[: max(i for i, (role, _) in enumerate(t) if role == "user") + 1] for t in picked]
