"""Deterministic generator of the bundled instruction data set.

``python -m dropbp.app.data.generate`` (re)writes ``train.jsonl`` and ``heldout.jsonl`` next to
this file. Every line is ``{"prompt": ..., "response": ..., "task": ...}``. The answers are
short (a number, a word, an ISO date, a comma-separated list) so that exact match is a
meaningful metric, and every prompt says the answer format it expects.

Tasks (one ``random.Random`` per task, seeded from the global seed and the task name, so
that the output is byte-for-byte reproducible and one task's changes do not shift another's
examples; the global ``random`` state is never used):

* ``arithmetic`` -- addition, subtraction and multiplication of small integers;
* ``unit_conversion`` -- km/m, kg/g, hours/minutes, ... with integer answers;
* ``string`` -- reverse, uppercase, length, letter count, first/last letter of a word;
* ``sorting`` -- sort 3-5 distinct small integers (mostly ascending);
* ``date`` -- ISO date plus/minus N days, weekday of a date;
* ``facts`` -- a hand-written table of capitals, chemical elements, planets and opposites,
  asked with several phrasings.

All prompts are unique within and across the splits, so no held-out prompt occurs in the
training split. ``--check`` verifies the shipped files instead of writing them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "DEFAULT_SEED",
    "SPLIT_SIZES",
    "TASKS",
    "generate_splits",
    "main",
    "render_jsonl",
    "write_splits",
]

DEFAULT_SEED = 0

# Examples per task: (train, heldout). Totals: 2400 train, 240 held-out.
SPLIT_SIZES: dict[str, tuple[int, int]] = {
    "arithmetic": (440, 44),
    "unit_conversion": (400, 40),
    "string": (440, 44),
    "sorting": (390, 39),
    "date": (400, 40),
    "facts": (330, 33),
}
TASKS: tuple[str, ...] = tuple(SPLIT_SIZES)

NUMBER_ONLY = "Answer with the number only."

# --------------------------------------------------------------------------- arithmetic

_ADD = (
    "What is {a} + {b}? " + NUMBER_ONLY,
    "Compute {a} plus {b}. " + NUMBER_ONLY,
    "Add {a} and {b}. " + NUMBER_ONLY,
)
_SUB = (
    "What is {a} - {b}? " + NUMBER_ONLY,
    "Compute {a} minus {b}. " + NUMBER_ONLY,
    "Subtract {b} from {a}. " + NUMBER_ONLY,
)
_MUL = (
    "What is {a} * {b}? " + NUMBER_ONLY,
    "Compute {a} times {b}. " + NUMBER_ONLY,
    "Multiply {a} by {b}. " + NUMBER_ONLY,
)


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice(("add", "sub", "mul"))
    if op == "add":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return rng.choice(_ADD).format(a=a, b=b), str(a + b)
    if op == "sub":
        a = rng.randint(10, 99)
        b = rng.randint(1, a)
        return rng.choice(_SUB).format(a=a, b=b), str(a - b)
    a, b = rng.randint(2, 19), rng.randint(2, 9)
    if rng.randrange(2):
        a, b = b, a
    return rng.choice(_MUL).format(a=a, b=b), str(a * b)


# ---------------------------------------------------------------------- unit conversion

# (big unit singular, big unit plural, small unit plural, factor, max count of big units)
_UNITS: tuple[tuple[str, str, str, int, int], ...] = (
    ("kilometer", "kilometers", "meters", 1000, 50),
    ("meter", "meters", "centimeters", 100, 50),
    ("centimeter", "centimeters", "millimeters", 10, 90),
    ("kilogram", "kilograms", "grams", 1000, 50),
    ("liter", "liters", "milliliters", 1000, 30),
    ("hour", "hours", "minutes", 60, 48),
    ("minute", "minutes", "seconds", 60, 60),
    ("day", "days", "hours", 24, 30),
    ("week", "weeks", "days", 7, 52),
    ("foot", "feet", "inches", 12, 30),
    ("yard", "yards", "feet", 3, 60),
    ("dozen", "dozens", "items", 12, 20),
)


def _count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


def _unit_conversion(rng: random.Random) -> tuple[str, str]:
    singular, plural, small, factor, top = rng.choice(_UNITS)
    n = rng.randint(1, top)
    big = _count(n, singular, plural)
    if rng.randrange(4) == 0:  # small -> big, exact division
        return (
            f"Convert {n * factor} {small} to {plural}. {NUMBER_ONLY}",
            str(n),
        )
    form = rng.randrange(2)
    if form == 0:
        return f"Convert {big} to {small}. {NUMBER_ONLY}", str(n * factor)
    return f"How many {small} are in {big}? {NUMBER_ONLY}", str(n * factor)


# ------------------------------------------------------------------------------ strings

_WORDS: tuple[str, ...] = tuple(
    """
    apple river garden planet silver window yellow orange pencil bottle candle rabbit
    monkey forest castle bridge market doctor summer winter spring autumn butter cotton
    dragon engine finger guitar hammer island jacket kitten ladder marble needle office
    pepper pocket rocket saddle tomato velvet wallet basket camera dinner flower lemon
    mango piano tiger zebra house mouse cloud storm bread chair table phone train plane
    horse sheep goat snake eagle shark whale stone brick glass paper metal water fire earth
    light night music dance smile heart brain sugar honey salt spoon knife plate clock
    watch shirt shoes dress scarf queen king prince crown sword magic dream ocean beach
    shore coral pearl tulip daisy maple cedar pine grape peach melon berry olive onion
    carrot potato radish banana cherry walnut coffee cookie pizza pasta salad noodle
    violin trumpet drum flute cabin tent canoe wagon bicycle rocket robot laptop mirror
    button ribbon puzzle letter stamp ticket anchor harbor lantern meadow valley desert
    canyon glacier volcano thunder rainbow comet galaxy
    """.split()
)
_WORDS = tuple(dict.fromkeys(_WORDS))  # drop repeats, keep order


def _string(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    op = rng.choice(("reverse", "upper", "length", "count", "first", "last"))
    if op == "reverse":
        return (
            f'Reverse the letters of the word "{word}". Answer with the reversed word only.',
            word[::-1],
        )
    if op == "upper":
        return (
            f'Write the word "{word}" in uppercase letters. Answer with the word only.',
            word.upper(),
        )
    if op == "length":
        return f'How many letters are in the word "{word}"? {NUMBER_ONLY}', str(len(word))
    if op == "count":
        letter = rng.choice(word) if rng.randrange(5) else rng.choice("abcdefghijklmnopqrstuvwxyz")
        return (
            f'How many times does the letter "{letter}" appear in "{word}"? {NUMBER_ONLY}',
            str(word.count(letter)),
        )
    if op == "first":
        return (
            f'What is the first letter of the word "{word}"? Answer with the letter only.',
            word[0],
        )
    return (
        f'What is the last letter of the word "{word}"? Answer with the letter only.',
        word[-1],
    )


# ------------------------------------------------------------------------------ sorting

_SORT_FORMAT = "Answer with the numbers separated by commas."


def _sorting(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    shown = ", ".join(map(str, numbers))
    if rng.randrange(4) == 0:
        answer = sorted(numbers, reverse=True)
        prompt = f"Sort these numbers in descending order: {shown}. {_SORT_FORMAT}"
    else:
        answer = sorted(numbers)
        prompt = f"Sort these numbers in ascending order: {shown}. {_SORT_FORMAT}"
    return prompt, ", ".join(map(str, answer))


# -------------------------------------------------------------------------------- dates

# Weekday names are spelled out here: strftime("%A") depends on the locale.
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_DATE_FORMAT = "Answer in YYYY-MM-DD format."
_FIRST_DAY = _dt.date(2020, 1, 1)
_N_DAYS = (_dt.date(2026, 12, 31) - _FIRST_DAY).days + 1


def _date(rng: random.Random) -> tuple[str, str]:
    day = _FIRST_DAY + _dt.timedelta(days=rng.randrange(_N_DAYS))
    form = rng.randrange(5)
    if form <= 1:
        n = rng.randint(1, 40)
        unit = "day" if n == 1 else "days"
        return (
            f"What date is {n} {unit} after {day.isoformat()}? {_DATE_FORMAT}",
            (day + _dt.timedelta(days=n)).isoformat(),
        )
    if form == 2:
        n = rng.randint(1, 40)
        unit = "day" if n == 1 else "days"
        return (
            f"What date is {n} {unit} before {day.isoformat()}? {_DATE_FORMAT}",
            (day - _dt.timedelta(days=n)).isoformat(),
        )
    return (
        f"What day of the week is {day.isoformat()}? Answer with the weekday name only.",
        WEEKDAYS[day.weekday()],
    )


# -------------------------------------------------------------------------------- facts

CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Russia", "Moscow"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Australia", "Canberra"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("the United Kingdom", "London"),
    ("Belgium", "Brussels"),
    ("Hungary", "Budapest"),
    ("Turkey", "Ankara"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"),
    ("the Philippines", "Manila"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Cuba", "Havana"),
    ("Nigeria", "Abuja"),
    ("Morocco", "Rabat"),
    ("Ethiopia", "Addis Ababa"),
    ("Ghana", "Accra"),
    ("Saudi Arabia", "Riyadh"),
    ("Pakistan", "Islamabad"),
    ("Romania", "Bucharest"),
    ("New Zealand", "Wellington"),
    ("Venezuela", "Caracas"),
)

# (name, symbol, atomic number)
ELEMENTS: tuple[tuple[str, str, int], ...] = (
    ("hydrogen", "H", 1),
    ("helium", "He", 2),
    ("lithium", "Li", 3),
    ("beryllium", "Be", 4),
    ("boron", "B", 5),
    ("carbon", "C", 6),
    ("nitrogen", "N", 7),
    ("oxygen", "O", 8),
    ("fluorine", "F", 9),
    ("neon", "Ne", 10),
    ("sodium", "Na", 11),
    ("magnesium", "Mg", 12),
    ("silicon", "Si", 14),
    ("phosphorus", "P", 15),
    ("sulfur", "S", 16),
    ("chlorine", "Cl", 17),
    ("argon", "Ar", 18),
    ("potassium", "K", 19),
    ("calcium", "Ca", 20),
    ("titanium", "Ti", 22),
    ("chromium", "Cr", 24),
    ("manganese", "Mn", 25),
    ("iron", "Fe", 26),
    ("cobalt", "Co", 27),
    ("nickel", "Ni", 28),
    ("copper", "Cu", 29),
    ("zinc", "Zn", 30),
    ("silver", "Ag", 47),
    ("tin", "Sn", 50),
    ("iodine", "I", 53),
    ("platinum", "Pt", 78),
    ("gold", "Au", 79),
    ("mercury", "Hg", 80),
    ("lead", "Pb", 82),
    ("uranium", "U", 92),
)

PLANETS: tuple[str, ...] = (
    "Mercury",
    "Venus",
    "Earth",
    "Mars",
    "Jupiter",
    "Saturn",
    "Uranus",
    "Neptune",
)
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")

# (word, opposite, whether the reverse question has this single answer too)
OPPOSITES: tuple[tuple[str, str, bool], ...] = (
    ("hot", "cold", True),
    ("up", "down", True),
    ("left", "right", False),  # right -> wrong
    ("open", "closed", True),
    ("fast", "slow", True),
    ("happy", "sad", True),
    ("early", "late", True),
    ("full", "empty", True),
    ("win", "lose", True),
    ("push", "pull", True),
    ("buy", "sell", True),
    ("true", "false", True),
    ("north", "south", True),
    ("east", "west", True),
    ("day", "night", True),
    ("black", "white", True),
    ("question", "answer", True),
    ("inside", "outside", True),
    ("above", "below", True),
    ("rich", "poor", True),
    ("strong", "weak", True),
    ("wet", "dry", True),
    ("thick", "thin", False),  # thin -> fat
    ("wide", "narrow", True),
    ("love", "hate", True),
    ("asleep", "awake", True),
    ("always", "never", True),
    ("before", "after", True),
    ("first", "last", True),
    ("entrance", "exit", True),
    ("maximum", "minimum", True),
    ("increase", "decrease", True),
    ("friend", "enemy", True),
    ("visible", "invisible", True),
    ("possible", "impossible", True),
    ("big", "small", False),  # small -> large
    ("heavy", "light", False),  # light -> dark
    ("young", "old", False),  # old -> new
    ("tall", "short", False),  # short -> long
    ("clean", "dirty", True),
    ("noisy", "quiet", False),  # quiet -> loud
    ("laugh", "cry", True),
    ("top", "bottom", True),
    ("dead", "alive", True),
    ("sunrise", "sunset", True),
    ("import", "export", True),
    ("success", "failure", True),
    ("forget", "remember", True),
    ("victory", "defeat", True),
    ("polite", "rude", True),
    ("deep", "shallow", True),
    ("cheap", "expensive", True),
    ("vertical", "horizontal", True),
    ("singular", "plural", True),
    ("major", "minor", True),
    ("ancient", "modern", False),  # modern -> old-fashioned
)


def _fact_pool() -> list[tuple[str, str]]:
    """Every fact question with its answer, in a fixed order."""
    pool: list[tuple[str, str]] = []
    city, country = "Answer with the city name only.", "Answer with the country name only."
    for place, capital in CAPITALS:
        pool.append((f"What is the capital of {place}? {city}", capital))
        pool.append((f"Name the capital city of {place}. {city}", capital))
        pool.append((f"{capital} is the capital of which country? {country}", place.removeprefix("the ")))
    symbol, name = "Answer with the symbol only.", "Answer with the element name only."
    for element, sym, number in ELEMENTS:
        pool.append((f"What is the chemical symbol for {element}? {symbol}", sym))
        pool.append((f"Which element has the chemical symbol {sym}? {name}", element))
        pool.append((f"What is the atomic number of {element}? {NUMBER_ONLY}", str(number)))
    planet = "Answer with the planet name only."
    for position, (body, ordinal) in enumerate(zip(PLANETS, _ORDINALS, strict=True), start=1):
        pool.append((f"Which planet is {ordinal} from the Sun? {planet}", body))
        pool.append((f"Counting from the Sun, what is the position of {body}? {NUMBER_ONLY}", str(position)))
        pool.append((f"Which planet is number {position} counting out from the Sun? {planet}", body))
    one_word = "Answer with one word."
    for word, opposite, symmetric in OPPOSITES:
        pool.append((f'What is the opposite of "{word}"? {one_word}', opposite))
        pool.append((f'Give the antonym of "{word}". {one_word}', opposite))
        if symmetric:
            pool.append((f'What is the opposite of "{opposite}"? {one_word}', word))
    return pool


# ------------------------------------------------------------------------------ splits

_SAMPLERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "unit_conversion": _unit_conversion,
    "string": _string,
    "sorting": _sorting,
    "date": _date,
}


def _task_examples(task: str, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` examples of ``task`` with distinct prompts, drawn from the task's own RNG."""
    rng = random.Random(f"dropbp-data-{seed}-{task}")
    if task == "facts":
        pool = _fact_pool()
        if len(pool) < count:
            raise ValueError(f"only {len(pool)} distinct fact prompts, {count} asked for")
        rng.shuffle(pool)
        pairs = pool[:count]
    else:
        sampler = _SAMPLERS[task]
        seen: dict[str, str] = {}
        attempts = 0
        while len(seen) < count:
            attempts += 1
            if attempts > 100 * count:
                raise ValueError(f"could not draw {count} distinct {task} prompts")
            prompt, response = sampler(rng)
            seen.setdefault(prompt, response)
        pairs = list(seen.items())
    return [{"prompt": p, "response": r, "task": task} for p, r in pairs]


def generate_splits(
    seed: int = DEFAULT_SEED,
    sizes: dict[str, tuple[int, int]] | None = None,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Return ``(train, heldout)`` lists of ``{"prompt", "response", "task"}`` dicts.

    Deterministic in ``seed``; prompts are distinct across both splits. Each split is
    shuffled (with its own seeded RNG) so that tasks are mixed.
    """
    sizes = SPLIT_SIZES if sizes is None else sizes
    train: list[dict[str, str]] = []
    heldout: list[dict[str, str]] = []
    for task, (n_train, n_heldout) in sizes.items():
        examples = _task_examples(task, n_train + n_heldout, seed)
        heldout.extend(examples[:n_heldout])
        train.extend(examples[n_heldout:])
    random.Random(f"dropbp-data-{seed}-train-order").shuffle(train)
    random.Random(f"dropbp-data-{seed}-heldout-order").shuffle(heldout)
    return train, heldout


def render_jsonl(examples: Sequence[dict[str, str]]) -> str:
    """One JSON object per line, keys in ``prompt, response, task`` order, ``\\n`` endings."""
    return "".join(json.dumps(example, ensure_ascii=False) + "\n" for example in examples)


def write_splits(out_dir: str | os.PathLike[str] | None = None, seed: int = DEFAULT_SEED) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` into ``out_dir`` (default: this package).

    Each file is written under a temporary name and moved into place with ``os.replace``.
    """
    # Imported here: importing this module needs only the standard library (not the dropbp package).
    from dropbp.app.files import write_text

    directory = Path(__file__).parent if out_dir is None else Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    train, heldout = generate_splits(seed)
    paths = (directory / "train.jsonl", directory / "heldout.jsonl")
    for path, examples in zip(paths, (train, heldout), strict=True):
        write_text(path, render_jsonl(examples))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dropbp.app.data.generate",
        description="(Re)write the bundled train.jsonl and heldout.jsonl deterministically.",
    )
    parser.add_argument("--out-dir", default=None, help="folder to write into (default: the dropbp.app.data package)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"generator seed (default {DEFAULT_SEED})")
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the files in --out-dir differ from what would be written",
    )
    args = parser.parse_args(argv)
    directory = Path(__file__).parent if args.out_dir is None else Path(args.out_dir)
    if args.check:
        train, heldout = generate_splits(args.seed)
        stale = []
        for name, examples in (("train.jsonl", train), ("heldout.jsonl", heldout)):
            path = directory / name
            if not path.is_file() or path.read_bytes() != render_jsonl(examples).encode("utf-8"):
                stale.append(str(path))
        if stale:
            print("out of date: " + ", ".join(stale), file=sys.stderr)
            return 1
        print(f"up to date: {directory}")
        return 0
    for path in write_splits(directory, args.seed):
        lines = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"wrote {path} ({lines} examples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
