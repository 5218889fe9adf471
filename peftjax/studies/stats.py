"""Seed statistics for study tables: mean and 95% confidence interval over the seeds a sweep runs.

For ``n`` values with mean ``m`` and sample standard deviation ``s`` (``ddof=1``), the two-sided confidence
interval of the mean at level ``1 - a`` is ``m ± t(1 - a/2, n - 1) * s / sqrt(n)`` (Student 1908), ``t`` being the
quantile of Student's t distribution with ``n - 1`` degrees of freedom (from scipy, a dependency of jax). One seed
has no interval: it is shown as a bare mean and never resolves a difference.

Two rows differ **resolved** when their 95% intervals are disjoint. This is conservative (disjoint 95% intervals
imply a difference significant at well below 5%; overlapping ones may still hide a real difference), and a reader
can check it from the printed intervals alone.
"""
from __future__ import annotations

import dataclasses
import math

LEVEL = 0.95


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t distribution with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


@dataclasses.dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and the half-width of its 95% confidence interval (None for a single value)."""

    mean: float
    half: float | None
    n: int

    @property
    def low(self) -> float:
        return self.mean - (self.half or 0.0)

    @property
    def high(self) -> float:
        return self.mean + (self.half or 0.0)

    def scaled(self, factor: float) -> "Interval":
        return Interval(self.mean * factor, None if self.half is None else self.half * factor, self.n)

    def format(self, fmt: str = "{:.3f}", scale: float = 1.0) -> str:
        """``"3.512 ± 0.021"``; a single value, or values that agree to the printed digits, is its mean alone.
        The half-width drops a sign flag of ``fmt`` (``"{:+.3f}"`` prints ``"+0.120 ± 0.013"``)."""
        text = fmt.format(self.mean / scale)
        half = fmt.replace("+", "").format((self.half or 0.0) / scale)
        return text if half == fmt.replace("+", "").format(0.0) else f"{text} ± {half}"


def interval(values) -> Interval:
    """Mean and 95% Student-t confidence half-width of ``values`` (finite numbers; at least one)."""
    xs = [float(v) for v in values]
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return Interval(mean, None, n)
    s = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return Interval(mean, t_quantile(0.5 + LEVEL / 2, n - 1) * s / math.sqrt(n), n)


def resolved(a: Interval, b: Interval) -> bool:
    """Whether the difference between ``a`` and ``b`` is resolved: both have intervals and they are disjoint."""
    if a.half is None or b.half is None:
        return False
    return a.high < b.low or b.high < a.low


def difference(a: Interval, b: Interval, fmt: str = "{:+.3f}") -> str:
    """``a - b`` of the means and whether the intervals resolve it: ``"+0.120 (resolved)"``."""
    return f"{fmt.format(a.mean - b.mean)} ({'resolved' if resolved(a, b) else 'not resolved'})"


def paired(a: dict, b: dict) -> Interval | None:
    """Interval of ``a[seed] - b[seed]`` over the seeds both rows ran (``{seed: value}`` each): runs of one seed share
    data order and initialisation, so the seed-to-seed spread that widens each row's own interval cancels. None
    with fewer than two shared seeds."""
    shared = [k for k in a if k in b]
    return interval([a[k] - b[k] for k in shared]) if len(shared) >= 2 else None


def paired_text(iv: Interval | None, fmt: str = "{:+.3f}") -> str:
    """``"-0.051 ± 0.033 (resolved)"``: resolved when the paired interval excludes zero."""
    if iv is None:
        return "fewer than two shared seeds"
    return f"{iv.format(fmt)} ({'resolved' if iv.half is not None and abs(iv.mean) > iv.half else 'not resolved'})"

