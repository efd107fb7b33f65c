"""Metrics on generated answers.

Contract:
- ``normalise(text, case_sensitive)``: the first line, stripped, inner whitespace collapsed,
  one trailing period dropped; lower-cased unless ``case_sensitive`` (no family here is about
  case, so the run passes False; a case-transformation family would pass True).
- ``exact_match(pred, gold)``: normalised equality.
- ``label_of(pred, labels)``: the one label word the prediction's first line names (whole word,
  any case); None when it names none or several (a model that repeats the prompt's list of
  options names them all: it gets no credit). ``accuracy`` counts label_of(pred) == gold.
- ``score(examples, predictions)`` -> {"exact_match", "accuracy" (classification only), "n"}.
"""
from __future__ import annotations

import re


def normalise(text: str, case_sensitive: bool = False) -> str:
    line = text.strip().split("\n", 1)[0]
    line = re.sub(r"\s+", " ", line).strip()
    if line.endswith("."):
        line = line[:-1].rstrip()
    return line if case_sensitive else line.lower()


def exact_match(pred: str, gold: str, case_sensitive: bool = False) -> bool:
    return normalise(pred, case_sensitive) == normalise(gold, case_sensitive)


def label_of(pred: str, labels) -> str | None:
    line = normalise(pred)
    named = [label for label in labels if re.search(rf"\b{re.escape(label.lower())}\b", line)]
    return named[0] if len(named) == 1 else None


def score(examples, predictions, case_sensitive: bool = False) -> dict:
    n = len(examples)
    em = sum(exact_match(p, e.answer, case_sensitive) for e, p in zip(examples, predictions))
    out = {"exact_match": em / n if n else None, "n": n}
    if n and examples[0].labels:
        out["accuracy"] = sum(label_of(p, e.labels) == e.answer for e, p in zip(examples, predictions)) / n
    return out
