"""Synthetic GSM8K-style word problems, so the pipeline can run offline.

Real GSM8K is too hard for a tiny CPU model (SmolLM2-135M) to show measurable
learning in a few minutes. These problems keep GSM8K's *format* (a question,
a worked solution with one line per step, and a final ``#### <int>`` line) but
simplify the content: every problem is a chain of ``difficulty`` arithmetic
steps on one running quantity, operands are small (2..20, factors 2..5), every
intermediate count is a positive integer below 1000, and division only happens
when it is exact. The phrasing comes from a handful of templates, so a small
model can pick up the format and some arithmetic from a few hundred examples.
Solutions carry no ``<<3+4=7>>`` calculator annotations: the pipeline strips
those from real GSM8K, so the synthetic data should look like the cleaned data.
"""

from __future__ import annotations

import random
import re

# Ranges are module constants (not arguments) so tests can shrink the template
# space and exercise the "not enough unique questions" error path.
LO, HI = 2, 20  # operands for + and - and starting counts
FACTOR_HI = 5  # multipliers and divisors stay in 2..FACTOR_HI
RATE_HI, TIMES_HI = 12, 6  # "r items per day for t days" starts
MAX_VALUE = 999  # every intermediate and final count stays below 1000
MAX_DIFFICULTY = 5

NAMES = [  # (name, subject, possessive, object) pronouns keep sentences grammatical
    ("Sam", "he", "his", "him"),
    ("Mia", "she", "her", "her"),
    ("Tom", "he", "his", "him"),
    ("Lena", "she", "her", "her"),
    ("Omar", "he", "his", "him"),
    ("Priya", "she", "her", "her"),
    ("Leo", "he", "his", "him"),
    ("Ava", "she", "her", "her"),
    ("Ben", "he", "his", "him"),
    ("Zoe", "she", "her", "her"),
]

_MUL = [
    "{He} trades and ends up with {n} times as many {items} as before.",
    "By the end of the month {he} has {n} times as many {items} as before.",
]
_DIV = ["{He} splits {his} {items} into {n} equal groups and keeps only one group."]


def _scenario(
    item,
    items,
    rate,
    add,
    sub=(),
    *,
    mul=_MUL,
    div=_DIV,
    state="{name} has {expr} {noun}.",
    start=None,
    q=None,
):
    """One scenario. ``state`` states the running count (question start and every
    solution line); op templates always see n >= 2, so they use the plural."""
    ops = {"+": list(add), "-": list(sub), "*": list(mul), "/": list(div)}
    return {
        "item": item,
        "items": items,
        "rate": rate,
        "state": state,
        "start": start,
        "q": q or "How many {items} does {name} have now?",
        "ops": {k: v for k, v in ops.items() if v},
    }


SCENARIOS = [
    _scenario(
        "apple",
        "apples",
        "{name} picks {r} apples from each of {t} trees.",
        ["{He} picks {n} more apples.", "{His} neighbor gives {him} {n} apples."],
        ["{He} eats {n} apples.", "{He} gives {n} apples to a friend."],
    ),
    _scenario(
        "marble",
        "marbles",
        "{name} has {t} bags with {r} marbles in each bag.",
        ["{He} buys {n} more marbles.", "{He} wins {n} marbles in a game."],
        ["{He} gives away {n} marbles.", "{He} loses {n} marbles."],
    ),
    _scenario(
        "book",
        "books",
        "{name} has {t} shelves with {r} books on each shelf.",
        ["{He} buys {n} more books.", "{He} gets {n} books as gifts."],
        ["{He} donates {n} books to the library."],
    ),
    _scenario(
        "coin",
        "coins",
        "{name} saves {r} coins every day for {t} days.",
        ["{He} finds {n} more coins."],
        ["{He} spends {n} coins at the arcade."],
    ),
    _scenario(
        "page",
        "pages",
        "{name} reads {r} pages every day for {t} days.",
        ["On Saturday {he} reads {n} more pages.", "Before bed {he} reads {n} more pages."],
        mul=(),
        div=(),
        state="{name} has read {expr} {noun}.",
        q="How many pages has {name} read in total?",
    ),
    _scenario(
        "pencil",
        "pencils",
        "{name} buys {t} boxes of pencils with {r} pencils in each box.",
        ["{He} finds {n} more pencils in {his} desk."],
        ["{He} gives {n} pencils to {his} classmates."],
    ),
    _scenario(
        "dollar",
        "dollars",
        "{name} saves {r} dollars every week for {t} weeks.",
        ["{His} grandmother gives {him} {n} dollars.", "{He} earns {n} dollars walking dogs."],
        ["{He} spends {n} dollars on a gift."],
        mul=(),
        div=(),
    ),
    _scenario(
        "cookie",
        "cookies",
        "{name} bakes {t} batches of cookies with {r} cookies in each batch.",
        ["{He} bakes {n} more cookies."],
        ["{His} family eats {n} cookies."],
        mul=(),
        div=["{He} packs the cookies equally into {n} boxes and gives away all but one box."],
    ),
    _scenario(
        "passenger",
        "passengers",
        None,
        ["At the next stop, {n} passengers get on."],
        ["At the next stop, {n} passengers get off."],
        mul=(),
        div=(),
        state="The bus has {expr} {noun}.",
        start="{name} drives a bus with {expr} passengers.",
        q="How many passengers are on the bus now?",
    ),
    _scenario(
        "sticker",
        "stickers",
        "{name} buys {t} sheets of stickers with {r} stickers on each sheet.",
        ["{He} gets {n} stickers from {his} teacher."],
        ["{He} uses {n} stickers on a card."],
    ),
    _scenario(
        "egg",
        "eggs",
        "{name} collects {r} eggs every day for {t} days.",
        ["{His} neighbor brings {n} more eggs."],
        ["{He} uses {n} eggs to make breakfast."],
        mul=(),
        div=["{He} puts the eggs equally into {n} cartons and sells all but one carton."],
    ),
    _scenario(
        "card",
        "cards",
        "{name} buys {t} packs of cards with {r} cards in each pack.",
        ["{He} trades for {n} more cards."],
        ["{He} gives {n} cards to {his} brother."],
    ),
]


def _operand(rng: random.Random, op: str, a: int) -> int | None:
    """A second operand that keeps the result a positive integer <= MAX_VALUE, or None."""
    if op == "+":
        return rng.randint(LO, HI) if a + LO <= MAX_VALUE else None
    if op == "-":  # leave at least one item: no negative (or empty) counts
        return rng.randint(LO, min(HI, a - 1)) if a - 1 >= LO else None
    if op == "*":
        top = min(FACTOR_HI, MAX_VALUE // a)
        return rng.randint(2, top) if top >= 2 else None
    divisors = [d for d in range(2, FACTOR_HI + 1) if a % d == 0]  # exact division only
    return rng.choice(divisors) if divisors else None


def _apply(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def _problem(rng: random.Random, difficulty: int) -> dict:
    sc = rng.choice(SCENARIOS)
    name, he, his, him = rng.choice(NAMES)
    f = {
        "name": name,
        "he": he,
        "He": he.capitalize(),
        "his": his,
        "His": his.capitalize(),
        "him": him,
        "item": sc["item"],
        "items": sc["items"],
    }

    def state(expr: str, value: int) -> str:
        noun = sc["item"] if value == 1 else sc["items"]
        return sc["state"].format(expr=expr, noun=noun, **f)

    question, solution, steps = [], [], difficulty
    if sc["rate"] and rng.random() < 0.5:  # a "rate x time" start is itself the first step
        r, t = rng.randint(LO, RATE_HI), rng.randint(2, TIMES_HI)
        total = r * t
        question.append(sc["rate"].format(r=r, t=t, **f))
        solution.append(state(f"{r} * {t} = {total}", total))
        steps -= 1
    else:
        total = rng.randint(LO, HI)
        question.append((sc["start"] or sc["state"]).format(expr=total, noun=sc["items"], **f))
    last = None
    for _ in range(steps):
        # Only ops that stay in range are candidates; "+" almost always is. Avoid
        # repeating the previous op when possible so chains read less mechanically.
        options = [(op, b) for op in sc["ops"] if (b := _operand(rng, op, total)) is not None]
        op, b = rng.choice([o for o in options if o[0] != last] or options)
        last = op
        new = _apply(op, total, b)
        question.append(rng.choice(sc["ops"][op]).format(n=b, **f))
        solution.append(state(f"{total} {op} {b} = {new}", new))
        total = new
    question.append(sc["q"].format(**f))
    solution.append(f"#### {total}")
    return {"question": " ".join(question), "answer": "\n".join(solution)}


def _check(difficulty: int) -> None:
    if not 1 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty must be in 1..{MAX_DIFFICULTY}, got {difficulty}")


def generate(n: int, *, seed: int, difficulty: int = 2) -> list[dict]:
    """n problems, each {"question": str, "answer": str} in GSM8K format."""
    _check(difficulty)
    rng = random.Random(seed)  # private RNG: same (n, seed, difficulty) -> same list
    return [_problem(rng, difficulty) for _ in range(n)]


def normalise(text: str) -> str:
    """Lowercase and collapse non-alphanumerics, for duplicate detection."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def generate_splits(
    n_train: int, n_test: int, *, seed: int, difficulty: int = 2
) -> tuple[list[dict], list[dict]]:
    """Train and test sets with no question text in both (normalised: lowercase, collapse non-alphanumerics)."""
    _check(difficulty)
    rng = random.Random(seed)
    wanted = n_train + n_test
    seen: set[str] = set()
    unique: list[dict] = []
    # Generous budget: with a large template space almost every draw is new, so
    # running out means the request exceeds what the templates can produce.
    for _ in range(100 * wanted + 1000):
        if len(unique) == wanted:
            break
        p = _problem(rng, difficulty)
        key = normalise(p["question"])
        if key not in seen:  # one shared set dedups within and across splits
            seen.add(key)
            unique.append(p)
    if len(unique) < wanted:
        raise ValueError(
            f"only found {len(unique)} unique questions at difficulty {difficulty} but "
            f"{wanted} were requested ({n_train} train + {n_test} test); the template space "
            "is too small: ask for fewer problems or a higher difficulty"
        )
    return unique[:n_train], unique[n_train:]
