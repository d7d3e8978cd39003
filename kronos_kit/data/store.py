"""One copy of the data per machine: the canonical arrays of a validated source, written once per data
hash as ``.npy`` files and memory-mapped by every process that loads it (torchrun ranks, notebooks).

A cache entry is a folder ``<cache_dir>/data-<key>/`` holding ``timestamps.npy`` (int64 ns),
``offsets.npy`` (symbol k's rows are ``offsets[k]:offsets[k + 1]``), one ``<column>.npy`` per
feature, ``stamps.npy`` (the calendar features, uint8) and ``meta.json`` (symbols, zone, notices,
key). The key hashes the source's bytes (every file `load_ohlcv` would read, by name and content),
the loader options and the format, so a changed file gives a new key: its entry is built afresh and
the stale one for the same source removed. A feature is stored as float32 only where that is exact
(every value survives float32 -> float64 unchanged, e.g. whole-number volumes below 2**24); prices
and amounts written with decimals stay float64, so a cached load gives bit-identical windows.

The page cache holds one copy of the mapped files however many processes read them; windows slice
the maps (`RowBlocks`), and split frames for evaluation are built from them only when asked for.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from .load import Validated, _expand, canonical_frame, load_validated
from .schema import CONTEXT_COLUMN, FEATURE_COLUMNS, DataNotice, nanoseconds, time_features
from .windows import RowBlocks, SplitRows

FORMAT = 1  # bump when the layout or any derived array changes: old entries then miss and are rebuilt
_STAMP_CHUNK = 1 << 21  # rows per calendar-feature pass (bounds the temporaries at market scale)


@dataclass(frozen=True)
class MarketArrays:
    """A validated source as arrays: read-only memory maps of a cache entry, or in-memory arrays."""

    names: list[str]  # symbols, sorted
    offsets: np.ndarray  # (S + 1,) int64: symbol k's rows are offsets[k]:offsets[k + 1]
    timestamps: np.ndarray  # (N,) int64 ns, UTC instants when zoned
    tz: object  # the times' zone; None when naive
    features: dict[str, np.ndarray]  # FEATURE_COLUMNS -> (N,) float64, or float32 where exact
    stamps: np.ndarray  # (N, 5) uint8 calendar features (TIME_FEATURE_COLUMNS)
    notices: list[str]  # what the loader filled, sorted or repaired (the frame's attrs["notices"])
    warned: list[str]  # the notices loading warned about, warned again on every load from the cache
    folder: Path | None = None  # the cache entry, None in memory

    @property
    def rows(self) -> int:
        return len(self.timestamps)

    @classmethod
    def from_validated(cls, data: Validated, warned: list[str] | None = None) -> MarketArrays:
        offsets = np.searchsorted(data.codes, np.arange(len(data.names) + 1)).astype(np.int64)
        return cls(list(data.names), offsets, data.timestamps, data.tz,
                   {c: _compact(data.values[c]) for c in FEATURE_COLUMNS},
                   calendar_stamps(data.timestamps, data.tz), list(data.notices), list(warned or []))

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, warned: list[str] | None = None) -> MarketArrays:
        """The arrays of a canonical frame from `load_ohlcv` (or `load_sample`)."""
        names, codes = np.unique(frame["symbol"].to_numpy(dtype=object).astype(str), return_inverse=True)
        ts = frame["timestamps"]
        data = Validated(codes.astype(np.int64), [str(n) for n in names], nanoseconds(ts),
                         getattr(ts.dt, "tz", None), {c: frame[c].to_numpy(np.float64) for c in FEATURE_COLUMNS},
                         list(frame.attrs.get("notices", [])))
        return cls.from_validated(data, warned)

    def codes(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Symbol index of each row (of row numbers ``rows``)."""
        if rows is None:
            return np.repeat(np.arange(len(self.names)), np.diff(self.offsets))
        return np.searchsorted(self.offsets, rows, side="right") - 1

    def frame(self, rows: np.ndarray | None = None) -> pd.DataFrame:
        """The canonical long frame (as `load_ohlcv` returns it) of all rows or of row numbers ``rows``."""
        take = slice(None) if rows is None else rows
        data = Validated(self.codes(rows), self.names, np.asarray(self.timestamps[take]), self.tz,
                         {c: np.asarray(v[take], dtype=np.float64) for c, v in self.features.items()}, self.notices)
        return canonical_frame(data)

    def split_frame(self, part: SplitRows, lookback: int) -> pd.DataFrame:
        """The frame `split` returns for ``part``: its rows, ``is_context``, and its attrs."""
        rows, context = _split_positions(self.offsets, part)
        frame = self.frame(rows)
        frame[CONTEXT_COLUMN] = context
        frame.attrs = {"notices": list(part.notices), "split": part.name, "lookback": lookback}
        return frame

    def blocks(self, part: SplitRows) -> RowBlocks:
        """``part``'s rows as `WindowDataset` reads them: blocks of these arrays, nothing copied."""
        kept = np.flatnonzero(part.kept)
        starts = self.offsets[kept] + part.lo[kept]
        return RowBlocks(tuple(self.features[c] for c in FEATURE_COLUMNS), self.stamps, self.timestamps, self.tz,
                         starts, self.offsets[kept] + part.hi[kept], (part.first - part.lo)[kept],
                         [self.names[k] for k in kept], part.name)

    # ------------------------------------------------------------------ disk
    def save(self, folder: Path, *, key: str, source: str) -> None:
        """Write the entry into ``folder`` (a fresh folder; `cached_arrays` renames it into place)."""
        folder.mkdir(parents=True)
        arrays = {"timestamps": self.timestamps, "offsets": self.offsets, "stamps": self.stamps, **self.features}
        for name, values in arrays.items():
            np.save(folder / f"{name}.npy", np.ascontiguousarray(values), allow_pickle=False)
        meta = {"format": FORMAT, "key": key, "source": source, "rows": self.rows, "names": self.names,
                "tz": _zone_text(self.tz), "notices": self.notices, "warned": self.warned,
                "dtypes": {c: str(v.dtype) for c, v in self.features.items()}}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: its presence marks a whole entry

    @classmethod
    def open(cls, folder: Path) -> MarketArrays:
        """Memory-map a cache entry (read-only); ValueError / OSError when it is incomplete or damaged."""
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{folder}: cache format {meta.get('format')}, expected {FORMAT}")

        def load(name: str) -> np.ndarray:
            return np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)

        arrays = cls(list(meta["names"]), load("offsets"), load("timestamps"), _zone(meta["tz"]),
                     {c: load(c) for c in FEATURE_COLUMNS}, load("stamps"), list(meta["notices"]),
                     list(meta["warned"]), folder)
        n = meta["rows"]
        lengths = {len(arrays.timestamps), len(arrays.stamps), *(len(v) for v in arrays.features.values())}
        if lengths != {n} or len(arrays.offsets) != len(arrays.names) + 1 or int(arrays.offsets[-1]) != n:
            raise ValueError(f"{folder}: arrays disagree with meta.json ({n} rows)")
        return arrays


def _zone_text(tz: object) -> str | None:
    """A zone as text for meta.json: its name, or ``UTC+<seconds>`` for a fixed offset."""
    if tz is None:
        return None
    if isinstance(tz, datetime.timezone):
        return f"offset:{tz.utcoffset(None).total_seconds():.0f}"
    return str(tz)


def _zone(text: str | None) -> object:
    if text is None or not text.startswith("offset:"):
        return text if text is None else pd.Timestamp(0, tz=text).tz
    return datetime.timezone(datetime.timedelta(seconds=int(text.removeprefix("offset:"))))


def _compact(values: np.ndarray) -> np.ndarray:
    """float32 when every value survives the round trip exactly, else the float64 values."""
    small = values.astype(np.float32)
    return small if np.array_equal(small.astype(np.float64), values) else values


def calendar_stamps(timestamps: np.ndarray, tz: object) -> np.ndarray:
    """`time_features` of int64-ns ``timestamps`` (local wall clock when zoned) as (N, 5) uint8."""
    out = np.empty((len(timestamps), 5), np.uint8)
    for a in range(0, len(timestamps), _STAMP_CHUNK):
        times = pd.DatetimeIndex(np.asarray(timestamps[a:a + _STAMP_CHUNK]).view("datetime64[ns]"))
        if tz is not None:
            times = times.tz_localize("UTC").tz_convert(tz)
        out[a:a + _STAMP_CHUNK] = time_features(times).to_numpy(np.uint8)
    return out


def _split_positions(offsets: np.ndarray, part: SplitRows) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of a split part (symbol by symbol, in time order) and which are context rows."""
    kept = np.flatnonzero(part.kept)
    lo, hi, first = part.lo[kept], part.hi[kept], part.first[kept]
    sizes = hi - lo
    within = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    rows = np.repeat(offsets[kept] + lo, sizes) + within
    return rows, within < np.repeat(first - lo, sizes)


# --------------------------------------------------------------------------------------------
# the cache


def source_key(source: str, *, symbol: str | None, fill: str | None, columns: dict[str, str] | None,
               use_adj_close: bool = False) -> str:
    """sha256 of what a load reads and how: every file's name and bytes (a sample: its name and the
    version of the package it ships in), the loader options and the cache format."""
    options = {"format": FORMAT, "symbol": symbol, "fill": fill, "columns": columns, "numpy": np.__version__,
               "pandas": pd.__version__, **({"use_adj_close": True} if use_adj_close else {})}  # old keys unchanged
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    if source.startswith("sample:"):
        h.update(f"{source}|arch {metadata.version('arch')}".encode())
        return h.hexdigest()
    for path in _expand(source):  # the files load_ohlcv reads, in its order (same errors for a bad path)
        h.update(f"{path.name}|{path.stat().st_size}|".encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (a file beside the entries): one process builds, the others wait."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(load) -> MarketArrays:
    """Load with the loader's own warnings shown, and keep which notices it warned about."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataNotice)
        arrays = load()
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    warned = [str(w.message) for w in caught if issubclass(w.category, DataNotice)]
    return dataclasses.replace(arrays, warned=warned) if warned else arrays


def _prune_stale(cache_dir: Path, source: str, keep: Path) -> None:
    """Remove entries of the same source under another key (the data changed since they were written)."""
    for entry in cache_dir.glob("data-*"):
        if entry == keep or not (entry / "meta.json").is_file():
            continue
        try:
            stale = json.loads((entry / "meta.json").read_text()).get("source") == source
        except (OSError, ValueError):
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)  # processes still mapping it keep their pages


def cached_arrays(source: str, cache_dir: str | Path | None, *, symbol: str | None = None, fill: str | None = None,
                  columns: dict[str, str] | None = None, use_adj_close: bool = False) -> MarketArrays:
    """The validated arrays of ``source`` (a file, folder or ``sample:NAME``), memory-mapped from the
    cache entry for its current bytes, built first when there is none (or it is damaged).

    ``cache_dir=None`` loads into memory without a cache. Building validates exactly as `load_ohlcv`
    (the same `DataError`s; nothing is written for refused data) and warns its notices; a load from
    the cache warns the same notices again. Concurrent processes (torchrun ranks) build once: the
    first takes a lock and the others wait for the entry.
    """
    from .samples import load_sample  # samples import the loader; imported here to keep the layers apart

    def load() -> MarketArrays:
        if source.startswith("sample:"):
            return MarketArrays.from_frame(load_sample(source.removeprefix("sample:")))
        return MarketArrays.from_validated(load_validated(source, symbol=symbol, fill=fill, columns=columns,
                                                          use_adj_close=use_adj_close))

    if cache_dir is None:
        return _build(load)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = source_key(source, symbol=symbol, fill=fill, columns=columns, use_adj_close=use_adj_close)
    entry = cache_dir / f"data-{key[:32]}"
    label = json.dumps({"source": source, "symbol": symbol, "fill": fill, "columns": columns,
                        **({"use_adj_close": True} if use_adj_close else {})}, sort_keys=True)
    with _locked(cache_dir / f"data-{key[:32]}.lock"):
        if (entry / "meta.json").is_file():
            try:
                arrays = MarketArrays.open(entry)
            except (OSError, ValueError) as exc:
                warnings.warn(f"data cache {entry} is damaged ({exc}); rebuilding it", RuntimeWarning, stacklevel=2)
            else:
                for message in arrays.warned:
                    warnings.warn(message, DataNotice, stacklevel=2)
                return arrays
        arrays = _build(load)
        tmp = cache_dir / f".{entry.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(entry, ignore_errors=True)
        arrays.save(tmp, key=key, source=label)
        os.replace(tmp, entry)
        _prune_stale(cache_dir, label, entry)
    return MarketArrays.open(entry)
