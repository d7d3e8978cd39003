"""OHLCV data layer: everything between a researcher's candles and a Kronos training window.

This package owns
* loading (`load_ohlcv`, in ``load``): CSV or Parquet files, a folder or list of them, or a
  DataFrame, into one canonical long frame
  ``symbol, timestamps, open, high, low, close, volume, amount``;
* validation: bad data raises `DataError` (a ValueError) naming the file, the column, the first
  rows at fault (with their numbers in the source) and what to do;
* calendar features (`time_features`, in ``schema``) exactly as the Kronos reference computes them;
* chronological per-symbol splits (`split`, in ``windows``) whose val/test parts carry look-back
  context only, and training windows (`WindowDataset`) z-scored on the look-back bars alone, so
  the future never leaks into the normalisation;
* the normalisation, its inverse and the amount fill (`normalize`, `denormalize`, `norm_scale`,
  `fill_amount`, in ``schema``), the one home of the column order and `NORM_EPS`;
* one copy of the data per machine (`cached_arrays` -> `MarketArrays`, in ``store``): the validated
  arrays written once per data hash as ``.npy`` files and memory-mapped by every rank and notebook;
* the configured data in one object (`load_data` -> `DataBundle`, in ``bundle``), read through that
  cache; windows (`RowBlocks`) and split frames come from the mapped arrays;
* batch plumbing (`loop_batches`, `iter_batches`, `take`, `unpack_batch`, `in_split_mask`, in
  ``batches``): the one loop every model-over-windows computation uses, and which bars it scores;
* forecast origins and the model inputs at them (`forecast_origins`, `origin_inputs`, in
  ``origins``), shared by the test evaluation and phase 2's forecast-skill probe;
* the embedded samples (`load_sample`, in ``samples``) and a notebook summary (`summarize`).

Whatever the loader fills, sorts or repairs is reported with ``warnings.warn(..., DataNotice)``
and kept in ``frame.attrs["notices"]``. Every check is vectorised: no Python loop runs over rows.
"""

from .batches import Batch, in_split_mask, is_window_dataset, iter_batches, loop_batches, take, unpack_batch
from .bundle import DataBundle, load_data
from .load import load_ohlcv
from .origins import forecast_origins, origin_inputs, walk_forward_frame
from .samples import load_sample
from .schema import (
    COLUMNS,
    CONTEXT_COLUMN,
    FEATURE_COLUMNS,
    NORM_EPS,
    PRICE_COLUMNS,
    TIME_FEATURE_COLUMNS,
    DataError,
    DataNotice,
    denormalize,
    fill_amount,
    norm_scale,
    normalize,
    time_features,
)
from .store import MarketArrays, cached_arrays
from .summary import DataSummary, summarize
from .windows import RowBlocks, SplitRows, Splits, WindowDataset, split, split_rows

__all__ = [
    "COLUMNS",
    "CONTEXT_COLUMN",
    "FEATURE_COLUMNS",
    "NORM_EPS",
    "PRICE_COLUMNS",
    "TIME_FEATURE_COLUMNS",
    "Batch",
    "DataBundle",
    "DataError",
    "DataNotice",
    "DataSummary",
    "MarketArrays",
    "RowBlocks",
    "SplitRows",
    "Splits",
    "WindowDataset",
    "cached_arrays",
    "denormalize",
    "fill_amount",
    "forecast_origins",
    "is_window_dataset",
    "in_split_mask",
    "iter_batches",
    "load_data",
    "load_ohlcv",
    "load_sample",
    "loop_batches",
    "norm_scale",
    "normalize",
    "origin_inputs",
    "split",
    "split_rows",
    "summarize",
    "take",
    "time_features",
    "unpack_batch",
    "walk_forward_frame",
]
