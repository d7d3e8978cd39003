"""How well the tokenizer reconstructs candles.

* per-channel reconstruction errors of the s1-only and full decoders, per-window errors and the
  full decoder's errors in return units (bp of the previous close)    -> :func:`reconstruction_report`
* one window through the tokenizer, the windows it reconstructs worst, and what each s1 code looks
  like -> :func:`reconstruct_window`, :func:`worst_windows`, :func:`code_profile` (plots, widgets)

Whether the tokenizer is fit for phase 2 (the gate) is decided from these reports in `kronos_kit.gate`.
``batches`` are anything `kronos_kit.data.loop_batches` takes (a window dataset or batches); the
tokenizer runs in eval mode under no_grad (`kronos_kit.runtime.inference`), its mode and device
restored afterwards. Errors count a window's in-split bars only (`kronos_kit.data.in_split_mask`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from kronos_kit.data.batches import in_split_mask, loop_batches, unpack_batch
from kronos_kit.data.schema import FEATURE_COLUMNS, PRICE_COLUMNS, denormalize, norm_scale
from kronos_kit.runs import JsonFile, json_float
from kronos_kit.runtime import inference

__all__ = [
    "ALL_SYMBOLS",
    "DECODERS",
    "RETURN_CHANNELS",
    "ChannelErrors",
    "ReconstructionReport",
    "WindowErrors",
    "reconstruction_report",
    "WindowReconstruction",
    "reconstruct_window",
    "WorstWindow",
    "worst_windows",
    "CodeProfile",
    "code_profile",
]


# --------------------------------------------------------------------------------------------
# reconstruction quality
# --------------------------------------------------------------------------------------------

DECODERS: tuple[str, ...] = ("s1", "full")
_METRICS: tuple[str, ...] = ("mse", "mae", "price_mse", "price_mae")
ALL_SYMBOLS = "(all)"


@dataclass
class ChannelErrors:
    """Per-channel reconstruction errors of one decoder over ``n_bars`` bars.

    ``mse``/``mae`` are in the tokenizer's normalized (z-scored, clipped) space; ``price_mse``/
    ``price_mae`` after de-normalization (`kronos_kit.data.denormalize`) back to prices and volumes,
    None when the batches carried no ``mean``/``std``.
    """

    n_bars: int
    mse: list[float]
    mae: list[float]
    price_mse: list[float] | None = None
    price_mae: list[float] | None = None

    def metric(self, name: str) -> np.ndarray | None:
        if name not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, not {name!r}")
        v = getattr(self, name)
        return None if v is None else np.asarray(v, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("n_bars", *_METRICS)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChannelErrors:
        return cls(**{k: d.get(k) for k in ("n_bars", *_METRICS)})


class _ErrorSums:
    """float64 running sums behind :class:`ChannelErrors`."""

    def __init__(self, c: int) -> None:
        self.n = 0
        self.sums = np.zeros((4, c))  # sse, sae, price sse, price sae
        self.has_price = True

    def add(self, n: int, sums: np.ndarray, has_price: bool) -> None:
        self.n += n
        self.sums += sums
        self.has_price &= has_price

    def result(self) -> ChannelErrors:
        mean = self.sums / max(self.n, 1)
        price = self.has_price and self.n > 0
        return ChannelErrors(
            n_bars=self.n,
            mse=mean[0].tolist(),
            mae=mean[1].tolist(),
            price_mse=mean[2].tolist() if price else None,
            price_mae=mean[3].tolist() if price else None,
        )


@dataclass
class ReconstructionReport(JsonFile):
    """Reconstruction errors of the s1-only decoder (``z_pre``) and the full decoder (``z``).

    ``overall[decoder]`` covers every bar; ``per_symbol[symbol][decoder]`` each symbol (empty when
    batches carry no ``symbol``).  Price-space errors of different symbols have different units, so
    compare them per symbol; the overall price numbers are dominated by the highest-priced ones.
    """

    features: list[str]
    n_windows: int
    overall: dict[str, ChannelErrors]
    per_symbol: dict[str, dict[str, ChannelErrors]] = field(default_factory=dict)
    windows: WindowErrors | None = None  # per-window errors of the full decoder, in input order
    returns: dict[str, float] | None = None  # full decoder in return units: <channel>_error_bp, median_move_bp

    def error_to_move(self, channel: str = "close") -> float | None:
        """Mean absolute ``channel`` error over the median absolute bar-to-bar close move, both in bp of
        the previous close (None without prices): 1.0 means the error is as large as a typical move."""
        if self.returns is None:
            return None
        move = self.returns["median_move_bp"]
        return self.returns[f"{channel}_error_bp"] / move if move > 0 else float("inf")

    def errors(self, decoder: str = "full", symbol: str | None = None) -> ChannelErrors:
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}")
        return (self.overall if symbol is None else self.per_symbol[symbol])[decoder]

    def mean_mse(self, decoder: str = "full") -> float:
        """Normalized MSE averaged over channels (the number the gate checks)."""
        return float(np.mean(self.overall[decoder].mse))

    @property
    def full_mse(self) -> float:
        return self.mean_mse("full")

    @property
    def s1_mse(self) -> float:
        return self.mean_mse("s1")

    def to_frame(self, *, per_symbol: bool = True, volume_prices: bool = True) -> pd.DataFrame:
        """Long summary table: rows (symbol, decoder, metric), columns the channels plus ``mean``.

        ``symbol`` is ``"(all)"`` for the overall rows.  ``mean`` is left NaN for price-space rows,
        where averaging prices with volumes would mix units. ``volume_prices=False`` leaves volume and
        amount out of the price-space rows (NaN): their squared errors in raw units (1e20 and more
        for amounts) dwarf the prices' and make the table unreadable; their normalized rows remain.
        """
        rows = []
        groups: list[tuple[str, dict[str, ChannelErrors]]] = [(ALL_SYMBOLS, self.overall)]
        if per_symbol:
            groups += sorted(self.per_symbol.items())
        for sym, by_dec in groups:
            for dec in DECODERS:
                ce = by_dec[dec]
                for m in _METRICS:
                    v = ce.metric(m)
                    if v is None:
                        continue
                    row = {"symbol": sym, "decoder": dec, "metric": m, "n_bars": ce.n_bars}
                    row.update(zip(self.features, v.tolist()))
                    row["mean"] = float(v.mean()) if not m.startswith("price") else float("nan")
                    if m.startswith("price") and not volume_prices:
                        row.update({c: float("nan") for c in self.features if c not in PRICE_COLUMNS})
                    rows.append(row)
        return pd.DataFrame(rows).set_index(["symbol", "decoder", "metric"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "n_windows": self.n_windows,
            "overall": {k: v.to_dict() for k, v in self.overall.items()},
            "per_symbol": {s: {k: v.to_dict() for k, v in d.items()} for s, d in self.per_symbol.items()},
            "windows": self.windows.to_dict() if self.windows is not None else None,
            "returns": dict(self.returns) if self.returns is not None else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReconstructionReport:
        return cls(
            features=list(d["features"]),
            n_windows=int(d["n_windows"]),
            overall={k: ChannelErrors.from_dict(v) for k, v in d["overall"].items()},
            per_symbol={
                s: {k: ChannelErrors.from_dict(v) for k, v in dd.items()} for s, dd in d.get("per_symbol", {}).items()
            },
            windows=WindowErrors.from_dict(d["windows"]) if d.get("windows") else None,
            returns=d.get("returns"),
        )


def _window_sums(x: torch.Tensor, recon: torch.Tensor, scale: torch.Tensor | None, keep: torch.Tensor) -> np.ndarray:
    """(B, 4, C) per-window sums of squared / absolute error over the in-split bars (``keep`` (B, L)),
    normalized and in price space."""
    # float64 where the device has it (MPS does not); the sums run over one window only
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    err = (recon.float() - x.float()).to(dtype) * keep[..., None].to(dtype)
    sums = [err.pow(2).sum(1), err.abs().sum(1)]
    if scale is not None:
        # de-normalized error: denormalize(recon) - denormalize(x) = err * scale, scale = norm_scale(mean, std)
        perr = err * scale.to(dtype)[:, None, :]
        sums += [perr.pow(2).sum(1), perr.abs().sum(1)]
    else:
        sums += [torch.zeros_like(sums[0])] * 2
    return torch.stack(sums, dim=1).cpu().double().numpy()


RETURN_CHANNELS: tuple[str, ...] = ("close", "high", "low")  # errors measured in return units
BP = 1e4  # basis points per unit of return


@dataclass
class WindowErrors:
    """Per-window reconstruction errors of the full decoder, one entry per window in input order.

    ``full_mse``: normalized MSE over the window's in-split bars (what the gate pairs against the base
    tokenizer). ``close_bp`` / ``high_bp`` / ``low_bp``: the mean absolute error of the reconstructed
    close / high / low in basis points of the previous bar's close, ``|x_hat_t - x_t| / close_{t-1}``:
    for the close this is exactly the error in the bar's return ``close_t / close_{t-1} - 1``, the quantity
    phase 2 has to predict. Over in-split bars with a previous bar in the window; NaN without one, None
    without ``mean``/``std`` (no prices).
    """

    n_bars: list[int]
    full_mse: list[float]
    close_bp: list[float] | None = None
    high_bp: list[float] | None = None
    low_bp: list[float] | None = None
    symbol: list[str] | None = None
    start: list[int] | None = None

    def __len__(self) -> int:
        return len(self.full_mse)

    def array(self, name: str) -> np.ndarray:
        v = getattr(self, name)
        if v is None:
            raise ValueError(f"no per-window {name}: the batches carried no mean/std, so there are no prices")
        return np.asarray(v, dtype=np.float64)

    def worst(self, k: int, by: str = "close_bp", *, spacing: int | None = None) -> np.ndarray:
        """Positions of the ``k`` windows with the largest ``by`` error, worst first (NaN never).

        Neighbouring windows share most of their bars, so the worst few would be one event seen ``k``
        times: a window is skipped when it starts fewer than ``spacing`` bars (default: half a window)
        from one already picked of the same symbol. ``spacing=0`` takes the plain ranking."""
        v = self.array(by)
        order = [int(i) for i in np.argsort(-np.nan_to_num(v, nan=-np.inf), kind="stable") if np.isfinite(v[i])]
        if spacing is None:
            spacing = max(self.n_bars, default=0) // 2
        if not spacing or self.start is None:
            return np.asarray(order[:k], dtype=int)
        symbols = self.symbol or [""] * len(v)
        picked: list[int] = []
        for i in order:
            if len(picked) == k:
                break
            if all(symbols[j] != symbols[i] or abs(self.start[j] - self.start[i]) >= spacing for j in picked):
                picked.append(i)
        return np.asarray(picked, dtype=int)

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_list(getattr(self, k)) for k in ("n_bars", "full_mse", "close_bp", "high_bp", "low_bp",
                                                            "symbol", "start")}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WindowErrors:
        floats = {k: None if d.get(k) is None else [math.nan if v is None else float(v) for v in d[k]]
                  for k in ("full_mse", "close_bp", "high_bp", "low_bp")}
        return cls(n_bars=list(d["n_bars"]), symbol=d.get("symbol"), start=d.get("start"), **floats)


def _json_list(values: list[Any] | None) -> list[Any] | None:
    if values is None:
        return None
    return [json_float(v) if isinstance(v, float) else v for v in values]


class _ReturnErrors:
    """Running pieces of the return-unit errors: per-window means, pooled sums and every bar's move."""

    def __init__(self) -> None:
        self.window_means: list[np.ndarray] = []  # (B, 3) per batch: close, high, low
        self.sums = np.zeros(3)
        self.count = 0
        self.moves: list[np.ndarray] = []

    def add(self, x: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
            keep: torch.Tensor, features: Sequence[str]) -> None:
        idx = [features.index(c) for c in RETURN_CHANNELS]
        shift, scale = mean.double()[:, None, idx], scale.double()[:, None, idx]
        true = x.double()[..., idx] * scale + shift  # (B, L, 3) prices
        fit = recon.double()[..., idx] * scale + shift
        prev = true[:, :-1, 0].abs()  # the previous bar's close
        valid = keep[:, 1:] & (prev > 0)  # bar t in the split; its previous bar may be context
        err = (fit[:, 1:] - true[:, 1:]).abs() / prev.clamp_min(1e-300)[..., None] * BP  # (B, L-1, 3)
        err = err * valid[..., None]
        n = valid.sum(1)  # (B,)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.window_means.append((err.sum(1) / n[:, None]).cpu().numpy())
        self.sums += err.sum((0, 1)).cpu().numpy()
        self.count += int(n.sum())
        move = (true[:, 1:, 0] - true[:, :-1, 0]).abs() / prev.clamp_min(1e-300) * BP
        self.moves.append(move[valid].cpu().numpy())

    def summary(self) -> dict[str, float] | None:
        if not self.count:
            return None
        mean = self.sums / self.count
        return {**{f"{c}_error_bp": float(v) for c, v in zip(RETURN_CHANNELS, mean)},
                "median_move_bp": float(np.median(np.concatenate(self.moves))), "n_bars": self.count}


@dataclass
class _Accumulator:
    """Everything `reconstruction_report` collects in its one pass over the batches."""

    c: int
    overall: dict[str, _ErrorSums] = field(default_factory=dict)
    per_symbol: dict[str, dict[str, _ErrorSums]] = field(default_factory=dict)
    n_windows: int = 0
    window_n: list[np.ndarray] = field(default_factory=list)
    window_mse: list[np.ndarray] = field(default_factory=list)
    symbols: list[str] | None = field(default_factory=list)
    starts: list[int] | None = field(default_factory=list)
    returns: _ReturnErrors | None = field(default_factory=_ReturnErrors)

    def __post_init__(self) -> None:
        self.overall = {d: _ErrorSums(self.c) for d in DECODERS}

    def add_sums(self, dec: str, w: np.ndarray, n: np.ndarray, symbols: list[str] | None, has_price: bool) -> None:
        self.overall[dec].add(int(n.sum()), w.sum(0), has_price)
        if symbols is None:
            return
        # group the windows of the batch by symbol without a loop over windows
        names, inv = np.unique(np.asarray(symbols, dtype=object).astype(str), return_inverse=True)
        g = np.zeros((len(names), *w.shape[1:]))
        np.add.at(g, inv, w)
        n_per = np.bincount(inv, weights=n, minlength=len(names))
        for j, name in enumerate(names):
            acc = self.per_symbol.setdefault(name, {d: _ErrorSums(self.c) for d in DECODERS})[dec]
            acc.add(int(n_per[j]), g[j], has_price)

    def windows(self) -> WindowErrors:
        n = np.concatenate(self.window_n) if self.window_n else np.zeros(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mse = np.concatenate(self.window_mse) / (n * self.c) if self.window_n else np.zeros(0)
        means = np.concatenate(self.returns.window_means) if self.returns and self.returns.window_means else None
        cols = {c: None if means is None else means[:, i].tolist() for i, c in enumerate(("close_bp", "high_bp",
                                                                                          "low_bp"))}
        return WindowErrors(n_bars=n.astype(int).tolist(), full_mse=mse.tolist(), symbol=self.symbols or None,
                            start=self.starts or None, **cols)


def reconstruction_report(
    tokenizer: Any,
    batches: Iterable[Any],
    *,
    device: str | torch.device | None = "cpu",
    max_batches: int | None = None,
    progress: bool = True,
    features: Sequence[str] = FEATURE_COLUMNS,
) -> ReconstructionReport:
    """Per-channel MSE/MAE of the s1-only (``z_pre``) and full (``z``) reconstructions, per-window errors
    (:class:`WindowErrors`) and the full decoder's errors in return units (:attr:`ReconstructionReport.returns`).

    Errors are measured against the tokenizer's own input (z-scored and clipped windows) and, when
    batches carry ``mean``/``std``, again after de-normalizing both sides; only over each window's
    in-split bars (`kronos_kit.data.in_split_mask`: a validation window's context bars belong to the
    training split). The tokenizer runs in eval mode under ``no_grad`` (mode and device restored).
    """
    acc = _Accumulator(len(features))
    with inference(tokenizer, device=device) as dev:
        for batch in loop_batches(batches, max_batches=max_batches, progress=progress, desc="reconstruction"):
            x, mean, std, symbols = unpack_batch(batch)
            x = x.to(dev, torch.float32)
            if x.shape[-1] != acc.c:
                raise ValueError(f"batch has {x.shape[-1]} channels but {acc.c} feature names were given")
            keep = in_split_mask(batch, x)
            # index, not .reconstructions: any tokenizer with the reference return ((z_pre, z), bsq, quantized, idx)
            recon = dict(zip(DECODERS, tokenizer(x)[0]))
            scale = norm_scale(mean.to(dev, torch.float32), std.to(dev, torch.float32)) if std is not None else None
            n = keep.sum(1).cpu().numpy()
            acc.n_windows += len(x)
            _track_windows(acc, batch, symbols, len(x))
            for dec, r in recon.items():
                if r.shape != x.shape:
                    raise ValueError(f"{dec} reconstruction has shape {tuple(r.shape)}, input {tuple(x.shape)}")
                w = _window_sums(x, r, scale, keep)  # (B, 4, C)
                acc.add_sums(dec, w, n, symbols, scale is not None)
                if dec == "full":
                    acc.window_n.append(n)
                    acc.window_mse.append(w[:, 0].sum(1))
            if scale is None or not set(RETURN_CHANNELS) <= set(features):
                acc.returns = None
            elif acc.returns is not None:
                acc.returns.add(x, recon["full"], mean.to(dev), scale, keep, list(features))
    return ReconstructionReport(
        features=list(features),
        n_windows=acc.n_windows,
        overall={d: a.result() for d, a in acc.overall.items()},
        per_symbol={s: {d: a.result() for d, a in by.items()} for s, by in sorted(acc.per_symbol.items())},
        windows=acc.windows(),
        returns=acc.returns.summary() if acc.returns is not None else None,
    )


def _track_windows(acc: _Accumulator, batch: Any, symbols: list[str] | None, b: int) -> None:
    """Keep each window's symbol and start (None once a batch lacks them)."""
    starts = batch.get("start") if isinstance(batch, Mapping) else None
    if acc.symbols is not None:
        acc.symbols = None if symbols is None else [*acc.symbols, *map(str, symbols)]
    if acc.starts is not None:
        acc.starts = None if starts is None else [*acc.starts, *torch.as_tensor(starts).reshape(-1).tolist()]


# --------------------------------------------------------------------------------------------
# single windows and per-code profiles (for plots and widgets)
# --------------------------------------------------------------------------------------------


@dataclass
class WindowReconstruction:
    """One window, its reconstructions (L, C) and its codes (L,), as numpy arrays."""

    x: np.ndarray
    s1_recon: np.ndarray
    full_recon: np.ndarray
    s1_ids: np.ndarray
    s2_ids: np.ndarray
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    symbol: str | None = None
    start: int | None = None
    in_split: np.ndarray | None = None  # (L,) bool: bars of the window's own split (False: borrowed context)

    def denormalize(self, a: np.ndarray) -> np.ndarray:
        """`kronos_kit.data.denormalize` with this window's mean/std; ``a`` unchanged without them."""
        if self.mean is None or self.std is None:
            return a
        return denormalize(a, self.mean, self.std)


def reconstruct_window(
    tokenizer: Any,
    window: Mapping[str, Any] | torch.Tensor | np.ndarray,
    *,
    device: str | torch.device | None = "cpu",
) -> WindowReconstruction:
    """Run one window (a dataset item or an (L, C) array) through the tokenizer."""
    x, mean, std, symbols = unpack_batch(window if isinstance(window, Mapping) else torch.as_tensor(window))
    with inference(tokenizer, device=device) as dev:
        xd = x[:1].to(dev, torch.float32)
        z_pre, z = tokenizer(xd)[0]  # the reference return order: stand-ins return plain tuples
        s1, s2 = tokenizer.encode(xd, half=True)
    start = window.get("start") if isinstance(window, Mapping) else None
    return WindowReconstruction(
        x=x[0].float().numpy(),
        s1_recon=z_pre[0].float().cpu().numpy(),
        full_recon=z[0].float().cpu().numpy(),
        s1_ids=s1[0].cpu().numpy(),
        s2_ids=s2[0].cpu().numpy(),
        mean=mean[0].float().numpy() if mean is not None else None,
        std=std[0].float().numpy() if std is not None else None,
        symbol=symbols[0] if symbols else None,
        start=int(start) if start is not None else None,
        in_split=in_split_mask(window, x)[0].cpu().numpy() if isinstance(window, Mapping) else None,
    )


@dataclass
class WorstWindow:
    """One of the windows a tokenizer reconstructs worst: its place in the dataset, rank (1 = worst), each
    tokenizer's per-window close error in bp of the previous close, and each one's reconstruction."""

    position: int
    rank: int
    close_bp: dict[str, float]
    reconstructions: dict[str, WindowReconstruction]


def worst_windows(
    reports: Mapping[str, ReconstructionReport],
    tokenizers: Mapping[str, Any],
    dataset: Any,
    *,
    k: int = 6,
    by: str | None = None,
    device: str | torch.device | None = "cpu",
) -> list[WorstWindow]:
    """The ``k`` windows of ``dataset`` with the largest close error of tokenizer ``by`` (default: the last
    one, e.g. ``"after"``), reconstructed by every tokenizer. ``reports[name]`` is
    :func:`reconstruction_report` of ``tokenizers[name]`` on ``dataset``, in order."""
    names = list(tokenizers)
    by = by or names[-1]
    for name in names:
        windows = reports[name].windows
        if windows is None or len(windows) != len(dataset):
            raise ValueError(f"worst_windows: reports[{name!r}] must cover the {len(dataset)} windows of the dataset "
                             "in order (reconstruction_report(tokenizer, dataset))")
    errors = {name: reports[name].windows.array("close_bp") for name in names}
    out = []
    for rank, pos in enumerate(reports[by].windows.worst(k), start=1):
        item = dataset[int(pos)]
        out.append(WorstWindow(int(pos), rank, {n: float(errors[n][pos]) for n in names},
                               {n: reconstruct_window(tokenizers[n], item, device=device) for n in names}))
    return out


@dataclass
class CodeProfile:
    """For each s1 code: how many bars carry it and their mean normalized features (K1, C)."""

    s1_bits: int
    counts: np.ndarray
    mean_features: np.ndarray
    features: list[str] = field(default_factory=lambda: list(FEATURE_COLUMNS))

    @property
    def n_tokens(self) -> int:
        return int(self.counts.sum())

    def mean_ohlc(self, code: int) -> np.ndarray:
        """Mean normalized open, high, low, close of the bars carrying ``code`` (NaN if none)."""
        idx = [self.features.index(f) for f in PRICE_COLUMNS]
        return self.mean_features[code, idx]


def code_profile(
    tokenizer: Any,
    batches: Iterable[Any],
    *,
    device: str | torch.device | None = "cpu",
    max_batches: int | None = None,
    progress: bool = False,
    features: Sequence[str] = FEATURE_COLUMNS,
) -> CodeProfile:
    """Count s1 codes and average the normalized input features of the bars that carry each code
    (in-split bars only)."""
    k1 = 2**tokenizer.s1_bits
    sums = torch.zeros(k1, len(features), dtype=torch.float64)
    counts = torch.zeros(k1, dtype=torch.int64)
    with inference(tokenizer, device=device) as dev:
        for batch in loop_batches(batches, max_batches=max_batches, progress=progress, desc="code profile"):
            x = unpack_batch(batch).x.to(dev, torch.float32)
            s1, _ = tokenizer.encode(x, half=True)
            keep = in_split_mask(batch, x)
            ids = s1[keep].cpu()
            sums.index_add_(0, ids, x[keep].cpu().double())
            counts += torch.bincount(ids, minlength=k1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (sums / counts[:, None].double()).numpy()  # NaN rows for unused codes
    return CodeProfile(tokenizer.s1_bits, counts.numpy(), mean, list(features))
