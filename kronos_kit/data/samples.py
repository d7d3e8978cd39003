"""The embedded sample data sets (`load_sample`), read offline: two indices from the ``arch`` package and a
15-stock US daily panel shipped with the kit (``kronos_kit/assets/samples``)."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .load import load_ohlcv
from .schema import DataError, DataNotice, fill_amount

_SAMPLES = {
    "sp500": ("sp500", "SP500", "S&P 500 index"),
    "nasdaq": ("nasdaq", "NASDAQ", "NASDAQ Composite index"),
}
# panels shipped as files beside the package: name -> (file under assets/samples, what it is)
_PANELS = {
    "us15": ("us_stocks_daily_15.csv.gz", "15 US stocks, daily 1998-2013 (QuantQuote's free daily data as "
             "redistributed by the BSD-licensed fakestockdata package; assets/samples/PROVENANCE.md)"),
}
SAMPLE_NAMES = tuple(_SAMPLES) + tuple(_PANELS)


def sample_file(name: str) -> Path:
    """The file of a shipped panel sample (``"us15"``), e.g. to read it with pandas or qlib tools."""
    if name not in _PANELS:
        raise ValueError(f"sample_file({name!r}): not a shipped panel; choose one of {sorted(_PANELS)}.")
    return Path(__file__).resolve().parent.parent / "assets" / "samples" / _PANELS[name][0]


def load_sample(name: str) -> pd.DataFrame:
    """Embedded daily OHLCV, offline: ``"sp500"`` or ``"nasdaq"`` (1999-01-04 .. 2018-12-31), or the
    panel ``"us15"`` (15 US stocks, 1998-01-02 .. 2013-08-09; see ``assets/samples/PROVENANCE.md``).

    Source: the ``arch`` package's bundled data sets ``arch.data.sp500.load()`` and
    ``arch.data.nasdaq.load()`` (Yahoo Finance daily bars: Open, High, Low, Close, Adj Close,
    Volume, Date index; 5,031 rows each). Returned in the canonical format with symbol
    ``"SP500"`` / ``"NASDAQ"``, close as published (Adj Close equals Close for these indices),
    and amount = volume * mean(open, high, low, close) as the Kronos reference fills it.
    Both pass validation unrepaired: no candle violates the high/low rules (checked in the
    tests); NASDAQ has two days with volume 0, which are valid and kept.
    """
    key = str(name).lower()
    if key in _PANELS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataNotice)
            frame = load_ohlcv(sample_file(key))
        frame.attrs["notices"] = [f"sample '{key}': {_PANELS[key][1]}; amount = volume * mean(open, high, low, "
                                  "close)."]
        return frame
    if key not in _SAMPLES:
        raise ValueError(f"load_sample({name!r}): unknown sample; choose one of {sorted(SAMPLE_NAMES)}.")
    module, symbol, title = _SAMPLES[key]

    raw = importlib.import_module(f"arch.data.{module}").load()
    ohlc = [raw[c].astype(np.float64) for c in ("Open", "High", "Low", "Close")]
    raw = raw.assign(Amount=fill_amount(raw["Volume"].astype(np.float64), *ohlc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataNotice)
        frame = load_ohlcv(raw, symbol=symbol)
    if frame.attrs["notices"]:  # the samples load as published, without any fill, sort or repair
        raise DataError(f"sample {key!r} no longer loads cleanly: {frame.attrs['notices']}")
    frame.attrs["notices"] = [f"sample '{key}': {title} daily bars from arch.data.{module} (Yahoo Finance); "
                              "amount = volume * mean(open, high, low, close)."]
    return frame


