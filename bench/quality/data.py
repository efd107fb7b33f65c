"""Generated tasks: six families a 135M model does not solve zero-shot, and their mixture.

Contract:
- ``make_splits(family, sizes, seed)`` -> {"train", "validation", "test"}: lists of ``Example``,
  deterministic from (family, seed); every prompt is unique within the family, so no prompt is
  in two splits (the splits are cut from one list of distinct prompts).
- ``mixture_splits(sizes, seed)``: per split, the union of every family's split (shuffled,
  seeded). Prompts of different families differ in their instruction, so the mixture's splits
  are disjoint too, and the prompt alone says which task a row is.
- ``Example.labels`` is the tuple of label words for classification families, else ().
"""
from __future__ import annotations

import random
from dataclasses import dataclass

SPLITS = ("train", "validation", "test")
WORDS = ("apple", "river", "stone", "cloud", "tiger", "lamp", "bread", "glass", "horse", "paper", "chair", "green",
         "music", "storm", "plant", "brick", "ocean", "sugar", "train", "wheel")
POSITIVE = ("wonderful", "great", "delightful", "excellent", "lovely", "superb", "pleasant", "brilliant")
NEGATIVE = ("terrible", "awful", "boring", "dreadful", "poor", "horrible", "disappointing", "bad")
SUBJECTS = ("The film", "The meal", "The hotel", "The concert", "The book", "The service", "The trip", "The game")
CONNECT = ("was {a}, really {b}.", "felt {a} and {b}.", "was {a}; honestly {b}.", "seemed {a}, quite {b}.")
TOPICS = {
    "sports": ("goal", "referee", "striker", "tournament", "coach", "stadium", "match", "league"),
    "food": ("recipe", "oven", "flavor", "dessert", "kitchen", "spice", "dinner", "bakery"),
    "science": ("molecule", "telescope", "experiment", "physics", "laboratory", "theory", "atom", "galaxy"),
    "weather": ("rain", "forecast", "snow", "thunder", "humidity", "breeze", "temperature", "fog"),
}
FILLERS = ("Yesterday", "Everyone noticed", "The report mentioned", "People talked about", "Nobody expected")


@dataclass(frozen=True)
class Example:
    family: str
    prompt: str
    answer: str
    labels: tuple = ()


def _reverse(rng):
    words = rng.sample(WORDS, rng.randint(4, 6))
    return "Reverse the order of these words: " + " ".join(words), " ".join(reversed(words))


def _sort(rng):
    nums = rng.sample(range(10, 100), rng.randint(4, 6))
    return "Sort these numbers from smallest to largest: " + " ".join(map(str, nums)), " ".join(map(str, sorted(nums)))


def _arith(rng):
    a, b, c = rng.randint(10, 60), rng.randint(10, 40), rng.randint(1, 9)
    return f"Compute {a} + {b} - {c}. Answer with the number only.", str(a + b - c)


def _lookup(rng):
    keys = rng.sample(WORDS, 5)
    vals = [rng.randint(100, 999) for _ in keys]
    k = rng.randrange(len(keys))
    table = "; ".join(f"{key}={v}" for key, v in zip(keys, vals))
    return f"Table: {table}. What is the value of {keys[k]}?", str(vals[k])


def _sentiment(rng):
    label = rng.choice(("positive", "negative"))
    a, b = rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
    text = f"{rng.choice(SUBJECTS)} {rng.choice(CONNECT).format(a=a, b=b)}"
    return f"Review: {text} Is this review positive or negative?", label


def _topic(rng):
    label = rng.choice(sorted(TOPICS))
    a, b = rng.sample(TOPICS[label], 2)
    text = f"{rng.choice(FILLERS)} the {a} and the {b}."
    return f"Text: {text} Topic (sports, food, science or weather)?", label


FAMILIES = {"reverse": _reverse, "sort": _sort, "arith": _arith, "lookup": _lookup,
            "sentiment": _sentiment, "topic": _topic}
LABELS = {"sentiment": ("positive", "negative"), "topic": tuple(sorted(TOPICS))}
MIXTURE = "mixture"


def make_splits(family: str, sizes: dict, seed: int) -> dict:
    """``sizes``: {split: n}. Distinct prompts, deterministic from (family, seed)."""
    rng = random.Random(f"{family}:{seed}")
    need, seen, rows = sum(sizes[s] for s in SPLITS), set(), []
    for _ in range(100 * need):
        if len(rows) == need:
            break
        prompt, answer = FAMILIES[family](rng)
        if prompt not in seen:
            seen.add(prompt)
            rows.append(Example(family, prompt, answer, LABELS.get(family, ())))
    if len(rows) < need:
        raise ValueError(f"{family}: only {len(rows)} distinct prompts, {need} asked")
    out, start = {}, 0
    for s in SPLITS:
        out[s], start = rows[start:start + sizes[s]], start + sizes[s]
    return out


def mixture_splits(sizes: dict, seed: int, families=tuple(FAMILIES)) -> dict:
    """Every family's splits pooled per split (``sizes`` per family), shuffled from ``seed``."""
    per = [make_splits(f, sizes, seed) for f in families]
    out = {}
    for s in SPLITS:
        rows = [e for p in per for e in p[s]]
        random.Random(f"{MIXTURE}:{s}:{seed}").shuffle(rows)
        out[s] = rows
    return out
