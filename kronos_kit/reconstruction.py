"""How well the tokenizer reconstructs candles, and whether it is fit for phase 2.

* per-channel reconstruction errors of the s1-only and full decoders -> :func:`reconstruction_report`
* the gate before phase 2                                            -> :func:`reconstruction_gate`
* one window through the tokenizer, and what each s1 code looks like -> :func:`reconstruct_window`,
  :func:`code_profile` (for plots and widgets)

``batches`` are anything `kronos_kit.data.loop_batches` takes (a window dataset or batches); the
tokenizer runs in eval mode under no_grad (`kronos_kit.runtime.inference`), its mode and device
restored afterwards.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from kronos_kit.codebook import CodebookStats
from kronos_kit.config import DEFAULT_MAX_FULL_MSE, DEFAULT_MIN_S1_USAGE, GateConfig
from kronos_kit.data.batches import loop_batches, unpack_batch
from kronos_kit.data.schema import FEATURE_COLUMNS, NORM_EPS, PRICE_COLUMNS, denormalize
from kronos_kit.runs import JsonFile, json_float
from kronos_kit.runtime import inference

__all__ = [
    "ALL_SYMBOLS",
    "DECODERS",
    "ChannelErrors",
    "ReconstructionReport",
    "reconstruction_report",
    "GateResult",
    "TokenizerGateError",
    "reconstruction_gate",
    "WindowReconstruction",
    "reconstruct_window",
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
        )


def _window_sums(x: torch.Tensor, recon: torch.Tensor, scale: torch.Tensor | None) -> np.ndarray:
    """(B, 4, C) per-window sums of squared / absolute error, normalized and in price space."""
    # float64 where the device has it (MPS does not); the sums run over one window only
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    err = (recon.float() - x.float()).to(dtype)
    sums = [err.pow(2).sum(1), err.abs().sum(1)]
    if scale is not None:
        # de-normalized error: denormalize(recon) - denormalize(x) = err * scale, scale = std + NORM_EPS
        perr = err * scale.to(dtype)[:, None, :]
        sums += [perr.pow(2).sum(1), perr.abs().sum(1)]
    else:
        sums += [torch.zeros_like(sums[0])] * 2
    return torch.stack(sums, dim=1).cpu().double().numpy()


def reconstruction_report(
    tokenizer: Any,
    batches: Iterable[Any],
    *,
    device: str | torch.device | None = "cpu",
    max_batches: int | None = None,
    progress: bool = True,
    features: Sequence[str] = FEATURE_COLUMNS,
) -> ReconstructionReport:
    """Per-channel MSE/MAE of the s1-only (``z_pre``) and full (``z``) reconstructions.

    Errors are measured against the tokenizer's own input (z-scored and clipped windows) and, when
    batches carry ``mean``/``std``, again after de-normalizing both sides.  The tokenizer runs in
    eval mode under ``no_grad`` (mode and device restored afterwards).
    """
    c = len(features)
    overall = {d: _ErrorSums(c) for d in DECODERS}
    per_symbol: dict[str, dict[str, _ErrorSums]] = {}
    n_windows = 0
    with inference(tokenizer, device=device) as dev:
        for batch in loop_batches(batches, max_batches=max_batches, progress=progress, desc="reconstruction"):
            x, mean, std, symbols = unpack_batch(batch)
            x = x.to(dev, torch.float32)
            if x.shape[-1] != c:
                raise ValueError(f"batch has {x.shape[-1]} channels but {c} feature names were given")
            # index, not .reconstructions: any tokenizer with the reference return ((z_pre, z), bsq, quantized, idx)
            recon = dict(zip(DECODERS, tokenizer(x)[0]))
            scale = (std.to(dev, torch.float32) + NORM_EPS) if std is not None else None
            b, t = x.shape[:2]
            n_windows += b
            if symbols is not None:
                names, inv = np.unique(np.asarray(symbols, dtype=object).astype(str), return_inverse=True)
            for dec, r in recon.items():
                if r.shape != x.shape:
                    raise ValueError(f"{dec} reconstruction has shape {tuple(r.shape)}, input {tuple(x.shape)}")
                w = _window_sums(x, r, scale)  # (B, 4, C)
                overall[dec].add(b * t, w.sum(0), scale is not None)
                if symbols is None:
                    continue
                # group the windows of the batch by symbol without a loop over windows
                g = np.zeros((len(names), *w.shape[1:]))
                np.add.at(g, inv, w)
                n_per = np.bincount(inv, minlength=len(names)) * t
                for j, name in enumerate(names):
                    acc = per_symbol.setdefault(name, {d: _ErrorSums(c) for d in DECODERS})[dec]
                    acc.add(int(n_per[j]), g[j], scale is not None)
    return ReconstructionReport(
        features=list(features),
        n_windows=n_windows,
        overall={d: a.result() for d, a in overall.items()},
        per_symbol={s: {d: a.result() for d, a in by.items()} for s, by in sorted(per_symbol.items())},
    )


# --------------------------------------------------------------------------------------------
# the gate before phase 2
# --------------------------------------------------------------------------------------------


class TokenizerGateError(RuntimeError):
    """Raised by :meth:`GateResult.raise_if_failed` when the tokenizer failed the gate."""


@dataclass
class GateResult(JsonFile):
    """Outcome of :func:`reconstruction_gate`; JSON-serialisable with :meth:`save` / :meth:`load`."""

    passed: bool
    metrics: dict[str, float | None]
    thresholds: dict[str, float | None]
    reasons: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "metrics": {k: json_float(v) if v is not None else None for k, v in self.metrics.items()},
            "thresholds": dict(self.thresholds),
            "reasons": list(self.reasons),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateResult:
        return cls(bool(d["passed"]), dict(d["metrics"]), dict(d["thresholds"]), list(d.get("reasons", [])))

    def summary(self) -> str:
        if self.passed:
            return "Tokenizer gate passed."
        return "Tokenizer gate FAILED: " + "; ".join(self.reasons) + "."

    def checks(self) -> list[str]:
        """One short line per active check: the number, its threshold and ok / FAIL
        (e.g. ``full_mse 0.0412 <= 0.5 ok``)."""
        lines = []
        for key, limit in self.thresholds.items():
            upper = key.startswith("max_")
            metric = key if key in self.metrics else key[4:]  # min_bit_balance is its own metric's name
            value = self.metrics.get(metric)
            if limit is None or value is None:
                continue
            ok = math.isfinite(value) and (value <= limit if upper else value >= limit)
            lines.append(f"{metric} {value:.4g} {'<=' if upper else '>='} {limit:.4g} {'ok' if ok else 'FAIL'}")
        return lines

    def report(self) -> str:
        """The summary, then every check with its number against its threshold, one per line."""
        return "\n".join([self.summary(), *(f"  {line}" for line in self.checks())])

    def raise_if_failed(self, *, override: bool = False) -> None:
        """Stop the pipeline on a failed gate, unless ``override`` (then only warn)."""
        if self.passed:
            return
        if override:
            warnings.warn(self.summary() + " Continuing because the gate was overridden.", stacklevel=2)
            return
        raise TokenizerGateError(self.summary() + " Pass override=True to continue anyway.")


def reconstruction_gate(
    report: ReconstructionReport,
    stats: CodebookStats | None,
    config: GateConfig | None = None,
    *,
    max_full_mse: float | None = DEFAULT_MAX_FULL_MSE,
    min_s1_usage: float | None = DEFAULT_MIN_S1_USAGE,
    min_s2_usage: float | None = 0.05,
    max_full_to_s1_mse_ratio: float | None = 1.0,
    min_bit_balance: float | None = 0.01,
) -> GateResult:
    """Decide whether the tokenizer is healthy enough for phase 2.  ``None`` disables a check.

    Defaults, and why:

    * ``max_full_mse=0.5``: inputs are z-scored per window, so predicting each window's mean already
      gives a normalized MSE near 1; above 0.5 the full decoder explains less than half the variance,
      which means the tokenizer is broken rather than merely imperfect.
    * ``min_s1_usage=0.2``: the paper reaches 97.66% on its corpus; a small adaptation set cannot be
      expected to visit every coarse code, but fewer than a fifth of them means the coarse codebook
      (the predictor's vocabulary) has collapsed.
    * ``min_s2_usage=0.05``: the same for the fine codebook (paper 85.25%), looser because fine codes
      are spread thinner.
    * ``max_full_to_s1_mse_ratio=1.0``: the fine bits must not make the reconstruction worse than the
      coarse bits alone.
    * ``min_bit_balance=0.01``: a bit that is (almost) always 0 or always 1 wastes half the vocabulary;
      the check is on ``min(p, 1 - p)`` over all bits.

    With ``stats=None`` the codebook checks are skipped (their metrics are None). A ``config``
    (the run's ``cfg.gate``) supplies ``max_full_mse`` and ``min_s1_usage``.
    """
    if config is not None:
        max_full_mse, min_s1_usage = config.max_full_mse, config.min_s1_usage
    thresholds = {
        "max_full_mse": max_full_mse,
        "min_s1_usage": min_s1_usage,
        "min_s2_usage": min_s2_usage,
        "max_full_to_s1_mse_ratio": max_full_to_s1_mse_ratio,
        "min_bit_balance": min_bit_balance,
    }
    full_mse, s1_mse = report.full_mse, report.s1_mse
    ratio = full_mse / s1_mse if s1_mse > 0 else (1.0 if full_mse == 0 else float("inf"))
    metrics: dict[str, float | None] = {
        "full_mse": full_mse,
        "s1_mse": s1_mse,
        "full_to_s1_mse_ratio": ratio,
        "s1_usage": stats.s1.usage if stats is not None else None,
        "s2_usage": stats.s2.usage if stats is not None else None,
        "min_bit_balance": (
            float(min(min(p, 1 - p) for p in stats.bit_balance)) if stats is not None and stats.n_tokens else None
        ),
    }
    reasons: list[str] = []

    def _check(metric: str, limit: float | None, upper: bool, label: str) -> None:
        value = metrics[metric]
        if limit is None or value is None:
            return
        if not math.isfinite(value):
            reasons.append(f"{label} is {value} (not finite)")
        elif (value > limit) if upper else (value < limit):
            bound = "maximum" if upper else "minimum"
            reasons.append(f"{label} {value:.4g} is {'above' if upper else 'below'} the {bound} {limit:.4g}")

    _check("full_mse", max_full_mse, True, "full-decoder normalized MSE")
    _check("full_to_s1_mse_ratio", max_full_to_s1_mse_ratio, True, "full / s1-only MSE ratio")
    _check("s1_usage", min_s1_usage, False, "s1 codebook usage")
    _check("s2_usage", min_s2_usage, False, "s2 codebook usage")
    _check("min_bit_balance", min_bit_balance, False, "least balanced bit's min(P(1), P(0))")
    return GateResult(passed=not reasons, metrics=metrics, thresholds=thresholds, reasons=reasons)


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
    )


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
    """Count s1 codes and average the normalized input features of the bars that carry each code."""
    k1 = 2**tokenizer.s1_bits
    sums = torch.zeros(k1, len(features), dtype=torch.float64)
    counts = torch.zeros(k1, dtype=torch.int64)
    with inference(tokenizer, device=device) as dev:
        for batch in loop_batches(batches, max_batches=max_batches, progress=progress, desc="code profile"):
            x = unpack_batch(batch).x.to(dev, torch.float32)
            s1, _ = tokenizer.encode(x, half=True)
            ids = s1.reshape(-1).cpu()
            sums.index_add_(0, ids, x.reshape(-1, x.shape[-1]).cpu().double())
            counts += torch.bincount(ids, minlength=k1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (sums / counts[:, None].double()).numpy()  # NaN rows for unused codes
    return CodeProfile(tokenizer.s1_bits, counts.numpy(), mean, list(features))
