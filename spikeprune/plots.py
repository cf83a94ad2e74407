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
    import matplotlib  # lazy heavy import: paid only when a figure is drawn

    matplotlib.use("Agg")  # before pyplot is imported (below, for the same reason)
    import matplotlib.pyplot as plt  # lazy heavy import: only when a figure is drawn

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


__all__ = ["FIGSIZE", "DPI", "pyplot", "new_figure", "save_figure"]
