"""Loading and validation: CSV / Parquet files, folders, lists of files or a DataFrame into the
canonical long frame, refusing bad data with a `DataError` that names the file, column and rows."""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
from pandas._libs.parsers import STR_NA_VALUES  # pandas' default missing-value markers of read_csv

from .schema import FEATURE_COLUMNS, PRICE_COLUMNS, SHOW, DataError, fill_amount, nanoseconds, notify

_ALIASES = {
    "timestamps": ("timestamps", "timestamp", "datetime", "date", "time"),
    "open": ("open",),
    "high": ("high",),
    "low": ("low",),
    "close": ("close",),
    "volume": ("volume", "vol"),
    "amount": ("amount", "amt", "turnover"),
    "symbol": ("symbol", "ticker", "code", "instrument"),
    "adj_close": ("adj close", "adjclose", "adjusted close"),
}
_ALIAS_OF = {alias: canon for canon, names in _ALIASES.items() for alias in names}
_REQUIRED = ("timestamps", *PRICE_COLUMNS)
_CSV_SUFFIXES = (".csv", ".csv.gz", ".txt")
_PARQUET_SUFFIXES = (".parquet", ".pq")


# --------------------------------------------------------------------------------------------
# where rows came from, so an error can point at the file and line


@dataclass
class _Origin:
    labels: list[str]  # per source: file name or "DataFrame"
    csv: list[bool]  # per source: numbers are CSV line numbers (header = line 1), else 1-based rows
    src: np.ndarray  # (N,) source index of each row
    row: np.ndarray  # (N,) row number of each row in its source

    def take(self, index: np.ndarray) -> _Origin:
        return _Origin(self.labels, self.csv, self.src[index], self.row[index])

    def cite(self, pos: int, many: bool) -> str:
        s = int(self.src[pos])
        where = f"{self.labels[s]} " if many else ""
        return f"{where}{'line' if self.csv[s] else 'row'} {int(self.row[pos])}"


MAX_ABS_VALUE = 1e15  # largest |value| of a price, volume or amount the kit accepts

def _rows_error(
    origin: _Origin,
    bad: np.ndarray,
    *,
    column: str,
    problem: str,
    fix: str,
    detail: Callable[[np.ndarray], list[str]] | None = None,
) -> DataError:
    """A `DataError` quoting the first offending rows in source order, with the total count."""
    pos = np.flatnonzero(bad) if bad.dtype == bool else np.asarray(bad)
    first = pos[np.lexsort((origin.row[pos], origin.src[pos]))[:SHOW]]
    sources = sorted({int(s) for s in origin.src[pos]})
    many = len(sources) > 1
    where = ", ".join(origin.labels[s] for s in sources[:3]) + (" and others" if len(sources) > 3 else "")
    kinds = {origin.csv[s] for s in sources}
    unit = (
        "CSV line numbers, header = line 1"
        if kinds == {True}
        else "1-based data rows"
        if kinds == {False}
        else "line = CSV line (header = line 1), row = 1-based data row"
    )
    notes = detail(first) if detail is not None else [""] * len(first)
    cites = ", ".join(origin.cite(p, many) + (f" ({d})" if d else "") for p, d in zip(first, notes))
    n = len(pos)
    return DataError(
        f"{where}: column '{column}' {problem} in {n} row{'s' if n != 1 else ''}; "
        f"first {len(first)} ({unit}): {cites}. {fix}"
    )


def _values(**cols: np.ndarray) -> Callable[[np.ndarray], list[str]]:
    """Detail callback quoting the named columns' values at each offending row."""
    return lambda pos: [", ".join(f"{k}={v[p]:.6g}" for k, v in cols.items()) for p in pos]


# --------------------------------------------------------------------------------------------
# loading


def _norm_name(name: object) -> str:
    return re.sub(r"[\s_.\-]+", " ", str(name).strip().lower())


def _file_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(_CSV_SUFFIXES):
        return "csv"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    return None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _CSV_SUFFIXES + _PARQUET_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _expand(source: str | PathLike | Sequence[str | PathLike]) -> list[Path]:
    items = [source] if isinstance(source, (str, PathLike)) else list(source)
    if not items:
        raise DataError("load_ohlcv got an empty list of files; pass at least one CSV or Parquet path.")
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and _file_kind(p))
            if not found:
                raise DataError(
                    f"{path}: folder holds no .csv or .parquet files; put one file per instrument there."
                )
            files.extend(found)
        elif not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder; pass a CSV or Parquet path, "
                                    "a folder of them, a list of files or a DataFrame.")
        elif _file_kind(path) is None:
            raise DataError(f"{path.name}: unsupported file type; use .csv (.csv.gz, .txt) or .parquet.")
        else:
            files.append(path)
    return files


def _csv_dialect(path: Path) -> tuple[str, str]:
    """(separator, decimal mark) of a CSV, told from its first lines: commas unless the header has none and splits
    on `;`, a tab or `|` (then a decimal comma when the numbers are written 1,5 rather than 1.5)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", errors="replace") as f:
            head = [f.readline() for _ in range(6)]
    except OSError:
        return ",", "."
    if "," in head[0]:
        return ",", "."
    for sep in (";", "\t", "|"):
        if sep in head[0]:
            body = "".join(head[1:])
            decimal = "," if re.search(r"\d,\d", body) and not re.search(r"\d\.\d", body) else "."
            return sep, decimal
    return ",", "."


def _read(path: Path, columns: Mapping[str, str] | None,
          notices: list[str]) -> tuple[pd.DataFrame, np.ndarray, bool]:
    """Read one file; return the frame, each row's number in the file, and whether it is a CSV."""
    try:
        if _file_kind(path) == "parquet":
            raw = pd.read_parquet(path)
            return raw, np.arange(1, len(raw) + 1), False
        sep, decimal = _csv_dialect(path)
        if sep != ",":
            names = {";": "';'", "\t": "tab", "|": "'|'"}
            notify(notices, f"{path.name}: read as {names[sep]}-separated"
                            f"{' with decimal commas' if decimal == ',' else ''} (its header has no commas).")
        header = pd.read_csv(path, nrows=0, sep=sep).columns
        # keep blank lines as empty rows so row numbers stay CSV line numbers, then drop them
        raw = pd.read_csv(path, skip_blank_lines=False, sep=sep, decimal=decimal, **_symbols_as_text(header, columns))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path.name}: could not be read ({exc}). Expect one header line and "
                        "comma-separated values (CSV) or a Parquet file.") from None
    rows = np.arange(2, len(raw) + 2)
    blank = raw.isna().all(axis=1).to_numpy()
    if blank.any():
        raw, rows = raw.loc[~blank], rows[~blank]
    return raw, rows, True


def _symbols_as_text(header: pd.Index, columns: Mapping[str, str] | None) -> dict[str, object]:
    """`read_csv` options that keep symbol columns as written: A-share codes such as 000001 must not become the
    number 1, nor the ticker NA (or NULL, None, NaN) a missing value; only an empty cell is missing there."""
    text = [c for c in header if _ALIAS_OF.get(_norm_name(c)) == "symbol" or (columns or {}).get(c) == "symbol"]
    if not text:
        return {}
    missing = {c: [""] if c in text else sorted(STR_NA_VALUES) for c in header}
    return {"dtype": dict.fromkeys(text, "str"), "keep_default_na": False, "na_values": missing}


def _resolve_columns(raw: pd.DataFrame, label: str, columns: Mapping[str, str] | None) -> dict[str, object]:
    """Map canonical names to the source's columns: the user's mapping first, then known aliases."""
    found: dict[str, object] = {}
    for src, canon in (columns or {}).items():
        if canon not in _ALIASES:
            raise ValueError(f"columns={{{src!r}: {canon!r}}}: target must be one of {sorted(_ALIASES)}")
        if src in raw.columns:
            found[canon] = src
    for col in raw.columns:
        canon = _ALIAS_OF.get(_norm_name(col))
        if canon is None or col in (columns or {}) or found.get(canon) == col:
            continue
        if canon in found:
            if (columns or {}).get(found[canon]) == canon:
                continue  # the user's mapping wins over an alias
            raise DataError(
                f"{label}: columns {found[canon]!r} and {col!r} both look like '{canon}'; keep one, "
                f"or pass columns={{'<the one to use>': '{canon}'}} (combine separate date and time "
                "columns into one first)."
            )
        found[canon] = col
    return found


def _unnamed_dates(raw: pd.DataFrame) -> bool:
    """True when the first column has no name (pandas says ``Unnamed: 0``; a DataFrame index written to
    CSV) and its first rows parse as ISO 8601 dates."""
    if raw.empty or not re.fullmatch(r"(Unnamed: 0|\s*)", str(raw.columns[0])):
        return False
    head = raw.iloc[:20, 0].dropna().astype(str)
    if head.empty or head.str.fullmatch(r"[+-]?\d+(\.\d*)?").all():  # row numbers, not dates
        return False
    return bool(pd.to_datetime(head, format="ISO8601", errors="coerce").notna().all())


def _parse_timestamps(values: pd.Series, origin: _Origin, label: str) -> pd.Series:
    """Parse to datetime64[ns] (naive or one time zone); refuse missing, unparseable or mixed zones."""
    fix_parse = ("Use ISO 8601 text such as 2024-06-18 09:35:00 (or 20240618), or parse them yourself "
                 "(pd.to_datetime(..., format=...), or unit='s' for epoch seconds) and pass a DataFrame.")
    missing = values.isna().to_numpy()
    if missing.any():
        raise _rows_error(origin, missing, column="timestamps", problem="is empty",
                          fix="Remove those rows or fill in their times.")
    if isinstance(values.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(values.dtype):
        return _times_in_range(values, origin, values.dt.tz_localize(None) if values.dt.tz else values)
    if pd.api.types.is_float_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype):
        raise DataError(f"{label}: column 'timestamps' holds numbers, not times. {fix_parse}")
    text = values.astype(str) if pd.api.types.is_integer_dtype(values.dtype) else values  # 20240618
    fix_zone = ("Convert all times to one zone first, e.g. pd.to_datetime(col, utc=True)"
                ".dt.tz_convert('Asia/Shanghai'), and pass the DataFrame.")
    try:
        # ISO 8601 only: guessing day/month order (06/07/2024) could silently give wrong dates
        parsed = pd.to_datetime(text, format="ISO8601", errors="coerce")
    except (ValueError, TypeError) as exc:  # pandas refuses text with different UTC offsets
        zone = text.astype(str).str.extract(r"(Z|[+-]\d\d:?\d\d)\s*$")[0].fillna("no zone").to_numpy()
        if not (zone != zone[0]).any():
            raise DataError(f"{label}: column 'timestamps' could not be parsed ({exc}). {fix_parse}") from None
        raise _rows_error(origin, zone != zone[0], column="timestamps",
                          problem=f"mixes time zones (first row: {zone[0]})",
                          detail=lambda pos: [f"zone {zone[p]}" for p in pos], fix=fix_zone) from None
    bad = parsed.isna().to_numpy()
    if bad.any():
        raw = values.to_numpy()
        # rows that parse once read as UTC failed only for their zone (e.g. Timestamps in two zones)
        zoned = np.zeros_like(bad)
        zoned[bad] = pd.to_datetime(text[bad], format="ISO8601", errors="coerce", utc=True).notna().to_numpy()
        if zoned.any():
            raise _rows_error(origin, zoned, column="timestamps",
                              problem=f"mixes time zones (first row: {raw[0]})",
                              detail=lambda pos: [repr(str(raw[p])) for p in pos], fix=fix_zone)
        raise _rows_error(origin, bad, column="timestamps", problem="cannot be parsed as a time",
                          detail=lambda pos: [repr(str(raw[p])) for p in pos], fix=fix_parse)
    naive = parsed.dt.tz_localize(None) if isinstance(parsed.dtype, pd.DatetimeTZDtype) else parsed
    return _times_in_range(parsed, origin, naive, raw=values)


def _times_in_range(times: pd.Series, origin: _Origin, naive: pd.Series, raw: pd.Series | None = None) -> pd.Series:
    """``times`` in nanoseconds; rows outside what nanoseconds hold (a Parquet or DataFrame time in 2300) are an
    error naming them."""
    outside = ((naive < pd.Timestamp.min) | (naive > pd.Timestamp.max)).to_numpy()
    if outside.any():  # nanosecond times span 1677-09-21 .. 2262-04-11
        shown = (times if raw is None else raw).to_numpy()
        raise _rows_error(origin, outside, column="timestamps", problem="lies outside 1677-09-22 .. 2262-04-11",
                          detail=lambda pos: [repr(str(shown[p])) for p in pos],
                          fix="Times are stored in nanoseconds, which cannot go further; fix or drop those rows.")
    return times.dt.as_unit("ns")


def _parse_numbers(values: pd.Series, origin: _Origin, column: str) -> np.ndarray:
    """Float64 values; text that is not a number is an error (empty cells stay NaN for later)."""
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isnan(numbers) & values.notna().to_numpy()
    if bad.any():
        raw = values.to_numpy()
        raise _rows_error(origin, bad, column=column, problem="holds text that is not a number",
                          detail=lambda pos: [repr(raw[p]) for p in pos],
                          fix="Clean those cells (no thousands separators or units), or leave them empty "
                              "and pass fill='ffill'.")
    return numbers


@dataclass
class _Part:
    """One source after column mapping and parsing, before the checks that span sources."""

    codes: np.ndarray  # (N,) int index into `names`: no per-row Python strings
    names: list[str]  # this source's symbols
    seen: list[str]  # symbols in the source before selecting one
    timestamps: pd.Series
    values: dict[str, np.ndarray]
    origin: _Origin


def _canonical_part(
    raw: pd.DataFrame,
    rows: np.ndarray,
    *,
    label: str,
    csv: bool,
    name: str,
    symbol: str | None,
    may_name: bool,
    columns: Mapping[str, str] | None,
    use_adj_close: bool,
    notices: list[str],
) -> _Part:
    found = _resolve_columns(raw, label, columns)
    if "timestamps" not in found and (
        isinstance(raw.index, pd.DatetimeIndex) or _ALIAS_OF.get(_norm_name(raw.index.name)) == "timestamps"
    ):
        raw = raw.reset_index(names="__index_time__")  # the index holds the times
        found["timestamps"] = "__index_time__"
    elif "timestamps" not in found and _unnamed_dates(raw):
        first = raw.columns[0]
        found["timestamps"] = first
        notify(notices, f"{label}: the unnamed first column holds dates; taken as the timestamps "
                        f"(name it, or pass columns={{'<name>': 'timestamps'}}, to silence this).")
    _require_columns(raw, found, label)
    origin = _Origin([label], [csv], np.zeros(len(raw), np.int32), np.asarray(rows, np.int64))

    # `symbol` names the only unnamed series, else it selects one instrument
    select = symbol
    if "symbol" in found:
        sym = raw[found["symbol"]]
        empty = sym.isna().to_numpy()
        if empty.any():
            raise _rows_error(origin, empty, column=str(found["symbol"]), problem="is empty",
                              fix="Give every row its symbol, or drop the symbol column for one instrument.")
        codes, uniques = pd.factorize(sym.astype(str))
        names = [str(n) for n in uniques]
    else:
        if may_name and symbol is not None:
            name, select = symbol, None
        codes, names = np.zeros(len(raw), np.int64), [name]
    seen = names[:20] if select is not None else []
    if select is not None:  # keep one instrument before checking, so others' problems don't block it
        keep = codes == (names.index(select) if select in names else -1)
        raw, origin = raw.loc[keep], origin.take(np.flatnonzero(keep))
        codes, names = np.zeros(len(raw), np.int64), [select]

    timestamps = _parse_timestamps(raw[found["timestamps"]], origin, label)
    values = {c: _parse_numbers(raw[found[c]], origin, str(found[c]))
              for c in (*PRICE_COLUMNS, "volume", "amount") if c in found}

    values = _adjusted(values, raw, found, origin, label, use_adj_close, notices)
    _fill_volume_amount(values, found, label, notices)
    return _Part(codes, names, seen, timestamps, values, origin)


def _require_columns(raw: pd.DataFrame, found: dict[str, object], label: str) -> None:
    """Refuse a source without the required columns, saying what to do (a separator, a close-only file)."""
    missing = [c for c in _REQUIRED if c not in found]
    if missing and len(raw.columns) == 1 and re.search(r"[;\t|]", str(raw.columns[0])):
        raise DataError(f"{label}: one column named {str(raw.columns[0])!r}: the file is not comma-separated and its "
                        "separator could not be told from the header; save it with commas, or read it with "
                        "pd.read_csv(path, sep=...) and pass the DataFrame.")
    if missing and "close" in found and {"open", "high", "low"} <= set(missing):
        shown = [c for c in raw.columns if c != "__index_time__"]
        raise DataError(
            f"{label}: only a close price (columns found: {shown}). Kronos reads candles: the open, high, low and "
            "close of each bar (and volume), and the kit does not invent highs and lows from closes (a tokenizer "
            "trained on flat candles learns nothing about a bar's range). Build the bars from finer data, e.g. "
            "pandas: bars = ticks.resample('1D', on='timestamp')['price'].ohlc(), or, knowingly, set open = high = "
            "low = close in your file (flat candles) and load that."
        )
    if missing:
        shown = [c for c in raw.columns if c != "__index_time__"]
        raise DataError(
            f"{label}: missing required column(s) {missing}; columns found: {shown}. Accepted names "
            f"(any case): time {list(_ALIASES['timestamps'])}, open, high, low, close, volume "
            f"{list(_ALIASES['volume'])}, amount {list(_ALIASES['amount'])}. Rename them or pass "
            "columns={'<your name>': '<canonical name>'}."
        )


def _adjusted(values: dict[str, np.ndarray], raw: pd.DataFrame, found: dict[str, object], origin: _Origin, label: str,
              use_adj_close: bool, notices: list[str]) -> dict[str, np.ndarray]:
    """The prices scaled by Adj Close / Close (`use_adj_close`), and a notice naming which close is used."""
    if use_adj_close:
        if "adj_close" not in found:
            raise DataError(f"{label}: use_adj_close=True but no 'Adj Close' column; columns found: "
                            f"{list(raw.columns)}. Pass use_adj_close=False or add the column.")
        adj = _parse_numbers(raw[found["adj_close"]], origin, str(found["adj_close"]))
        close = values["close"]
        bad = ~((close > 0) & (adj > 0))
        if bad.any():
            raise _rows_error(origin, bad, column=str(found["adj_close"]),
                              problem="or 'close' is missing or not positive", detail=_values(close=close, adj=adj),
                              fix="Both must be positive to scale the prices by adj/close.")
        factor = adj / close  # one factor per bar scales the whole candle, so its shape is kept
        values = {**values, "open": values["open"] * factor, "high": values["high"] * factor,
                  "low": values["low"] * factor, "close": adj}
        notify(notices, f"{label}: prices adjusted: close = '{found['adj_close']}', open/high/low scaled by "
                        f"{found['adj_close']} / {found['close']} (use_adj_close).")
    elif "adj_close" in found and not np.allclose(
            pd.to_numeric(raw[found["adj_close"]], errors="coerce").to_numpy(np.float64), values["close"],
            rtol=1e-9, atol=0.0, equal_nan=True):  # an Adj Close equal to Close (indices) changes nothing
        notify(notices, f"{label}: the close is the '{found['close']}' column, unadjusted (splits and dividends show "
                        f"as price jumps); '{found['adj_close']}' is there too and is not used. To use it, set "
                        f"data.adj_close: true (load_ohlcv(..., use_adj_close=True)): open, high, low and close are "
                        f"then scaled by {found['adj_close']} / {found['close']}.")
    return values


def _combine(parts: list[_Part]) -> tuple[np.ndarray, list[str], np.ndarray, object, dict[str, np.ndarray], _Origin]:
    zones = {p.origin.labels[0]: getattr(p.timestamps.dt, "tz", None) for p in parts}
    distinct = {str(z) for z in zones.values()}
    if len(distinct) > 1:
        listing = "; ".join(f"{k}: {v or 'no zone'}" for k, v in list(zones.items())[:6])
        raise DataError(f"column 'timestamps' mixes time zones across sources ({listing}). Convert all "
                        "sources to one zone (or all to naive local time) and load again.")
    tz = next(iter(zones.values()))
    # one sorted list of symbols; each part's codes are remapped into it
    names = sorted({n for p in parts for n in p.names})
    where = {n: i for i, n in enumerate(names)}
    codes = np.concatenate([np.array([where[n] for n in p.names], np.int64)[p.codes] for p in parts])
    ts = np.concatenate([nanoseconds(p.timestamps) for p in parts])
    values = {c: np.concatenate([p.values[c] for p in parts]) for c in FEATURE_COLUMNS}
    origin = _Origin(
        [p.origin.labels[0] for p in parts],
        [p.origin.csv[0] for p in parts],
        np.concatenate([np.full(len(p.codes), i, np.int32) for i, p in enumerate(parts)]),
        np.concatenate([p.origin.row for p in parts]),
    )
    return codes, names, ts, tz, values, origin


def load_ohlcv(
    source: str | PathLike | Sequence[str | PathLike] | pd.DataFrame,
    *,
    symbol: str | None = None,
    fill: str | None = None,
    use_adj_close: bool = False,
    repair: str | None = None,
    columns: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Load candles into the canonical long frame, validated.

    Args:
        source: a CSV/Parquet path, a folder or list of such files (one instrument per file unless
            a symbol column says otherwise), or a DataFrame (a DatetimeIndex may hold the times).
        symbol: names the series when the input is one file or DataFrame without a symbol column
            (default: the file stem, or ``"series"`` for a DataFrame); otherwise keeps only that symbol.
        fill: ``None`` (missing or infinite values are errors) or ``"ffill"``: carry the last finite
            value forward within a symbol; a symbol whose first value is missing is still an error.
        use_adj_close: replace close by ``Adj Close`` and scale open/high/low by adj/close.
        repair: ``None`` or ``"clip"``: raise high to max(open, close) and lower low to
            min(open, close) where they violate it (counted in a notice) instead of refusing.
        columns: extra name mapping ``{source column: canonical name}`` for unusual headers.

    Returns:
        columns exactly ``symbol, timestamps, open, high, low, close, volume, amount`` (str,
        datetime64[ns] naive or one zone, float64 x 6), sorted by symbol then time, RangeIndex;
        ``attrs["notices"]`` lists what was filled, sorted or repaired.

    Column names match case-insensitively with aliases (date/datetime/time/timestamp, vol,
    amt/turnover, ticker/code/instrument). ``Adj Close`` is ignored unless ``use_adj_close``.
    Raises `DataError` (a ValueError) naming the source, column and first rows at fault.
    """
    return canonical_frame(load_validated(source, symbol=symbol, fill=fill, use_adj_close=use_adj_close,
                                          repair=repair, columns=columns))


@dataclass
class Validated:
    """A validated source as flat arrays, before any DataFrame is built (what `load_ohlcv` returns as a
    frame and the data cache writes to disk): rows sorted by symbol code then time."""

    codes: np.ndarray  # (N,) int64 index into `names`, non-decreasing
    names: list[str]  # symbols, sorted
    timestamps: np.ndarray  # (N,) int64 nanoseconds (UTC instants when zoned)
    tz: object  # the times' zone, None when naive
    values: dict[str, np.ndarray]  # FEATURE_COLUMNS -> (N,) float64
    notices: list[str]


def load_validated(
    source: str | PathLike | Sequence[str | PathLike] | pd.DataFrame,
    *,
    symbol: str | None = None,
    fill: str | None = None,
    use_adj_close: bool = False,
    repair: str | None = None,
    columns: Mapping[str, str] | None = None,
) -> Validated:
    """`load_ohlcv`'s reading and every check, returning arrays (same arguments, same `DataError`s)."""
    if fill not in (None, "ffill"):
        raise ValueError(f"fill={fill!r}: use None (missing values are errors) or 'ffill'.")
    if repair not in (None, "clip"):
        raise ValueError(f"repair={repair!r}: use None (refuse bad candles) or 'clip'.")
    notices: list[str] = []
    options = dict(symbol=symbol, columns=columns, use_adj_close=use_adj_close, notices=notices)
    if isinstance(source, pd.DataFrame):
        label = "DataFrame"
        parts = [_canonical_part(source, np.arange(1, len(source) + 1), label=label, csv=False,
                                 name="series", may_name=True, **options)]
    else:
        files = _expand(source)
        parts = []
        for path in files:
            raw, rows, csv = _read(path, columns, notices)
            parts.append(_canonical_part(raw, rows, label=path.name, csv=csv, name=_stem(path),
                                         may_name=len(files) == 1, **options))
        label = files[0].name if len(files) == 1 else f"{len(files)} files"
    if sum(len(p.codes) for p in parts) == 0:
        seen = sorted({n for p in parts for n in p.seen})
        raise DataError(f"{label}: no rows{f' for symbol {symbol!r} (symbols found: {seen})' if symbol else ''}"
                        "; check the file is not empty and the symbol is spelled as in the data.")

    codes, names, ts, tz, values, origin = _combine(parts)
    many = len(parts) > 1
    del parts  # the combined arrays hold every row now; at market scale the parts' copies are gigabytes
    codes, ts, values, origin = _sort_by_symbol_time(codes, names, ts, values, origin, label, notices)
    first_of_symbol = np.r_[True, codes[1:] != codes[:-1]]

    _fill_missing(values, first_of_symbol, fill=fill, origin=origin, label=label, notices=notices)
    _check_candles(values, first_of_symbol, ts, repair=repair, origin=origin, label=label, notices=notices,
                   many=many)

    return Validated(codes, names, ts, tz, values, notices)


def canonical_frame(data: Validated) -> pd.DataFrame:
    """The canonical long frame of validated arrays (the columns and dtypes `load_ohlcv` documents)."""
    times = pd.DatetimeIndex(data.timestamps.view("datetime64[ns]"))
    if data.tz is not None:
        times = times.tz_localize("UTC").tz_convert(data.tz)
    frame = pd.DataFrame({
        "symbol": pd.Categorical.from_codes(data.codes, data.names).astype("str"),
        "timestamps": times,
        **{c: data.values[c] for c in FEATURE_COLUMNS},
    })
    frame.attrs["notices"] = list(data.notices)
    return frame


def _fill_missing(values: dict[str, np.ndarray], first_of_symbol: np.ndarray, *, fill: str | None, origin: _Origin,
                  label: str, notices: list[str]) -> None:
    """Refuse NaN/inf feature values, or forward-fill them within their symbol (``fill='ffill'``)."""
    for col in FEATURE_COLUMNS:
        v = values[col]
        bad = ~np.isfinite(v)
        if bad.any() and fill == "ffill":
            # index of the last finite value, reset at each symbol's first row
            src = np.where(~bad | first_of_symbol, np.arange(len(v)), 0)
            filled = v[np.maximum.accumulate(src)]
            still = ~np.isfinite(filled)
            if still.any():
                raise _rows_error(origin, still, column=col, problem="is missing at the start of a symbol",
                                  fix="Forward fill has nothing to copy there; drop those leading rows.")
            notify(notices, f"{label}: column '{col}': {int(bad.sum())} missing or infinite value(s) "
                             "forward-filled within their symbol (fill='ffill').")
            values[col] = v = filled
        elif bad.any():
            raise _rows_error(origin, bad, column=col, problem="is missing (NaN) or infinite",
                              detail=_values(**{col: v}),
                              fix="Fix or drop those rows, or pass fill='ffill' to carry the last value forward.")


def _check_candles(values: dict[str, np.ndarray], first_of_symbol: np.ndarray, ts: np.ndarray, *, repair: str | None,
                   origin: _Origin, label: str, notices: list[str], many: bool) -> None:
    """Positive prices, high/low around open/close (or clipped there), non-negative volumes, unique times."""
    o, h, lo, c = (values[k] for k in PRICE_COLUMNS)
    if repair == "clip":
        top, bottom = np.maximum(o, c), np.minimum(o, c)
        hit = (h < top) | (lo > bottom)
        if hit.any():
            values["high"], values["low"] = h, lo = np.maximum(h, top), np.minimum(lo, bottom)
            notify(notices, f"{label}: repair='clip' moved high/low to the open-close range in "
                             f"{int(hit.sum())} row(s).")
    for col in PRICE_COLUMNS:
        bad = values[col] <= 0
        if bad.any():
            raise _rows_error(origin, bad, column=col, problem="is zero or negative",
                              detail=_values(**{col: values[col]}),
                              fix="Prices must be positive: fix or drop those rows.")
    for col in FEATURE_COLUMNS:  # normalising squares the values: far larger ones overflow to inf / NaN
        bad = np.abs(values[col]) > MAX_ABS_VALUE
        if bad.any():
            raise _rows_error(origin, bad, column=col, problem=f"is above {MAX_ABS_VALUE:.0e}",
                              detail=_values(**{col: values[col]}),
                              fix="Values that large overflow the model's arithmetic: rescale the column (e.g. "
                                  "prices in thousands) or fix those rows.")
    candle = _values(open=o, high=h, low=lo, close=c)
    fix_hl = "Fix the source, or pass repair='clip' to move high/low to the open-close range (reported)."
    if (bad := h < np.maximum(o, c)).any():
        raise _rows_error(origin, bad, column="high", problem="is below max(open, close)", detail=candle,
                          fix=fix_hl)
    if (bad := lo > np.minimum(o, c)).any():
        raise _rows_error(origin, bad, column="low", problem="is above min(open, close)", detail=candle,
                          fix=fix_hl)
    for col in ("volume", "amount"):
        if (bad := values[col] < 0).any():
            raise _rows_error(origin, bad, column=col, problem="is negative",
                              detail=_values(**{col: values[col]}), fix="Volumes and amounts must be >= 0.")
    dup = np.flatnonzero(~first_of_symbol[1:] & (ts[1:] == ts[:-1])) + 1
    if len(dup):
        raise _rows_error(origin, dup, column="timestamps", problem="repeats a time within its symbol",
                          detail=lambda pos: [f"same time as {origin.cite(p - 1, many)}" for p in pos],
                          fix="Keep one row per symbol and time (e.g. drop_duplicates on symbol, timestamps).")


def _fill_volume_amount(values: dict[str, np.ndarray], found: dict[str, object], label: str,
                        notices: list[str]) -> None:
    """Fill volume/amount as the reference KronosPredictor does, and say so."""
    if "volume" not in values:
        values["volume"] = np.zeros(len(values["open"]))
        values["amount"] = np.zeros(len(values["open"]))
        dropped = " (the amount column is discarded, as the reference does)" if "amount" in found else ""
        notify(notices, f"{label}: no volume column; volume and amount set to 0 as the Kronos "
                         f"reference predictor does{dropped}.")
    elif "amount" not in values:
        values["amount"] = fill_amount(values["volume"], *(values[c] for c in PRICE_COLUMNS))
        notify(notices, f"{label}: no amount column; amount = volume * mean(open, high, low, close) "
                         "as the Kronos reference predictor does.")


def _sort_by_symbol_time(codes: np.ndarray, names: list[str], ts: np.ndarray, values: dict[str, np.ndarray],
                         origin: _Origin, label: str, notices: list[str]):
    """Rows sorted by symbol then time (stable), with a notice naming the symbols that were out of order."""
    order = np.lexsort((ts, codes))  # stable: equal times keep their input order
    if np.array_equal(order, np.arange(len(order))):
        return codes, ts, values, origin
    same = codes[order][1:] == codes[order][:-1]
    late = same & (order[1:] < order[:-1])
    if late.any():
        unsorted = [names[k] for k in np.unique(codes[order][1:][late])]
        notify(notices, f"{label}: rows were not in time order for {len(unsorted)} symbol(s) "
                         f"({', '.join(map(str, unsorted[:5]))}); sorted by symbol then time.")
    codes, ts, origin = codes[order], ts[order], origin.take(order)
    values = {c: v[order] for c, v in values.items()}
    return codes, ts, values, origin

