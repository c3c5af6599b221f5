"""The `finefineweb` domain: English prose from three sources.

- reference: the interpreter's bundled documentation (`pydoc_data`), one document per section;
- docstrings: the prose paragraphs of long standard-library docstrings (module, class, function),
  without doctests, indented blocks or argument tables;
- articles: generated encyclopedic articles about fictional towns, species, institutions and
  people: an intro sentence, then history and description paragraphs whose sentence templates are
  drawn without replacement, so no article repeats a sentence.
The first two are bounded (about 0.45M and 0.4M bytes on CPython 3.11); articles fill the rest.

Design choices
- Prose, not code or dialogue: docstring paragraphs must be mostly letters, unindented, and end
  a sentence; articles contain no code and no speaker turns.
- Held out: held-out topic sections and files (corpus_sources), less any docstring that a
  training file repeats; articles whose title hashes into the held-out split.
"""

from __future__ import annotations

import random
from typing import Iterator

from hydra_ray.data.corpus_sources import docstrings, held_out, in_training, shuffled, split_sections

_SYL = ("al", "bar", "cor", "dun", "el", "fen", "gal", "har", "is", "jor", "kel", "lim", "mar", "nor", "os",
        "pel", "quar", "ros", "sel", "tor", "ul", "ven", "wil", "yar", "zen", "ath", "bri", "cal", "dor", "eth")
_FIRST = ("Anna", "Bertil", "Clara", "Dmitri", "Edith", "Florian", "Hanne", "Ivo", "Johanna", "Karel", "Lucia",
          "Matthias", "Nadia", "Oskar", "Petra", "Rosa", "Stefan", "Tereza", "Viktor", "Wilhelmina")


def _name(rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> str:
    return "".join(rng.choice(_SYL) for _ in range(rng.randint(*syllables))).capitalize()


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {_name(rng)}"


# --------------------------------------------------------------------------- articles
_PLACE = {
    "intro": ["{name} is a {kind} in the {dir} of {region}, on the {side} bank of the river {river}.",
              "{name} is a {climate} {kind} of about {pop:,} people in the province of {region}.",
              "The {kind} of {name} lies {dist} kilometres {dir} of {neighbor}, at an elevation of {elev} metres."],
    "history": ["It was founded around {year} by settlers from {neighbor}, who were drawn by the {product} trade.",
                "Records first mention {name} in {year}, when {founder} was granted the right to hold a market there.",
                "A great fire in {year2} destroyed much of the old {kind}, and it was rebuilt in stone.",
                "During the {century} century the {kind} grew quickly, and its population doubled in a generation.",
                "For a long time {name} was overshadowed by its larger neighbour, {neighbor}.",
                "The arrival of the railway in {rail} ended a century of slow decline."],
    "life": ["Today the local economy rests on {product}, tourism and a small number of workshops.",
             "Its best-known landmark is the {feature}, which was restored in {year2}.",
             "Every {season} the {kind} holds a festival in honour of its founder, {founder}.",
             "The surrounding hills are planted with {crop}, and the harvest is sold at the weekly market.",
             "The {climate} climate and the nearby {hill} hills make it popular with walkers.",
             "Most of the older houses are built from the {stone} quarried a few kilometres upstream.",
             "The {kind} has a primary school, a library and a small museum of local history."],
}
_SPECIES = {
    "intro": ["The {adj} {animal} ({genus} {epithet}) is a {animal} found in the {habitat} of {region}.",
              "{genus} {epithet}, known locally as the {adj} {animal}, is a species of {animal} native to {region}.",
              "The {adj} {animal} is a {size} {animal} that lives mainly in {habitat}."],
    "history": ["It was first described in {year} by the naturalist {founder}, who collected it near {neighbor}.",
                "Early travellers confused it with the common {animal}, and it was not recognised as distinct "
                "until {year2}.",
                "Its scientific name honours the river {river}, where the first specimens were found."],
    "life": ["Adults reach a length of about {length} centimetres and are {colour} with paler markings.",
             "It feeds mostly on {diet}, and is most active at {time}.",
             "Breeding takes place in {season}, when the {animals} gather in small groups.",
             "It is considered {status} across most of its range, although local numbers vary from year to year.",
             "Changes in land use have reduced its habitat in the lowlands, but it remains common in the hills.",
             "Its call is a short, {adj2} note repeated several times.",
             "Young {animals} stay close to where they were born for their first year."],
}
_INSTITUTION = {
    "intro": ["The {org} of {name} was a {orgkind} active in {region} from {year} to {year2}.",
              "The {org} of {name} is a {orgkind} based in the city of {neighbor}, founded in {year}.",
              "The {org} of {name} grew out of a small {orgkind} of {product} merchants in {neighbor}."],
    "history": ["Its first charter was signed in {year} by {founder} and eleven other members.",
                "In its early years the {org} met in the back room of an inn near the river {river}.",
                "A dispute over {product} prices in the {century} century split the members into two camps.",
                "Under the leadership of {founder} it opened branches in {neighbor} and {region}.",
                "A long decline followed the collapse of the {product} trade in {year2}."],
    "life": ["Members paid a yearly fee and were expected to train at least one apprentice.",
             "The {org} kept detailed records, many of which survive in the archive at {neighbor}.",
             "Its hall, built in {year2}, is now used as a concert venue.",
             "Historians value its accounts as a rare record of everyday life in {region}.",
             "Its seal showed a {feature} above the river {river}.",
             "Each {season} the members elected a new master and settled their debts."],
}
_PERSON = {
    "intro": ["{founder} ({year}-{year3}) was a {job} from {name}, a {kind} in {region}.",
              "{founder} was a {job} of the {century} century, best known for work on the {feature} of {neighbor}.",
              "{founder}, born in {name} in {year}, was a {job} whose notebooks survive almost complete."],
    "history": ["{surname} grew up in a family of {product} merchants and was apprenticed at the age of twelve.",
                "After some years in {neighbor}, {surname} returned to {name} and opened a small workshop.",
                "In {year2} {surname} travelled along the river {river} and wrote a long account of the journey.",
                "A quarrel with the {org} of {neighbor} cost {surname} several commissions.",
                "Late in life {surname} taught a circle of younger students, among them several women."],
    "life": ["Contemporaries described {surname} as {trait} and unusually careful with money.",
             "Much of the surviving work is kept in the library at {neighbor}.",
             "{surname} never married, and left the house in {name} to the town.",
             "The {feature} in {name} still carries a plaque in {surname}'s honour.",
             "Modern historians read the letters of {surname} as a record of everyday life in {region}.",
             "A street in {neighbor} and a {adj} {animal} are named after {surname}."],
}
_KINDS = [("place", _PLACE), ("species", _SPECIES), ("institution", _INSTITUTION), ("person", _PERSON)]
_WORDS = {
    "kind": ["market town", "village", "port town", "mountain village", "river town", "small city"],
    "dir": ["north", "south", "east", "west", "north-east", "south-west"], "side": ["left", "right"],
    "climate": ["mild", "dry", "damp", "windy", "sunny", "cool"],
    "product": ["wool", "salt", "glass", "timber", "copper", "tea", "paper", "linen", "cheese", "pottery"],
    "feature": ["bell tower", "covered market", "stone bridge", "lighthouse", "observatory", "town hall"],
    "season": ["spring", "summer", "autumn", "winter"], "century": ["sixteenth", "seventeenth", "eighteenth"],
    "crop": ["olives", "vines", "barley", "apple orchards", "lavender", "hops"],
    "stone": ["grey limestone", "red sandstone", "dark granite", "pale chalk"],
    "adj": ["copper-winged", "spotted", "lesser", "marsh", "crested", "long-tailed", "mountain", "pale"],
    "adj2": ["whistling", "rasping", "clear", "rising", "falling"],
    "animal": ["warbler", "beetle", "newt", "finch", "moth", "vole", "heron", "dragonfly", "lizard"],
    "habitat": ["wetlands", "pine forests", "coastal cliffs", "high meadows", "river gravel beds", "reed beds"],
    "size": ["small", "medium-sized", "slender", "stocky"],
    "colour": ["brown", "olive green", "grey", "rust-coloured", "black", "sandy"],
    "diet": ["small insects", "seeds", "snails and worms", "fallen fruit", "water plants"],
    "time": ["dawn", "dusk", "night", "midday"], "status": ["common", "scarce", "stable", "declining"],
    "org": ["Guild", "Society", "League", "Company", "Brotherhood", "Academy"],
    "orgkind": ["trade guild", "learned society", "merchant league", "craft association"],
    "job": ["cartographer", "painter", "engineer", "botanist", "composer", "astronomer", "printer", "surveyor"],
    "trait": ["quiet", "stubborn", "generous", "restless", "witty", "patient"],
}


def article(rng: random.Random) -> tuple[str, str]:
    """(title, text) of one generated article."""
    kind, parts = rng.choice(_KINDS)
    facts = {k: rng.choice(v) for k, v in _WORDS.items()}
    year = rng.randint(900, 1850)
    facts.update(name=_name(rng), region=_name(rng), river=_name(rng, (2, 2)), neighbor=_name(rng),
                 hill=_name(rng, (2, 2)), founder=_person(rng), genus=_name(rng),
                 epithet=_name(rng).lower() + "a", year=year, year2=rng.randint(year + 20, 1990),
                 pop=rng.randint(8, 900) * 10, dist=rng.randint(4, 90), elev=rng.randint(2, 1400),
                 length=rng.randint(2, 60), rail=rng.randint(1835, 1910))
    facts.update(animals=facts["animal"] + ("es" if facts["animal"].endswith(("ch", "sh")) else "s"),
                 surname=facts["founder"].split()[-1], year3=facts["year2"] + rng.randint(1, 40))
    title = {"place": "{name}", "species": "{genus} {epithet}", "institution": "{org} of {name}",
             "person": "{founder}"}[kind].format(**facts)
    history = rng.sample(parts["history"], rng.randint(2, min(4, len(parts["history"]))))
    life = rng.sample(parts["life"], rng.randint(3, len(parts["life"])))
    cut = rng.randint(1, len(life) - 1)
    paras = [rng.choice(parts["intro"]), " ".join(history), " ".join(life[:cut]), " ".join(life[cut:])]
    text = "\n\n".join(p.format(**facts) for p in paras)
    return title, f"{title}\n\n{text}\n"


def articles(heldout: bool, rng: random.Random) -> Iterator[str]:
    while True:
        title, text = article(rng)
        if held_out(f"article:{title}") == heldout:
            yield text


# --------------------------------------------------------------------------- standard library
def _is_prose(p: str) -> bool:
    flat = " ".join(p.split())
    return (len(flat) >= 60 and flat.endswith(".") and ">>>" not in p and "::" not in p
            and not any(line.startswith((" ", "\t", "-", "*", ":")) for line in p.split("\n"))
            and sum(c.isalpha() or c == " " for c in flat) > 0.85 * len(flat))


def docstring_prose(heldout: bool, rng: random.Random, min_bytes: int = 300) -> Iterator[str]:
    for d in docstrings(heldout, rng, per_pass=6):
        paras = [p.strip() for p in d.text.split("\n\n") if _is_prose(p.strip())]
        text = "\n\n".join(paras)
        if len(text) >= min_bytes and not (heldout and in_training(text)):
            yield text + "\n"


def sources(heldout: bool, seed: str) -> list[tuple[float, Iterator[str]]]:
    # docstring prose stays a small share: chat replies are written from docstrings too, and a
    # window inside a long reply must not read like the web domain
    return [(0.3, shuffled(split_sections(heldout), random.Random(f"web-reference-{seed}"))),
            (0.1, docstring_prose(heldout, random.Random(f"web-docstrings-{seed}"))),
            (0.6, articles(heldout, random.Random(f"web-articles-{seed}")))]
