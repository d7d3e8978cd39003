"""Figures display inline (IPython formatter, a real kernel via nbclient), leave no pyplot state, and
carry the fixes of issue 15: labelled axes, legends beside the curves, readable units, dates, notes."""

from __future__ import annotations

import gc
import io
import weakref

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from kronos_kit import plots
from kronos_kit.codebook import CodebookCounter
from kronos_kit.data import FEATURE_COLUMNS
from kronos_kit.evaluate import walk_forward
from kronos_kit.reconstruction import ChannelErrors, ReconstructionReport, WindowReconstruction

FEATS = list(FEATURE_COLUMNS)


# ------------------------------------------------------------------------------------ helpers


def bars(n: int = 200, symbol: str = "X", seed: int = 0, freq: str = "D") -> pd.DataFrame:
    """A canonical frame of one geometric random walk."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    opens = np.r_[close[0], close[:-1]]
    vol = rng.integers(1_000, 10_000, n).astype(float)
    return pd.DataFrame({
        "symbol": symbol, "timestamps": pd.date_range("2023-01-02", periods=n, freq=freq), "open": opens,
        "high": np.maximum(opens, close) * 1.002, "low": np.minimum(opens, close) * 0.998, "close": close,
        "volume": vol, "amount": vol * close * 1e6,
    })


def random_walk(seed: int):
    """A ForecastFn of seeded random-walk paths from each history's last close."""
    rng = np.random.default_rng(seed)

    def fn(histories, hist_stamps, future_stamps, pred_len, sample_count):
        out = np.empty((len(histories), sample_count, pred_len, 6))
        for i, h in enumerate(histories):
            path = h["close"].iloc[-1] * np.exp(np.cumsum(rng.normal(0, 0.01, (sample_count, pred_len)), axis=1))
            out[i, ..., :4] = path[..., None]
            out[i, ..., 4:] = h[["volume", "amount"]].to_numpy()[-1]
        return out

    return fn


def evaluation(sample_count: int = 8):
    frame = bars(160)
    result = walk_forward(frame, {"base": random_walk(0), "finetuned": random_walk(1)}, lookback=40, pred_len=6,
                          stride=10, sample_count=sample_count, baselines=("persistence",), progress=False)
    return frame, result


def drawn(fig: Figure) -> Figure:
    fig.canvas.draw()  # tick labels and legend positions exist only after a draw
    return fig


def legend_clear_of_axes(ax) -> bool:
    """The axes' legend lies wholly outside its plotting area (so it cannot cover a line)."""
    legend, box = ax.get_legend(), ax.get_window_extent()
    leg = legend.get_window_extent()
    return leg.x0 >= box.x1 or leg.x1 <= box.x0 or leg.y0 >= box.y1 or leg.y1 <= box.y0


def tick_text(ax) -> str:
    return " ".join(t.get_text() for t in ax.get_xticklabels())


# ------------------------------------------------------------------------- inline display


def test_kit_figures_are_png_for_ipython_and_save_figure_returns_them(tmp_path):
    from IPython.core.formatters import DisplayFormatter

    fig = plots.plot_candles(bars(30), volume=False)
    data, _ = DisplayFormatter().format(fig)  # what a kernel sends for a cell ending with `fig`
    assert data["image/png"][:8] == b"\x89PNG\r\n\x1a\n"
    plain = Figure()  # the bare class has no PNG form without pyplot's inline backend: the bug
    assert "image/png" not in DisplayFormatter().format(plain)[0]

    path = tmp_path / "figures" / "candles.png"
    assert plots.save_figure(fig, path) is fig
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kit_figures_leave_no_global_figure_behind():
    from matplotlib._pylab_helpers import Gcf

    before = Gcf.get_num_fig_managers()
    fig = plots.plot_candles(bars(30))
    fig._repr_png_()
    ref = weakref.ref(fig)
    del fig
    gc.collect()
    assert ref() is None  # nothing (no pyplot registry) holds on to a kit figure
    assert Gcf.get_num_fig_managers() == before


@pytest.fixture
def kernel_env(monkeypatch):
    # a kernel as JupyterLab starts one: its own inline backend, not the tests' Agg
    monkeypatch.delenv("MPLBACKEND", raising=False)


@pytest.mark.slow  # a kernel start and the kit's imports: about 10-20 s on a busy 2-core machine
def test_notebook_cells_ending_with_a_figure_show_a_png(tmp_path, kernel_env):
    """A real kernel (nbclient, as papermill runs it): a cell ending with a kit figure or with
    `save_figure(...)` has an image/png output, pyplot is never imported, the live curve updates.
    (The fast test above checks the same PNG form through IPython's formatter without a kernel.)"""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    cells = [
        "import numpy as np, pandas as pd\n"
        "from kronos_kit.plots import plot_candles, save_figure\n"
        "t = pd.date_range('2024-01-02', periods=40, freq='D')\n"
        "c = 10 + np.cumsum(np.random.default_rng(0).normal(0, 0.1, 40))\n"
        "frame = pd.DataFrame({'symbol': 'A', 'timestamps': t, 'open': c, 'high': c + 0.1, 'low': c - 0.1,\n"
        "                      'close': c, 'volume': 1.0, 'amount': c})\n"
        "plot_candles(frame)",
        "save_figure(plot_candles(frame, volume=False), 'figures/candles.png')",
        "import sys\nprint('pyplot imported:', 'matplotlib.pyplot' in sys.modules)",
        "from kronos_kit.widgets import LiveCurve\n"
        "live = LiveCurve(('loss', 'bsq'), every=2, reference={'base model': 0.5})\n"
        "display(live)\n"
        "for step in range(1, 5):\n"
        "    live(step, {'loss': 1 / step, 'bsq': -0.03})\n"
        "print('live outputs:', [sorted(o['data']) for o in live.widget.outputs])",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    def mimetypes(cell):
        return {m for out in cell.outputs for m in out.get("data", {})}

    def text(cell):
        return "".join(out.get("text", "") for out in cell.outputs)

    figure_cell, save_cell, pyplot_cell, live_cell = nb.cells
    assert "image/png" in mimetypes(figure_cell)
    assert "image/png" in mimetypes(save_cell)
    assert (tmp_path / "figures" / "candles.png").read_bytes()[:4] == b"\x89PNG"
    assert "pyplot imported: False" in text(pyplot_cell)
    assert "application/vnd.jupyter.widget-view+json" in mimetypes(live_cell)
    assert "live outputs: [['image/png', 'text/plain']]" in text(live_cell)


# -------------------------------------------------------------------------- training curves


def training_records() -> list[dict]:
    recs = []
    for step in range(1, 21):
        recs.append({"phase": "tokenizer", "kind": "train", "step": step, "loss": 0.1 / step, "recon_s1": 0.2 / step,
                     "recon_full": 0.15 / step, "bsq": -0.03 - 0.001 * step})
        recs.append({"phase": "predictor", "kind": "train", "step": step, "loss": 5 / step, "ce_s1": 6 / step,
                     "ce_s2": 4 / step})
        if step % 10 == 0:
            recs.append({"phase": "tokenizer", "kind": "eval", "step": step, "val_recon_full": 0.1,
                         "val_recon_s1": 0.2})
            recs.append({"phase": "predictor", "kind": "eval", "step": step, "val_loss": 4.0, "val_ce_s1": 4.5,
                         "val_ce_s2": 3.5})
    return recs


def test_tokenizer_curves_give_bsq_its_own_axis_and_label_every_y_axis():
    fig = drawn(plots.plot_training_curves(training_records(), "tokenizer"))
    train_ax, bsq_ax, val_ax = fig.axes
    assert [ln.get_label() for ln in train_ax.get_lines()] == ["loss", "recon_s1", "recon_full"]
    assert [ln.get_label() for ln in bsq_ax.get_lines()] == ["bsq"]
    # the negative term (down to -0.05) no longer drags the MSE axis below zero
    assert train_ax.get_ylim()[0] > -0.01 and bsq_ax.get_ylim()[1] < 0
    assert all(ax.get_ylabel() for ax in fig.axes)
    assert all(legend_clear_of_axes(ax) for ax in fig.axes)


def test_predictor_curves_keep_legends_off_the_lines_and_draw_reference_levels():
    fig = drawn(plots.plot_training_curves(training_records(), "predictor", reference={"base model": 4.2}))
    train_ax, val_ax = fig.axes
    assert "cross-entropy" in train_ax.get_ylabel() and "cross-entropy" in val_ax.get_ylabel()
    assert all(legend_clear_of_axes(ax) for ax in fig.axes)
    ref = [ln for ln in val_ax.get_lines() if ln.get_label() == "base model = 4.2"]
    assert len(ref) == 1 and set(ref[0].get_ydata()) == {4.2}


def test_live_curve_draws_reference_and_separate_bsq_without_a_kernel():
    from kronos_kit.widgets import LiveCurve

    live = LiveCurve(("loss", "bsq"), every=3, reference={"base model": 0.5, "bsq": -0.02})
    for step in range(1, 7):
        live(step, {"loss": 1 / step, "bsq": -0.03})
    assert len(live.widget.outputs) == 1 and "image/png" in live.widget.outputs[0]["data"]
    main, side = live.figure().axes
    assert {ln.get_label() for ln in main.get_lines()} == {"loss", "base model = 0.5"}
    assert {ln.get_label() for ln in side.get_lines()} == {"bsq", "bsq = -0.02"}
    live.reference["later level"] = 0.7  # a reference may be added after construction
    assert "later level = 0.7" in {ln.get_label() for ln in live.figure().axes[0].get_lines()}


# ------------------------------------------------------------------------------ codebook


def test_heatmap_markers_leave_code_numbers_readable():
    counts = CodebookCounter(4, 2).update(np.array([0, 0, 1, 2, 2, 2, 9]), np.zeros(7, int)).stats()
    fig = plots.plot_code_heatmap(counts)
    ax = fig.axes[0]
    dead = [c for c in range(16) if c not in (0, 1, 2, 9)]
    offsets = ax.collections[0].get_offsets()
    assert len(offsets) == len(dead)
    cells = np.array([[c % 4, c // 4] for c in dead], dtype=float)
    assert np.all(np.abs(offsets - cells) >= 0.25)  # in the corner, not on the number
    texts = {int(t.get_text()): t for t in ax.texts}
    assert sorted(texts) == list(range(16))
    assert all(mcolors.to_hex(texts[c].get_color()) == "#000000" for c in dead)  # dark on the grey cells


def report(price_scale: float) -> ReconstructionReport:
    def errors(k: float) -> ChannelErrors:
        return ChannelErrors(n_bars=10, mse=[0.1 * k] * 6, mae=[0.2 * k] * 6,
                             price_mse=[2.0 * k] * 4 + [1e10 * k, price_scale * k],
                             price_mae=[1.0 * k] * 4 + [1e5 * k, 1e11 * k])
    return ReconstructionReport(features=FEATS, n_windows=2, overall={"s1": errors(2), "full": errors(1)})


def test_price_errors_put_each_unit_on_its_own_axis():
    fig = plots.plot_channel_errors({"before": report(1e23), "after": report(5e22)}, metric="price_mse")
    by_ticks = {tuple(t.get_text() for t in ax.get_xticklabels()): ax for ax in fig.axes[:3]}
    assert set(by_ticks) == {("open", "high", "low", "close"), ("volume",), ("amount",)}
    price_heights = [p.get_height() for p in by_ticks[("open", "high", "low", "close")].patches]
    assert max(price_heights) == 4.0 and by_ticks[("open", "high", "low", "close")].get_ylim()[1] < 10
    assert max(p.get_height() for p in by_ticks[("amount",)].patches) == 2e23
    assert "pass symbol=" in fig.get_suptitle()

    normalized = plots.plot_channel_errors(report(1e23), channels=["close", "amount"])
    assert len(normalized.axes) == 2 and len(normalized.axes[0].patches) == 2
    with pytest.raises(ValueError, match="vwap"):
        plots.plot_channel_errors(report(1e23), channels=["vwap"])


def test_window_reconstruction_titles_and_ticks_show_dates():
    frame = bars(30, symbol="ABC")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 6))
    rec = WindowReconstruction(x=x, s1_recon=x * 0.9, full_recon=x * 0.95, s1_ids=np.zeros(12, int),
                               s2_ids=np.zeros(12, int), mean=np.full(6, 100.0), std=np.ones(6), symbol="ABC",
                               start=5)
    fig = drawn(plots.plot_window_reconstruction(rec, frame=frame))
    assert fig.get_suptitle() == "ABC: 2023-01-07 .. 2023-01-18 (12 bars)"
    assert "2023-01" in tick_text(fig.axes[-1])
    assert "bars 5..16" in plots.plot_window_reconstruction(rec).get_suptitle()  # no frame: positions
    with pytest.raises(ValueError, match="data.splits.val"):
        plots.plot_window_reconstruction(rec, frame=frame.iloc[:10])


# ------------------------------------------------------------------------------ forecasts


def test_fan_chart_history_swatch_is_neutral_and_dates_label_the_axis():
    frame, result = evaluation()
    fig = drawn(plots.plot_fan_chart(result, 1, "finetuned", history_bars=20, frame=frame))
    ax = fig.axes[0]
    handles = ax.get_legend().legend_handles
    assert isinstance(handles[0], Patch) and handles[0].get_label() == "history"
    r, g, b, _ = handles[0].get_facecolor()
    assert r == g == b  # grey: the candles are green and red, the swatch is neither
    when = pd.Timestamp(result.origin_time[1])
    assert ax.get_title().startswith(f"X @ {when:%Y-%m-%d}")
    assert f"{when:%Y-%m-%d}" in tick_text(ax)
    with pytest.raises(ValueError, match="data.splits.test"):
        plots.plot_fan_chart(result, 1, "finetuned", frame=frame.iloc[5:])


def test_fan_comparison_shows_models_side_by_side_on_one_price_axis():
    frame, result = evaluation()
    fig = drawn(plots.plot_fan_comparison(result, 2, frame=frame))
    left, right = fig.axes
    assert left.get_title().startswith("base: CRPS") and right.get_title().startswith("finetuned: CRPS")
    assert left.get_ylim() == right.get_ylim()
    assert len(fig.legends) == 1 and fig.legends[0].legend_handles[0].get_label() == "history"
    assert "X @" in fig.get_suptitle()
    with pytest.raises(ValueError, match="persistence"):
        plots.plot_fan_comparison(result, 2, models=("base", "nope"))


def test_return_scatter_draws_y_equals_x():
    _, result = evaluation()
    ax = plots.plot_return_scatter(result, "finetuned").axes[0]
    diagonal = [ln for ln in ax.get_lines() if ln.get_label().startswith("y = x")]
    assert len(diagonal) == 1
    assert diagonal[0].get_xy1() == (0.0, 0.0) and diagonal[0].get_slope() == 1.0


def test_pit_histogram_states_paths_and_warns_when_too_few():
    _, few = evaluation(sample_count=8)
    ax = plots.plot_pit_histogram(few, "finetuned").axes[0]
    assert "8 paths" in ax.get_title()
    assert any("cannot judge calibration" in t.get_text() for t in ax.texts)
    _, enough = evaluation(sample_count=24)
    ax = plots.plot_pit_histogram(enough, "finetuned").axes[0]
    assert "24 paths" in ax.get_title() and not ax.texts


def test_every_figure_function_returns_an_inline_figure():
    frame, result = evaluation()
    figures = [
        plots.plot_training_curves(training_records(), "predictor"),
        plots.plot_error_by_horizon(result),
        plots.plot_coverage(result),
        plots.plot_channel_errors(report(1.0)),
        plots.plot_fan_comparison(result, 0),
        plots.plot_selection_curves(training_records()),
    ]
    for fig in figures:
        assert isinstance(fig, plots.KitFigure)
        assert io.BytesIO(fig._repr_png_()).read(4) == b"\x89PNG"


def test_the_selection_figure_rings_the_kept_best_only_on_the_metric_that_picked_it():
    """It once ringed every best-so-far on every curve: three rings on val_loss although val_crps picked `best`."""
    recs = [{"phase": "predictor", "kind": "reference", "step": 0, "val_loss": 2.5, "val_crps": 80.0, "val_mae": 99.0}]
    for step, loss, crps, best in ((10, 2.4, 79.0, True), (20, 2.3, 75.0, True), (30, 2.2, 77.0, False)):
        recs.append({"phase": "predictor", "kind": "eval", "step": step, "val_loss": loss, "val_crps": crps,
                     "val_mae": 98.0, "best": best, "select_metric": "val_crps"})
    fig = drawn(plots.plot_selection_curves(recs))
    left, right = fig.axes
    rings = [tuple(c.get_offsets()[0]) for ax in fig.axes for c in ax.collections]
    assert rings == [(20.0, 75.0)] and not left.collections  # one ring, on val_crps, at the kept step
    assert "best: step 20, by val_crps" in right.get_legend_handles_labels()[1]
    assert [ln.get_xdata()[0] for ax in fig.axes for ln in ax.lines if ln.get_linestyle() == ":"] == [20, 20]
