"""``--time-limit``: a point in time after which optional work is skipped, so that a bounded
run (a device lease) ends by itself with a complete report of what it did measure."""
from __future__ import annotations

import time


class Deadline:
    """A point in time (``time.perf_counter()`` seconds) after which optional work is skipped;
    ``Deadline(None)`` never passes. Used by ``--time-limit`` so that a bounded run (a device
    lease) ends by itself with a complete report of what it measured."""

    def __init__(self, at: float | None = None):
        self.at = at

    @classmethod
    def after(cls, seconds: float | None) -> "Deadline":
        return cls(None if seconds is None else time.perf_counter() + seconds)

    def left(self) -> float:
        return float("inf") if self.at is None else self.at - time.perf_counter()

    def passed(self) -> bool:
        return self.left() <= 0

    def earlier(self, seconds: float) -> "Deadline":
        """The same deadline moved ``seconds`` earlier."""
        return Deadline(None if self.at is None else self.at - seconds)


NO_DEADLINE = Deadline(None)
