"""A notebook-friendly summary of a loaded frame: span, bar interval and gaps per symbol."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .schema import modal_step, nanoseconds, require_canonical, symbol_bounds


@dataclass(frozen=True)
class DataSummary:
    """What a loaded frame holds; shows as a per-symbol table in a notebook."""

    rows: int
    symbols: tuple[str, ...]
    start: pd.Timestamp
    end: pd.Timestamp
    bars_per_symbol: dict[str, int]
    interval: pd.Timedelta  # modal timestamp difference over all symbols
    gap_threshold: pd.Timedelta  # differences above this count as gaps
    gaps: int
    largest_gaps: pd.DataFrame  # symbol, before, after, length; the longest few
    per_symbol: pd.DataFrame = field(repr=False)
    notices: tuple[str, ...] = ()

    def to_frame(self) -> pd.DataFrame:
        """Per-symbol table (bars, start, end, interval, gaps, largest gap)."""
        return self.per_symbol

    def __str__(self) -> str:
        return (f"{self.rows} rows, {len(self.symbols)} symbol(s), {self.start} .. {self.end}, "
                f"interval {self.interval}, {self.gaps} gap(s) > {self.gap_threshold} (weekends, holidays, "
                "overnight and lunch breaks are expected)")

    def _repr_html_(self) -> str:
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notices)
        head = f"<p>{html.escape(str(self))}</p>" + (f"<ul>{notes}</ul>" if notes else "")
        return head + self.per_symbol._repr_html_()


def summarize(frame: pd.DataFrame, *, gap_factor: float = 1.5) -> DataSummary:
    """Rows, symbols, span, bar interval (modal difference) and gaps (> gap_factor x interval).

    Gaps are reported, not judged: for daily data weekends and holidays, and for intraday data
    overnight and lunch breaks, are expected and counted like any other.
    """
    require_canonical(frame, "summarize")
    starts, ends, names = symbol_bounds(frame, "summarize")
    ts = pd.DatetimeIndex(frame["timestamps"])
    ns = nanoseconds(ts)
    sym_of_row = np.repeat(np.arange(len(starts)), ends - starts)
    inner = sym_of_row[1:] == sym_of_row[:-1]
    diffs = np.diff(ns)[inner]
    if len(diffs):
        vals, counts = np.unique(diffs, return_counts=True)
        step = int(vals[np.argmax(counts)])
    else:
        step = 0
    threshold = int(step * gap_factor)
    is_gap = np.zeros(len(ns) - 1 if len(ns) else 0, bool)
    is_gap[inner] = diffs > threshold
    at = np.flatnonzero(is_gap) + 1  # first row after each gap
    length = ns[at] - ns[at - 1]
    top = at[np.argsort(-length, kind="stable")[:5]]
    largest = pd.DataFrame({
        "symbol": [names[k] for k in sym_of_row[top]],
        "before": ts[top - 1],
        "after": ts[top],
        "length": pd.to_timedelta(ns[top] - ns[top - 1]),
    })
    gap_sym = sym_of_row[at]
    longest = np.zeros(len(starts), np.int64)
    np.maximum.at(longest, gap_sym, length)
    per_symbol = pd.DataFrame({
        "bars": ends - starts,
        "start": ts[starts],
        "end": ts[ends - 1],
        "interval": pd.to_timedelta(modal_step(ns, starts)),
        "gaps": np.bincount(gap_sym, minlength=len(starts)),
        "largest_gap": pd.to_timedelta(longest),
    }, index=pd.Index(names, name="symbol"))
    return DataSummary(
        rows=len(frame),
        symbols=tuple(names),
        start=ts.min(),
        end=ts.max(),
        bars_per_symbol=dict(zip(names, (ends - starts).tolist())),
        interval=pd.Timedelta(step),
        gap_threshold=pd.Timedelta(threshold),
        gaps=len(at),
        largest_gaps=largest,
        per_symbol=per_symbol,
        notices=tuple(frame.attrs.get("notices", ())),
    )

