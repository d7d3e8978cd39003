"""Date-aligned splits for panels: ratios cut several symbols on common calendar dates, so no symbol's training
target lies at or after the validation start, nor a validation target at or after the test start; per-symbol
cuts only when asked for, with a notice. One symbol is cut exactly as before."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from kronos_kit.config import KitConfig
from kronos_kit.data import CONTEXT_COLUMN, DataNotice, load_data, load_ohlcv, load_sample, split

LOOKBACK, PREDICT = 20, 5


def bars(symbol: str, start: str, n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 50 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    open_ = np.r_[close[0], close[:-1]]
    return pd.DataFrame({"symbol": symbol, "timestamps": pd.bdate_range(start, periods=n), "open": open_,
                         "high": np.maximum(open_, close) * 1.01, "low": np.minimum(open_, close) * 0.99,
                         "close": close, "volume": 1000.0})


def staggered() -> pd.DataFrame:
    """A listing (LATE starts 150 days in), an early end (GONE stops at day 420) and a full history (OLD)."""
    frame = pd.concat([bars("OLD", "2020-01-01", 600, 0), bars("LATE", "2020-07-29", 450, 1),
                       bars("GONE", "2020-01-01", 420, 2)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataNotice)
        return load_ohlcv(frame)


def own(part: pd.DataFrame) -> pd.DataFrame:
    return part[~part[CONTEXT_COLUMN]]


def target_bounds(part: pd.DataFrame, lookback: int) -> tuple[pd.Timestamp, pd.Timestamp]:
    """First and last timestamp that a window of this part has as a target (after its look-back)."""
    return own(part)["timestamps"].min(), own(part)["timestamps"].max()


def test_a_panel_is_cut_on_common_dates_so_no_target_crosses_a_split_start():
    frame = staggered()
    parts = split(frame, lookback=LOOKBACK, predict=PREDICT, ratios=(0.7, 0.15, 0.15), short="drop")
    calendar = np.sort(frame["timestamps"].unique())
    val_start, test_start = calendar[int(len(calendar) * 0.7)], calendar[int(len(calendar) * 0.85)]
    # every training bar (all are targets) of every symbol lies before the validation start ...
    assert parts.train["timestamps"].max() < val_start
    # ... every validation target inside [val_start, test_start), every test target from test_start on
    val_first, val_last = target_bounds(parts.val, LOOKBACK)
    assert val_first == val_start and val_last < test_start
    assert own(parts.test)["timestamps"].min() == test_start
    # the cut dates are the same for every symbol that has bars there
    starts = own(parts.test).groupby("symbol")["timestamps"].min()
    assert set(starts) == {pd.Timestamp(test_start)}
    # GONE ended before the test period: left out of it with a notice, not cut on its own bar count
    assert "GONE" not in set(parts.test["symbol"]) and any("GONE" in n for n in parts.test.attrs["notices"])


def test_per_symbol_cuts_only_when_asked_and_with_a_notice():
    frame = staggered()
    with pytest.warns(DataNotice, match="own bar count.*another's test period"):
        parts = split(frame, lookback=LOOKBACK, predict=PREDICT, ratios=(0.7, 0.15, 0.15), ratio_split="symbol")
    # the leak the calendar cut prevents: one symbol still trains after another's test period began
    test_start = own(parts.test).groupby("symbol")["timestamps"].min()
    train_end = parts.train.groupby("symbol")["timestamps"].max()
    assert train_end.max() >= test_start.min()
    with pytest.raises(ValueError, match="ratio_split"):
        split(frame, lookback=LOOKBACK, predict=PREDICT, ratio_split="dates")


def test_one_symbol_is_cut_as_before():
    frame = staggered()
    one = frame[frame["symbol"] == "OLD"].reset_index(drop=True)
    by_calendar = split(one, lookback=LOOKBACK, predict=PREDICT)
    by_count = split(one, lookback=LOOKBACK, predict=PREDICT, ratio_split="symbol")  # no notice for one symbol
    for a, b in zip(by_calendar, by_count):
        pd.testing.assert_frame_equal(a, b)
    n = len(one)
    assert len(by_calendar.train) == int(np.floor(n * 0.8))  # floor(n * ratio) bars, as the per-symbol cut


def test_the_us15_sample_trains_nothing_after_the_validation_start(tmp_path):
    cfg = KitConfig.from_dict({"run_dir": str(tmp_path / "run"), "data": {"source": "sample:us15"}})
    bundle = load_data(cfg)
    val_start = own(bundle.splits.val)["timestamps"].min()
    test_start = own(bundle.splits.test)["timestamps"].min()
    assert bundle.splits.train["timestamps"].max() < val_start
    assert own(bundle.splits.val)["timestamps"].max() < test_start
    # EBAY starts nine months after the others, yet its test period starts with theirs
    starts = own(bundle.splits.test).groupby("symbol")["timestamps"].min()
    assert starts.nunique() == 1 and len(starts) == 15
    # training windows end before the validation start: the last window's last bar is a train bar
    assert bundle.train.n_windows == sum(len(g) - bundle.train.window + 1 for _, g in
                                         bundle.splits.train.groupby("symbol"))


def test_load_data_leaves_a_late_listing_out_of_a_split_it_has_no_window_in(tmp_path):
    frame = pd.concat([bars("OLD", "2020-01-01", 600, 0), bars("NEW", "2022-01-03", 60, 3)])
    path = tmp_path / "panel.csv"
    frame.to_csv(path, index=False)
    cfg = KitConfig.from_dict({"run_dir": str(tmp_path / "run"),
                               "data": {"source": str(path), "lookback": LOOKBACK, "predict": PREDICT}})
    with pytest.warns(DataNotice, match="split 'train': left out 1 symbol.*'NEW'"):
        bundle = load_data(cfg)
    assert set(bundle.splits.train["symbol"]) == {"OLD"}
    assert "NEW" in set(bundle.splits.test["symbol"])


def test_the_shipped_panel_sample_loads_offline():
    frame = load_sample("us15")
    assert frame["symbol"].nunique() == 15 and len(frame) == 58707
    assert frame["timestamps"].min() == pd.Timestamp("1998-01-02")
    assert "fakestockdata" in frame.attrs["notices"][0]
