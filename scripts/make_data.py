"""Generate the bundled question/answer set under recipes/data/ (deterministic, written by us).

Kinds of question: arithmetic word problems (checkable by a program), capitals (short facts),
definitions, explanations and advice (no program can check these: the case NRT is built for).
The same seed always writes the same files:

    python scripts/make_data.py            # writes recipes/data/{train,test}.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CAPITALS = [
    ("France", "Paris"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Ireland", "Dublin"),
    ("Mexico", "Mexico City"),
    ("India", "New Delhi"),
    ("Peru", "Lima"),
    ("Austria", "Vienna"),
    ("Hungary", "Budapest"),
    ("Finland", "Helsinki"),
    ("Chile", "Santiago"),
]

DEFINITIONS = [
    (
        "photosynthesis",
        "the process by which plants use sunlight, water and carbon dioxide to make sugar and release oxygen",
    ),
    ("a prime number", "a whole number greater than 1 whose only divisors are 1 and itself"),
    ("gravity", "the force by which masses attract one another, which keeps us on the ground"),
    ("an atom", "the smallest unit of a chemical element, made of a nucleus and electrons"),
    ("democracy", "a system of government in which citizens choose their leaders by voting"),
    ("a verb", "a word that describes an action, a state or an occurrence"),
    ("inflation", "a general rise in prices that lowers the buying power of money"),
    (
        "an ecosystem",
        "a community of living things interacting with each other and their environment",
    ),
    ("evaporation", "the change of a liquid into a gas, usually because it is heated"),
    ("a metaphor", "a figure of speech that describes something as if it were something else"),
    (
        "a fraction",
        "a number that represents a part of a whole, written as one number over another",
    ),
    ("friction", "the force that resists motion when two surfaces rub against each other"),
    ("a habitat", "the natural home of an animal or plant"),
    ("an algorithm", "a precise list of steps for solving a problem or doing a task"),
    ("erosion", "the slow wearing away of rock and soil by water, wind or ice"),
    ("a mammal", "a warm-blooded animal with hair that feeds its young with milk"),
]

EXPLANATIONS = [
    (
        "Why is the sky blue?",
        "Air scatters blue light from the sun more than red light, so blue light reaches our eyes from all directions.",
    ),
    (
        "Why do we have seasons?",
        "The Earth's axis is tilted, so each half of the planet gets more direct sunlight during part of the year.",
    ),
    (
        "Why does ice float on water?",
        "Water expands when it freezes, so ice is less dense than liquid water and floats.",
    ),
    (
        "Why do leaves change colour in autumn?",
        "Trees stop making green chlorophyll, so the yellow and red pigments in the leaves show.",
    ),
    (
        "Why does the moon change shape?",
        "As the moon orbits the Earth we see different parts of its sunlit half.",
    ),
    (
        "Why do metals feel cold to the touch?",
        "Metals conduct heat well, so they draw warmth away from your skin quickly.",
    ),
    (
        "Why do we need to sleep?",
        "Sleep lets the body repair itself and helps the brain store memories and clear waste.",
    ),
    (
        "Why does bread rise?",
        "Yeast eats sugar in the dough and releases carbon dioxide gas, which makes the dough expand.",
    ),
    (
        "Why is the sea salty?",
        "Rivers carry dissolved minerals from rocks into the sea, and evaporation leaves the salt behind.",
    ),
    (
        "Why do birds fly south in winter?",
        "They migrate to warmer places where food is easier to find.",
    ),
    (
        "Why do we see lightning before we hear thunder?",
        "Light travels much faster than sound, so the flash reaches us first.",
    ),
    (
        "Why does a spoon look bent in a glass of water?",
        "Light changes direction when it passes from water into air, which shifts where we see the spoon.",
    ),
]

ADVICE = [
    (
        "How can I sleep better?",
        "Keep a regular bedtime, avoid screens and caffeine late in the day, and keep your bedroom dark and cool.",
    ),
    (
        "How can I remember what I study?",
        "Review the material in short sessions spread over several days and test yourself instead of rereading.",
    ),
    (
        "How do I start exercising?",
        "Begin with short walks or light workouts a few times a week and increase slowly so you can keep going.",
    ),
    (
        "How can I save money?",
        "Track what you spend, set a budget, and move a fixed amount into savings as soon as you are paid.",
    ),
    (
        "How do I give a good presentation?",
        "Know your main message, practise out loud, and speak to the audience rather than reading slides.",
    ),
    (
        "How can I be more productive?",
        "Plan your three most important tasks each morning and work on them before checking messages.",
    ),
    (
        "How should I prepare for a job interview?",
        "Research the company, prepare examples of your work, and practise answering common questions.",
    ),
    (
        "How do I make a new friend?",
        "Join activities you enjoy, ask people questions about themselves, and suggest meeting again.",
    ),
    ("How can I drink more water?", "Carry a bottle with you and drink a glass with every meal."),
    (
        "How do I deal with stress?",
        "Take short breaks, breathe slowly, get some exercise, and talk to someone you trust.",
    ),
]

NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Maya", "Ben", "Zoe", "Ivan", "Nia"]
ITEMS = ["apples", "books", "coins", "pencils", "stamps", "marbles", "cards", "shells"]


def arithmetic(rng: random.Random) -> dict[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 30), rng.randint(2, 20)
    kind = rng.randrange(3)
    if kind == 0:
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        ans = a + b
    elif kind == 1:
        a = a + b
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        ans = a - b
    else:
        a = rng.randint(2, 9)
        q = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that in total?"
        ans = a * b
    return {"question": q, "answer": f"{ans}", "kind": "arithmetic"}


def records(seed: int, n_arithmetic: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = [
        {
            "question": f"What is the capital of {c}?",
            "answer": f"The capital of {c} is {city}.",
            "kind": "capital",
        }
        for c, city in CAPITALS
    ]
    out += [
        {
            "question": f"What is {term}?",
            "answer": f"{term[0].upper()}{term[1:]} is {text}.",
            "kind": "definition",
        }
        for term, text in DEFINITIONS
    ]
    out += [{"question": q, "answer": a, "kind": "explanation"} for q, a in EXPLANATIONS]
    out += [{"question": q, "answer": a, "kind": "advice"} for q, a in ADVICE]
    out += [arithmetic(rng) for _ in range(n_arithmetic)]
    rng.shuffle(out)
    return out


def split(rows: list[dict[str, str]], test_fraction: float) -> tuple[list, list]:
    """Every kind is represented in the test split."""
    train, test = [], []
    by_kind: dict[str, list] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    for kind_rows in by_kind.values():
        n_test = max(1, round(len(kind_rows) * test_fraction))
        test += kind_rows[:n_test]
        train += kind_rows[n_test:]
    return train, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parent.parent / "recipes" / "data")
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arithmetic", type=int, default=60)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    args = parser.parse_args()
    train, test = split(records(args.seed, args.arithmetic), args.test_fraction)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{out / name}: {len(rows)} records")


if __name__ == "__main__":
    main()
