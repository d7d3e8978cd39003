"""Figure plumbing shared by every plot: a Figure that shows itself inline, PNG bytes, saving, date ticks.

Why a subclass: the kit builds figures without pyplot (no global figure registry, nothing to close,
no window opened by a script). IPython shows a bare ``Figure`` as an image only after pyplot's inline
backend has registered a PNG formatter for the class, which happens when pyplot is imported; without
that a notebook cell ending with a figure prints ``<Figure size 1100x550 with 2 Axes>``. A
:class:`KitFigure` carries its own ``_repr_png_``, which every IPython front end (JupyterLab,
papermill/nbclient, VS Code) asks for, so it displays with or without pyplot and leaves no state behind.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from kronos_kit.runs import atomic_write

__all__ = ["KitFigure", "new_figure", "figure_and_axes", "figure_png", "save_figure", "bar_time_axis",
           "legend_outside"]


def figure_png(fig: Figure, *, dpi: float | None = None) -> bytes:
    """The figure as PNG bytes (``dpi`` None: the figure's own), rendered with Agg, no pyplot involved."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi if dpi is not None else fig.dpi)
    return buf.getvalue()


class KitFigure(Figure):
    """A matplotlib Figure that IPython displays as a PNG (see the module docstring for why)."""

    def _repr_png_(self) -> bytes:
        return figure_png(self)


def new_figure(figsize: tuple[float, float], **kwargs: object) -> KitFigure:
    """A :class:`KitFigure` of ``figsize`` inches with constrained layout (other Figure arguments pass through)."""
    kwargs.setdefault("layout", "constrained")
    return KitFigure(figsize=figsize, **kwargs)


def figure_and_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """``ax`` and its figure when given (the caller's figure), else a new figure with one Axes."""
    if ax is not None:
        return ax.figure, ax
    fig = new_figure(figsize)
    return fig, fig.add_subplot()


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Figure:
    """Write a figure as PNG (folders created) and return it, so a cell ending with this call shows it."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    return fig


def bar_time_axis(ax: Axes, times: Sequence[object] | pd.DatetimeIndex, *, first: int = 0, nbins: int = 7,
                  label: str | None = "bar time (evenly spaced bars)") -> None:
    """Label an x axis of bar positions with the bars' times.

    Bars sit at consecutive integers (no blank space over nights and weekends); the bar at x = ``first``
    has time ``times[0]``, the next ``times[1]``, and so on. Ticks fall on whole bars; the format shows
    the time of day only when some bar has one.
    """
    stamps = pd.DatetimeIndex(pd.to_datetime(list(times)))
    if len(stamps) == 0:
        return
    fmt = "%Y-%m-%d %H:%M" if (stamps != stamps.normalize()).any() else "%Y-%m-%d"
    text = [t.strftime(fmt) for t in stamps]

    def tick(x: float, _pos: int | None) -> str:
        i = int(round(x)) - first
        return text[i] if abs(x - round(x)) < 1e-6 and 0 <= i < len(text) else ""

    ax.xaxis.set_major_locator(MaxNLocator(nbins=nbins, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(tick))
    try:  # "xtick" (matplotlib >= 3.10) anchors each rotated label's end at its tick
        ax.tick_params(axis="x", labelrotation=30, labelrotation_mode="xtick")
    except ValueError:
        ax.tick_params(axis="x", labelrotation=30)
    if label:
        ax.set_xlabel(label)


def legend_outside(ax: Axes, **kwargs: object) -> None:
    """A legend right of the axes, so it never covers a line (constrained layout makes room for it)."""
    if ax.get_legend_handles_labels()[0]:
        kwargs = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": "small", "borderaxespad": 0.0,
                  **kwargs}
        ax.legend(**kwargs)

