"""Seed statistics and plot geometry: Student-t intervals against printed t tables, the resolution rule, the
Pareto front, and figures whose texts never overlap."""
import math

import pytest

from peftjax.studies import plots as P
from peftjax.studies.stats import Interval, difference, interval, paired, paired_text, resolved, t_quantile


@pytest.mark.parametrize("df, t975", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)])
def test_t_quantiles_match_the_printed_table(df, t975):
    assert t_quantile(0.975, df) == pytest.approx(t975, abs=5e-4)  # the table's 3 decimals


def test_interval_of_three_seeds():
    iv = interval([1.0, 2.0, 3.0])  # mean 2, s = 1, half = t(0.975, 2) / sqrt(3)
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert iv.format("{:.2f}") == "2.00 ± 2.48"
    one = interval([3.5])
    assert one.half is None and one.format() == "3.500"
    assert Interval(-0.733, 0.0131, 3).format("{:+.3f}") == "-0.733 ± 0.013"
    assert Interval(23.601, 4e-7, 3).format() == "23.601"  # agree to the printed digits


def test_paired_differences_over_the_shared_seeds():
    a = {0: 3.70, 1: 3.75, 2: 3.80, 3: 9.0}  # seed 3 ran in one row only: left out
    b = {0: 3.65, 1: 3.69, 2: 3.77}
    iv = paired(a, b)  # differences 0.05, 0.06, 0.03: mean 0.04667, s = 0.015275
    assert iv.n == 3 and iv.mean == pytest.approx(0.046667, abs=1e-6)
    assert iv.half == pytest.approx(4.302653 * 0.0152753 / math.sqrt(3), rel=1e-5)  # 0.0379
    assert paired_text(iv) == "+0.047 ± 0.038 (resolved)"
    assert not resolved(interval([3.70, 3.75, 3.80]), interval([3.65, 3.69, 3.77]))  # unpaired: not resolved
    assert paired_text(paired({0: 1.0, 1: 2.0}, {0: 1.5, 1: 1.0})) == "+0.250 ± 9.530 (not resolved)"
    assert paired({0: 1.0}, {0: 2.0}) is None and paired_text(None) == "fewer than two shared seeds"


def test_resolved_only_when_the_intervals_are_disjoint():
    a, b = Interval(1.0, 0.1, 3), Interval(1.3, 0.1, 3)
    assert resolved(a, b) and resolved(b, a)
    assert not resolved(a, Interval(1.15, 0.1, 3))  # overlapping
    assert not resolved(Interval(1.0, None, 1), Interval(9.0, None, 1))  # one seed resolves nothing
    assert difference(b, a) == "+0.300 (resolved)"
    assert difference(Interval(1.15, 0.1, 3), a) == "+0.150 (not resolved)"


def test_pareto_front_minimises_both_axes():
    points = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0), (2.0, 3.5), (4.0, 1.0)]
    # (3, 4) and (2, 3.5) are dominated by (2, 3); the two equal (4, 1) points dominate neither
    assert P.pareto_front(points) == [0, 1, 3, 5]


def _overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty texts in ``fig`` whose rendered boxes intersect."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    from matplotlib.text import Text

    found = {id(t): t for t in fig.findobj(Text)}  # findobj may list an artist twice
    texts = [t for t in found.values() if t.get_visible() and t.get_text().strip()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    return [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb)]


def test_scatter_labels_points_that_coincide_without_overlap():
    plt = P.pyplot()
    same = Interval(4.5, None, 1)  # nf4, nf4-dq, int4, fp4 at one spot: the old loss_vs_bits.png stacked them
    points = [P.Point(name, same, Interval(3.1, 0.02, 3)) for name in ("nf4", "nf4-dq", "int4", "fp4")]
    points.append(P.Point("float32", Interval(32.0, None, 1), Interval(3.0, 0.02, 3)))
    fig = P.scatter(plt, points, title="t", xlabel="bits", ylabel="loss")
    ax = fig.axes[0]
    legend = sorted(t.get_text() for t in ax.get_legend().get_texts())
    assert legend == sorted(["nf4", "nf4-dq", "int4", "fp4", "float32", "Pareto front"])
    assert not ax.texts  # no label drawn on the axes
    assert _overlaps(fig) == []
    plt.close(fig)


def test_twenty_series_get_twenty_colours_and_distinct_styles():
    # The methods plot has 16 series: with ten colours cycled, series i and i + 10 (adalora / olora) looked alike
    import matplotlib.colors as mcolors

    styles = [P.style(i) for i in range(20)]
    colours = [mcolors.to_hex(s["color"]) for s in styles]
    assert len(set(colours)) == 20
    assert len({(c, s["marker"]) for c, s in zip(colours, styles)}) == 20
    assert all(styles[i]["marker"] != styles[i + 10]["marker"] for i in range(10))
