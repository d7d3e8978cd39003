"""The memory-mapped data cache (kronos_kit.data.store): one copy of the validated arrays per data hash,
read by every process; windows and split frames from it equal those of the in-memory frame path."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kronos_kit.config import DataConfig, KitConfig
from kronos_kit.data import DataError, DataNotice, WindowDataset, load_data, load_ohlcv, split
from kronos_kit.data.store import _locked, cached_arrays, source_key

LOOKBACK, PREDICT = 12, 3


def market(symbols: int = 3, bars: int = 120, *, seed: int = 0, tz: str | None = None) -> pd.DataFrame:
    """A long frame of valid 5-minute candles, symbols of different lengths, one overnight gap each."""
    rng = np.random.default_rng(seed)
    parts = []
    for k in range(symbols):
        n = bars + 17 * k
        times = pd.date_range("2024-01-02 09:30", periods=n, freq="5min", tz=tz)
        times = times.where(np.arange(n) < n // 2, times + pd.Timedelta("18h"))  # a break halfway
        close = np.round(10 * (k + 1) * np.exp(np.cumsum(rng.normal(0, 0.01, n))), 2)
        open_ = np.r_[close[0], close[:-1]]
        volume = rng.integers(100, 10_000, n).astype(float)  # whole numbers: stored as float32, exactly
        parts.append(pd.DataFrame({
            "symbol": f"S{k:02d}", "timestamps": times, "open": open_, "high": np.maximum(open_, close) + 0.01,
            "low": np.minimum(open_, close) - 0.01, "close": close, "volume": volume,
            "amount": np.round(volume * close, 2),
        }))
    return pd.concat(parts, ignore_index=True)


def config(source: Path, run_dir: Path, **data) -> KitConfig:
    return KitConfig(run_dir=str(run_dir), data=DataConfig(source=str(source), lookback=LOOKBACK, predict=PREDICT,
                                                           **data))


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("data-*") if p.is_dir())


def same_item(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        bool((a[k] == b[k]).all()) if hasattr(a[k], "shape") else a[k] == b[k] for k in a)


@pytest.mark.parametrize("tz", [None, "Asia/Shanghai"])
def test_cached_load_equals_the_frame_path(tmp_path, tz):
    source = tmp_path / "bars.csv"
    market(tz=tz).to_csv(source, index=False)
    cfg = config(source, tmp_path / "run")
    built, mapped = load_data(cfg), load_data(cfg)  # the first builds the entry, the second maps it
    assert built.cache == mapped.cache and entries(tmp_path / "run" / "cache") == [mapped.cache]
    assert isinstance(mapped.arrays.features["open"], np.memmap)
    assert mapped.arrays.features["volume"].dtype == np.float32  # exact, so stored small
    assert mapped.arrays.features["close"].dtype == np.float64  # 2-decimal prices are not float32-exact

    frame = load_ohlcv(source)
    pd.testing.assert_frame_equal(mapped.frame, frame)
    parts = split(frame, lookback=LOOKBACK, predict=PREDICT, ratios=(0.8, 0.1, 0.1), short="drop")  # as a panel
    for name in ("train", "val", "test"):
        expected, got = getattr(parts, name), getattr(mapped.splits, name)
        pd.testing.assert_frame_equal(got, expected)
        assert got.attrs == expected.attrs
        windows, cached = WindowDataset(expected, lookback=LOOKBACK, predict=PREDICT), getattr(mapped, name)
        assert len(windows) == len(cached) > 0
        assert all(same_item(windows[i], cached[i]) for i in range(len(windows)))
        assert np.array_equal(windows.window_array(), cached.window_array())


def test_date_split_and_epoch_cap_match_the_frame_path(tmp_path):
    source = tmp_path / "bars.parquet"
    market(symbols=2, bars=200).to_parquet(source)
    cfg = config(source, tmp_path / "run", val_start="2024-01-02 15:00", test_start="2024-01-03 12:30",
                 max_samples_per_epoch=50, stride=2)
    mapped = load_data(cfg)
    frame = load_ohlcv(source)
    parts = split(frame, lookback=LOOKBACK, predict=PREDICT, dates=("2024-01-02 15:00", "2024-01-03 12:30"))
    pd.testing.assert_frame_equal(mapped.splits.val, parts.val)
    train = WindowDataset(parts.train, lookback=LOOKBACK, predict=PREDICT, stride=2, max_samples=50, seed=0)
    for epoch in (0, 1):
        train.set_epoch(epoch)
        mapped.train.set_epoch(epoch)
        assert np.array_equal(train.window_array(), mapped.train.window_array())


CHILD = """
import hashlib, json, sys
from kronos_kit.config import DataConfig, KitConfig
from kronos_kit.data import load_data
cfg = KitConfig(run_dir=sys.argv[2], cache_dir=sys.argv[3],
                data=DataConfig(source=sys.argv[1], lookback=12, predict=3, max_samples_per_epoch=40))
bundle = load_data(cfg)
digest = {name: hashlib.sha256(getattr(bundle, name).window_array().tobytes()).hexdigest()
          for name in ("train", "val", "test")}
print(json.dumps({"entry": str(bundle.cache), "digest": digest, "mapped": type(bundle.arrays.timestamps).__name__,
                  "first": bundle.val[0]["x"].tolist()}))
"""


def test_two_processes_mapping_one_entry_see_identical_windows(tmp_path):
    source = tmp_path / "bars.csv"
    market(symbols=4).to_csv(source, index=False)
    cache = tmp_path / "shared-cache"
    # started together: one builds under the lock, the other waits and maps the same entry
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(tmp_path / f"run{i}"), str(cache)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == results[1]
    assert results[0]["mapped"] == "memmap" and entries(cache) == [Path(results[0]["entry"])]
    cfg = config(source, tmp_path / "here", max_samples_per_epoch=40)
    here = load_data(cfg.with_overrides({"cache_dir": str(cache)}))  # this process maps it too
    assert here.cache == Path(results[0]["entry"])
    assert hashlib.sha256(here.train.window_array().tobytes()).hexdigest() == results[0]["digest"]["train"]


def test_a_changed_source_file_invalidates_the_entry(tmp_path):
    source = tmp_path / "bars.csv"
    bars = market()
    bars.to_csv(source, index=False)
    cfg = config(source, tmp_path / "run")
    before = load_data(cfg)
    old_entry, old_close = before.cache, before.frame["close"].iloc[5]
    bars.loc[5, ["close", "high"]] = bars.loc[5, "high"] + 1.0  # a corrected price
    bars.to_csv(source, index=False)
    after = load_data(cfg)
    assert after.cache != old_entry and entries(tmp_path / "run" / "cache") == [after.cache]  # stale one removed
    assert after.frame["close"].iloc[5] != old_close
    pd.testing.assert_frame_equal(after.frame, load_ohlcv(source))

    bars.loc[7, "low"] = bars.loc[7, "high"] + 1  # now invalid: the loader's own error, nothing cached
    bars.to_csv(source, index=False)
    with pytest.raises(DataError) as expected:
        load_ohlcv(source)
    with pytest.raises(DataError) as got:
        load_data(cfg)
    assert str(got.value) == str(expected.value) and "line 9" in str(got.value)
    assert entries(tmp_path / "run" / "cache") == [after.cache]


def test_a_folder_gaining_a_file_is_new_data(tmp_path):
    folder = tmp_path / "bars"
    folder.mkdir()
    frame = market(symbols=2)
    for name, part in frame.groupby("symbol"):
        part.drop(columns="symbol").to_csv(folder / f"{name}.csv", index=False)
    first = cached_arrays(str(folder), tmp_path / "cache")
    market(symbols=1, seed=3).drop(columns="symbol").to_csv(folder / "S09.csv", index=False)
    second = cached_arrays(str(folder), tmp_path / "cache")
    assert first.folder != second.folder and second.names == ["S00", "S01", "S09"]


def test_a_damaged_entry_is_rebuilt(tmp_path):
    source = tmp_path / "bars.csv"
    market().to_csv(source, index=False)
    cfg = config(source, tmp_path / "run")
    entry = load_data(cfg).cache
    (entry / "close.npy").write_bytes((entry / "close.npy").read_bytes()[:200])  # a truncated write
    with pytest.warns(RuntimeWarning, match="damaged"):
        again = load_data(cfg)
    pd.testing.assert_frame_equal(again.frame, load_ohlcv(source))


def test_notices_are_warned_on_every_load(tmp_path):
    source = tmp_path / "bars.csv"
    market().drop(columns="amount").to_csv(source, index=False)
    cfg = config(source, tmp_path / "run")
    for _ in range(2):  # built, then mapped: the same notice both times
        with pytest.warns(DataNotice, match="no amount column"):
            bundle = load_data(cfg)
    assert any("no amount column" in n for n in bundle.splits.val.attrs["notices"])


def test_cache_location_follows_the_config(tmp_path):
    source = tmp_path / "bars.csv"
    market().to_csv(source, index=False)
    elsewhere = load_data(config(source, tmp_path / "run").with_overrides({"cache_dir": str(tmp_path / "c")}))
    assert elsewhere.cache.parent == tmp_path / "c" and not (tmp_path / "run").exists()
    in_memory = load_data(KitConfig(data=DataConfig(source=str(source), lookback=LOOKBACK, predict=PREDICT)))
    assert in_memory.cache is None and not isinstance(in_memory.arrays.timestamps, np.memmap)
    assert np.array_equal(in_memory.train.window_array(), elsewhere.train.window_array())
    meta = json.loads((elsewhere.cache / "meta.json").read_text())
    assert meta["rows"] == len(elsewhere.frame) and meta["arrays"]["volume"]["dtype"] == "float32"


def test_the_default_sample_goes_through_the_cache(tmp_path):
    cfg = KitConfig.from_file(Path(__file__).resolve().parent.parent / "configs" / "default.yaml")
    cfg = cfg.with_overrides({"run_dir": str(tmp_path / "run")})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataNotice)  # the samples load without notices, cached or not
        built, mapped = load_data(cfg), load_data(cfg)
    assert mapped.cache is not None and mapped.cache == built.cache
    assert np.array_equal(built.val.window_array(), mapped.val.window_array())


def test_a_process_waits_for_the_one_building_the_entry(tmp_path):
    source = tmp_path / "bars.csv"
    market().to_csv(source, index=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    key = source_key(str(source), symbol=None, fill=None, columns=None)
    got: list = []
    waiting = threading.Thread(target=lambda: got.append(cached_arrays(str(source), cache)))
    with (cache / f"data-{key[:32]}.lock").open("a") as handle, _locked(handle):  # as another rank building it
        waiting.start()
        time.sleep(3)
        assert waiting.is_alive() and not entries(cache)  # it waits instead of building its own copy
    waiting.join(timeout=120)
    assert entries(cache) == [got[0].folder]
