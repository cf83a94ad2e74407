"""Figures for reports and benchmarks: matplotlib on the Agg backend, written atomically as PNG.

    from spikeprune.plots import new_figure, save_figure
    fig, ax = new_figure()                      # FIGSIZE; new_figure(1, 2, figsize=(11, 4.4)) for two panels
    ax.plot(...)
    save_figure(fig, "RUN/plots/mine.png")      # atomic write, then the figure is closed

pyplot() gives matplotlib.pyplot itself (for colour maps, etc.). matplotlib is imported only when
a figure is made, so importing spikeprune stays cheap.
"""
from __future__ import annotations

from pathlib import Path

from .serialization import atomic_path

FIGSIZE = (7.0, 4.2)  # inches: the size of every single-panel figure in a report
DPI = 110


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only; a figure never opens a window)."""
    import matplotlib  # imported here: a heavy import paid only when a figure is drawn

    matplotlib.use("Agg")  # before pyplot is imported (below, for the same reason)
    import matplotlib.pyplot as plt  # heavy: only when a figure is drawn

    return plt


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] | None = None, **subplots_kw):
    """(figure, axes) as plt.subplots returns them, at FIGSIZE unless `figsize` is given."""
    return pyplot().subplots(nrows, ncols, figsize=figsize or FIGSIZE, **subplots_kw)


def save_figure(fig, path, dpi: int = DPI) -> Path:
    """Write `fig` to `path` as PNG (atomically: a reader never sees half a file), then close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    finally:
        pyplot().close(fig)
    return path


def limit_line(ax, y: float, label: str):
    """A horizontal limit line (red, dashed, in the legend) that stays inside the axes with some room,
    never on their edge: draw it after the data."""
    line = ax.axhline(y, color="tab:red", ls="--", lw=1, label=label)
    low, high = ax.get_ylim()
    pad = 0.05 * (max(high, y) - min(low, y) or 1.0)
    ax.set_ylim(min(low, y - pad), max(high, y + pad))
    return line


def label_points(ax, xs, ys, labels: list[str], key_title: str | None = None, fontsize: float = 7) -> None:
    """Number the points (xs[i], ys[i]) 1, 2, ... where a number fits without covering another one or
    leaving the axes, and list "1. label" in a key to the right of the axes, so long labels never
    overprint each other or run off the figure. A point whose number cannot be placed (a dense
    cluster) is still in the key, and its neighbours' numbers tell where it lies."""
    fig = ax.figure
    fig.canvas.draw()  # the renderer measures the numbers' boxes
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    from matplotlib.transforms import Bbox  # matplotlib is heavy: imported only when a figure is drawn

    points = ax.transData.transform(list(zip(xs, ys))) if len(xs) else []
    taken = [Bbox.from_bounds(px - 4, py - 4, 8, 8) for px, py in points]  # no number covers a marker
    offsets = [(4, 5), (4, -11), (-12, 5), (-12, -11), (4, 14), (4, -20), (-12, 14), (-12, -20), (12, -3), (-20, -3)]
    for i, (x, y) in enumerate(zip(xs, ys), 1):
        for dx, dy in offsets:
            text = ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                               color="0.2")
            box = text.get_window_extent(renderer).expanded(1.1, 1.15)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(t) for t in taken):
                taken.append(box)
                break
            text.remove()
    rows = [f"{i}. {label}" for i, label in enumerate(labels, 1)]
    per_column = 24
    columns = [rows[k:k + per_column] for k in range(0, len(rows), per_column)]
    for c, column in enumerate(columns):
        head = [key_title] if key_title and c == 0 else ([""] if key_title else [])
        ax.text(1.02 + 0.32 * c, 1.0, "\n".join(head + column), transform=ax.transAxes, va="top", ha="left",
                fontsize=fontsize, family="monospace")


__all__ = ["FIGSIZE", "DPI", "pyplot", "new_figure", "save_figure", "label_points", "limit_line"]
