"""One copy of the data per machine: the canonical arrays of a validated source, written once per data
hash as ``.npy`` files and memory-mapped by every process that loads it (torchrun ranks, notebooks).

A cache entry is a folder ``<cache_dir>/data-<key>/`` holding ``timestamps.npy`` (int64 ns),
``offsets.npy`` (symbol k's rows are ``offsets[k]:offsets[k + 1]``), one ``<column>.npy`` per
feature, ``stamps.npy`` (the calendar features, uint8) and ``meta.json`` (symbols, zone, notices,
key, source, and each array's dtype, shape and a CRC-32 of up to 64 blocks spread through it). The key
hashes the source's bytes (every file `load_ohlcv` would read, by name and content: `source_sha256`), the
loader options and the format, so a changed file gives a new key: its entry is built afresh and the stale
one for the same source removed.
An entry is used only when its meta.json names this key and every array has the dtype, shape and checksum
recorded there; anything else (another dataset's entry copied or linked in, swapped or retyped
arrays, a damaged file) is rebuilt with a warning. A cache folder that cannot be written (read-only, a full
disk) leaves nothing behind and the data is loaded into memory, with a warning.

A feature is stored as float32 only where that is exact (every value survives float32 -> float64 unchanged,
e.g. whole-number volumes below 2**24); prices and amounts written with decimals stay float64, so a cached
load gives bit-identical windows.

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
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from kronos_kit.atomic import _alive as process_alive

from .load import Validated, _expand, canonical_frame, load_validated
from .schema import CONTEXT_COLUMN, FEATURE_COLUMNS, DataNotice, nanoseconds, time_features
from .windows import RowBlocks, SplitRows

FORMAT = 2  # bump when the layout or any derived array changes: old entries then miss and are rebuilt
FEATURE_DTYPES = ("float64", "float32")  # what `_compact` keeps a feature as
ARRAY_DTYPES = {"timestamps": "int64", "offsets": "int64", "stamps": "uint8"}
CHECKED_BLOCKS, CHECKED_BLOCK = 64, 1 << 16  # what an entry's checksums cover (`_crc32`): 4 MiB of each array
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
    source_sha256: str | None = None  # the source's bytes (`source_sha256`): what a run records it read

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
    def _arrays(self) -> dict[str, np.ndarray]:
        return {"timestamps": self.timestamps, "offsets": self.offsets, "stamps": self.stamps, **self.features}

    def save(self, folder: Path, *, key: str, source: str) -> None:
        """Write the entry into ``folder`` (a fresh folder; `cached_arrays` renames it into place)."""
        folder.mkdir(parents=True)
        arrays = {name: np.ascontiguousarray(values) for name, values in self._arrays().items()}
        for name, values in arrays.items():
            np.save(folder / f"{name}.npy", values, allow_pickle=False)
        meta = {"format": FORMAT, "key": key, "source": source, "source_sha256": self.source_sha256,
                "rows": self.rows, "names": self.names, "tz": _zone_text(self.tz), "notices": self.notices,
                "warned": self.warned, "arrays": {name: _described(values) for name, values in arrays.items()}}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: its presence marks a whole entry

    @classmethod
    def open(cls, folder: Path, *, key: str) -> MarketArrays:
        """Memory-map the cache entry of ``key`` (read-only); `CacheEntryError` naming what is wrong when it holds
        other data, is incomplete or damaged (`_check_meta`, `_check_array`)."""
        meta = _check_meta(folder, key)
        arrays = {}
        for name, expected in meta["arrays"].items():
            try:
                arrays[name] = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                raise CacheEntryError(f"{name}.npy does not load ({type(err).__name__}: {err})") from None
            _check_array(name, arrays[name], expected, meta["rows"], len(meta["names"]))
        if int(arrays["offsets"][-1]) != meta["rows"] or (np.diff(arrays["offsets"]) < 0).any():
            raise CacheEntryError("offsets.npy does not cut the rows into the symbols")
        return cls(list(meta["names"]), arrays["offsets"], arrays["timestamps"], meta["tz"],
                   {c: arrays[c] for c in FEATURE_COLUMNS}, arrays["stamps"], list(meta["notices"]),
                   list(meta["warned"]), folder, meta["source_sha256"])


class CacheEntryError(ValueError):
    """A cache entry that is not this source's, or is incomplete or damaged: it is rebuilt."""


def _described(values: np.ndarray) -> dict[str, object]:
    return {"dtype": str(values.dtype), "shape": list(values.shape), "crc32": _crc32(values)}


def _crc32(values: np.ndarray) -> int:
    """CRC-32 of an array's bytes: all of them up to `CHECKED_BLOCKS` blocks of `CHECKED_BLOCK` bytes, else of
    that many blocks spread evenly from the first byte to the last. Opening an entry stays a few page reads
    (nothing else of a memory map is read until a window needs it), and an array swapped, rewritten or cut short
    is caught; bytes changed between the blocks of a large array are not."""
    raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    if len(raw) <= CHECKED_BLOCKS * CHECKED_BLOCK:
        return zlib.crc32(raw)
    crc = 0
    for start in np.linspace(0, len(raw) - CHECKED_BLOCK, CHECKED_BLOCKS).astype(np.int64):
        crc = zlib.crc32(raw[start:start + CHECKED_BLOCK], crc)
    return crc


def _check_meta(folder: Path, key: str) -> dict[str, object]:
    """meta.json of an entry, checked: this format and key, every array described, a known zone."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CacheEntryError(f"meta.json does not read ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict):
        raise CacheEntryError(f"meta.json holds a {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise CacheEntryError(f"cache format {meta.get('format')!r}, expected {FORMAT}")
    if meta.get("key") != key:  # the key hashes the bytes and options; the path may differ (a moved file)
        raise CacheEntryError(f"it holds other data or options ({meta.get('source')!r}, key {meta.get('key')!r})")
    wanted = {"timestamps", "offsets", "stamps", *FEATURE_COLUMNS}
    arrays = meta.get("arrays")
    if not isinstance(arrays, dict) or set(arrays) != wanted or not all(isinstance(a, dict) for a in arrays.values()):
        raise CacheEntryError(f"meta.json does not describe the arrays {sorted(wanted)}")
    kinds = {"rows": int, "names": list, "notices": list, "warned": list}
    if any(not isinstance(meta.get(k), t) for k, t in kinds.items()) or not isinstance(meta.get("source_sha256"), str):
        raise CacheEntryError(f"meta.json lacks or mistypes one of {sorted([*kinds, 'source_sha256'])}")
    try:
        meta["tz"] = _zone(meta.get("tz"))
    except Exception as err:  # noqa: BLE001 (pytz, zoneinfo and dateutil each raise their own)
        raise CacheEntryError(f"meta.json names an unknown time zone {meta.get('tz')!r} ({err})") from None
    return meta


def _check_array(name: str, values: np.ndarray, expected: dict[str, object], rows: int, symbols: int) -> None:
    """One array of an entry: the dtype it must have, the shape and checksum meta.json recorded for it."""
    dtypes = FEATURE_DTYPES if name in FEATURE_COLUMNS else (ARRAY_DTYPES[name],)
    shape = (symbols + 1,) if name == "offsets" else (rows, 5) if name == "stamps" else (rows,)
    if str(values.dtype) not in dtypes or str(values.dtype) != expected.get("dtype"):
        raise CacheEntryError(f"{name}.npy holds {values.dtype}, expected {expected.get('dtype')} (one of {dtypes})")
    if values.shape != shape or list(shape) != expected.get("shape"):
        raise CacheEntryError(f"{name}.npy has shape {values.shape}, expected {shape}")
    if _crc32(values) != expected.get("crc32"):
        raise CacheEntryError(f"{name}.npy does not hold the values written there (checksum differs)")


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


def source_sha256(source: str) -> str:
    """sha256 of the data a load reads: every file `load_ohlcv` would read, by name, size and bytes, in its
    order (a sample: its name and the version of the package it ships in). What a run records it read."""
    h = hashlib.sha256()
    if source.startswith("sample:"):
        h.update(f"{source}|arch {metadata.version('arch')}".encode())
        return h.hexdigest()
    for path in _expand(source):  # the same errors as the loader for a bad path
        h.update(f"{path.name}|{path.stat().st_size}|".encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def source_key(source: str, *, symbol: str | None, fill: str | None, columns: dict[str, str] | None,
               content: str | None = None, use_adj_close: bool = False) -> str:
    """sha256 of what a load reads and how: the source's bytes (``content``, else `source_sha256`), the loader
    options (the adjusted close only when asked for, so the keys of other loads stay as they were) and the cache
    format."""
    options = {"format": FORMAT, "symbol": symbol, "fill": fill, "columns": columns, "numpy": np.__version__,
               "pandas": pd.__version__, "content": content or source_sha256(source),
               **({"use_adj_close": True} if use_adj_close else {})}
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()


@contextmanager
def _locked(handle) -> Iterator[None]:
    """An exclusive lock on an open file beside the entries: one process builds, the others wait."""
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
            meta = json.loads((entry / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("source") == source and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)  # processes still mapping it keep their pages


def cached_arrays(source: str, cache_dir: str | Path | None, *, symbol: str | None = None, fill: str | None = None,
                  columns: dict[str, str] | None = None, use_adj_close: bool = False) -> MarketArrays:
    """The validated arrays of ``source`` (a file, folder or ``sample:NAME``), memory-mapped from the
    cache entry for its current bytes, built first when there is none (or it is not this source's, or damaged).

    ``cache_dir=None`` loads into memory without a cache, and so does a cache folder that cannot be written
    (read-only, a full disk: a warning; nothing half written is left). Building validates exactly as
    `load_ohlcv` (the same `DataError`s; nothing is written for refused data) and warns its notices; a load
    from the cache warns the same notices again. Concurrent processes (torchrun ranks) build once: the first
    takes a lock and the others wait for the entry.
    """
    from .samples import load_sample  # samples import the loader; imported here to keep the layers apart

    content = source_sha256(source)

    def load() -> MarketArrays:
        if source.startswith("sample:"):
            arrays = MarketArrays.from_frame(load_sample(source.removeprefix("sample:")))
        else:
            arrays = MarketArrays.from_validated(load_validated(source, symbol=symbol, fill=fill, columns=columns,
                                                                use_adj_close=use_adj_close))
        return dataclasses.replace(arrays, source_sha256=content)

    if cache_dir is None:
        return _build(load)
    cache_dir = Path(cache_dir)
    key = source_key(source, symbol=symbol, fill=fill, columns=columns, content=content, use_adj_close=use_adj_close)
    entry = cache_dir / f"data-{key[:32]}"
    label = json.dumps({"source": source, "symbol": symbol, "fill": fill, "columns": columns,
                        **({"use_adj_close": True} if use_adj_close else {})}, sort_keys=True)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        handle = (cache_dir / f"data-{key[:32]}.lock").open("a")
    except OSError as err:  # a read-only cache folder: an entry there is still good to read
        arrays = _open_entry(entry, key, quiet=True)
        return arrays if arrays is not None else _unwritable(cache_dir, err, _build(load))
    with handle, _locked(handle):
        arrays = _open_entry(entry, key)
        if arrays is not None:
            return arrays
        arrays = _build(load)
        try:
            _write_entry(arrays, cache_dir, entry, key, label)
        except OSError as err:
            return _unwritable(cache_dir, err, arrays)
    return MarketArrays.open(entry, key=key)


def _open_entry(entry: Path, key: str, *, quiet: bool = False) -> MarketArrays | None:
    """The entry's arrays (its notices warned again), or None when there is none or it cannot be used (a warning
    names why unless ``quiet``; a link, even to a good entry, is not used: an entry is a folder of its own)."""
    if not (entry.is_symlink() or (entry / "meta.json").is_file()):
        return None
    try:
        if entry.is_symlink():
            raise CacheEntryError(f"it is a link to {os.readlink(entry)}, not an entry of its own")
        arrays = MarketArrays.open(entry, key=key)
    except CacheEntryError as exc:
        if not quiet:
            warnings.warn(f"data cache {entry} is damaged or not this data's ({exc}); rebuilding it", RuntimeWarning,
                          stacklevel=3)
        return None
    for message in arrays.warned:
        warnings.warn(message, DataNotice, stacklevel=3)
    return arrays


def _write_entry(arrays: MarketArrays, cache_dir: Path, entry: Path, key: str, label: str) -> None:
    """Write ``arrays`` as the entry (a temporary folder renamed into place; removed whatever fails), replacing
    what was there, then drop the same source's stale entries and temporaries of processes that are gone."""
    tmp = cache_dir / f".{entry.name}.{os.getpid()}.tmp"
    try:
        for leftover in [tmp, *cache_dir.glob(f".{entry.name}.*.tmp")]:
            pid = leftover.name.rsplit(".", 2)[-2]
            if leftover == tmp or (pid.isdigit() and not process_alive(int(pid))):
                shutil.rmtree(leftover, ignore_errors=True)
        if entry.is_symlink() or entry.is_file():
            entry.unlink()
        shutil.rmtree(entry, ignore_errors=True)
        arrays.save(tmp, key=key, source=label)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune_stale(cache_dir, label, entry)


def _unwritable(cache_dir: Path, err: OSError, arrays: MarketArrays) -> MarketArrays:
    """``arrays`` (in memory), with a warning that the cache folder could not take them."""
    warnings.warn(f"data cache {cache_dir} cannot be written ({err.strerror or err}); the data is loaded into "
                  "memory instead (one copy per process). Point cache_dir at a writable folder with free space to "
                  "share one copy", RuntimeWarning, stacklevel=3)
    return arrays
