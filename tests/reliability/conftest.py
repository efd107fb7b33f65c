"""The reliability campaign (docs/reliability.md): fuzzed files and calls, numerics, long runs,
concurrency. Each test tells the ``campaign`` fixture how many cases it tried, under a category
of ``findings.CATEGORIES``; ``scripts/reliability.py`` runs this folder with
``PARA_RELIABILITY_REPORT`` set and writes the table from those counts and ``findings.py``.

Sizes: small in ``make test`` (the whole folder in well under two minutes);
``PARA_RELIABILITY_SCALE=<k>`` multiplies every campaign's case count by k (``make reliability``
uses 20)."""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch
from findings import CATEGORIES

SCALE = max(1, int(os.environ.get("PARA_RELIABILITY_SCALE", "1")))
_tried: Counter = Counter()
_measured: dict = {}


class Campaign:
    scale = SCALE

    def cases(self, small: int) -> int:
        """How many cases a campaign runs: ``small`` in make test, times the scale."""
        return small * SCALE

    def tried(self, category: str, n: int = 1) -> None:
        if category not in CATEGORIES:
            raise KeyError(f"unknown reliability category {category!r}; known: {sorted(CATEGORIES)}")
        _tried[category] += n

    def measured(self, name: str, value: float, unit: str, note: str = "") -> None:
        """A number the table reports as measured by this run (throughput, RSS growth, ...)."""
        _measured[name] = {"value": value, "unit": unit, "note": note}


@pytest.fixture
def campaign() -> Campaign:
    return Campaign()


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models: extra intra-op threads only add contention on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("PARA_RELIABILITY_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"scale": SCALE, "tried": dict(_tried), "measured": _measured, "exitstatus": int(exitstatus)},
                      f, indent=1)
