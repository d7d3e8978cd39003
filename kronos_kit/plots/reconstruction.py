"""Figures for the decision before phase 2: where the tokenizer fails, and how its errors moved.

* :func:`plot_worst_windows`: the windows with the largest close error in return units, the true
  close against each tokenizer's reconstruction (the context bars a window borrows shaded);
* :func:`plot_window_errors`: the distribution of per-window close errors before vs after adaptation,
  against the median bar move, and the per-window normalized MSE of one against the other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from kronos_kit.data.schema import FEATURE_COLUMNS
from kronos_kit.plots.codebook import _window_times
from kronos_kit.plots.figure import bar_time_axis, legend_outside, new_figure
from kronos_kit.reconstruction import ReconstructionReport, WorstWindow

__all__ = ["plot_worst_windows", "plot_window_errors"]

_CLOSE = FEATURE_COLUMNS.index("close")
_STYLES = (("tab:orange", "-"), ("tab:blue", "--"), ("tab:green", ":"))


def plot_worst_windows(
    worst: Sequence[WorstWindow],
    *,
    median_move_bp: float | None = None,
    frame: pd.DataFrame | None = None,
    columns: int = 3,
) -> Figure:
    """One panel per window of :func:`~kronos_kit.reconstruction.worst_windows`, worst first: the true
    close (black) and each tokenizer's full-decoder close, in prices; shaded bars are context borrowed
    from the previous split (not scored). Titles give each tokenizer's mean close error in bp of the
    previous close and, with ``median_move_bp``, as a multiple of the median bar move; the red ring marks the last
    tokenizer's worst bar, with its own error. ``frame`` (the
    frame the dataset came from, e.g. ``data.splits.val``) puts dates on the x axes."""
    if not worst:
        fig = new_figure((6.0, 2.0))
        fig.add_subplot().text(0.5, 0.5, "no windows with a close error", ha="center", va="center")
        return fig
    rows = -(-len(worst) // columns)
    fig = new_figure((4.2 * min(columns, len(worst)), 3.0 * rows + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, min(columns, len(worst)), squeeze=False)).ravel()
    for ax, w in zip(axes, worst):
        first = next(iter(w.reconstructions.values()))
        truth = first.denormalize(first.x)[:, _CLOSE]
        bars = np.arange(len(truth))
        if first.in_split is not None and not first.in_split.all():
            ax.axvspan(-0.5, int(np.argmax(first.in_split)) - 0.5, color="0.9", lw=0, label="context (not scored)")
        ax.plot(bars, truth, color="black", lw=1.3, label="close")
        parts = []
        for (name, rec), (color, ls) in zip(w.reconstructions.items(), _STYLES):
            fit = rec.denormalize(rec.full_recon)[:, _CLOSE]
            ax.plot(bars, fit, color=color, ls=ls, lw=1.1, label=name)
            move = f" = {w.close_bp[name] / median_move_bp:.2f}x move" if median_move_bp else ""
            parts.append(f"{name} {w.close_bp[name]:.0f} bp{move}")
        # the worst bar of the last tokenizer (the one ranked), scored bars only
        err = np.abs(fit[1:] - truth[1:]) / np.abs(truth[:-1])
        if first.in_split is not None:
            err = np.where(first.in_split[1:], err, -np.inf)
        t = int(np.argmax(err)) + 1
        ax.plot([t], [fit[t]], ls="none", marker="o", ms=9, mfc="none", mec="red", mew=1.5,
                label="worst bar of " + name)
        # the ring's own error: the title's numbers are means over the window, far below a single worst bar
        ax.annotate(f"{err[t - 1] * 1e4:.0f} bp", (t, fit[t]), xytext=(7, -3), textcoords="offset points",
                    color="red", fontsize="x-small", va="top",
                    bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 0.5})
        times = _window_times(frame, first.symbol, first.start, len(truth)) if frame is not None and \
            first.start is not None else None
        when = f" {times[0]:%Y-%m-%d}" if times is not None else (f" start {first.start}" if first.start is not None
                                                                    else "")
        ax.set_title(f"#{w.rank} {first.symbol or 'window'}{when}, mean close error:\n" + ", ".join(parts),
                     fontsize="small", loc="left")
        if times is not None:
            bar_time_axis(ax, times, nbins=4, label=None)
        else:
            ax.set_xlabel("bar")
        ax.grid(alpha=0.25)
    for ax in axes[len(worst):]:
        ax.set_visible(False)
    axes[0].set_ylabel("close (price)")
    legend = {}
    for ax in axes[: len(worst)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=len(legend), fontsize="small")
    fig.suptitle("the validation windows with the largest close error (full decoder), worst first")
    return fig


def plot_window_errors(reports: Mapping[str, ReconstructionReport], *, bins: int = 30) -> Figure:
    """Left: histograms of the per-window close error (bp of the previous close) of each report, e.g.
    ``{"before": base, "after": adapted}``, with each report's median dotted and the median absolute
    bar move dashed. Right (two reports on the same windows): each window's normalized MSE after
    against before; points above the diagonal got worse."""
    names = list(reports)
    errors = {n: reports[n].windows.array("close_bp") if reports[n].windows is not None else np.zeros(0)
              for n in names}
    fig = new_figure((11.0, 3.6))
    left, right = fig.subplots(1, 2)
    finite = np.concatenate([e[np.isfinite(e)] for e in errors.values()]) if errors else np.zeros(0)
    edges = np.histogram_bin_edges(finite, bins=bins) if len(finite) else bins
    for (name, e), (color, _) in zip(errors.items(), _STYLES):
        e = e[np.isfinite(e)]
        left.hist(e, bins=edges, histtype="step", lw=1.5, color=color, label=f"{name} ({len(e)} windows)")
        if len(e):
            left.axvline(np.median(e), color=color, ls=":", lw=1.2, label=f"{name} median {np.median(e):.1f} bp")
    move = (reports[names[0]].returns or {}).get("median_move_bp") if names else None
    if move:
        left.axvline(move, color="black", ls="--", lw=1.2, label=f"median |bar move| {move:.1f} bp")
    left.set_xlabel("mean close error in the window (bp of the previous close)")
    left.set_ylabel("windows")
    left.set_title("per-window close error")
    left.grid(alpha=0.25)
    legend_outside(left)
    if len(names) == 2 and reports[names[0]].windows is not None and reports[names[1]].windows is not None:
        a, b = (reports[n].windows.array("full_mse") for n in names)
        if len(a) == len(b):
            worse = float(np.mean(b > a)) if len(a) else float("nan")
            right.scatter(a, b, s=8, alpha=0.5, color="tab:purple")
            hi = float(np.nanmax(np.r_[a, b])) if len(a) else 1.0
            right.plot([0, hi], [0, hi], color="0.3", ls="--", lw=1)
            right.set_title(f"per-window MSE: {worse:.0%} of windows worse {names[1]}", fontsize="medium")
            right.set_xlabel(f"{names[0]}")
            right.set_ylabel(f"{names[1]}")
    else:
        right.text(0.5, 0.5, "needs two reports on the same windows", ha="center", va="center",
                   transform=right.transAxes)
    right.grid(alpha=0.25)
    return fig
