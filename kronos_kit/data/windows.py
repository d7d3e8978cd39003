"""Chronological splits and training windows: `split` cuts a frame into train / val / test without
sharing a target bar (a panel of symbols on common calendar dates), `WindowDataset` cuts Kronos windows
normalised on the look-back only."""

from __future__ import annotations

import copy
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from kronos_kit.config import RATIO_SPLITS

from .schema import (
    COLUMNS,
    CONTEXT_COLUMN,
    FEATURE_COLUMNS,
    SHOW,
    DataError,
    modal_step,
    nanoseconds,
    normalize,
    notify,
    require_canonical,
    symbol_bounds,
    time_features,
)


@dataclass(frozen=True)
class Splits:
    """Chronological train / val / test frames. Val and test start with up to ``lookback`` context
    rows (``is_context`` True) borrowed from before the split; only their later rows are targets."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame

    def __iter__(self):
        return iter((self.train, self.val, self.test))


def _bound(value: str | pd.Timestamp, tz: object, dates: object) -> pd.Timestamp:
    """A split date comparable with the frame's times (naive dates are read in the frame's zone)."""
    t = pd.Timestamp(value)
    if t.tz is None and tz is not None:
        return t.tz_localize(tz)
    if t.tz is not None and tz is None:
        raise DataError(f"split: dates={dates} carry a time zone but the frame's times are naive; pass naive dates.")
    return t


def _need(lookback: int, predict: int) -> str:
    return f"one window needs {lookback + predict + 1} bars (lookback {lookback} + predict {predict} + 1)"


@dataclass(frozen=True)
class SplitRows:
    """One split's rows, per symbol of the source: positions ``lo <= p < hi`` within the symbol's block,
    of which ``p < first`` are look-back context (``is_context``); ``kept`` False: left out (too short)."""

    name: str
    lo: np.ndarray  # (S,) int64
    first: np.ndarray  # (S,) int64
    hi: np.ndarray  # (S,) int64
    kept: np.ndarray  # (S,) bool
    notices: list[str]


def split(
    frame: pd.DataFrame,
    *,
    lookback: int,
    predict: int = 0,
    ratios: tuple[float, float, float] | None = None,
    dates: tuple[str | pd.Timestamp, str | pd.Timestamp] | None = None,
    short: str = "error",
    ratio_split: str = "calendar",
) -> Splits:
    """Split a frame chronologically into train / val / test, without sharing a target bar.

    ``ratios`` (default 0.8, 0.1, 0.1) are shares of time: with several symbols (``ratio_split=
    "calendar"``, the default) the cut dates are taken from the pooled calendar (every distinct timestamp
    of every symbol; val starts at its ``floor(n * ratios[0])``-th timestamp, test at its
    ``floor(n * (ratios[0] + ratios[1]))``-th) and every symbol is cut on those dates, so no symbol's
    training target lies at or after the validation start, nor a validation target at or after the test
    start (a market-wide move of the test period cannot leak through another symbol's training data).
    ``ratio_split="symbol"`` cuts each symbol by its own bar count (floored) instead, with a notice; with
    one symbol both are the same cut. ``dates=(val_start, test_start)`` cut by time (val holds
    val_start <= t < test_start; naive dates are read in the frame's zone). Val and test carry up to
    ``lookback`` bars before their
    first bar as context rows (``is_context`` True; they may reach back past the previous split
    when it is shorter), so `WindowDataset` builds windows there whose target bars (those after
    the look-back) all lie in the split. Pass the ``predict`` you will train with so the check
    below is exact (a window is lookback + predict + 1 bars; the default 0 asks for one target).

    A symbol whose part of a split cannot hold one window is a `DataError` (``short="error"``) or
    is left out of that split with a notice (``short="drop"``); a split with no window at all is
    always a `DataError`. Each part's ``attrs`` hold ``split`` (its name), ``lookback`` and
    ``notices``.
    """
    require_canonical(frame, "split")
    starts, ends, names = symbol_bounds(frame, "split")
    ts = frame["timestamps"]
    rows = split_rows(starts, ends, names, nanoseconds(ts), getattr(ts.dt, "tz", None), lookback=lookback,
                      predict=predict, ratios=ratios, dates=dates, short=short, ratio_split=ratio_split,
                      notices=list(frame.attrs.get("notices", [])))
    sizes = ends - starts
    pos = np.arange(len(frame)) - np.repeat(starts, sizes)  # row position within its symbol
    base = frame.loc[:, list(COLUMNS)]
    parts = {}
    for name, part_rows in rows.items():
        lo = np.repeat(np.where(part_rows.kept, part_rows.lo, 0), sizes)
        hi = np.repeat(np.where(part_rows.kept, part_rows.hi, 0), sizes)
        keep = (pos >= lo) & (pos < hi)
        part = base.loc[keep].reset_index(drop=True)
        part[CONTEXT_COLUMN] = (pos < np.repeat(part_rows.first, sizes))[keep]
        part.attrs = {"notices": part_rows.notices, "split": name, "lookback": lookback}
        parts[name] = part
    return Splits(**parts)


def split_rows(
    starts: np.ndarray,
    ends: np.ndarray,
    names: list[str],
    timestamps: np.ndarray,
    tz: object,
    *,
    lookback: int,
    predict: int = 0,
    ratios: tuple[float, float, float] | None = None,
    dates: tuple[str | pd.Timestamp, str | pd.Timestamp] | None = None,
    short: str = "error",
    ratio_split: str = "calendar",
    notices: Sequence[str] = (),
) -> dict[str, SplitRows]:
    """`split`'s cut of symbol blocks ``[starts[k], ends[k])`` of time-sorted ``timestamps`` (int64 ns,
    UTC instants when ``tz`` is set): the rows of each split, its checks and notices, without a frame."""
    if short not in ("error", "drop"):
        raise ValueError(f"short={short!r}: use 'error' or 'drop'.")
    if ratio_split not in RATIO_SPLITS:
        raise ValueError(f"ratio_split={ratio_split!r}: use one of {list(RATIO_SPLITS)}.")
    if lookback < 1 or predict < 0:
        raise ValueError(f"lookback={lookback}, predict={predict}: need lookback >= 1 and predict >= 0.")
    sizes = ends - starts
    notices = list(notices)
    if dates is None:
        r = np.asarray(ratios if ratios is not None else (0.8, 0.1, 0.1), dtype=float)
        if r.shape != (3,) or (r < 0).any() or abs(r.sum() - 1) > 1e-6:
            raise ValueError(f"ratios={ratios}: give three non-negative shares summing to 1.")
        how = f"ratios={tuple(r.tolist())}"
        if ratio_split == "calendar" and len(starts) > 1:
            cut1, cut2, how = _calendar_cuts(starts, timestamps, tz, r)
        else:  # one symbol: its bar count is its calendar, the same cut
            cut1 = np.floor(sizes * r[0]).astype(np.int64)
            cut2 = np.floor(sizes * (r[0] + r[1])).astype(np.int64)
            if len(starts) > 1:
                notify(notices, f"split: {how} cut each of the {len(starts)} symbols by its own bar count "
                                "(ratio_split='symbol'), so their validation and test periods differ and one "
                                "symbol's training targets can lie in another's test period; the default "
                                "ratio_split='calendar' cuts every symbol on the same dates.")
    else:
        val_start, test_start = (_bound(d, tz, dates) for d in dates)
        if not val_start < test_start:
            raise ValueError(f"dates={dates}: val_start must come before test_start.")
        cut1, cut2 = _date_cuts(starts, timestamps, val_start.value, test_start.value)
        how = f"dates=({val_start}, {test_start})"

    window = lookback + predict + 1
    parts = {}
    for name, first, last in (("train", np.zeros_like(cut1), cut1), ("val", cut1, cut2), ("test", cut2, sizes)):
        part_notices = list(notices)
        context_from = np.maximum(0, first - lookback)
        counts = np.maximum(0, last - window - context_from + 1)  # windows whose targets lie in [first, last)
        short_ones = np.flatnonzero(counts == 0)
        if len(short_ones) == len(names):
            raise DataError(f"split '{name}' is empty: no symbol has a complete window there ({how}; "
                            f"{_need(lookback, predict)}). Lower lookback/predict, or give '{name}' a larger "
                            "share of the data.")
        if len(short_ones):
            listing = ", ".join(f"'{names[k]}' ({last[k] - first[k]} of its {sizes[k]} bars)"
                                for k in short_ones[:SHOW])
            if short == "error":
                raise DataError(f"split '{name}': {len(short_ones)} symbol(s) too short for one window: "
                                f"{listing}; {_need(lookback, predict)}. Lower lookback/predict, change the "
                                "split, or leave such symbols out of this split: data.short: drop in a config "
                                "(-p data.short=drop), short='drop' when calling split.")
            notify(part_notices, f"split '{name}': left out {len(short_ones)} symbol(s) too short for one "
                                 f"window: {listing}.")
        parts[name] = SplitRows(name, context_from, first, last, counts > 0, part_notices)
    return parts


def _date_cuts(starts: np.ndarray, timestamps: np.ndarray, val_start: int, test_start: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per symbol, its rows before ``val_start`` and before ``test_start`` (int64 ns): rows are time-sorted
    within each symbol, so a cut is the count of that symbol's earlier rows."""
    return (np.add.reduceat((timestamps < val_start).astype(np.int64), starts),
            np.add.reduceat((timestamps < test_start).astype(np.int64), starts))


def _calendar_cuts(starts: np.ndarray, timestamps: np.ndarray, tz: object, r: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, str]:
    """Ratio cuts of several symbols on common dates: shares of the pooled calendar's distinct timestamps."""
    calendar = np.unique(np.asarray(timestamps))
    n = len(calendar)
    at = [int(np.floor(n * r[0])), int(np.floor(n * (r[0] + r[1])))]
    bounds = [int(calendar[i]) if i < n else int(calendar[-1]) + 1 for i in at]  # past the end: an empty split
    cut1, cut2 = _date_cuts(starts, timestamps, *bounds)

    def text(value: int) -> str:
        t = pd.Timestamp(value)
        return str(t if tz is None else t.tz_localize("UTC").tz_convert(tz))

    how = (f"ratios={tuple(r.tolist())} on the pooled calendar of {n} timestamps (validation from "
           f"{text(bounds[0])}, test from {text(bounds[1])})")
    return cut1, cut2, how


# --------------------------------------------------------------------------------------------
# windows


def _normalize_windows(windows: np.ndarray, lookback: int, clip: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-score (..., L, 6) windows with the mean and population std of the first ``lookback`` bars."""
    past = windows[..., :lookback, :]
    mean = past.mean(axis=-2, keepdims=True)
    std = past.std(axis=-2, keepdims=True)  # ddof=0, as the reference's np.std
    x = normalize(windows, mean, std, clip)
    return x, mean.squeeze(-2), std.squeeze(-2)


@dataclass(frozen=True)
class RowBlocks:
    """The rows a `WindowDataset` reads: one block of rows per symbol in shared arrays, which are a
    frame's own columns or the memory-mapped canonical arrays of the data cache (`store`), so every
    window indexes into one copy of the data and none is copied up front."""

    columns: tuple[np.ndarray, ...]  # FEATURE_COLUMNS in order, (N,) each: float64, or float32 where exact
    stamps: np.ndarray  # (N, 5) TIME_FEATURE_COLUMNS, float32 or uint8 (the values are small whole numbers)
    timestamps: np.ndarray  # (N,) int64 ns, UTC instants when zoned
    tz: object  # the times' zone; None when naive
    starts: np.ndarray  # (S,) first row of each symbol's block, ascending
    ends: np.ndarray  # (S,) one past its last row
    n_context: np.ndarray  # (S,) `is_context` rows at the start of each block
    names: list[str]
    split: str | None = None  # the split's name, for messages

    @classmethod
    def of_frame(cls, frame: pd.DataFrame, where: str) -> RowBlocks:
        """The blocks of a canonical frame (or a split part of one), checked as `WindowDataset` needs."""
        starts, ends, names = symbol_bounds(frame, where)
        columns = tuple(frame[c].to_numpy(np.float64) for c in FEATURE_COLUMNS)
        if not all(np.isfinite(c).all() for c in columns):
            raise DataError(f"{where}: frame holds missing or infinite values; load it with "
                            "load_ohlcv(..., fill='ffill') or drop those rows.")
        context = (frame[CONTEXT_COLUMN].to_numpy(bool) if CONTEXT_COLUMN in frame.columns
                   else np.zeros(len(frame), bool))
        sym_of_row = np.repeat(np.arange(len(starts)), ends - starts)
        if (context[1:] & ~context[:-1] & (sym_of_row[1:] == sym_of_row[:-1])).any():
            raise DataError(f"{where}: '{CONTEXT_COLUMN}' rows must come first within each symbol; "
                            "build val/test frames with split(...).")
        ts = frame["timestamps"]
        return cls(columns, time_features(ts).to_numpy(np.float32), nanoseconds(ts), getattr(ts.dt, "tz", None),
                   starts, ends, np.add.reduceat(context.astype(np.int64), starts), names, frame.attrs.get("split"))

    def features(self, rows: slice | np.ndarray) -> np.ndarray:
        """Raw feature values of ``rows`` (a slice, or row numbers of any shape) as float64 (..., 6)."""
        return np.stack([c[rows] for c in self.columns], axis=-1).astype(np.float64, copy=False)

    def time_text(self, row: int) -> str:
        t = pd.Timestamp(int(self.timestamps[row]))
        return str(t if self.tz is None else t.tz_localize("UTC").tz_convert(self.tz))


def _cut_at_gaps(blocks: RowBlocks, *, gaps: str, max_gap: float | str | pd.Timedelta,
                 where: str) -> tuple[np.ndarray, np.ndarray]:
    """Unbroken stretches [lo, hi) of rows: the symbol blocks, cut at gaps when ``gaps="split"``."""
    starts, ends, names = blocks.starts, blocks.ends, blocks.names
    if gaps == "ignore":
        return starts, ends
    sizes = ends - starts
    local = np.cumsum(sizes) - sizes  # each block's first position in the gathered rows
    rows = np.arange(int(sizes.sum())) + np.repeat(starts - local, sizes)
    ts = blocks.timestamps[rows]
    sym_of_row = np.repeat(np.arange(len(starts)), sizes)
    if isinstance(max_gap, numbers.Real):  # a multiple of each symbol's own bar interval
        limit = modal_step(ts, local)[sym_of_row[1:]] * float(max_gap)
    else:
        limit = pd.Timedelta(max_gap).value
    jump = np.flatnonzero((np.diff(ts) > limit) & (sym_of_row[1:] == sym_of_row[:-1])) + 1
    if len(jump) and gaps == "error":
        listing = ", ".join(f"'{names[sym_of_row[j]]}' {blocks.time_text(rows[j - 1])} -> "
                            f"{blocks.time_text(rows[j])}" for j in jump[:SHOW])
        raise DataError(f"{where}: {len(jump)} gap(s) longer than max_gap={max_gap!r} (times the bar interval "
                        f"when a number), first: {listing}. Pass gaps='split' to keep windows inside unbroken "
                        "stretches, gaps='ignore' if such breaks are normal (overnight, weekends), or a "
                        "larger max_gap.")
    return np.sort(np.r_[starts, rows[jump]]), np.sort(np.r_[ends, rows[jump]])


class WindowDataset(Dataset):
    """Kronos training windows: ``lookback + predict + 1`` consecutive bars of one symbol.

    Each feature is z-scored with the mean and population std of the first ``lookback`` bars
    only (the reference uses the whole window, which leaks the future), then clipped to ``+-clip``
    (`schema.normalize`). An item is a dict: ``x`` (L, 6) float32 in order open,
    high, low, close, volume, amount; ``stamp`` (L, 5) float32 minute, hour, weekday, day, month;
    ``mean`` and ``std`` (6,) float32; ``symbol`` str; ``start`` int (row of the first bar within
    its symbol's rows in ``frame``); ``in_split`` (L,) bool, False for the ``is_context`` bars that a
    val/test window borrows from the previous split (score only targets where it is True). The
    default DataLoader collate works.

    ``frame`` is a canonical frame (or a split part of one), or `RowBlocks` over shared arrays (what
    `load_data` passes: the memory-mapped cache); items slice those arrays when asked for, and the
    dataset keeps only a few numbers per unbroken stretch of rows, never one per window.

    Windows never cross symbols. For frames from `split`, the target bars (after the look-back)
    of every window lie outside the ``is_context`` rows. ``gaps`` decides what a time jump larger
    than ``max_gap`` (a multiple of the symbol's modal bar interval, or a Timedelta such as
    ``"3D"``) means: ``"ignore"`` (the default, because overnight, lunch and weekend breaks are
    normal for market data, e.g. intraday A-shares), ``"split"`` (no window crosses one) or
    ``"error"``. ``short`` decides what a symbol without any window means: ``"error"`` or
    ``"drop"`` (left out, with a notice in ``self.notices``).

    Without ``max_samples`` the items are every window in order (shuffle with the DataLoader or a
    DistributedSampler). With it, each epoch's items are the first ``max_samples`` of the
    permutation ``numpy.random.default_rng((seed, epoch)).permutation(n_windows)``; call
    ``set_epoch`` before each epoch (before the DataLoader starts its workers).
    """

    def __init__(
        self,
        frame: pd.DataFrame | RowBlocks,
        *,
        lookback: int,
        predict: int,
        clip: float = 5.0,  # z-scores are clipped to +-clip, as the reference does
        stride: int = 1,  # rows between consecutive window starts
        max_samples: int | None = None,  # windows per epoch; None: all, in order
        seed: int = 0,
        gaps: str = "ignore",  # "ignore" | "split" | "error"
        max_gap: float | str | pd.Timedelta = 1.5,  # x modal interval, or a Timedelta
        short: str = "error",  # "error" | "drop": a symbol without a single window
    ) -> None:
        if lookback < 1 or predict < 0 or stride < 1 or clip <= 0:
            raise ValueError(f"lookback={lookback}, predict={predict}, stride={stride}, clip={clip}: need "
                             "lookback >= 1, predict >= 0, stride >= 1, clip > 0.")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples={max_samples}: use None (every window) or a positive count.")
        if gaps not in ("ignore", "split", "error") or short not in ("error", "drop"):
            raise ValueError(f"gaps={gaps!r}, short={short!r}: gaps is 'ignore', 'split' or 'error'; "
                             "short is 'error' or 'drop'.")
        if isinstance(frame, RowBlocks):
            blocks = frame
            where = f"WindowDataset (split '{blocks.split}')" if blocks.split else "WindowDataset"
        else:
            require_canonical(frame, "WindowDataset")
            where = f"WindowDataset (split '{frame.attrs['split']}')" if "split" in frame.attrs else "WindowDataset"
            blocks = RowBlocks.of_frame(frame, where)
        self.lookback, self.predict, self.clip = lookback, predict, float(clip)
        self.window = lookback + predict + 1
        self.max_samples, self.seed, self.epoch = max_samples, seed, 0
        self.notices: list[str] = []
        self._blocks = blocks
        starts, ends, n_context, names = blocks.starts, blocks.ends, blocks.n_context, blocks.names

        seg_lo, seg_hi = _cut_at_gaps(blocks, gaps=gaps, max_gap=max_gap, where=where)
        seg_sym = np.searchsorted(starts, seg_lo, side="right") - 1
        # a window may start in the context rows, but its targets (after the look-back) may not
        lo = np.maximum(seg_lo, (starts + n_context)[seg_sym] - lookback)
        count = np.maximum(0, (seg_hi - self.window - lo) // stride + 1)
        longest = (np.maximum.reduceat(seg_hi - seg_lo, np.searchsorted(seg_sym, np.arange(len(starts))))
                   if gaps == "split" else None)  # per symbol, to explain a symbol left without windows
        self._check_short(np.bincount(seg_sym, weights=count, minlength=len(starts)), names,
                          ends - starts - n_context, n_context, longest, short=short, where=where)

        # windows are numbered segment by segment: window j of a segment starts at lo + stride * j; only
        # these per-segment numbers are kept (a per-window table would cost 16 bytes a window)
        self._stride = stride
        self._seg_lo, self._seg_count, self._seg_sym = lo, count, seg_sym
        self._seg_end = np.cumsum(count)
        self.symbols = names
        self._order: np.ndarray | None = None
        self.set_epoch(0)

    def _check_short(self, per_symbol: np.ndarray, names: list[str], bars: np.ndarray, n_context: np.ndarray,
                     longest: np.ndarray | None, *, short: str, where: str) -> None:
        empty = np.flatnonzero(per_symbol == 0)
        if not len(empty):
            return

        def describe(k: int) -> str:
            extra = f" + {n_context[k]} context" if n_context[k] else ""
            stretch = f", longest unbroken stretch {longest[k]}" if longest is not None else ""
            return f"'{names[k]}' ({bars[k]} bars{extra}{stretch})"

        listing = ", ".join(describe(k) for k in empty[:SHOW])
        if len(empty) == len(names) or short == "error":
            fixes = ["lower lookback/predict", "supply more history"]
            fixes += ["use gaps='ignore'"] if longest is not None else []
            fixes += ["pass short='drop' to leave them out"] if len(empty) < len(names) else []
            raise DataError(f"{where}: {len(empty)} of {len(names)} symbol(s) too short for one window: "
                            f"{listing}; {_need(self.lookback, self.predict)}. To fix: {', or '.join(fixes)}.")
        notify(self.notices, f"{where}: left out {len(empty)} symbol(s) too short for one window: {listing}.")

    @property
    def n_windows(self) -> int:
        """Every window the frame holds (``len(self)`` is smaller under ``max_samples``)."""
        return int(self._seg_end[-1]) if len(self._seg_end) else 0

    def _window_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First row (in the blocks' arrays) and symbol of windows ``ids``."""
        seg = np.searchsorted(self._seg_end, ids, side="right")
        first = self._seg_end[seg] - self._seg_count[seg]
        return self._seg_lo[seg] + self._stride * (ids - first), self._seg_sym[seg]

    def set_epoch(self, epoch: int) -> None:
        """Choose this epoch's windows (only matters with ``max_samples``)."""
        self.epoch = int(epoch)
        if self.max_samples is not None:
            rng = np.random.default_rng((self.seed, self.epoch))
            self._order = rng.permutation(self.n_windows)[: self.max_samples].copy()  # free the rest

    def __len__(self) -> int:
        return self.n_windows if self._order is None else len(self._order)

    def every_window(self) -> WindowDataset:
        """The same windows without the per-epoch sample of ``max_samples``: item i is window i, for all of them
        (a token cache encodes each window once)."""
        whole = copy.copy(self)
        whole.max_samples, whole._order = None, None
        return whole

    def _window_id(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} items")
        index %= len(self)
        return int(index if self._order is None else self._order[index])

    def __getitem__(self, index: int) -> dict[str, object]:
        j = self._window_id(index)
        rows, syms = self._window_rows(np.array([j]))
        start, k = int(rows[0]), int(syms[0])
        blocks = self._blocks
        span = slice(start, start + self.window)
        x, mean, std = _normalize_windows(blocks.features(span), self.lookback, self.clip)
        offset = start - int(blocks.starts[k])  # position within the symbol's rows of this split
        return {
            "x": torch.from_numpy(x.astype(np.float32)),
            "stamp": torch.from_numpy(blocks.stamps[span].astype(np.float32)),
            "mean": torch.from_numpy(mean.astype(np.float32)),
            "std": torch.from_numpy(std.astype(np.float32)),
            "symbol": self.symbols[k],
            "start": offset,
            "in_split": torch.arange(self.window) >= int(blocks.n_context[k]) - offset,
        }

    def window_array(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Normalised windows as one float32 array (N, L, 6), for codebook statistics.

        ``indices`` are item indices (default: all of this epoch's items; mind the memory:
        N * L * 6 * 4 bytes).
        """
        items = np.arange(len(self)) if indices is None else np.asarray(indices, np.int64) % max(len(self), 1)
        starts, _ = self._window_rows(items if self._order is None else self._order[items])
        rows = starts[:, None] + np.arange(self.window)  # (N, L)
        return _normalize_windows(self._blocks.features(rows), self.lookback, self.clip)[0].astype(np.float32)
