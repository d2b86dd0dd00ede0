"""Rates with Wilson 95% intervals: pure functions of counts and of episode records."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n``, with the Wilson score interval at 95%."""

    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.k, self.n)

    def to_dict(self) -> dict:
        lo, hi = self.interval
        return {**asdict(self), "rate": self.value, "low": lo, "high": hi}

    def __str__(self) -> str:
        if not self.n:
            return "n/a (n=0)"
        lo, hi = self.interval
        return f"{100 * self.value:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({self.k}/{self.n})"


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (nan, nan) when ``n`` is 0."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return math.nan, math.nan
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(records: Iterable[dict], hit: Callable[[dict], bool], where: Callable[[dict], bool] = lambda r: True) -> Rate:
    """The share of records satisfying ``where`` for which ``hit`` holds."""
    chosen = [r for r in records if where(r)]
    return Rate(sum(bool(hit(r)) for r in chosen), len(chosen))
