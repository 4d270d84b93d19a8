"""Timing statistics that say when a difference is real.

On a shared CPU a latency sample is the true cost plus scheduler noise, with a long right tail
(p90 often 30-50% above p50). So latencies are summarised by medians, with a distribution-free
confidence interval from the order statistics, and two models are compared by the per-round ratio
of interleaved timings (round i times every model once, so the noise of a round is shared and
cancels in the ratio). A model is called faster only when the whole interval of that ratio lies
on one side of 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959964  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Interval:
    """A median with its 95% confidence interval (order statistics: valid for any distribution)."""

    median: float
    low: float
    high: float
    samples: int

    @property
    def relative_width(self) -> float:
        """(high - low) / median: 0.02 means the median is known to about +-1%."""
        return (self.high - self.low) / self.median if self.median else math.inf

    def to_dict(self) -> dict:
        return {"median": self.median, "low": self.low, "high": self.high, "samples": self.samples}


def median_interval(samples: Sequence[float]) -> Interval:
    """The median of `samples` and its 95% interval: the order statistics at n/2 -+ 1.96 sqrt(n)/2
    (the normal approximation of the binomial(n, 1/2) that the count of samples below the median follows).

    Raises:
        ValueError: no samples.
    """
    xs = sorted(samples)
    n = len(xs)
    if n == 0:
        raise ValueError("no samples")
    half = Z95 * math.sqrt(n) / 2
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    mid = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    return Interval(mid, xs[lo], xs[hi], n)


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> Interval:
    """The median and 95% interval of a_i / b_i over interleaved rounds i: how many times b's time
    a takes (below 1: a is faster).

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    if len(a) != len(b):
        raise ValueError(f"paired timings differ in length ({len(a)} vs {len(b)})")
    return median_interval([x / y for x, y in zip(a, b)])


def faster(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether a is faster than b beyond the noise: the whole 95% interval of a_i / b_i is below 1."""
    return paired_ratio(a, b).high < 1.0
