"""ipywidgets for a notebook: a window browser and a code inspector for a tokenizer, and a forecast
explorer for one or more predictors.

The widgets only read and display.  Figures are rendered to PNG and appended to an ``Output``'s
outputs directly (not through ``with out: display(...)``), so the widgets build and update without
a running kernel - which is also what lets the tests construct them.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
from IPython.display import Image
from matplotlib.figure import Figure

from kronos_kit.calibration import Handover, PathCalibration
from kronos_kit.config import DEFAULT_MAX_CONTEXT, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from kronos_kit.data.schema import FEATURE_COLUMNS, PRICE_COLUMNS
from kronos_kit.plots.figure import figure_png, new_figure
from kronos_kit.reconstruction import (
    CodeProfile,
    ReconstructionReport,
    WindowReconstruction,
    code_profile,
    reconstruct_window,
)

if TYPE_CHECKING:
    import torch

    from kronos_kit.forecast import Forecast, KronosPredictor
    from kronos_kit.model import Kronos, KronosTokenizer
    from kronos_kit.runs import SamplingCalibration

__all__ = ["LiveCurve", "window_browser", "code_inspector", "codes_table_html", "forecast_explorer"]


# what a notebook opened without a running kernel shows in place of a widget (its text/plain; <= 110 chars)
NO_KERNEL_NOTE = "[interactive {what}: needs a live kernel; run the cell to use it]"


class _NotedBox(widgets.VBox):
    """A VBox whose plain-text fallback says what it is and that it needs a kernel (not `VBox(children=...`)."""

    def __init__(self, children: Sequence[widgets.Widget], what: str):
        super().__init__(children)
        self._note = NO_KERNEL_NOTE.format(what=what)

    def __repr__(self) -> str:
        return self._note


class _NotedOutput(widgets.Output):
    """An Output whose plain-text fallback is a note (the live loss curve: the figures below show the result)."""

    def __repr__(self) -> str:
        return NO_KERNEL_NOTE.format(what="loss curve (static figure below)")


def _show(out: widgets.Output, fig: Figure, *, dpi: int = 80) -> None:
    """Replace the contents of ``out`` with ``fig`` as a PNG."""
    out.outputs = ()
    out.append_display_data(Image(data=figure_png(fig, dpi=dpi), format="png"))


class LiveCurve:
    """A loss curve that redraws while a phase trains: pass it as `on_step=` to `train_tokenizer` /
    `train_predictor` and display it (or `.widget`) above the training call.

    It receives (step, {"loss": ..., <loss parts>}) after every optimizer step and redraws every
    `every` steps (`draw()` redraws now). Keys in `separate` (default: the negative BSQ term) get a
    panel of their own; `reference` draws `{label: level}` as dashed horizontal lines, e.g.
    `{"base model val_loss": 2.31}`, and may be set or changed at any time. Under papermill nothing
    renders live (no widget front end), and the static curves cell shows the result.
    """

    def __init__(
        self,
        keys: Sequence[str] = ("loss",),
        *,
        every: int = 10,
        title: str = "training loss",
        ylabel: str = "loss",
        reference: Mapping[str, float] | None = None,
        separate: Sequence[str] | None = None,
    ):
        self.keys, self.every, self.title, self.ylabel = tuple(keys), max(1, every), title, ylabel
        self.reference: dict[str, float] = dict(reference or {})
        self.separate = separate
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {k: [] for k in self.keys}
        self.widget = _NotedOutput()

    def __call__(self, step: int, parts: Mapping[str, float]) -> None:
        self.steps.append(step)
        for k in self.keys:
            self.values[k].append(float(parts.get(k, np.nan)))
        if step % self.every == 0:
            self.draw()

    def draw(self) -> None:
        """Redraw the widget from the steps received so far."""
        _show(self.widget, self.figure())

    def figure(self) -> Figure:
        from kronos_kit.plots.training import plot_loss_curves

        series = {k: (self.steps, self.values[k]) for k in self.keys}
        return plot_loss_curves(series, separate=self.separate, reference=self.reference, title=self.title,
                                ylabel=self.ylabel)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


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
    reports: Mapping[str, ReconstructionReport] | None = None,
    frame: Any = None,
) -> widgets.VBox:
    """Browse a window dataset and see each tokenizer's reconstruction of the selected window.

    ``tokenizers`` maps a name to a tokenizer, e.g. ``{"before": base, "after": adapted}``;
    ``dataset`` is a map-style dataset (or list) of window dicts with ``x``, ``mean``, ``std``,
    ``symbol`` and ``start``.  Controls: symbol dropdown, window slider (within the symbol) and a
    toggle between tokenizers; below them the candle overlay (original / s1 only / full) and the
    window's s1 and s2 codes.  ``symbols`` (symbol -> dataset positions) skips the one pass over the
    dataset that otherwise builds that index. ``reports`` (name -> `reconstruction_report` of that tokenizer
    on ``dataset``) adds an ``order`` toggle: ``worst close error`` walks the symbol's windows from the
    selected tokenizer's largest close error (bp of the previous close) down, at least half a window apart
    (`WindowErrors.worst`: neighbours share most of their bars, so they would show one event again and again).
    ``frame``, the frame the windows came from (e.g. ``data.splits.val`` for ``data.val``), puts dates on the
    window and its figure instead of bar numbers."""
    if not tokenizers:
        raise ValueError("tokenizers must name at least one tokenizer")
    index = {str(k): list(v) for k, v in (symbols or _symbol_index(dataset)).items()}
    if not index:
        raise ValueError("the dataset has no windows")
    names = list(tokenizers)
    errors = _close_errors(reports, names, len(dataset))
    ranked = {n: [int(i) for i in reports[n].windows.worst(len(dataset))] for n in errors}  # spaced, worst first

    symbol = widgets.Dropdown(options=sorted(index), description="symbol")
    position = widgets.IntSlider(value=0, min=0, max=len(index[symbol.value]) - 1, description="window")
    which = widgets.ToggleButtons(options=names, value=names[0], description="tokenizer")
    order = widgets.ToggleButtons(options=["time", _WORST], value="time", description="order")
    info = widgets.HTML()
    figure = widgets.Output()
    codes = widgets.HTML()

    def _items() -> list[int]:
        items = index[symbol.value]
        if order.value != _WORST:
            return items
        mine = set(items)
        return [i for i in ranked[which.value] if i in mine]

    @lru_cache(maxsize=64)  # scrubbing back and forth should not re-run the tokenizer
    def _reconstruct(name: str, item: int) -> WindowReconstruction:
        return reconstruct_window(tokenizers[name], dataset[item], device=device)

    def _redraw(*_: Any) -> None:
        from kronos_kit.plots.codebook import plot_window_reconstruction

        items = _items()
        item = items[position.value]
        rec = _reconstruct(which.value, item)
        worst = (f"; close error {errors[which.value][item]:.1f} bp of the previous close, rank "
                 f"{position.value + 1} of {len(items)} from the worst (windows at least half a window apart)"
                 if order.value == _WORST else "")
        info.value = (f"<b>{html.escape(str(symbol.value))}</b> window {position.value + 1}/{len(items)} "
                      f"({_window_span(rec, frame)}); tokenizer <b>{html.escape(which.value)}</b>: "
                      f"{_window_errors(rec)}{worst}")
        title = None if frame is not None else f"{symbol.value} - {which.value}"
        _show(figure, plot_window_reconstruction(rec, frame=frame, title=title))
        codes.value = codes_table_html(rec.s1_ids, rec.s2_ids)

    def _restart(*_: Any) -> None:
        # Setting max may clamp value and fire its own redraw; hold it so we draw exactly once.
        with position.hold_trait_notifications():
            position.value = 0
            position.max = len(_items()) - 1  # the worst order holds fewer windows (spaced)
        _redraw()

    symbol.observe(_restart, names="value")
    position.observe(_redraw, names="value")
    which.observe(lambda *_: _restart() if order.value == _WORST else _redraw(), names="value")
    order.observe(_restart, names="value")
    _redraw()
    controls = [symbol, which, order] if errors else [symbol, which]
    return _NotedBox([widgets.HBox(controls), position, info, figure, codes], "window browser")


_WORST = "worst close error"


def _window_errors(rec: WindowReconstruction) -> str:
    full, s1 = ((rec.full_recon - rec.x) ** 2).mean(), ((rec.s1_recon - rec.x) ** 2).mean()
    return (f"normalized MSE over all {rec.x.shape[-1]} channels: full {full:.4f}, s1 only {s1:.4f} (the figure's "
            "titles: over open, high, low, close only)")


def _window_span(rec: WindowReconstruction, frame: Any) -> str:
    """A window's first and last bar: dates with its frame (`data.splits.val` for `data.val`), else bar numbers."""
    if frame is None:
        return f"bars {rec.start}..{int(rec.start) + len(rec.x) - 1}"
    from kronos_kit.plots.codebook import _window_times

    times = _window_times(frame, rec.symbol, int(rec.start), len(rec.x))
    return f"{times[0]:%Y-%m-%d %H:%M} .. {times[-1]:%Y-%m-%d %H:%M}".replace(" 00:00", "")


def _close_errors(reports: Mapping[str, ReconstructionReport] | None, names: list[str],
                  n: int) -> dict[str, np.ndarray]:
    """Per-window close errors (bp) by tokenizer name, for the browser's worst-first order ({} without reports)."""
    if not reports:
        return {}
    out = {}
    for name in names:
        windows = reports[name].windows if name in reports else None
        if windows is None or len(windows) != n or windows.close_bp is None:
            raise ValueError(f"window_browser: reports[{name!r}] must be reconstruction_report of that tokenizer on "
                             f"the same {n} windows, with prices (mean/std)")
        out[name] = windows.array("close_bp")
    return out


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
    (:func:`~kronos_kit.reconstruction.code_profile`); pass a ready ``profile`` to skip that.
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
            detail = (f"rank {rank[c]} of {k1} ({used} used); each channel's mean over those bars, normalized "
                      f"(averaged separately, so not one real candle): {means}")
        else:
            detail = f"never used ({used} of {k1} codes used)"
        info.value = (
            f"<b>code {c}</b> (bits {format(c, f'0{prof.s1_bits}b')}): {n:,} of {prof.n_tokens:,} bar positions "
            f"({share:.2%}; windows overlap, so a bar counts once for each window holding it); {detail}"
        )
        _show(figure, plot_code_candle(prof, c))

    code.observe(_redraw, names="value")
    _redraw()
    return _NotedBox([code, info, figure], "code inspector")


# ------------------------------------------------------------------------------------ forecasts

_ALL_MODELS = "all (side by side)"
HANDED_OVER = "handed over"  # the run's handed-over forecast: the promoted model's, with its ensemble and tails


def _symbol_frames(frame: pd.DataFrame, lookback: int) -> dict[str, pd.DataFrame]:
    """symbol -> its bars sorted by time (index 0..n-1), for symbols with at least ``lookback`` bars."""
    missing = [c for c in ("timestamps", *PRICE_COLUMNS) if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks columns {missing}; columns are {list(frame.columns)}")
    if "symbol" not in frame.columns:  # a single series, e.g. one CSV read with pandas
        frame = frame.assign(symbol=str(frame.attrs.get("symbol", "series")))
    keep = ["timestamps", *[c for c in FEATURE_COLUMNS if c in frame.columns]]
    out = {}
    for sym, part in frame.groupby("symbol", sort=True):
        part = part[keep].assign(timestamps=pd.to_datetime(part["timestamps"]))
        part = part.sort_values("timestamps", kind="stable").reset_index(drop=True)
        if len(part) >= lookback:
            out[str(sym)] = part
    if not out:
        raise ValueError(f"no symbol has the {lookback} bars one lookback needs")
    return out


def _explorer_predictors(predictors: Mapping[str, Any], max_context: int | None, device: Any) -> dict[str, Any]:
    from kronos_kit.forecast import KronosPredictor

    out = {}
    for name, entry in predictors.items():
        if isinstance(entry, KronosPredictor):
            if max_context is not None and max_context != entry.max_context:
                # a second predictor over the same modules: the caller's predictor keeps its settings
                entry = KronosPredictor(entry.model, entry.tokenizer, device=entry.device, max_context=max_context,
                                        clip=entry.clip)
            out[str(name)] = entry
        elif isinstance(entry, tuple) and len(entry) == 2:
            out[str(name)] = KronosPredictor(entry[0], entry[1], device=device,
                                             max_context=max_context or DEFAULT_MAX_CONTEXT)
        else:
            raise TypeError(f"predictor {name!r}: expected a KronosPredictor or a (Kronos, KronosTokenizer) pair, "
                            f"got {type(entry).__name__}")
    return out


class _ForecastExplorer:
    """The state behind :func:`forecast_explorer`: the predictors, each symbol's bars and the controls.

    Nothing forecasts while the controls move (that takes seconds); :meth:`run` (the button) does.
    """

    def __init__(self, models: dict[str, KronosPredictor], bars: dict[str, pd.DataFrame], *, lookback: int,
                 pred_len: int, sample_count: int, max_sample_count: int, history_bars: int,
                 seed: int | None, calibration: SamplingCalibration | None = None) -> None:
        self.models, self.names, self.bars = models, list(models), bars
        self.lookback, self.pred_len, self.history_bars, self.seed = lookback, pred_len, history_bars, seed
        self.calibration = calibration
        fit = calibration.handover_choice() if calibration is not None and calibration.model in models else {}
        self.handover = Handover.from_dict(fit, where="calibration") if fit else None
        if self.handover is not None:  # offered beside the models, described next to the button
            self.names.append(HANDED_OVER)
        self._build_controls(sample_count, max_sample_count)
        self.button.on_click(self._on_click)
        self.symbol.observe(self._on_symbol, names="value")
        for control in (self.origin, self.which, self.temperature, self.top_p, self.samples, self.calibrated):
            control.observe(self._changed, names="value")
        self._describe()
        self.status.value = "press <b>Forecast</b> (nothing runs while the sliders move)"
        self.box = _NotedBox([
            widgets.HBox([self.symbol, self.which]),
            self.origin,
            widgets.HBox([self.temperature, self.top_p, self.samples, self.calibrated]),
            widgets.HBox([self.button, self.status]),
            self.info,
            self.figure,
        ], "forecast explorer")
        self.box.run = self.run  # programmatic hook (tests, scripts): the button, but raises on errors

    def _origin_range(self, sym: str) -> tuple[int, int, int]:
        """(lowest, highest, opening) origin bar of ``sym``."""
        n = len(self.bars[sym])
        # open on the latest origin whose whole horizon is realized, when there is one
        return self.lookback - 1, n - 1, max(self.lookback - 1, n - 1 - self.pred_len)

    def _build_controls(self, sample_count: int, max_sample_count: int) -> None:
        first = sorted(self.bars)[0]
        lo, hi, start = self._origin_range(first)
        wide = {"description_width": "initial"}
        self.symbol = widgets.Dropdown(options=sorted(self.bars), value=first, description="symbol")
        model_options = self.names + ([_ALL_MODELS] if len(self.names) > 1 else [])
        self.which = widgets.Dropdown(options=model_options, value=model_options[-1], description="model")
        self.origin = widgets.IntSlider(value=start, min=lo, max=hi, description="origin bar", style=wide,
                                        continuous_update=False, layout=widgets.Layout(width="95%"))
        # the run's calibrated setting when given (calibration.json), else the kit's default sampling
        sampling = self.calibration.sampling() if self.calibration is not None else {
            "temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P}
        self.temperature = widgets.FloatSlider(value=sampling["temperature"], min=0.1, max=2.0, step=0.05,
                                               description="temperature", style=wide)
        self.top_p = widgets.FloatSlider(value=sampling["top_p"], min=0.05, max=1.0, step=0.05, description="top-p",
                                         style=wide)
        self.calibrated = widgets.Checkbox(value=self.calibration is not None, disabled=self.calibration is None,
                                           description="calibrated paths", style=wide)
        self.samples = widgets.IntSlider(value=min(sample_count, max_sample_count), min=1, max=max_sample_count,
                                         description="sample paths", style=wide)
        self.button = widgets.Button(description="Forecast", button_style="primary", icon="play")
        self.status = widgets.HTML()
        self.info = widgets.HTML()
        self.figure = widgets.Output()

    def _selected(self) -> tuple[pd.DataFrame, int]:
        """The selected symbol's bars and the origin bar's index in them."""
        return self.bars[self.symbol.value], int(self.origin.value)

    def _window(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
        """(history, realized bars, future bar times) around the selected origin."""
        from kronos_kit.forecast import future_timestamps

        part, o = self._selected()
        history = part.iloc[o - self.lookback + 1 : o + 1].reset_index(drop=True)
        realized = part.iloc[o + 1 : o + 1 + self.pred_len].reset_index(drop=True)
        # the frame's own bar times while they last, then continued past its end by future_timestamps
        beyond = self.pred_len - len(realized)
        future = pd.Series([*realized["timestamps"],
                            *(future_timestamps(part["timestamps"], beyond) if beyond else [])])
        return history, realized, future

    def _describe(self, *_: Any) -> None:
        part, o = self._selected()
        realized = min(self.pred_len, len(part) - 1 - o)
        future = "all realized" if realized == self.pred_len else (
            f"{realized} of {self.pred_len} realized" if realized else "none realized (past the data)")
        t = part["timestamps"]
        self.info.value = (
            f"<b>{html.escape(self.symbol.value)}</b>: history {t.iloc[o - self.lookback + 1]:%Y-%m-%d %H:%M} .. "
            f"{t.iloc[o]:%Y-%m-%d %H:%M} ({self.lookback} bars), horizon {self.pred_len} bars: {future}"
        )

    def _forecast(self, history: pd.DataFrame, future: pd.Series, chosen: list[str]) -> dict[str, Forecast]:
        feats = [c for c in FEATURE_COLUMNS if c in history.columns]
        out = {}
        for name in chosen:
            model = self.calibration.model if name == HANDED_OVER else name
            fc = self.models[model].predict_paths(
                history[feats], history["timestamps"], future, self.pred_len, T=float(self.temperature.value),
                top_p=float(self.top_p.value), sample_count=int(self.samples.value), verbose=False, seed=self.seed)
            # each model's own fit on validation; the handed-over forecast always starts from the calibrated paths
            if (self.calibrated.value or name == HANDED_OVER) and self.calibration is not None:
                fit = PathCalibration.from_dict(self.calibration.path_calibration(model), where="calibration")
                fc = fc.calibrated(fit, [float(history["close"].iloc[-1])])
            if name == HANDED_OVER:  # the naive members drawn from this history with the explorer's seed
                fc = fc.handed_over(self.handover, history[feats], seed=self.seed)
            out[name] = fc
        return out

    def _draw(self, history: pd.DataFrame, realized: pd.DataFrame, forecasts: dict[str, Forecast]) -> list[str]:
        """Draw one fan chart per forecast into the figure; return each model's score on the realized bars."""
        from kronos_kit import metrics as M
        from kronos_kit.plots.forecast import plot_forecast

        fig = new_figure((min(16.0, 6.0 * len(forecasts)) if len(forecasts) > 1 else 10.0, 4.5))
        axes = fig.subplots(1, len(forecasts), sharey=True, squeeze=False)[0]
        when = f"{history['timestamps'].iloc[-1]:%Y-%m-%d %H:%M}"
        scores = []
        for ax, (name, fc) in zip(axes, forecasts.items()):
            plot_forecast(history, fc, realized=realized if len(realized) else None, history_bars=self.history_bars,
                          title=f"{self.symbol.value} @ {when}: {name}", label=name, ax=ax)
            if len(realized):
                paths = fc.paths[0, :, : len(realized), M.CLOSE]  # (S, k)
                real = realized["close"].to_numpy(np.float64)
                crps = float(M.crps(paths, real, axis=0).mean())
                mae = float(np.abs(np.median(paths, axis=0) - real).mean())
                scores.append(f"{html.escape(name)} close CRPS {crps:.4g}, median MAE {mae:.4g}")
        _show(self.figure, fig)
        return scores

    def run(self) -> dict[str, Forecast]:
        """Forecast with the current settings, redraw the figure, return the forecasts drawn."""
        history, realized, future = self._window()
        chosen = self.names if self.which.value == _ALL_MODELS else [self.which.value]
        t0 = time.perf_counter()
        forecasts = self._forecast(history, future, chosen)
        elapsed = time.perf_counter() - t0
        scores = self._draw(history, realized, forecasts)
        over = f" over {len(realized)} realized bars: " + "; ".join(scores) if scores else " (no realized bars)"
        handed = (f"<br>{HANDED_OVER}: {html.escape(self.handover.describe(self.calibration.model))}"
                  if HANDED_OVER in chosen else "")
        self.status.value = (f"{len(chosen)} model(s) x {int(self.samples.value)} paths x {self.pred_len} steps in "
                             f"{elapsed:.2f} s{over}{handed}")
        return forecasts

    def _on_click(self, _: Any) -> None:
        self.button.disabled, self.button.description = True, "Forecasting..."
        try:
            self.run()
        except Exception as exc:  # a kernel would swallow it; show it next to the button instead
            self.status.value = f"<span style='color:#c62828'>forecast failed: {html.escape(repr(exc))}</span>"
        finally:
            self.button.disabled, self.button.description = False, "Forecast"

    def _changed(self, *_: Any) -> None:
        self._describe()
        if self.figure.outputs:
            self.status.value = "settings changed: press <b>Forecast</b> to redraw"

    def _on_symbol(self, change: dict[str, Any]) -> None:
        _, hi, start = self._origin_range(change["new"])  # the lowest origin is lookback - 1 for every symbol
        with self.origin.hold_trait_notifications():  # setting max may clamp value: describe once, below
            self.origin.max = hi
            self.origin.value = start
        self._changed()


def forecast_explorer(
    predictors: Mapping[str, KronosPredictor | tuple[Kronos, KronosTokenizer]],
    frame: pd.DataFrame,
    *,
    lookback: int,
    pred_len: int,
    max_context: int | None = None,
    device: str | torch.device | None = None,
    sample_count: int = 16,
    max_sample_count: int = 64,
    history_bars: int = 60,
    seed: int | None = 0,
    calibration: SamplingCalibration | None = None,
) -> widgets.VBox:
    """Forecast from any bar of ``frame`` and see each model's fan chart against what happened.

    ``predictors`` maps a name to a :class:`~kronos_kit.forecast.KronosPredictor` (or a
    ``(Kronos, KronosTokenizer)`` pair, wrapped on ``device``), e.g. ``{"base": ..., "finetuned": ...}``;
    ``max_context`` overrides each predictor's context for these forecasts (None keeps it; the
    caller's predictors are not changed). ``frame`` is a long frame (``symbol``, ``timestamps``,
    open, high, low, close, optional volume and amount) or a single series without ``symbol``.

    Controls: symbol, origin (the last history bar; from the first bar with ``lookback`` bars of
    history up to the last bar, so the horizon may run past the data: then only the realized bars
    that exist are drawn, and the future bar times continue at the modal interval), temperature,
    top-p, sample count, model (or all side by side) and a Forecast button. Forecasting takes
    seconds, so nothing runs while sliders move; the button (or ``box.run()``, which returns the
    ``{name: Forecast}`` it drew) forecasts with the current settings and ``seed`` and redraws the
    fan chart: last ``history_bars`` candles, median, 50% and 90% bands and the realized close.
    ``calibration`` (the run's calibration.json, e.g. ``decision.calibration``) starts the sliders at
    its temperature / top-p and ticks "calibrated paths": each model's path calibration fitted on
    validation is applied to its paths (untick it to see them as sampled). When it holds a handed-over
    forecast for one of the models, the model menu offers "handed over" too: that model's calibrated paths
    in the ensemble with naive forecasts drawn from the history, then the tails, described with its weights.
    """
    if lookback < 2 or pred_len < 1:
        raise ValueError(f"need lookback >= 2 and pred_len >= 1, got lookback={lookback}, pred_len={pred_len}")
    if not predictors:
        raise ValueError("predictors must name at least one predictor")
    models = _explorer_predictors(predictors, max_context, device)
    bars = _symbol_frames(frame, lookback)
    return _ForecastExplorer(models, bars, lookback=lookback, pred_len=pred_len, sample_count=sample_count,
                             max_sample_count=max_sample_count, history_bars=history_bars, seed=seed,
                             calibration=calibration).box
