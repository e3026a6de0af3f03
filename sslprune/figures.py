"""The report's figures: density axes in %, tick labels that do not overlap, and one writer (PNG
and SVG beside it). Used by report, report_layers, report_dual and sparsity."""
from __future__ import annotations

import io
import math
from pathlib import Path

from . import layout


def percent(v: float) -> str:
    """A density in % as a reader writes it: 100, 80, 64, ..., 11, then two significant digits
    (8.6, 6.9, ..., 0.12), never 1e+02 or 9x10^1."""
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"


def percent_axis(ax, values) -> None:
    """Log x axis in %, a labelled tick at each value (each level's density: the levels are what was
    measured, and round decades say little). Values that print alike get one tick; many ticks are
    set upright (more than ~10 three-digit labels overlap across a 6-inch panel); no minor ticks."""
    import matplotlib.ticker

    ticks = {}
    for v in sorted(values, reverse=True):
        ticks.setdefault(percent(v), v)
    ax.set_xscale("log")
    if ticks:
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(list(ticks.values())))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: percent(v)))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.tick_params(axis="x", labelsize=8, labelrotation=90 if len(ticks) > 10 else 0)


def colours(names) -> dict:
    """One colour per name, the same in every panel of a figure, so a curve is found again by its
    colour (tab10; tab20 past ten names)."""
    import matplotlib

    names = sorted(set(names))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


INSIDE = 6  # legend entries that still fit inside a panel without hiding its curves


def legend_height(entries: int) -> float:
    """Inches a panel needs below it for a legend of that many entries (0 when it fits inside)."""
    return 0.0 if entries <= INSIDE else 0.6 + 0.17 * math.ceil(entries / 2)


def legend(ax, fontsize: int = 8) -> None:
    """The axes' legend: inside them while it is short, else below them in two columns, where it
    hides no curve (give the figure legend_height() more; tight_layout makes the room)."""
    if len(ax.get_legend_handles_labels()[1]) <= INSIDE:
        ax.legend(fontsize=fontsize)
    else:
        ax.legend(fontsize=fontsize - 1, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)


def thin_labels(fig) -> None:
    """Hide each x tick label that would overlap the last one shown (very many levels, or curves whose
    densities nearly coincide). Sizes are known only once the figure is laid out and drawn."""
    fig.tight_layout()
    fig.canvas.draw()
    for ax in fig.axes:
        shown = None
        for label in ax.get_xticklabels():
            box = label.get_window_extent()
            if shown is not None and box.overlaps(shown):
                label.set_visible(False)
            else:
                shown = box


def save_png(fig, path: Path) -> None:
    """Write a matplotlib figure atomically as PNG and, beside it, as SVG (same name: vector, for
    papers; no date inside, so an unchanged report rewrites the same bytes), then close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    with plt.rc_context({"svg.hashsalt": "sslprune"}):  # element ids from content, not random
        fig.savefig(svg, format="svg", metadata={"Date": None})
    plt.close(fig)
    layout.save_bytes(path, png.getvalue())
    layout.save_bytes(path.with_suffix(".svg"), svg.getvalue())
