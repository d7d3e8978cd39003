"""Tests of the OHLCV data layer (kronos_kit.data) and the candlestick drawing (kronos_kit.plots.candles)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from kronos_kit.data import (
    COLUMNS,
    CONTEXT_COLUMN,
    DataError,
    DataNotice,
    WindowDataset,
    load_ohlcv,
    load_sample,
    split,
    summarize,
    time_features,
)

matplotlib.use("Agg")

ASHARE = Path(__file__).parent / "data" / "ashare_5min_sample.csv"
FEATURES = ["open", "high", "low", "close", "volume", "amount"]


def candles(n: int = 60, *, symbol: str | None = None, price: float = 10.0, start: str = "2024-01-02 09:30",
            freq: str = "5min", seed: int = 0) -> pd.DataFrame:
    """Valid candles: random-walk closes, open = previous close, wicks outside the body."""
    rng = np.random.default_rng(seed)
    close = price * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    open_ = np.r_[price, close[:-1]]
    volume = rng.integers(100, 1000, n).astype(float)
    frame = pd.DataFrame({
        "timestamps": pd.date_range(start, periods=n, freq=freq),
        "open": open_,
        "high": np.maximum(open_, close) * 1.002,
        "low": np.minimum(open_, close) * 0.998,
        "close": close,
        "volume": volume,
        "amount": volume * close,
    })
    if symbol is not None:
        frame.insert(0, "symbol", symbol)
    return frame


def to_csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def load_quiet(source, **kwargs) -> pd.DataFrame:
    """Load while asserting that no notice is raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataNotice)
        return load_ohlcv(source, **kwargs)


def refused(source, *, match: str, **kwargs) -> str:
    """The DataError message for a source that must be refused."""
    with pytest.raises(DataError, match=match) as info:
        load_ohlcv(source, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# loading: formats and names


def test_csv_loads_into_the_canonical_frame(tmp_path):
    src = candles(30)
    frame = load_quiet(to_csv(src, tmp_path / "ABC.csv"))
    assert list(frame.columns) == list(COLUMNS)
    assert isinstance(frame.index, pd.RangeIndex) and frame.index[0] == 0
    assert frame["symbol"].unique().tolist() == ["ABC"]  # from the file stem
    assert pd.api.types.is_string_dtype(frame["symbol"])
    assert pd.api.types.is_datetime64_dtype(frame["timestamps"])
    assert all(frame[c].dtype == np.float64 for c in FEATURES)
    np.testing.assert_allclose(frame[FEATURES].to_numpy(), src[FEATURES].to_numpy())
    assert frame.attrs["notices"] == []


def test_aliases_match_case_insensitively_and_adj_close_is_not_used_by_default_and_said_so(tmp_path):
    src = candles(20)
    raw = pd.DataFrame({
        "Ticker": "XYZ", "Date": src["timestamps"].astype(str), "OPEN": src["open"], "High": src["high"],
        "low": src["low"], "Close": src["close"], "Adj Close": src["close"] * 0.5, "Vol": src["volume"],
        "Turnover": src["amount"],
    })
    with pytest.warns(DataNotice, match="the close is the 'Close' column, unadjusted .* 'Adj Close' is there too "
                                        "and is not used. To use it, set data.adj_close: true"):
        frame = load_ohlcv(to_csv(raw, tmp_path / "file.csv"))
    assert frame["symbol"].unique().tolist() == ["XYZ"]  # the column beats the file stem
    np.testing.assert_allclose(frame["close"], src["close"])  # Adj Close not used by default
    np.testing.assert_allclose(frame["volume"], src["volume"])
    np.testing.assert_allclose(frame["amount"], src["amount"])
    quiet = raw.drop(columns="Adj Close")
    for alias in ("datetime", "time", "timestamp", "TIMESTAMPS"):
        other = load_quiet(quiet.rename(columns={"Date": alias, "Ticker": "code", "Turnover": "amt"}))
        assert other["timestamps"].equals(frame["timestamps"])
    assert load_quiet(quiet.rename(columns={"Ticker": "instrument"}))["symbol"].iat[0] == "XYZ"


def test_use_adj_close_replaces_close_and_scales_the_candle():
    src = candles(10)
    adj = src["close"] * np.linspace(0.5, 0.9, 10)
    with pytest.warns(DataNotice, match="prices adjusted: close = 'Adj Close'"):
        frame = load_ohlcv(src.assign(**{"Adj Close": adj}), use_adj_close=True)
    factor = adj / src["close"]
    np.testing.assert_allclose(frame["close"], adj)
    for col in ("open", "high", "low"):
        np.testing.assert_allclose(frame[col], src[col] * factor)
    np.testing.assert_allclose(frame["volume"], src["volume"])
    with pytest.raises(DataError, match="no 'Adj Close' column"):
        load_ohlcv(src, use_adj_close=True)


def test_a_semicolon_separated_file_with_decimal_commas_loads_and_says_how_it_was_read(tmp_path):
    """Once read as one column named 'timestamps;open;...' with advice to rename the columns."""
    src = candles(20)
    path = tmp_path / "eu.csv"
    src.to_csv(path, index=False, sep=";", decimal=",")
    with pytest.warns(DataNotice, match="eu.csv: read as ';'-separated with decimal commas"):
        frame = load_ohlcv(path)
    np.testing.assert_allclose(frame[FEATURES].to_numpy(), src[FEATURES].to_numpy())
    src.to_csv(path, index=False, sep="\t")
    with pytest.warns(DataNotice, match="read as tab-separated"):
        np.testing.assert_allclose(load_ohlcv(path)["close"], src["close"])


def test_a_close_only_file_is_told_the_way_forward(tmp_path):
    src = candles(20)[["timestamps", "close"]]
    message = refused(to_csv(src, tmp_path / "closes.csv"), match="only a close price")
    assert "resample" in message and "open = high = low = close" in message and "Rename" not in message


def test_adj_close_reaches_the_loader_from_the_config_and_keys_its_own_cache_entry(tmp_path):
    from kronos_kit.config import KitConfig
    from kronos_kit.data import load_data

    src = candles(300)
    adj = src["close"] * 0.5
    path = to_csv(src.assign(**{"Adj Close": adj}), tmp_path / "adj.csv")
    cfg = KitConfig().with_overrides({"data.source": str(path), "data.lookback": 20, "run_dir": str(tmp_path / "r")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataNotice)
        plain = load_data(cfg).frame
        adjusted = load_data(cfg.with_overrides({"data.adj_close": True})).frame
    np.testing.assert_allclose(plain["close"], src["close"])
    np.testing.assert_allclose(adjusted["close"], adj)
    np.testing.assert_allclose(adjusted["high"], src["high"] * 0.5)


def test_folder_and_list_of_files_take_symbols_from_stems(tmp_path):
    folder = tmp_path / "candles"
    folder.mkdir()
    to_csv(candles(25, seed=1), folder / "AAA.csv")
    candles(30, seed=2).to_parquet(folder / "BBB.parquet")
    (folder / "notes.md").write_text("not data")
    frame = load_quiet(folder)
    assert frame.groupby("symbol").size().to_dict() == {"AAA": 25, "BBB": 30}
    listed = load_quiet([folder / "BBB.parquet", folder / "AAA.csv"])
    pd.testing.assert_frame_equal(listed, frame)  # canonical order whatever the input order
    only = load_quiet(folder, symbol="BBB")
    assert only["symbol"].unique().tolist() == ["BBB"] and len(only) == 30


def test_parquet_and_dataframe_with_datetime_index(tmp_path):
    src = candles(15).set_index("timestamps")
    src.to_parquet(tmp_path / "idx.parquet")  # the DatetimeIndex survives in the file
    from_file = load_quiet(tmp_path / "idx.parquet")
    from_frame = load_quiet(src, symbol="IDX")
    assert from_file["symbol"].iat[0] == "idx" and from_frame["symbol"].iat[0] == "IDX"
    assert (from_frame["timestamps"].to_numpy() == src.index.to_numpy()).all()
    np.testing.assert_allclose(from_file[FEATURES].to_numpy(), from_frame[FEATURES].to_numpy())
    assert load_quiet(candles(5))["symbol"].iat[0] == "series"  # an unnamed DataFrame


def test_long_csv_with_symbol_column_selects_one_symbol(tmp_path):
    long = pd.concat([candles(20, symbol="B", seed=3), candles(20, symbol="A", seed=4)])
    path = to_csv(long, tmp_path / "long.csv")
    frame = load_quiet(path)
    assert frame["symbol"].tolist() == ["A"] * 20 + ["B"] * 20  # sorted by symbol then time
    assert load_quiet(path, symbol="B")["symbol"].unique().tolist() == ["B"]
    codes = to_csv(candles(5, symbol="000001"), tmp_path / "codes.csv")
    assert load_quiet(codes)["symbol"].iat[0] == "000001"  # codes stay text, leading zeros kept
    with pytest.raises(DataError, match=r"no rows for symbol 'C'.*\['A', 'B'\]"):
        load_ohlcv(path, symbol="C")


def test_zoned_timestamps_are_kept():
    src = candles(10).assign(timestamps=lambda f: f["timestamps"].dt.tz_localize("Asia/Shanghai"))
    frame = load_quiet(src.assign(timestamps=src["timestamps"].astype(str)))
    assert str(frame["timestamps"].dt.tz) in ("UTC+08:00", "Asia/Shanghai")
    assert (frame["timestamps"] == src["timestamps"]).all()


# --------------------------------------------------------------------------------------------
# loading: fills, sorting and notices


def test_missing_volume_fills_zeros_and_reports(tmp_path):
    path = to_csv(candles(10).drop(columns=["volume", "amount"]), tmp_path / "novol.csv")
    with pytest.warns(DataNotice, match="no volume column"):
        frame = load_ohlcv(path)
    assert (frame["volume"] == 0).all() and (frame["amount"] == 0).all()
    assert any("volume and amount set to 0" in n for n in frame.attrs["notices"])


def test_missing_amount_is_volume_times_mean_price_and_reported():
    src = candles(10).drop(columns=["amount"])
    with pytest.warns(DataNotice, match="no amount column"):
        frame = load_ohlcv(src)
    expected = src["volume"] * src[["open", "high", "low", "close"]].mean(axis=1)
    np.testing.assert_allclose(frame["amount"], expected)
    assert len(frame.attrs["notices"]) == 1


def test_unsorted_rows_are_sorted_with_a_notice(tmp_path):
    src = candles(12)
    shuffled = src.sample(frac=1.0, random_state=0)
    with pytest.warns(DataNotice, match="not in time order"):
        frame = load_ohlcv(to_csv(shuffled, tmp_path / "shuffled.csv"))
    assert frame["timestamps"].is_monotonic_increasing
    np.testing.assert_allclose(frame["close"], src["close"])
    assert "sorted by symbol then time" in frame.attrs["notices"][0]
    # symbols interleaved by time (a long file sorted by time) is no disorder: no notice
    mixed = pd.concat([candles(5, symbol="A"), candles(5, symbol="B")]).sort_values("timestamps")
    assert load_quiet(mixed)["symbol"].tolist() == ["A"] * 5 + ["B"] * 5


def test_ffill_fills_within_a_symbol_and_refuses_a_leading_gap():
    src = pd.concat([candles(6, symbol="A"), candles(6, symbol="B", seed=1)], ignore_index=True)
    src.loc[2, "close"] = np.nan
    src.loc[3, "volume"] = np.inf
    with pytest.warns(DataNotice, match="forward-filled"):
        frame = load_ohlcv(src, fill="ffill")
    assert frame.loc[2, "close"] == src.loc[1, "close"]
    assert frame.loc[3, "volume"] == src.loc[2, "volume"]
    assert len(frame.attrs["notices"]) == 2
    src.loc[6, "open"] = np.nan  # first row of symbol B: nothing to carry forward (not A's value)
    with pytest.raises(DataError, match=r"column 'open' is missing at the start of a symbol.*row 7"):
        load_ohlcv(src, fill="ffill")


def test_repair_clip_moves_high_and_low_and_reports():
    src = candles(8)
    src.loc[2, "high"] = src.loc[2, ["open", "close"]].max() - 0.01
    src.loc[5, "low"] = src.loc[5, ["open", "close"]].min() + 0.01
    with pytest.warns(DataNotice, match="repair='clip'.*2 row"):
        frame = load_ohlcv(src, repair="clip")
    assert frame.loc[2, "high"] == src.loc[2, ["open", "close"]].max()
    assert frame.loc[5, "low"] == src.loc[5, ["open", "close"]].min()
    assert frame.loc[0, "high"] == src.loc[0, "high"]  # valid rows untouched


# --------------------------------------------------------------------------------------------
# validation: every rule refuses with the file, column and rows


def test_missing_required_columns_are_named_with_the_columns_found(tmp_path):
    path = to_csv(candles(5).drop(columns=["close"]).rename(columns={"high": "hi"}), tmp_path / "bad.csv")
    msg = refused(path, match="missing required column")
    assert "bad.csv" in msg and "'high'" in msg and "'close'" in msg and "'hi'" in msg
    assert "columns found" in msg


def test_non_numeric_cells_name_column_line_and_value(tmp_path):
    src = candles(8).astype({"close": object})
    src.loc[2, "close"] = "abc"
    msg = refused(to_csv(src, tmp_path / "text.csv"), match="column 'close' holds text that is not a number")
    assert "text.csv" in msg and "line 4 ('abc')" in msg and "CSV line numbers" in msg


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_without_fill(tmp_path, value):
    src = candles(8)
    src.loc[4, "volume"] = value
    msg = refused(to_csv(src, tmp_path / "nan.csv"), match="column 'volume' is missing .NaN. or infinite")
    assert "line 6" in msg and "fill='ffill'" in msg


def test_error_quotes_at_most_five_rows_and_the_total(tmp_path):
    src = candles(20)
    src.loc[[3, 5, 7, 9, 11, 13, 15], "amount"] = -1.0
    msg = refused(to_csv(src, tmp_path / "neg.csv"), match="column 'amount' is negative in 7 rows")
    assert "first 5" in msg and "line 5 (amount=-1)" in msg and "line 13" in msg and "line 15" not in msg


def test_dataframe_errors_say_dataframe_and_row_numbers():
    src = candles(6)
    src.loc[3, "open"] = 0.0
    msg = refused(src, match="DataFrame: column 'open' is zero or negative in 1 row")
    assert "row 4" in msg and "1-based data rows" in msg


def test_non_positive_prices_are_refused(tmp_path):
    src = candles(6)
    src.loc[1, "low"] = -2.0
    msg = refused(to_csv(src, tmp_path / "p.csv"), match="column 'low' is zero or negative")
    assert "line 3" in msg


def test_high_below_body_and_low_above_body_are_refused(tmp_path):
    src = candles(6)
    src.loc[2, "high"] = src.loc[2, ["open", "close"]].max() * 0.99
    msg = refused(to_csv(src, tmp_path / "hl.csv"), match=r"column 'high' is below max\(open, close\)")
    assert "line 4" in msg and "repair='clip'" in msg
    src = candles(6)
    src.loc[4, "low"] = src.loc[4, ["open", "close"]].min() * 1.01
    msg = refused(to_csv(src, tmp_path / "hl2.csv"), match=r"column 'low' is above min\(open, close\)")
    assert "line 6" in msg


def test_negative_volume_is_refused(tmp_path):
    src = candles(6)
    src.loc[0, "volume"] = -5.0
    msg = refused(to_csv(src, tmp_path / "v.csv"), match="column 'volume' is negative in 1 row")
    assert "line 2 (volume=-5)" in msg


def test_duplicate_timestamps_within_a_symbol_are_refused(tmp_path):
    src = candles(6)
    src.loc[4, "timestamps"] = src.loc[3, "timestamps"]
    msg = refused(to_csv(src, tmp_path / "dup.csv"), match="column 'timestamps' repeats a time within its symbol")
    assert "line 6 (same time as line 5)" in msg
    # the same time in two different symbols is fine
    both = pd.concat([candles(4, symbol="A"), candles(4, symbol="B")])
    assert len(load_quiet(both)) == 8


def test_unparseable_and_missing_timestamps_are_refused(tmp_path):
    src = candles(6).astype({"timestamps": str})
    src.loc[3, "timestamps"] = "not a date"
    msg = refused(to_csv(src, tmp_path / "t.csv"), match="column 'timestamps' cannot be parsed as a time")
    assert "line 5 ('not a date')" in msg and "ISO 8601" in msg
    src.loc[3, "timestamps"] = None
    msg = refused(to_csv(src, tmp_path / "t2.csv"), match="column 'timestamps' is empty")
    assert "line 5" in msg
    src = candles(6).astype({"timestamps": str})
    src.loc[:, "timestamps"] = pd.to_datetime(src["timestamps"]).dt.strftime("%m/%d/%Y %H:%M")
    refused(src, match="cannot be parsed")  # ambiguous day/month order is not guessed


def test_mixed_time_zones_are_refused(tmp_path):
    src = candles(6).astype({"timestamps": str})
    src["timestamps"] = src["timestamps"] + "+08:00"
    src.loc[2, "timestamps"] = src.loc[2, "timestamps"].replace("+08:00", "+00:00")
    msg = refused(to_csv(src, tmp_path / "tz.csv"), match="column 'timestamps' mixes time zones")
    assert "line 4 (zone +00:00)" in msg
    # across files: one zoned, one naive
    to_csv(candles(5).assign(timestamps=lambda f: f["timestamps"].astype(str) + "+08:00"), tmp_path / "Z.csv")
    to_csv(candles(5), tmp_path / "N.csv")
    msg = refused([tmp_path / "Z.csv", tmp_path / "N.csv"], match="mixes time zones across sources")
    assert "Z.csv" in msg and "N.csv" in msg


def test_errors_in_a_multi_file_load_name_the_file(tmp_path):
    to_csv(candles(5, seed=1), tmp_path / "GOOD.csv")
    bad = candles(5, seed=2)
    bad.loc[3, "close"] = np.nan
    to_csv(bad, tmp_path / "BAD.csv")
    msg = refused(tmp_path, match="BAD.csv: column 'close'")
    assert "GOOD.csv" not in msg and "line 5" in msg


def test_unreadable_and_unsupported_inputs_raise_clear_errors(tmp_path):
    (tmp_path / "ragged.csv").write_text("timestamps,open\n2024-01-01,1,2,3,4\n2024-01-02\n")
    with pytest.raises(DataError, match="ragged.csv"):
        load_ohlcv(tmp_path / "ragged.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv: could not be read"):
        load_ohlcv(tmp_path / "empty.csv")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataError, match="unsupported file type"):
        load_ohlcv(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_ohlcv(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="both look like 'timestamps'"):
        load_ohlcv(candles(3).assign(date=lambda f: f["timestamps"]))


# --------------------------------------------------------------------------------------------
# time features


def test_time_features_match_the_reference_fields():
    ts = pd.Series(pd.to_datetime(["2024-06-18 11:15", "2024-12-31 23:59", "2024-03-03 00:00"]))
    feats = time_features(ts)
    assert list(feats.columns) == ["minute", "hour", "weekday", "day", "month"]
    assert feats.iloc[0].tolist() == [15, 11, 1, 18, 6]  # a Tuesday
    assert feats.iloc[1].tolist() == [59, 23, 1, 31, 12]
    assert feats.iloc[2].tolist() == [0, 0, 6, 3, 3]  # a Sunday
    # the reference's ts.dt.weekday, spelled day_of_week as pandas 3 prefers
    reference = pd.DataFrame({"minute": ts.dt.minute, "hour": ts.dt.hour, "weekday": ts.dt.day_of_week,
                              "day": ts.dt.day, "month": ts.dt.month})
    np.testing.assert_array_equal(feats.to_numpy(), reference.to_numpy())


# --------------------------------------------------------------------------------------------
# windows


def test_window_items_have_the_kronos_layout_and_collate():
    frame = load_quiet(candles(40, symbol="A"))
    ds = WindowDataset(frame, lookback=10, predict=4)
    assert len(ds) == 40 - 15 + 1 and ds.window == 15
    item = ds[3]
    assert item["x"].shape == (15, 6) and item["x"].dtype == torch.float32
    assert item["stamp"].shape == (15, 5) and item["stamp"].dtype == torch.float32
    assert item["mean"].shape == (6,) and item["std"].shape == (6,)
    assert item["symbol"] == "A" and item["start"] == 3
    expected_stamp = time_features(frame["timestamps"].iloc[3:18]).to_numpy(np.float32)
    np.testing.assert_array_equal(item["stamp"].numpy(), expected_stamp)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["x"].shape == (4, 15, 6) and batch["symbol"] == ["A"] * 4
    assert batch["start"].tolist() == [0, 1, 2, 3]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_normalisation_uses_lookback_statistics_only_and_clips():
    frame = load_quiet(candles(30, symbol="A"))
    lookback, predict = 12, 5
    ds = WindowDataset(frame, lookback=lookback, predict=predict, clip=5.0)
    raw = frame[FEATURES].to_numpy()[2 : 2 + ds.window]
    mean, std = raw[:lookback].mean(0), raw[:lookback].std(0)  # population std over the look-back
    expected = np.clip((raw - mean) / (std + 1e-5), -5, 5)
    item = ds[2]
    np.testing.assert_allclose(item["x"].numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(item["mean"].numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(item["std"].numpy(), std, rtol=1e-5)
    # a huge future bar changes nothing in the normalised past, and is clipped itself
    future = frame.copy()
    future.loc[2 + lookback + 3, ["open", "high", "low", "close"]] *= 50
    changed = WindowDataset(future, lookback=lookback, predict=predict)[2]
    torch.testing.assert_close(changed["x"][:lookback], item["x"][:lookback])
    torch.testing.assert_close(changed["mean"], item["mean"])
    torch.testing.assert_close(changed["std"], item["std"])
    assert changed["x"][lookback + 3, 1] == 5.0  # the spike is clipped to +clip
    # a change inside the look-back does move the statistics (the check above is not vacuous)
    past = frame.copy()
    past.loc[2 + 1, "close"] *= 1.5
    assert not torch.equal(WindowDataset(past, lookback=lookback, predict=predict)[2]["mean"], item["mean"])


def test_windows_never_mix_symbols():
    long = pd.concat([candles(30, symbol="LOW", price=1.0, seed=1), candles(45, symbol="HIGH", price=1000.0)])
    frame = load_quiet(long)
    ds = WindowDataset(frame, lookback=8, predict=3, clip=1e9)  # no clipping, so windows can be restored
    assert len(ds) == (30 - 12 + 1) + (45 - 12 + 1)
    blocks = {s: frame[frame["symbol"] == s][FEATURES].to_numpy() for s in ("LOW", "HIGH")}
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        rows = blocks[item["symbol"]][item["start"] : item["start"] + ds.window]
        assert len(rows) == ds.window  # the window fits inside its symbol
        restored = item["x"].double().numpy() * (item["std"].double().numpy() + 1e-5) + item["mean"].double().numpy()
        np.testing.assert_allclose(restored[:, :4], rows[:, :4], rtol=1e-4)
        seen.add((item["symbol"], item["start"]))
    assert len(seen) == len(ds)


def test_stride_max_samples_and_epochs_are_deterministic():
    frame = load_quiet(candles(80, symbol="A"))
    assert len(WindowDataset(frame, lookback=10, predict=4, stride=5)) == (80 - 15) // 5 + 1
    a = WindowDataset(frame, lookback=10, predict=4, max_samples=20, seed=7)
    b = WindowDataset(frame, lookback=10, predict=4, max_samples=20, seed=7)
    assert len(a) == 20 and a.n_windows == 66
    starts = lambda ds: [ds[i]["start"] for i in range(len(ds))]  # noqa: E731
    first = starts(a)
    assert first == starts(b) and len(set(first)) == 20
    expected = np.random.default_rng((7, 0)).permutation(66)[:20].tolist()
    assert first == expected
    a.set_epoch(1)
    assert starts(a) != first
    a.set_epoch(0)
    assert starts(a) == first
    assert len(WindowDataset(frame, lookback=10, predict=4, max_samples=1000)) == 66  # capped


def test_distributed_sampler_sees_a_consistent_dataset():
    frame = load_quiet(candles(60, symbol="A"))
    ds = WindowDataset(frame, lookback=10, predict=4, max_samples=25, seed=1)
    ds.set_epoch(3)
    shards = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(3)
        shards.append(list(sampler))
    assert set(shards[0]) | set(shards[1]) == set(range(25))
    batch = next(iter(DataLoader(ds, batch_size=5, sampler=DistributedSampler(ds, num_replicas=2, rank=1))))
    assert batch["x"].shape == (5, 15, 6)


def test_gap_policies():
    one = candles(40, symbol="A")
    one.loc[20:, "timestamps"] += pd.Timedelta("1D")  # a one-day hole between rows 19 and 20
    frame = load_quiet(one)
    ignored = WindowDataset(frame, lookback=6, predict=3)  # default: ignore (overnight breaks are normal)
    assert len(ignored) == 40 - 10 + 1
    cut = WindowDataset(frame, lookback=6, predict=3, gaps="split")
    assert len(cut) == 2 * (20 - 10 + 1)
    assert all(not (s < 20 < s + 10) for s in (cut[i]["start"] for i in range(len(cut))))
    with pytest.raises(DataError, match=r"1 gap\(s\) longer than max_gap.*'A'.*gaps='split'"):
        WindowDataset(frame, lookback=6, predict=3, gaps="error")
    assert len(WindowDataset(frame, lookback=6, predict=3, gaps="error", max_gap="2D")) == 31


def test_short_symbol_is_named_with_its_length():
    frame = load_quiet(pd.concat([candles(40, symbol="LONG"), candles(9, symbol="TINY")]))
    with pytest.raises(DataError, match=r"'TINY' \(9 bars\).*needs 15 bars") as info:
        WindowDataset(frame, lookback=10, predict=4)
    assert isinstance(info.value, ValueError) and "short='drop'" in str(info.value)
    with pytest.warns(DataNotice, match="left out 1 symbol"):
        ds = WindowDataset(frame, lookback=10, predict=4, short="drop")
    assert {ds[i]["symbol"] for i in range(len(ds))} == {"LONG"}


def test_window_array_matches_items():
    frame = load_quiet(pd.concat([candles(30, symbol="A"), candles(30, symbol="B", seed=5)]))
    ds = WindowDataset(frame, lookback=8, predict=2, max_samples=12)
    arr = ds.window_array()
    assert arr.shape == (12, 11, 6) and arr.dtype == np.float32
    for i in (0, 5, 11):
        np.testing.assert_allclose(arr[i], ds[i]["x"].numpy(), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# splits


def _targets(part: pd.DataFrame) -> set[tuple[str, pd.Timestamp]]:
    rows = part[~part[CONTEXT_COLUMN]]
    return set(zip(rows["symbol"], rows["timestamps"]))


@pytest.mark.filterwarnings("ignore:split.*own bar count")  # the per-symbol cut's notice
def test_ratio_split_shares_no_target_bar_and_val_windows_target_only_val():
    frame = load_quiet(pd.concat([candles(200, symbol="A"), candles(150, symbol="B", seed=9)]))
    lookback, predict = 20, 5
    parts = split(frame, lookback=lookback, predict=predict, ratios=(0.6, 0.2, 0.2), ratio_split="symbol")
    train, val, test = parts
    t_train, t_val, t_test = _targets(train), _targets(val), _targets(test)
    assert not (t_train & t_val) and not (t_val & t_test) and not (t_train & t_test)
    assert len(t_train) + len(t_val) + len(t_test) == len(frame)  # every bar is a target exactly once
    assert not train[CONTEXT_COLUMN].any()
    for part, before in ((val, t_train), (test, t_val)):
        for _, block in part.groupby("symbol"):
            ctx = block[block[CONTEXT_COLUMN]]
            assert len(ctx) == lookback and ctx.index.max() < block[~block[CONTEXT_COLUMN]].index.min()
            assert set(zip(ctx["symbol"], ctx["timestamps"])) <= before
            # every target comes after every context row and after every earlier split's target
            assert block.loc[~block[CONTEXT_COLUMN], "timestamps"].min() > ctx["timestamps"].max()
    ds = WindowDataset(val, lookback=lookback, predict=predict)
    for i in range(len(ds)):
        item = ds[i]
        block = val[val["symbol"] == item["symbol"]].reset_index(drop=True)
        window = block.iloc[item["start"] : item["start"] + ds.window]
        assert not window[CONTEXT_COLUMN].iloc[lookback:].any()
    # the first val window's targets begin at the first val bar: nothing is wasted
    assert ds[0]["start"] == 0
    assert len(ds) == sum(len(b) - lookback - ds.window + lookback + 1 for _, b in val.groupby("symbol"))


def test_date_split():
    frame = load_quiet(candles(300, symbol="A", freq="1D", start="2020-01-01"))
    parts = split(frame, lookback=10, predict=2, dates=("2020-08-01", "2020-09-15"))
    assert parts.train["timestamps"].max() < pd.Timestamp("2020-08-01")
    val_targets = parts.val.loc[~parts.val[CONTEXT_COLUMN], "timestamps"]
    assert val_targets.min() == pd.Timestamp("2020-08-01") and val_targets.max() < pd.Timestamp("2020-09-15")
    assert parts.test.loc[~parts.test[CONTEXT_COLUMN], "timestamps"].min() == pd.Timestamp("2020-09-15")
    assert parts.val.attrs["split"] == "val"


def test_empty_or_short_split_is_an_error_naming_the_split():
    frame = load_quiet(candles(100, symbol="A"))
    with pytest.raises(DataError, match=r"split 'val' is empty.*needs 31 bars"):
        split(frame, lookback=20, predict=10, ratios=(0.8, 0.1, 0.1))
    # SMALL's 100 bars end long before the common validation start (the 320th of BIG's 400 times)
    two = load_quiet(pd.concat([candles(400, symbol="BIG"), candles(100, symbol="SMALL")]))
    with pytest.raises(DataError, match=r"split 'val'.*'SMALL' \(0 of its 100 bars\).*short='drop'"):
        split(two, lookback=20, predict=10)
    with pytest.warns(DataNotice, match="left out 1 symbol"):
        parts = split(two, lookback=20, predict=10, short="drop")
    assert parts.val["symbol"].unique().tolist() == ["BIG"]
    assert set(parts.train["symbol"]) == {"BIG", "SMALL"}
    # cut by its own bar count, SMALL keeps 10 validation bars: too few for a window, named in the error
    with pytest.warns(DataNotice, match="own bar count"), \
            pytest.raises(DataError, match=r"split 'val'.*'SMALL' \(10 of its 100 bars\).*short='drop'"):
        split(two, lookback=20, predict=10, ratio_split="symbol")


# --------------------------------------------------------------------------------------------
# samples, the A-share file, summary


@pytest.mark.parametrize("name,symbol", [("sp500", "SP500"), ("nasdaq", "NASDAQ")])
def test_samples_load_offline_and_pass_validation(name, symbol):
    import arch.data.nasdaq
    import arch.data.sp500

    frame = load_sample(name)
    assert list(frame.columns) == list(COLUMNS) and len(frame) == 5031
    assert frame["symbol"].unique().tolist() == [symbol]
    assert frame["timestamps"].iat[0] == pd.Timestamp("1999-01-04")
    raw = {"sp500": arch.data.sp500, "nasdaq": arch.data.nasdaq}[name].load()
    # unrepaired: the published candles satisfy every rule as they are
    np.testing.assert_array_equal(frame["high"].to_numpy(), raw["High"].to_numpy())
    np.testing.assert_array_equal(frame["low"].to_numpy(), raw["Low"].to_numpy())
    np.testing.assert_allclose(frame["amount"], frame["volume"] * frame[["open", "high", "low", "close"]].mean(axis=1))
    assert len(frame.attrs["notices"]) == 1 and "arch.data" in frame.attrs["notices"][0]
    assert len(WindowDataset(frame, lookback=90, predict=10, max_samples=64)) == 64
    with pytest.raises(ValueError, match="unknown sample"):
        load_sample("dax")


def test_ashare_sample_loads_and_its_interval_is_detected():
    frame = load_quiet(ASHARE)
    assert len(frame) == 2500 and frame["symbol"].iat[0] == "ashare_5min_sample"
    summary = summarize(frame)
    assert summary.interval == pd.Timedelta("5min")
    assert summary.rows == 2500 and summary.symbols == ("ashare_5min_sample",)
    # lunch and overnight breaks are counted as gaps, not refused
    assert summary.gaps == 104 and summary.largest_gaps["length"].iat[0] == pd.Timedelta("2D18h35min")
    table = summary.to_frame()
    assert table.loc["ashare_5min_sample", "bars"] == 2500
    assert table.loc["ashare_5min_sample", "interval"] == pd.Timedelta("5min")
    html = summary._repr_html_()
    assert "<table" in html and "0 days 00:05:00" in html


def test_summary_of_several_symbols():
    frame = load_quiet(pd.concat([candles(10, symbol="A", freq="1D"), candles(20, symbol="B", freq="1D")]))
    summary = summarize(frame)
    assert summary.bars_per_symbol == {"A": 10, "B": 20} and summary.interval == pd.Timedelta("1D")
    assert summary.gaps == 0 and summary.start == pd.Timestamp("2024-01-02 09:30")
    assert "30 rows, 2 symbol(s)" in str(summary)


# --------------------------------------------------------------------------------------------
# candles


def test_draw_candles_accepts_frames_and_arrays():
    from matplotlib.figure import Figure

    from kronos_kit.plots.candles import DOWN_COLOR, UP_COLOR, draw_candles

    ohlc = np.array([[1.0, 2.0, 0.5, 1.5], [1.5, 1.6, 1.0, 1.2], [np.nan, 1, 1, 1], [1.2, 1.3, 1.1, 1.2]])
    ax = Figure().subplots()
    wicks, bodies = draw_candles(ax, ohlc, label="hist")
    assert len(wicks.get_segments()) == 3 and len(bodies.patches) == 3  # the NaN row is skipped
    colors = [matplotlib.colors.to_hex(p.get_facecolor()) for p in bodies.patches]
    assert colors == [UP_COLOR, DOWN_COLOR, UP_COLOR]
    assert bodies.patches[0].get_height() == pytest.approx(0.5)
    assert ax.get_legend_handles_labels()[1] == ["hist"]
    frame = pd.DataFrame(ohlc[[0, 1, 3]], columns=["Open", "High", "Low", "Close"])
    ax2 = Figure().subplots()
    _, bars = draw_candles(ax2, frame, x=pd.date_range("2024-01-01", periods=3), width=0.5)
    assert bars.patches[0].get_width() == pytest.approx(0.5)  # half a day between daily bars
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        draw_candles(ax2, np.zeros((3, 5)))


def test_plot_candles_makes_a_headless_figure():
    from kronos_kit.plots.candles import plot_candles

    frame = load_quiet(pd.concat([candles(500, symbol="A"), candles(50, symbol="B")]))
    fig = plot_candles(frame, symbol="A", max_bars=120)
    price_ax, vol_ax = fig.axes
    assert "A" in price_ax.get_title() and "last 120 of 500 bars" in price_ax.get_title()
    assert len(price_ax.patches) == 120 and len(vol_ax.patches) == 120
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    assert buffer.getvalue()[:4] == b"\x89PNG"
    one = plot_candles(frame, symbol="B", start="2024-01-02 10:00", end="2024-01-02 11:00", volume=False)
    assert len(one.axes) == 1 and len(one.axes[0].patches) == 13
    with pytest.raises(ValueError, match="not in frame"):
        plot_candles(frame, symbol="C")


def test_an_unnamed_first_column_of_dates_is_the_timestamps(tmp_path):
    # what DataFrame.to_csv() writes for a frame indexed by date
    bars = pd.DataFrame({"Open": [1.0, 1.5, 1.6], "High": [2.0, 2.0, 2.0], "Low": [0.5, 1.0, 1.0],
                         "Close": [1.5, 1.8, 1.7], "Volume": [10.0, 20.0, 30.0], "Amount": [15.0, 36.0, 51.0]},
                        index=pd.to_datetime(["2024-01-02", "2024-01-03", "2024-01-04"]))
    bars.to_csv(tmp_path / "indexed.csv")
    with pytest.warns(DataNotice, match="unnamed first column holds dates; taken as the timestamps"):
        frame = load_ohlcv(tmp_path / "indexed.csv")
    assert list(frame["timestamps"]) == list(bars.index)
    # an unnamed column of row numbers is not taken for dates
    bars.reset_index(drop=True).to_csv(tmp_path / "numbered.csv")
    with pytest.raises(DataError, match="missing required column"):
        load_ohlcv(tmp_path / "numbered.csv")


def test_the_configs_column_mapping_reaches_the_loader(tmp_path):
    from kronos_kit.config import KitConfig, parse_overrides
    from kronos_kit.data.bundle import load_source

    pd.DataFrame({"When": ["2024-01-02", "2024-01-03"], "o": [1.0, 1.5], "h": [2.0, 2.0], "l": [0.5, 1.0],
                  "c": [1.5, 1.8]}).to_csv(tmp_path / "odd.csv", index=False)
    words = ["data.columns.When=timestamps", "data.columns.o=open", "data.columns.h=high", "data.columns.l=low",
             "data.columns.c=close", f"data.source={tmp_path / 'odd.csv'}"]
    cfg = KitConfig().with_overrides(parse_overrides(words))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataNotice)
        frame = load_source(cfg.data)
    assert list(frame["close"]) == [1.5, 1.8] and frame["timestamps"].iloc[0] == pd.Timestamp("2024-01-02")
