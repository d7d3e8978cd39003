"""The configured data in one object: `load_data(cfg)` loads, splits and windows `cfg.data`."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from torch.utils.data import Dataset

from kronos_kit.config import DataConfig, KitConfig

from .load import load_ohlcv
from .samples import load_sample
from .windows import Splits, WindowDataset, split


@dataclass
class DataBundle:
    frame: pd.DataFrame  # the canonical long frame
    splits: Splits
    train: Dataset
    val: Dataset
    test: Dataset


def load_source(d: DataConfig) -> pd.DataFrame:
    """The canonical long frame of `d.source`: an embedded sample (`sample:NAME`) or files loaded with
    the config's symbol, fill and column mapping."""
    if d.source.startswith("sample:"):
        return load_sample(d.source.removeprefix("sample:"))
    return load_ohlcv(d.source, symbol=d.symbol, fill=d.fill, columns=d.columns)


def load_data(cfg: KitConfig) -> DataBundle:
    """Load, split and window the configured data (train windows per the epoch cap; val/test all)."""
    d = cfg.data
    frame = load_source(d)
    if d.val_start or d.test_start:
        if not (d.val_start and d.test_start):
            raise ValueError("data.val_start and data.test_start go together: set both, or neither to use ratios")
        splits = split(frame, lookback=d.lookback, predict=d.predict, dates=(d.val_start, d.test_start))
    else:
        ratios = (d.train_ratio, d.val_ratio, 1 - d.train_ratio - d.val_ratio)
        splits = split(frame, lookback=d.lookback, predict=d.predict, ratios=ratios)
    train = WindowDataset(splits.train, lookback=d.lookback, predict=d.predict, clip=d.clip, stride=d.stride,
                          max_samples=d.max_samples_per_epoch, seed=cfg.seed)
    val = WindowDataset(splits.val, lookback=d.lookback, predict=d.predict, clip=d.clip)
    test = WindowDataset(splits.test, lookback=d.lookback, predict=d.predict, clip=d.clip)
    return DataBundle(frame, splits, train, val, test)
