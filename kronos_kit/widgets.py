"""ipywidgets for looking at a tokenizer in a notebook: a window browser and a code inspector.

The widgets only read and display.  Figures are rendered to PNG and appended to an ``Output``'s
outputs directly (not through ``with out: display(...)``), so the widgets build and update without
a running kernel - which is also what lets the tests construct them.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import ipywidgets as widgets
import numpy as np
from IPython.display import Image
from matplotlib.figure import Figure

from kronos_kit.codebook import CodeProfile, WindowReconstruction, code_profile, reconstruct_window

__all__ = ["window_browser", "code_inspector", "codes_table_html"]


def _show(out: widgets.Output, fig: Figure, *, dpi: int = 80) -> None:
    """Replace the contents of ``out`` with ``fig`` as a PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    out.outputs = ()
    out.append_display_data(Image(data=buf.getvalue(), format="png"))


def codes_table_html(s1_ids: Sequence[int], s2_ids: Sequence[int], *, max_bars: int | None = None) -> str:
    """A small HTML table of a window's codes: one column per bar, rows s1 and s2 (horizontally
    scrollable for long windows); ``max_bars`` keeps only the last bars."""
    s1, s2 = np.asarray(s1_ids).ravel(), np.asarray(s2_ids).ravel()
    start = 0 if max_bars is None or len(s1) <= max_bars else len(s1) - max_bars
    cell = "<td style='padding:1px 4px;text-align:right;border:1px solid #ddd'>{}</td>"
    head = "".join(cell.format(f"<b>{t}</b>") for t in range(start, len(s1)))
    row1 = "".join(cell.format(int(v)) for v in s1[start:])
    row2 = "".join(cell.format(int(v)) for v in s2[start:])
    return (
        "<div style='overflow-x:auto;font-family:monospace;font-size:11px'>"
        "<table style='border-collapse:collapse'>"
        f"<tr><th>bar</th>{head}</tr><tr><th>s1</th>{row1}</tr><tr><th>s2</th>{row2}</tr>"
        "</table></div>"
    )


def _symbol_index(dataset: Any) -> dict[str, list[int]]:
    """symbol -> dataset positions, in order; reads ``dataset[i]["symbol"]`` for every item once."""
    index: dict[str, list[int]] = {}
    for i in range(len(dataset)):
        index.setdefault(str(dataset[i]["symbol"]), []).append(i)
    return index


def window_browser(
    tokenizers: Mapping[str, Any],
    dataset: Any,
    *,
    device: str | None = "cpu",
    symbols: Mapping[str, Sequence[int]] | None = None,
) -> widgets.VBox:
    """Browse a window dataset and see each tokenizer's reconstruction of the selected window.

    ``tokenizers`` maps a name to a tokenizer, e.g. ``{"before": base, "after": adapted}``;
    ``dataset`` is a map-style dataset (or list) of window dicts with ``x``, ``mean``, ``std``,
    ``symbol`` and ``start``.  Controls: symbol dropdown, window slider (within the symbol) and a
    toggle between tokenizers; below them the candle overlay (original / s1 only / full) and the
    window's s1 and s2 codes.  ``symbols`` (symbol -> dataset positions) skips the one pass over the
    dataset that otherwise builds that index.
    """
    if not tokenizers:
        raise ValueError("tokenizers must name at least one tokenizer")
    index = {str(k): list(v) for k, v in (symbols or _symbol_index(dataset)).items()}
    if not index:
        raise ValueError("the dataset has no windows")
    names = list(tokenizers)

    symbol = widgets.Dropdown(options=sorted(index), description="symbol")
    position = widgets.IntSlider(value=0, min=0, max=len(index[symbol.value]) - 1, description="window")
    which = widgets.ToggleButtons(options=names, value=names[0], description="tokenizer")
    info = widgets.HTML()
    figure = widgets.Output()
    codes = widgets.HTML()

    @lru_cache(maxsize=64)  # scrubbing back and forth should not re-run the tokenizer
    def _reconstruct(name: str, item: int) -> WindowReconstruction:
        return reconstruct_window(tokenizers[name], dataset[item], device=device)

    def _redraw(*_: Any) -> None:
        from kronos_kit.plots.codebook import plot_window_reconstruction

        item = index[symbol.value][position.value]
        rec = _reconstruct(which.value, item)
        err = ((rec.full_recon - rec.x) ** 2).mean(), ((rec.s1_recon - rec.x) ** 2).mean()
        info.value = (
            f"<b>{html.escape(str(symbol.value))}</b> window {position.value + 1}/{len(index[symbol.value])}"
            f" (dataset item {item}, start {rec.start}); tokenizer <b>{html.escape(which.value)}</b>: "
            f"normalized MSE full {err[0]:.4f}, s1 only {err[1]:.4f}"
        )
        _show(figure, plot_window_reconstruction(rec, title=f"{symbol.value} - {which.value}"))
        codes.value = codes_table_html(rec.s1_ids, rec.s2_ids)

    def _on_symbol(change: dict[str, Any]) -> None:
        # Setting max may clamp value and fire its own redraw; hold it so we draw exactly once.
        with position.hold_trait_notifications():
            position.value = 0
            position.max = len(index[change["new"]]) - 1
        _redraw()

    symbol.observe(_on_symbol, names="value")
    position.observe(_redraw, names="value")
    which.observe(_redraw, names="value")
    _redraw()
    return widgets.VBox([widgets.HBox([symbol, which]), position, info, figure, codes])


def code_inspector(
    tokenizer: Any,
    dataset_or_batches: Any,
    *,
    device: str | None = "cpu",
    max_batches: int | None = None,
    profile: CodeProfile | None = None,
) -> widgets.VBox:
    """Pick an s1 code and see how often it occurs and the mean normalized candle of its bars.

    The data (a window dataset or an iterable of batches) is encoded once up front
    (:func:`~kronos_kit.codebook.code_profile`); pass a ready ``profile`` to skip that.
    """
    from kronos_kit.plots.codebook import plot_code_candle

    prof = profile or code_profile(tokenizer, dataset_or_batches, device=device, max_batches=max_batches)
    k1 = len(prof.counts)
    order = np.argsort(-prof.counts, kind="stable")
    rank = np.empty(k1, dtype=int)
    rank[order] = np.arange(1, k1 + 1)
    start = int(order[0])  # open on the most frequent code

    code = widgets.IntSlider(value=start, min=0, max=k1 - 1, description="s1 code")
    info = widgets.HTML()
    figure = widgets.Output()

    def _redraw(*_: Any) -> None:
        c = int(code.value)
        n = int(prof.counts[c])
        share = n / prof.n_tokens if prof.n_tokens else 0.0
        used = int((prof.counts > 0).sum())
        if n:
            means = ", ".join(f"{f} {v:+.2f}" for f, v in zip(prof.features, prof.mean_features[c]))
            detail = f"rank {rank[c]} of {k1} ({used} used); mean normalized {means}"
        else:
            detail = f"never used ({used} of {k1} codes used)"
        info.value = (
            f"<b>code {c}</b> (bits {format(c, f'0{prof.s1_bits}b')}): {n:,} of {prof.n_tokens:,} bars "
            f"({share:.2%}); {detail}"
        )
        _show(figure, plot_code_candle(prof, c))

    code.observe(_redraw, names="value")
    _redraw()
    return widgets.VBox([code, info, figure])
