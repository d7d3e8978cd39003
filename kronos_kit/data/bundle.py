"""The configured data in one object: `load_data(cfg)` loads, splits and windows `cfg.data`, through
the memory-mapped data cache (`store`) when the run has a folder for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd

from kronos_kit.config import DataConfig, KitConfig

from .load import load_ohlcv
from .samples import load_sample
from .store import MarketArrays, cached_arrays
from .windows import SplitRows, WindowDataset, split_rows

CACHE_FOLDER = "cache"  # under the run folder, when `cache_dir` is unset


class SplitFrames:
    """Train / val / test frames as `split` returns them, each built from the arrays when first used
    (phase 2's skill probe needs only val, the evaluation only test: the train frame is never built)."""

    def __init__(self, arrays: MarketArrays, parts: dict[str, SplitRows], lookback: int) -> None:
        self._arrays, self._parts, self._lookback = arrays, parts, lookback

    @cached_property
    def train(self) -> pd.DataFrame:
        return self._arrays.split_frame(self._parts["train"], self._lookback)

    @cached_property
    def val(self) -> pd.DataFrame:
        return self._arrays.split_frame(self._parts["val"], self._lookback)

    @cached_property
    def test(self) -> pd.DataFrame:
        return self._arrays.split_frame(self._parts["test"], self._lookback)

    def __iter__(self):
        return iter((self.train, self.val, self.test))


@dataclass
class DataBundle:
    arrays: MarketArrays  # the validated canonical arrays (memory-mapped from the cache when there is one)
    splits: SplitFrames  # per-split frames, built on first use
    train: WindowDataset
    val: WindowDataset
    test: WindowDataset
    cache: Path | None = field(default=None)  # the cache entry the arrays map, None in memory

    @property
    def source_sha256(self) -> str | None:
        """sha256 of the source's bytes (`store.source_sha256`): what a run's stage records it read."""
        return self.arrays.source_sha256

    @cached_property
    def frame(self) -> pd.DataFrame:
        """The canonical long frame, as `load_ohlcv` returns it (built on first use)."""
        return self.arrays.frame()


def load_source(d: DataConfig) -> pd.DataFrame:
    """The canonical long frame of `d.source`: an embedded sample (`sample:NAME`) or files loaded with
    the config's symbol, fill, column mapping and adjusted-close choice."""
    if d.source.startswith("sample:"):
        return load_sample(d.source.removeprefix("sample:"))
    return load_ohlcv(d.source, symbol=d.symbol, fill=d.fill, columns=d.columns, use_adj_close=d.adj_close)


def data_cache_dir(cfg: KitConfig) -> Path | None:
    """Where `load_data` keeps the memory-mapped data: `cache_dir`, else `<run_dir>/cache`, else nowhere."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(cfg.run_dir) / CACHE_FOLDER if cfg.run_dir else None


def load_data(cfg: KitConfig) -> DataBundle:
    """Load, split and window the configured data (train windows per the epoch cap; val/test all).

    A panel (several symbols) is cut on common calendar dates unless ``data.ratio_split`` says
    ``symbol``; a symbol without a window in a split is left out of it with a notice."""
    d = cfg.data
    arrays = cached_arrays(d.source, data_cache_dir(cfg), symbol=d.symbol, fill=d.fill, columns=d.columns,
                           use_adj_close=d.adj_close)
    if d.val_start or d.test_start:
        if not (d.val_start and d.test_start):
            raise ValueError("data.val_start and data.test_start go together: set both, or neither to use ratios")
        how = {"dates": (d.val_start, d.test_start)}
    else:
        how = {"ratios": (d.train_ratio, d.val_ratio, 1 - d.train_ratio - d.val_ratio), "ratio_split": d.ratio_split}
    # in a panel cut on common dates a symbol listed late (or delisted early) may have no window in a split:
    # data.short "auto" leaves it out of that split with a notice; one series too short for a split stays an error
    short = d.short if d.short != "auto" else "drop" if len(arrays.names) > 1 else "error"
    parts = split_rows(arrays.offsets[:-1], arrays.offsets[1:], arrays.names, arrays.timestamps, arrays.tz,
                       lookback=d.lookback, predict=d.predict, short=short, notices=arrays.notices, **how)
    train = WindowDataset(arrays.blocks(parts["train"]), lookback=d.lookback, predict=d.predict, clip=d.clip,
                          stride=d.stride, max_samples=d.max_samples_per_epoch, seed=cfg.seed)
    val = WindowDataset(arrays.blocks(parts["val"]), lookback=d.lookback, predict=d.predict, clip=d.clip)
    test = WindowDataset(arrays.blocks(parts["test"]), lookback=d.lookback, predict=d.predict, clip=d.clip)
    return DataBundle(arrays, SplitFrames(arrays, parts, d.lookback), train, val, test, arrays.folder)
