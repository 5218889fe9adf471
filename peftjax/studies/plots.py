"""Plots for study reports: every figure has a title, axis labels with units, error bars from the seeds (95%
confidence intervals, :mod:`peftjax.studies.stats`) and a legend outside the axes, so no label is ever drawn over
another point's label.

Quality-vs-cost plots mark the **Pareto front**: the points no other point beats on both axes (lower cost and
lower loss), joined as a step line. matplotlib is optional (the ``plots`` extra): without it no plot is drawn.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from peftjax.studies.stats import Interval

_PLOT_NOTE_SHOWN = False
MARKERS = "osD^vPX*<>"
# tab20's light shades of the ten default colours (C0 ... C9), in their order
LIGHT = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None after a one-line note when matplotlib (the ``plots``
    extra) is not installed: tables and reports never need it."""
    import sys

    global _PLOT_NOTE_SHOWN
    try:
        import matplotlib
    except ImportError:
        if not _PLOT_NOTE_SHOWN:
            _PLOT_NOTE_SHOWN = True
            print("peftjax: note: matplotlib is not installed, so no plots were drawn (install the plots extra: "
                  "pip install 'peftjax[plots]')", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point dominates when both coordinates are minimised, by increasing x.
    A point is dominated by another that is <= on both axes and < on one."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(x2 <= x and y2 <= y and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


@dataclasses.dataclass(frozen=True)
class Point:
    label: str
    x: Interval
    y: Interval


def seed_note(seed_counts) -> str:
    """What a plot's error bars are: ``"mean ± 95% CI over 3 seeds"``, or that one seed gives no interval."""
    counts = sorted(set(seed_counts))
    if counts == [1]:
        return "one seed: no interval"
    return f"mean ± 95% CI over {'/'.join(map(str, counts))} seeds"


def style(i: int) -> dict:
    """A distinct colour and marker per series: matplotlib's ten default colours, then their light shades (tab20's
    odd entries) with the next marker, so series i and i + 10 differ in shade as well as in shape."""
    shade = (i // 10) % 2
    return {"color": LIGHT[i % 10] if shade else f"C{i % 10}", "marker": MARKERS[(i // 10) % len(MARKERS)]}


def new_figure(plt, title: str, xlabel: str, ylabel: str, width: float = 7.5, height: float = 4.5):
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def outside_legend(ax, title: str | None = None) -> None:
    """The legend to the right of the axes: labels never cover points or each other."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, title=title, title_fontsize=7,
              borderaxespad=0.0, frameon=False)


def scatter(plt, points: list[Point], *, title: str, xlabel: str, ylabel: str, xlog: bool = False,
            pareto: bool = True):
    """One marker per point with its x and y 95% intervals as error bars, the Pareto front (lower x and lower y
    are better) as a dashed step line through ringed points, and every label in the legend. Points that share an
    x value (methods of one size) are drawn spread a little apart around it, so their error bars do not hide each
    other; the legend says so when it happens."""
    fig, ax = new_figure(plt, title, xlabel, ylabel)
    points = sorted(points, key=lambda p: p.label)  # a label keeps its colour from one plot of a study to the next
    xs_drawn = dodged([p.x.mean for p in points], log=xlog)
    for i, (p, x) in enumerate(zip(points, xs_drawn)):
        ax.errorbar([x], [p.y.mean], xerr=[p.x.half or 0.0], yerr=[p.y.half or 0.0], linestyle="none",
                    capsize=3, markersize=6, label=p.label, **style(i))
    if pareto and len(points) > 1:
        front = pareto_front([(p.x.mean, p.y.mean) for p in points])
        xs, ys = [xs_drawn[i] for i in front], [points[i].y.mean for i in front]
        ax.plot(xs, ys, drawstyle="steps-post", color="black", linestyle="--", linewidth=0.8, label="Pareto front")
        ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="black", linewidths=0.8)
    if xlog:
        ax.set_xscale("log")
        low, high = min(p.x.mean for p in points), max(p.x.mean for p in points)
        if points and 0 < low and high / low < 10:  # a narrow range: keep a decade in view, the spread looks small
            middle = (low * high) ** 0.5
            ax.set_xlim(min(ax.get_xlim()[0], middle / 10 ** 0.5), max(ax.get_xlim()[1], middle * 10 ** 0.5))
    spread = any(a != b for a, b in zip(xs_drawn, (p.x.mean for p in points)))
    outside_legend(ax, "equal x values drawn\nspread apart" if spread else None)
    return fig


def dodged(xs: list[float], *, log: bool, step: float = 0.02) -> list[float]:
    """``xs`` with the members of every group of equal values moved apart symmetrically around their value: by
    ``step`` decades each on a log axis, by ``step`` of the data's span (or of the value) on a linear one."""
    span = (max(xs) - min(xs)) if xs else 0.0
    out = list(xs)
    for value in set(xs):
        members = [i for i, x in enumerate(xs) if x == value]
        for k, i in enumerate(members if len(members) > 1 else ()):
            offset = step * (k - (len(members) - 1) / 2)
            out[i] = value * 10 ** offset if log and value > 0 else value + offset * (span or abs(value) or 1.0)
    return out


def save(plt, fig, path: Path) -> str:
    """Write ``fig`` as a PNG (legend outside the axes kept in the picture); returns the file name."""
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path).name
