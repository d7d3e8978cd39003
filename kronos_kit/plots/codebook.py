"""Figures for tokenizer codebook health and reconstruction quality.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot that displays inline in
a notebook (see :mod:`kronos_kit.plots.figure`); pass ``ax=`` where offered to draw into your own axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from kronos_kit.codebook import CodebookStats
from kronos_kit.data.schema import FEATURE_COLUMNS, PRICE_COLUMNS, denormalize
from kronos_kit.plots.candles import draw_candles
from kronos_kit.plots.figure import bar_time_axis, figure_and_axes, new_figure
from kronos_kit.reconstruction import DECODERS, CodeProfile, ReconstructionReport, WindowReconstruction

__all__ = [
    "plot_rank_frequency",
    "plot_code_heatmap",
    "plot_bit_balance",
    "plot_reconstruction",
    "plot_window_reconstruction",
    "plot_channel_errors",
    "plot_code_candle",
]

_S1_COLOR, _S2_COLOR = "tab:blue", "tab:orange"
_HATCHES = ("", "//", "..", "xx", "\\\\", "++")
# channels that share a unit in price space; each group gets its own y axis there
_UNIT_GROUPS = (("prices", PRICE_COLUMNS), ("volume", ("volume",)), ("amount", ("amount",)))


def _as_mapping(stats: object, default: str) -> dict[str, object]:
    return dict(stats) if isinstance(stats, Mapping) else {default: stats}


def plot_rank_frequency(
    stats: CodebookStats | Mapping[str, CodebookStats],
    *,
    level: str = "s1",
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Code frequency against frequency rank on log-log axes, one line per statistics object
    (e.g. ``{"before": base_stats, "after": adapted_stats}``), with uniform usage ``1/K`` dashed.

    Dead codes have frequency 0 and cannot appear on a log axis; each line ends at its last used code.
    """
    series = _as_mapping(stats, "codes")
    fig, ax = figure_and_axes(ax, (6.0, 4.0))
    k = None
    for label, st in series.items():
        cs = st.level(level)  # type: ignore[attr-defined]
        k = cs.vocab_size
        freq = np.sort(cs.frequencies)[::-1]
        freq = freq[freq > 0]
        ranks = np.arange(1, freq.size + 1)
        ax.plot(ranks, freq, drawstyle="steps-post", label=f"{label} (usage {cs.usage:.1%})")
    if k is not None:
        ax.hlines(1.0 / k, 1, k, colors="grey", linestyles="--", label=f"uniform 1/{k}")
        ax.set_xlim(1, max(k, 2))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("share of tokens")
    ax.set_title(title or f"{level} rank-frequency")
    ax.legend(fontsize="small")
    return fig


def plot_code_heatmap(
    stats: CodebookStats,
    *,
    level: str = "s1",
    ax: Axes | None = None,
    title: str | None = None,
    annotate: bool | None = None,
) -> Figure:
    """Code counts laid out on a near-square grid (code = row * n_cols + col), log colour scale;
    dead codes are grey and marked with a red x.  ``annotate`` writes the code numbers into the
    cells (default: when there are at most 64 codes); the x then moves to the cell's corner and each
    number takes the colour that reads on its cell."""
    cs = stats.level(level)
    bits = int(round(np.log2(cs.vocab_size)))
    rows, cols = 2 ** (bits // 2), 2 ** (bits - bits // 2)
    grid = cs.counts.reshape(rows, cols).astype(float)
    fig, ax = figure_and_axes(ax, (5.5, 4.5))
    masked = np.ma.masked_equal(grid, 0)
    pos = grid[grid > 0]
    vmin = float(pos.min()) if pos.size else 1.0
    vmax = float(pos.max()) if pos.size else 10.0
    if vmax <= vmin:  # LogNorm needs a non-empty range
        vmax = vmin * 10
    import matplotlib as mpl

    cmap = mpl.colormaps["viridis"].with_extremes(bad="0.85")
    norm = LogNorm(vmin=vmin, vmax=vmax)
    im = ax.imshow(masked, cmap=cmap, norm=norm, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="count")
    annotate = annotate if annotate is not None else cs.vocab_size <= 64
    dead_r, dead_c = np.nonzero(grid == 0)
    # Marking every dead cell of a huge grid would cost more than it shows; the grey cells suffice.
    if 0 < dead_r.size <= 4096:
        if annotate:  # a small x in the top-right corner leaves the code number readable
            ax.scatter(dead_c + 0.3, dead_r - 0.3, marker="x", color="red", s=max(4.0, 200.0 / cols), linewidths=1.0)
        else:
            ax.scatter(dead_c, dead_r, marker="x", color="red", s=max(4.0, 400.0 / cols), linewidths=1.0)
    if annotate:
        rgba = cmap(norm(masked))  # the colour each cell is drawn in (grey where dead)
        luminance = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])
        for code in range(cs.vocab_size):
            r, c = divmod(code, cols)
            ax.text(c, r, str(code), ha="center", va="center", fontsize="x-small",
                    color="black" if luminance[r, c] > 0.5 else "white")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"code % {cols}")
    ax.set_ylabel(f"code // {cols}")
    ax.set_title(title or f"{level} code usage: {cs.n_used}/{cs.vocab_size} used, {cs.n_dead} dead (grey, x)")
    return fig


def plot_bit_balance(
    stats: CodebookStats | Mapping[str, CodebookStats],
    *,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """P(bit = 1) per bit, s1 bits and s2 bits in different colours, 0.5 (balanced) dashed.
    A mapping draws grouped bars, one hatch per entry."""
    series = _as_mapping(stats, "")
    first = next(iter(series.values()))
    b1, b2 = first.s1_bits, first.s2_bits  # type: ignore[attr-defined]
    n_bits = b1 + b2
    fig, ax = figure_and_axes(ax, (max(5.0, 0.4 * n_bits * len(series) + 2), 3.5))
    width = 0.8 / len(series)
    colors = [_S1_COLOR] * b1 + [_S2_COLOR] * b2
    x = np.arange(n_bits)
    handles = [Patch(color=_S1_COLOR, label="s1 bits"), Patch(color=_S2_COLOR, label="s2 bits")]
    for i, (label, st) in enumerate(series.items()):
        if (st.s1_bits, st.s2_bits) != (b1, b2):  # type: ignore[attr-defined]
            raise ValueError("all statistics must have the same s1_bits and s2_bits")
        hatch = _HATCHES[i % len(_HATCHES)]
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar(x + offset, st.bit_balance, width=width, color=colors, hatch=hatch, edgecolor="black", lw=0.5)  # type: ignore[attr-defined]
        if label:
            handles.append(Patch(facecolor="white", edgecolor="black", hatch=hatch, label=label))
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_xticks(x, [f"s1.{i}" for i in range(b1)] + [f"s2.{i}" for i in range(b2)], rotation=90)
    ax.set_ylim(0, 1)
    ax.set_ylabel("P(bit = 1)")
    ax.set_title(title or "bit balance")
    ax.legend(handles=handles, fontsize="small", ncols=2)
    return fig


def _to_prices(a: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None) -> np.ndarray:
    if mean is None or std is None:
        return a
    return denormalize(a, np.asarray(mean), np.asarray(std))


def plot_reconstruction(
    original: np.ndarray,
    s1_recon: np.ndarray,
    full_recon: np.ndarray,
    *,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
    features: Sequence[str] = FEATURE_COLUMNS,
    times: Sequence[object] | pd.DatetimeIndex | None = None,
    title: str | None = None,
) -> Figure:
    """One window as candles in three stacked panels: original, s1-only and full reconstruction.

    Arrays are (L, C) in normalized space; with ``mean`` and ``std`` (C,) they are de-normalized to
    prices first.  The original close is drawn as a grey line behind both reconstructions.  Panel
    titles carry the normalized MSE over the OHLC channels.  ``times`` (L bar times) label the x axis
    with dates; without them it counts bars.
    """
    idx = [list(features).index(f) for f in PRICE_COLUMNS]
    arrays = [np.asarray(a, dtype=float) for a in (original, s1_recon, full_recon)]
    shown = [_to_prices(a, mean, std)[:, idx] for a in arrays]
    if times is not None and len(times) != len(shown[0]):
        raise ValueError(f"plot_reconstruction: {len(times)} times for a window of {len(shown[0])} bars")
    fig = new_figure((9.0, 7.0))
    axes = fig.subplots(3, 1, sharex=True, sharey=True)
    names = ("original", "s1 only (coarse)", "full (s1 + s2)")
    for k, (ax, name, ohlc) in enumerate(zip(axes, names, shown)):
        if k:
            ax.plot(np.arange(len(ohlc)), shown[0][:, 3], color="grey", lw=0.8, alpha=0.8, label="original close")
            mse = float(np.mean((arrays[k][:, idx] - arrays[0][:, idx]) ** 2))
            name = f"{name} - OHLC MSE {mse:.4f} (normalized)"
            ax.legend(loc="best", fontsize="x-small", framealpha=0.8)
        draw_candles(ax, ohlc)
        ax.set_title(name, fontsize="medium", loc="left")
        ax.set_ylabel("price" if mean is not None and std is not None else "normalized")
        ax.grid(alpha=0.25)
    if times is not None:
        bar_time_axis(axes[-1], times)
    else:
        axes[-1].set_xlabel("bar")
    if title:
        fig.suptitle(title)
    return fig


def _window_times(frame: pd.DataFrame, symbol: str | None, start: int, length: int) -> pd.DatetimeIndex:
    """The bar times of a window: rows ``start .. start + length - 1`` of ``symbol`` in ``frame``."""
    part = frame if symbol is None or "symbol" not in frame.columns else frame[frame["symbol"] == symbol]
    if start + length > len(part):
        raise ValueError(
            f"plot_window_reconstruction: the frame has {len(part)} bars of {symbol!r}, the window needs bars "
            f"{start}..{start + length - 1}; pass the frame the window dataset was built from "
            "(e.g. data.splits.val for data.val).")
    times = pd.to_datetime(part["timestamps"]).sort_values(kind="stable")
    return pd.DatetimeIndex(times.iloc[start : start + length])


def plot_window_reconstruction(
    rec: WindowReconstruction, *, frame: pd.DataFrame | None = None, title: str | None = None
) -> Figure:
    """:func:`plot_reconstruction` of a :class:`~kronos_kit.codebook.WindowReconstruction`.

    ``frame`` is the frame the window came from (e.g. ``data.splits.val`` for an item of ``data.val``):
    with it the x axis shows dates and the title the window's time range.
    """
    times = None
    if frame is not None and rec.start is not None:
        times = _window_times(frame, rec.symbol, int(rec.start), len(rec.x))
    if title is None:
        name = rec.symbol or "window"
        if times is not None:
            fmt = "%Y-%m-%d %H:%M" if (times != times.normalize()).any() else "%Y-%m-%d"
            title = f"{name}: {times[0].strftime(fmt)} .. {times[-1].strftime(fmt)} ({len(times)} bars)"
        elif rec.start is not None:
            title = f"{name}: bars {rec.start}..{int(rec.start) + len(rec.x) - 1} of its split"
        else:
            title = f"{name} ({len(rec.x)} bars)"
    return plot_reconstruction(rec.x, rec.s1_recon, rec.full_recon, mean=rec.mean, std=rec.std, times=times,
                               title=title)


def plot_channel_errors(
    reports: ReconstructionReport | Mapping[str, ReconstructionReport],
    *,
    metric: str = "mse",
    symbol: str | None = None,
    log: bool = False,
    channels: Sequence[str] | None = None,
) -> Figure:
    """Per-channel reconstruction error as grouped bars (one group per channel, one bar per report,
    e.g. ``{"before": r_base, "after": r_adapted}``), for each decoder (s1 only, full).

    ``metric`` is ``"mse"``, ``"mae"`` (normalized: one panel per decoder, all channels on one axis),
    ``"price_mse"`` or ``"price_mae"`` (de-normalized: prices, volume and amount have different units
    and scales - an amount error of 1e23 would flatten every price bar - so each unit gets its own
    column and y axis, one row per decoder).
    ``channels`` picks channels (default all); ``symbol`` picks a per-symbol row instead of the
    overall one, whose price errors are dominated by the highest-priced symbols.
    """
    series = _as_mapping(reports, "report")
    first = next(iter(series.values()))
    features = list(first.features)  # type: ignore[attr-defined]
    chosen = list(channels) if channels is not None else features
    unknown = [c for c in chosen if c not in features]
    if unknown or not chosen:
        raise ValueError(f"plot_channel_errors: channels {unknown or chosen} not in the report's {features}")
    price_space = metric.startswith("price")
    if price_space:
        grouped = {c for _, group in _UNIT_GROUPS for c in group}
        groups = [(name, [c for c in chosen if c in group]) for name, group in _UNIT_GROUPS]
        groups += [(c, [c]) for c in chosen if c not in grouped]
        groups = [(name, cols) for name, cols in groups if cols]
    else:
        groups = [("", chosen)]
    what = metric.removeprefix("price_").upper()
    decoder_names = {"s1": "s1 only (coarse)", "full": "full (s1 + s2)"}
    width = 0.8 / len(series)
    if price_space:  # one row per decoder, one column per unit with its own y axis, shared down the column
        fig = new_figure((11.0, 6.2))
        axes = fig.subplots(len(DECODERS), len(groups), squeeze=False, sharey="col",
                            width_ratios=[len(cols) + 0.6 for _, cols in groups])
        cells = [(axes[r, g], dec, g) for r, dec in enumerate(DECODERS) for g in range(len(groups))]
    else:  # one unit: the decoders side by side on one shared y axis
        fig = new_figure((10.0, 3.8))
        axes = fig.subplots(1, len(DECODERS), squeeze=False, sharey=True)
        cells = [(axes[0, d], dec, 0) for d, dec in enumerate(DECODERS)]
    for ax, dec, g in cells:
        unit, cols = groups[g]
        idx = [features.index(c) for c in cols]
        x = np.arange(len(cols))
        for i, (label, rep) in enumerate(series.items()):
            values = rep.errors(dec, symbol).metric(metric)  # type: ignore[attr-defined]
            if values is None:
                raise ValueError(f"report {label!r} has no {metric} (batches lacked mean/std)")
            ax.bar(x + (i - (len(series) - 1) / 2) * width, values[idx], width=width, label=label, color=f"C{i}")
        ax.set_xticks(x, cols)
        ax.set_xlim(-0.6, len(cols) - 0.4)
        ax.grid(axis="y", alpha=0.3)
        if log:
            ax.set_yscale("log")
        if price_space:
            if dec == DECODERS[0]:
                ax.set_title(unit)
            if g == 0:
                ax.set_ylabel(f"{decoder_names[dec]}\n{what}")
        else:
            ax.set_title(decoder_names[dec])
    if not price_space:
        axes[0, 0].set_ylabel(f"{what} (normalized)")
    axes[0, -1].legend(fontsize="small")
    head = f"reconstruction {metric} by channel" + (f" - {symbol}" if symbol else "")
    if price_space:
        head += "\nde-normalized: each unit on its own axis" + ("" if symbol else
                                                                 "; all symbols pooled (pass symbol= for one)")
    fig.suptitle(head)
    return fig


def plot_code_candle(profile: CodeProfile, code: int, *, ax: Axes | None = None) -> Figure:
    """The mean normalized candle (open, high, low, close averaged over the bars carrying s1 ``code``).

    Channels are z-scored separately, so the mean high need not lie above the mean open: the
    candle shows where each price sits relative to its own window, not a literal bar.
    """
    fig, ax = figure_and_axes(ax, (3.4, 4.0))
    n = int(profile.counts[code])
    share = n / profile.n_tokens if profile.n_tokens else 0.0
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    if n:
        draw_candles(ax, profile.mean_ohlc(code)[None, :], width=0.5)
        ax.set_xlim(-1, 1)
    else:
        ax.text(0.5, 0.5, "never used", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    # short lines: the explorer shows this figure 3.4 inches wide, and a longer title or label was cut off there
    ax.set_ylabel("mean normalized value")
    ax.set_xlabel("each channel averaged on its own:\nnot one real candle", fontsize="small")
    bits = format(code, f"0{profile.s1_bits}b")
    ax.set_title(f"s1 code {code} ({bits})\n{n:,} bar positions ({share:.2%})", fontsize="medium")
    return fig
