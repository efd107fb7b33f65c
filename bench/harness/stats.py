"""Summary statistics of timed samples: every ratio and time the suite reports is a median
with its quartiles (a few slow runs on a shared machine move the mean, not the median)."""
from __future__ import annotations

import statistics


def quantile(xs, q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of a non-empty sequence."""
    s = sorted(xs)
    if len(s) == 1:
        return float(s[0])
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def summary(xs) -> dict:
    """median, quartiles, IQR, min, max and count of a sample."""
    xs = [float(x) for x in xs]
    q1, q3 = quantile(xs, 0.25), quantile(xs, 0.75)
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": min(xs), "max": max(xs), "n": len(xs)}
