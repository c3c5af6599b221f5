"""The `math` domain: generated problems with worked steps, in short worksheets.

Design choices
- Every problem is written the same way, so a model's final answer can be exact-matched:
      Problem: <statement>
      Solution: <first step>
      <more steps>
      Answer: <answer>.
  `problem(rng)` returns (statement, steps, answer); `render` writes it; an evaluation prompt is the
  text up to and including `Solution:` and its answer the string after `Answer: ` (no final '.').
- Answer formats, one per kind of quantity: integers (`-12`), reduced fractions (`7/12`),
  decimals without trailing zeros (`14.5`), money (`$3.50`; whole dollars `$360`), quantities
  with a unit (`2500 m`), variables (`x = 4`, `x = 3, y = -2`, `x = -3 or x = 5`), times (`12:15`),
  `yes` / `no`, a percentage (`35%`), prime factorisations (`2^3 * 3 * 5`).
- Numbers are drawn so every answer is exact (no rounding), and families share the draw of one
  `random.Random`, so the documents depend only on (seed, budget).
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from typing import Callable, Iterator

from hydra_ray.data.corpus_sources import held_out

Problem = tuple[str, list[str], str]
NAMES = ("Ava", "Ben", "Chloe", "Daniel", "Elena", "Farid", "Grace", "Hiro", "Isla", "Jonas", "Kemi",
         "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Ravi", "Sofia", "Tomas", "Uma", "Wen")


def num(x: Fraction | int) -> str:
    """An exact number: integer, else terminating decimal, else reduced fraction."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    d = x.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d != 1:
        return f"{x.numerator}/{x.denominator}"
    places = 0
    while (x * 10**places).denominator != 1:
        places += 1
    return f"{float(x):.{places}f}"


def frac(x: Fraction) -> str:
    return str(Fraction(x))


def money(x: Fraction | int) -> str:
    x = Fraction(x)
    return f"${x.numerator // x.denominator}" if x.denominator == 1 else f"${float(x):.2f}"


def count(k: int, word: str) -> str:
    """'1 hour', '3 hours'."""
    return f"{k} {word}" if k == 1 else f"{k} {word}s"


def _signed(coef: int, var: str, first: bool = False) -> str:
    """A term of a linear expression: '3x', ' - 2y', ' + y'."""
    mag = "" if abs(coef) == 1 and var else str(abs(coef))
    if first:
        return f"{'-' if coef < 0 else ''}{mag}{var}"
    return f" {'-' if coef < 0 else '+'} {mag}{var}"


# --------------------------------------------------------------------------- algebra
def linear(rng: random.Random) -> Problem:
    a, x, b = rng.randint(2, 12), rng.randint(-20, 20), rng.randint(-30, 30)
    c = a * x + b
    lhs = f"{a}x{_signed(b, '')}" if b else f"{a}x"
    st = rng.choice([f"Solve {lhs} = {c} for x.", f"Find x if {lhs} = {c}.",
                     f"What value of x makes {lhs} = {c} true?"])
    steps = [f"{'Subtract' if b >= 0 else 'Add'} {abs(b)} {'from' if b >= 0 else 'to'} both sides: {a}x = {c - b}.",
             f"Divide both sides by {a}: x = {x}.", f"Check: {a} * {x}{_signed(b, '')} = {c}."]
    return st, steps, f"x = {x}"


def quadratic(rng: random.Random) -> Problem:
    r1, r2 = sorted((rng.randint(-9, 9), rng.randint(-9, 9)))
    b, c = -(r1 + r2), r1 * r2
    eq = f"x^2{_signed(b, 'x') if b else ''}{_signed(c, '') if c else ''} = 0"
    st = rng.choice([f"Find the roots of {eq}.", f"Solve {eq} by factoring."])
    steps = [f"We need two numbers whose sum is {r1 + r2} and whose product is {c}: {r1} and {r2}.",
             f"So the equation is (x{_signed(-r1, '')})(x{_signed(-r2, '')}) = 0." if r1 and r2 else
             f"So the equation factors with the roots {r1} and {r2}.",
             "Each factor can be zero." if r1 != r2 else "Both factors are the same, so there is one root."]
    return st, steps, f"x = {r1}" if r1 == r2 else f"x = {r1} or x = {r2}"


def system(rng: random.Random) -> Problem:
    x, y = rng.randint(-9, 9), rng.randint(-9, 9)
    while True:
        a1, b1, a2, b2 = (rng.choice([-1, 1]) * rng.randint(1, 7) for _ in range(4))
        if a1 * b2 - a2 * b1:
            break
    c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
    e1, e2 = f"{_signed(a1, 'x', True)}{_signed(b1, 'y')} = {c1}", f"{_signed(a2, 'x', True)}{_signed(b2, 'y')} = {c2}"
    k = b1 * a2 - b2 * a1
    steps = [f"Multiply the first equation by {a2} and the second by {a1}, then subtract to remove x.",
             f"This leaves {k}y = {c1 * a2 - c2 * a1}, so y = {y}.",
             f"Put y = {y} into the first equation: {a1}x = {c1} - ({b1 * y}) = {c1 - b1 * y}, so x = {x}."]
    return f"Solve the system {e1} and {e2}.", steps, f"x = {x}, y = {y}"


def powers(rng: random.Random) -> Problem:
    a, m, n = rng.randint(2, 5), rng.randint(1, 5), rng.randint(1, 4)
    kind = rng.randrange(3)
    if kind == 0:
        return (f"Compute {a}^{m + n}.", [f"Multiply {a} by itself {m + n} times: "
                + " * ".join([str(a)] * (m + n)) + "."], str(a ** (m + n)))
    if kind == 1:
        return (f"Evaluate {a}^{m} * {a}^{n}.", [f"Add the exponents: {a}^{m} * {a}^{n} = {a}^{m + n}.",
                                                 f"{a}^{m + n} = {a ** (m + n)}."], str(a ** (m + n)))
    return (f"Evaluate ({a}^{m})^{n}.", [f"Multiply the exponents: ({a}^{m})^{n} = {a}^{m * n}.",
                                         f"{a}^{m * n} = {a ** (m * n)}."], str(a ** (m * n)))


# --------------------------------------------------------------------------- arithmetic
def arith(rng: random.Random) -> Problem:
    a, b, c = rng.randint(2, 999), rng.randint(2, 99), rng.randint(2, 99)
    kind = rng.randrange(3)
    if kind == 0:
        return (f"Compute {a} + {b} * {c}.", [f"Multiplication comes first: {b} * {c} = {b * c}.",
                                              f"Then add: {a} + {b * c} = {a + b * c}."], str(a + b * c))
    if kind == 1:
        return (f"Compute ({a} - {b}) * {c}.", [f"Brackets first: {a} - {b} = {a - b}.",
                                                f"Then multiply: {a - b} * {c} = {(a - b) * c}."], str((a - b) * c))
    q = b * c
    return (f"Compute {a} - {q} / {b}.", [f"Division comes first: {q} / {b} = {c}.",
                                          f"Then subtract: {a} - {c} = {a - c}."], str(a - c))


def fractions(rng: random.Random) -> Problem:
    p = Fraction(rng.randint(1, 9), rng.randint(2, 12))
    q = Fraction(rng.randint(1, 9), rng.randint(2, 12))
    kind = rng.choice("+-*")
    if kind == "*":
        r = p * q
        return (f"Multiply {p} by {q}.", [f"Multiply the numerators and the denominators: "
                                          f"{p.numerator * q.numerator}/{p.denominator * q.denominator}.",
                                          f"Simplify: {frac(r)}."], frac(r))
    den = p.denominator * q.denominator // math.gcd(p.denominator, q.denominator)
    a, b = p.numerator * den // p.denominator, q.numerator * den // q.denominator
    r = p + q if kind == "+" else p - q
    verb = "Add" if kind == "+" else "Subtract"
    st = f"Add {p} and {q}." if kind == "+" else f"Subtract {q} from {p}."
    top = a + b if kind == "+" else a - b
    return (st, [f"{verb} over the common denominator {den}: {a}/{den} {kind} {b}/{den} = {top}/{den}.",
                 f"Simplify: {frac(r)}."], frac(r))


def compare(rng: random.Random) -> Problem:
    while True:
        p, q = Fraction(rng.randint(1, 11), rng.randint(2, 12)), Fraction(rng.randint(1, 11), rng.randint(2, 12))
        if p != q and p.denominator != q.denominator:
            break
    big = max(p, q)
    return (f"Which is larger, {p} or {q}?",
            [f"Cross-multiply: {p.numerator} * {q.denominator} = {p.numerator * q.denominator} and "
             f"{q.numerator} * {p.denominator} = {q.numerator * p.denominator}.",
             f"The larger product belongs to {big}."], frac(big))


def gcd_lcm(rng: random.Random) -> Problem:
    g = rng.randint(2, 15)
    a, b = g * rng.randint(2, 20), g * rng.randint(2, 20)
    a, b = max(a, b), min(a, b)
    if a == b:
        a += g
    steps, x, y = [], a, b
    while y:
        steps.append(f"{x} = {x // y} * {y} + {x % y}.")
        x, y = y, x % y
    steps.append(f"The last non-zero remainder is {x}, so gcd({a}, {b}) = {x}.")
    if rng.random() < 0.5:
        return f"Find the greatest common divisor of {a} and {b}.", ["Use Euclid's algorithm."] + steps, str(x)
    steps.append(f"lcm({a}, {b}) = {a} * {b} / {x} = {a * b // x}.")
    return f"Find the least common multiple of {a} and {b}.", ["First find the gcd with Euclid's algorithm."] + steps, \
        str(a * b // x)


def factorise(rng: random.Random) -> Problem:
    n = 1
    for _ in range(rng.randint(2, 5)):
        n *= rng.choice([2, 2, 3, 3, 5, 7, 11, 13])
    steps, m, found = [], n, []
    for p in (2, 3, 5, 7, 11, 13):
        while m % p == 0:
            steps.append(f"{m} / {p} = {m // p}.")
            m //= p
            found.append(p)
    answer = " * ".join(f"{p}^{found.count(p)}" if found.count(p) > 1 else str(p) for p in sorted(set(found)))
    steps.insert(0, "Divide by the smallest prime that divides it.")
    return f"Write {n} as a product of prime factors.", steps, answer


def divisibility(rng: random.Random) -> Problem:
    d = rng.choice([2, 3, 4, 5, 6, 9, 10])
    n = rng.randint(100, 99999) if rng.random() < 0.5 else d * rng.randint(12, 9999)
    digits = sum(int(c) for c in str(n))
    rule = {2: f"The last digit is {n % 10}.", 5: f"The last digit is {n % 10}.", 10: f"The last digit is {n % 10}.",
            3: f"The digit sum is {digits}, and {digits} mod 3 = {digits % 3}.",
            9: f"The digit sum is {digits}, and {digits} mod 9 = {digits % 9}.",
            4: f"The last two digits form {n % 100}, and {n % 100} mod 4 = {n % 100 % 4}.",
            6: f"It must be divisible by 2 and 3: the last digit is {n % 10} and the digit sum is {digits}."}[d]
    yes = n % d == 0
    return (f"Is {n} divisible by {d}?", [rule, f"So {n} is {'' if yes else 'not '}divisible by {d}."],
            "yes" if yes else "no")


# --------------------------------------------------------------------------- quantities
def percent(rng: random.Random) -> Problem:
    p, base = 5 * rng.randint(1, 19), 20 * rng.randint(1, 40)
    kind = rng.randrange(3)
    part = base * p // 100
    if kind == 0:
        return (f"What is {p}% of {base}?", [f"{p}% means {p}/100.", f"{base} * {p} / 100 = {part}."], str(part))
    if kind == 1:
        return (f"{part} is what percent of {base}?",
                [f"Divide the part by the whole: {part} / {base} = {num(Fraction(part, base))}.",
                 f"Multiply by 100: {p}%."], f"{p}%")
    new = base + part
    return (f"A price rises from {money(base)} to {money(new)}. What is the percentage increase?",
            [f"The increase is {money(new)} - {money(base)} = {money(part)}.",
             f"As a share of the old price: {part} / {base} * 100 = {p}%."], f"{p}%")


_UNITS = [("km", "km", "m", 1000), ("m", "m", "cm", 100), ("kg", "kg", "g", 1000), ("L", "L", "mL", 1000),
          ("hours", "hour", "minutes", 60), ("minutes", "minute", "seconds", 60), ("days", "day", "hours", 24),
          ("weeks", "week", "days", 7), ("feet", "foot", "inches", 12), ("yards", "yard", "feet", 3),
          ("pounds", "pound", "ounces", 16), ("cm", "cm", "mm", 10)]


def units(rng: random.Random) -> Problem:
    big, one, small, f = rng.choice(_UNITS)
    v = Fraction(rng.randint(1, 40), rng.choice([1, 1, 2, 4]))
    name = one if v == 1 else big
    if rng.random() < 0.5:
        return (f"Convert {num(v)} {name} to {small}.", [f"There are {f} {small} in one {one}.",
                                                        f"{num(v)} * {f} = {num(v * f)}."], f"{num(v * f)} {small}")
    w = v * f
    return (f"How many {big} is {num(w)} {small}?", [f"There are {f} {small} in one {one}.",
                                                     f"{num(w)} / {f} = {num(v)}."], f"{num(v)} {name}")


def geometry(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    shape = rng.randrange(4)
    if shape == 0:
        return (f"A rectangle is {a} cm long and {b} cm wide. What is its area?",
                [f"Area = length * width = {a} * {b} = {a * b}."], f"{a * b} cm^2")
    if shape == 1:
        return (f"A rectangle is {a} m long and {b} m wide. What is its perimeter?",
                [f"Perimeter = 2 * (length + width) = 2 * ({a} + {b}) = {2 * (a + b)}."], f"{2 * (a + b)} m")
    if shape == 2:
        return (f"A triangle has base {a} cm and height {b} cm. What is its area?",
                [f"Area = base * height / 2 = {a} * {b} / 2 = {num(Fraction(a * b, 2))}."],
                f"{num(Fraction(a * b, 2))} cm^2")
    return (f"A square has sides of {a} m. What are its area and perimeter?",
            [f"Area = {a} * {a} = {a * a}.", f"Perimeter = 4 * {a} = {4 * a}."], f"{a * a} m^2, {4 * a} m")


def statistics(rng: random.Random) -> Problem:
    xs = [rng.randint(1, 60) for _ in range(rng.randint(5, 8))]
    listed = ", ".join(map(str, xs))
    if rng.random() < 0.5:
        xs[-1] += -sum(xs) % len(xs)  # a whole-number mean
        listed = ", ".join(map(str, xs))
        m = sum(xs) // len(xs)
        return (f"Find the mean of {listed}.", [f"The sum is {sum(xs)} and there are {len(xs)} numbers.",
                                                f"{sum(xs)} / {len(xs)} = {m}."], str(m))
    s, k = sorted(xs), len(xs)
    steps = [f"Sort the numbers: {', '.join(map(str, s))}."]
    if k % 2:
        steps.append(f"The middle one is number {k // 2 + 1}: {s[k // 2]}.")
        med = Fraction(s[k // 2])
    else:
        med = Fraction(s[k // 2 - 1] + s[k // 2], 2)
        steps.append(f"The two middle ones are {s[k // 2 - 1]} and {s[k // 2]}; their average is {num(med)}.")
    return f"Find the median of {listed}.", steps, num(med)


def interest(rng: random.Random) -> Problem:
    p, r, t = 100 * rng.randint(2, 80), rng.randint(1, 12), rng.randint(1, 6)
    i = p * r * t // 100
    steps = [f"Simple interest = principal * rate * time = {money(p)} * {r}/100 * {t} = {money(i)}."]
    if rng.random() < 0.5:
        return f"Find the simple interest on {money(p)} at {r}% a year for {count(t, 'year')}.", steps, money(i)
    return (f"{money(p)} is saved at {r}% simple interest a year. How much is there after {count(t, 'year')}?",
            steps + [f"Add it to the principal: {money(p)} + {money(i)} = {money(p + i)}."], money(p + i))


def motion(rng: random.Random) -> Problem:
    s, t = 5 * rng.randint(2, 24), rng.randint(1, 9)
    d, kind = s * t, rng.randrange(3)
    if kind == 0:
        return (f"A car travels at {s} km/h for {count(t, 'hour')}. How far does it go?",
                [f"Distance = speed * time = {s} * {t} = {d}."], f"{d} km")
    if kind == 1:
        return (f"A cyclist covers {d} km at {s} km/h. How long does it take?",
                [f"Time = distance / speed = {d} / {s} = {t}."], count(t, "hour"))
    return (f"A train covers {d} km in {count(t, 'hour')}. What is its average speed?",
            [f"Speed = distance / time = {d} / {t} = {s}."], f"{s} km/h")


# --------------------------------------------------------------------------- stories
def story(rng: random.Random) -> Problem:
    a, b = rng.sample(NAMES, 2)
    kind = rng.randrange(4)
    if kind == 0:
        k, cents = rng.randint(2, 9), 25 * rng.randint(2, 19)
        price, bill = Fraction(cents, 100), rng.choice([10, 20, 50])
        item = rng.choice(["notebooks", "apples", "pens", "tickets", "muffins"])
        cost = k * price
        if cost >= bill:
            bill = 100
        return (f"{a} buys {k} {item} at {money(price)} each and pays with a {money(bill)} note. How much change "
                f"does {a} get?", [f"The {item} cost {k} * {money(price)} = {money(cost)}.",
                                   f"Change: {money(bill)} - {money(cost)} = {money(bill - cost)}."],
                money(bill - cost))
    if kind == 1:
        x, g, c = rng.randint(20, 90), rng.randint(1, 19), rng.randint(1, 30)
        thing = rng.choice(["marbles", "stickers", "stamps", "shells", "cards"])
        return (f"{a} has {x} {thing}, gives {g} to {b}, and then finds {c} more. How many {thing} does {a} have now?",
                [f"After giving some away: {x} - {g} = {x - g}.", f"After finding more: {x - g} + {c} = {x - g + c}."],
                str(x - g + c))
    if kind == 2:
        per, days = rng.randint(12, 60), rng.randint(3, 7)
        sold = rng.randint(per, per * days)
        return (f"A bakery run by {a} bakes {per} loaves a day for {days} days and sells {sold} of them. How many "
                f"loaves are left?", [f"Baked: {per} * {days} = {per * days}.",
                                      f"Left: {per * days} - {sold} = {per * days - sold}."], str(per * days - sold))
    h, m, dh, dm = rng.randint(5, 14), 5 * rng.randint(0, 11), rng.randint(0, 6), 5 * rng.randint(1, 11)
    end = (h * 60 + m + dh * 60 + dm) % (24 * 60)
    ans = f"{end // 60:02d}:{end % 60:02d}"
    return (f"{a}'s train leaves at {h:02d}:{m:02d} and the journey takes {dh} h {dm} min. When does it arrive?",
            [f"Add the hours: {h + dh:02d}:{m:02d}.", f"Add {dm} minutes: {ans}."], ans)


def ratio(rng: random.Random) -> Problem:
    a, b = rng.sample(NAMES, 2)
    p, q = rng.randint(1, 7), rng.randint(1, 7)
    unit = rng.randint(2, 40)
    total = (p + q) * unit
    return (f"{a} and {b} share {money(total)} in the ratio {p}:{q}. How much does {a} get?",
            [f"There are {p} + {q} = {p + q} parts, each worth {money(total)} / {p + q} = {money(unit)}.",
             f"{a} gets {count(p, 'part')}: {p} * {money(unit)} = {money(p * unit)}."], money(p * unit))


FAMILIES: dict[str, Callable[[random.Random], Problem]] = {
    f.__name__: f for f in (linear, quadratic, system, powers, arith, fractions, compare, gcd_lcm, factorise,
                            divisibility, percent, units, geometry, statistics, interest, motion, story, ratio)}


def render(problem: Problem) -> str:
    statement, steps, answer = problem
    body = "\n".join(steps)
    return f"Problem: {statement}\nSolution: {body}\nAnswer: {answer}.\n"


def prompt(statement: str) -> str:
    return f"Problem: {statement}\nSolution:"


def problems(heldout: bool, rng: random.Random) -> Iterator[Problem]:
    """An endless stream of problems of the split: a family at random, then its numbers."""
    makers = list(FAMILIES.values())
    while True:
        p = rng.choice(makers)(rng)
        if held_out(p[0]) == heldout:
            yield p


def worksheets(heldout: bool, rng: random.Random) -> Iterator[str]:
    """Documents: 3 to 6 problems each, separated by blank lines."""
    stream = problems(heldout, rng)
    while True:
        yield "\n".join(render(next(stream)) for _ in range(rng.randint(3, 6)))


def math_tasks(n: int, seed: int) -> list[tuple[str, str]]:
    """n held-out (prompt, answer) pairs: the prompt ends with `Solution:`, the answer is the text
    training writes after `Answer: `."""
    stream = problems(True, random.Random(f"math-eval-{seed}"))
    return [(prompt(st), answer) for st, _, answer in (next(stream) for _ in range(n))]
