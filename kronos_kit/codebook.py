"""Codebook health and reconstruction diagnostics for the Kronos tokenizer.

The tokenizer quantizes every bar into a coarse index ``s1`` (``s1_bits`` bits) and a fine index
``s2`` (``s2_bits`` bits).  Before phase 2 (predictor finetuning) a researcher wants to know:

* does the tokenizer use its codebook?  -> :class:`CodebookCounter`, :func:`codebook_stats`
* did adaptation change what it uses?   -> :func:`compare_codebooks`
* does it reconstruct candles well, coarse (s1 only) and fine (s1 + s2)?  -> :func:`reconstruction_report`
* is it healthy enough to go on?        -> :func:`reconstruction_gate`

Everything here works on plain tensors; the data layer is never imported.  A *batch* is either a
dict as produced by a ``DataLoader`` over ``kronos_kit.data.WindowDataset`` (keys ``x`` (B, L, 6),
``mean``/``std`` (B, 6), ``symbol`` list of str, ...), a bare ``x`` tensor (B, L, 6), or a
tuple/list whose first element is ``x``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kronos_kit.data.schema import FEATURE_COLUMNS, NORM_EPS

__all__ = [
    "PAPER_S1_USAGE",
    "PAPER_S2_USAGE",
    "FEATURES",
    "DENORM_EPS",
    "CodeStats",
    "CodebookStats",
    "CodebookCounter",
    "codebook_stats",
    "DistributionShift",
    "CodebookComparison",
    "compare_codebooks",
    "total_variation",
    "js_distance",
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
    "iter_batches",
]

#: Coarse (s1) codebook usage the Kronos paper reports on its pretraining corpus.
PAPER_S1_USAGE = 0.9766
#: Fine (s2) codebook usage the Kronos paper reports on its pretraining corpus.
PAPER_S2_USAGE = 0.8525

#: Channel order of the tokenizer input.
FEATURES: tuple[str, ...] = FEATURE_COLUMNS
#: The data layer de-normalizes with ``x * (std + DENORM_EPS) + mean``.
DENORM_EPS = NORM_EPS

# Dense counts are readable in JSON for small vocabularies; the joint vocabulary (2**20 for the
# base model) is written sparsely instead so that a stats file stays small.
_DENSE_JSON_MAX_VOCAB = 4096


# --------------------------------------------------------------------------------------------
# statistics of one vocabulary
# --------------------------------------------------------------------------------------------


class _JsonFile:
    """`save(path)` / `load(path)` for the JSON-serialisable results below (via to_dict / from_dict)."""

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class CodeStats:
    """Usage statistics of one vocabulary (s1, s2 or the joint code) computed from its counts.

    ``usage`` is the share of the ``vocab_size`` codes seen at least once; ``perplexity`` is
    ``exp(H)`` with ``H`` the entropy of the empirical code distribution in nats (``vocab_size``
    for uniform usage, 1 for a single code); ``normalized_entropy`` is ``H / log(vocab_size)``;
    ``top1pct_share`` is the share of tokens taken by the ``top_k = max(1, vocab_size // 100)``
    most frequent codes.
    """

    name: str
    vocab_size: int
    n_tokens: int
    n_used: int
    n_dead: int
    usage: float
    entropy: float
    perplexity: float
    normalized_entropy: float
    top_k: int
    top1pct_share: float
    counts: np.ndarray = field(repr=False, compare=False)

    @classmethod
    def from_counts(cls, counts: np.ndarray | torch.Tensor | Sequence[int], name: str = "") -> CodeStats:
        c = np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.int64)
        if c.ndim != 1 or c.size == 0:
            raise ValueError("counts must be a non-empty 1-D array")
        if (c < 0).any():
            raise ValueError("counts must be non-negative")
        k = int(c.size)
        n = int(c.sum())
        n_used = int((c > 0).sum())
        top_k = max(1, k // 100)
        if n == 0:
            # Nothing counted: no distribution to measure, so report NaN rather than a fake value.
            h = perplexity = norm_h = top_share = float("nan")
        else:
            p = c[c > 0] / n
            h = float(-(p * np.log(p)).sum())
            perplexity = math.exp(h)
            norm_h = h / math.log(k) if k > 1 else 1.0
            # np.partition avoids a full sort of the 1M-bin joint vocabulary.
            top_share = float(np.partition(c, k - top_k)[k - top_k :].sum() / n)
        return cls(
            name=name,
            vocab_size=k,
            n_tokens=n,
            n_used=n_used,
            n_dead=k - n_used,
            usage=n_used / k,
            entropy=h,
            perplexity=perplexity,
            normalized_entropy=norm_h,
            top_k=top_k,
            top1pct_share=top_share,
            counts=c,
        )

    @property
    def dead_codes(self) -> np.ndarray:
        """Codes never seen (sorted)."""
        return np.flatnonzero(self.counts == 0)

    @property
    def used_codes(self) -> np.ndarray:
        """Codes seen at least once (sorted)."""
        return np.flatnonzero(self.counts > 0)

    @property
    def frequencies(self) -> np.ndarray:
        """Empirical distribution over the vocabulary (zeros where nothing was counted)."""
        n = self.counts.sum()
        return self.counts / n if n else np.zeros(self.vocab_size)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "n_tokens": self.n_tokens,
            "n_used": self.n_used,
            "n_dead": self.n_dead,
            "usage": self.usage,
            "entropy": _json_float(self.entropy),
            "perplexity": _json_float(self.perplexity),
            "normalized_entropy": _json_float(self.normalized_entropy),
            "top_k": self.top_k,
            "top1pct_share": _json_float(self.top1pct_share),
        }
        if self.vocab_size <= _DENSE_JSON_MAX_VOCAB:
            d["counts"] = self.counts.tolist()
        else:
            nz = np.flatnonzero(self.counts)
            d["nonzero_codes"] = nz.tolist()
            d["nonzero_counts"] = self.counts[nz].tolist()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CodeStats:
        # The derived numbers are recomputed from the counts, so a file can never be inconsistent.
        if "counts" in d:
            counts = np.asarray(d["counts"], dtype=np.int64)
        else:
            counts = np.zeros(int(d["vocab_size"]), dtype=np.int64)
            counts[np.asarray(d["nonzero_codes"], dtype=np.int64)] = np.asarray(d["nonzero_counts"])
        return cls.from_counts(counts, name=d.get("name", ""))


def _json_float(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _bit_matrix(bits: int) -> np.ndarray:
    """(2**bits, bits) 0/1 matrix; row c holds the LSB-first bits of code c."""
    codes = np.arange(2**bits, dtype=np.int64)[:, None]
    return (codes >> np.arange(bits, dtype=np.int64)) & 1


@dataclass
class CodebookStats(_JsonFile):
    """Codebook statistics of a tokenizer on some data: s1, s2 and (optionally) the joint code.

    ``bit_balance[i]`` is P(bit i = 1) over all tokens; bits ``0 .. s1_bits-1`` are the s1 bits and
    the next ``s2_bits`` the s2 bits, LSB first (the same order the tokenizer packs them).  The
    joint code is ``s1 | s2 << s1_bits``.
    """

    s1_bits: int
    s2_bits: int
    n_tokens: int
    s1: CodeStats
    s2: CodeStats
    joint: CodeStats | None
    bit_balance: list[float]

    @classmethod
    def from_counts(
        cls,
        s1_bits: int,
        s2_bits: int,
        s1_counts: np.ndarray,
        s2_counts: np.ndarray,
        joint_counts: np.ndarray | None = None,
    ) -> CodebookStats:
        s1 = CodeStats.from_counts(s1_counts, "s1")
        s2 = CodeStats.from_counts(s2_counts, "s2")
        joint = CodeStats.from_counts(joint_counts, "joint") if joint_counts is not None else None
        n = s1.n_tokens
        if s2.n_tokens != n or (joint is not None and joint.n_tokens != n):
            raise ValueError("s1, s2 and joint counts must cover the same tokens")
        if n == 0:
            balance = [float("nan")] * (s1_bits + s2_bits)
        else:
            # Bit balance follows from the counts: no second pass over the tokens is needed.
            ones = np.concatenate([s1.counts @ _bit_matrix(s1_bits), s2.counts @ _bit_matrix(s2_bits)])
            balance = (ones / n).tolist()
        return cls(s1_bits, s2_bits, n, s1, s2, joint, balance)

    def level(self, name: str) -> CodeStats:
        """The statistics of ``"s1"``, ``"s2"`` or ``"joint"``."""
        if name not in ("s1", "s2", "joint"):
            raise ValueError(f"level must be 's1', 's2' or 'joint', not {name!r}")
        out = getattr(self, name)
        if out is None:
            raise ValueError("joint statistics were not tracked (CodebookCounter(joint=False))")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "s1_bits": self.s1_bits,
            "s2_bits": self.s2_bits,
            "n_tokens": self.n_tokens,
            "s1": self.s1.to_dict(),
            "s2": self.s2.to_dict(),
            "joint": self.joint.to_dict() if self.joint is not None else None,
            "bit_balance": [_json_float(b) for b in self.bit_balance],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CodebookStats:
        s1 = CodeStats.from_dict(d["s1"])
        s2 = CodeStats.from_dict(d["s2"])
        joint = CodeStats.from_dict(d["joint"]) if d.get("joint") is not None else None
        return cls.from_counts(
            int(d["s1_bits"]), int(d["s2_bits"]), s1.counts, s2.counts, joint.counts if joint else None
        )


    def to_frame(self) -> pd.DataFrame:
        """One row per vocabulary (s1, s2, joint) with the headline numbers and the paper's usage."""
        rows = []
        paper = {"s1": PAPER_S1_USAGE, "s2": PAPER_S2_USAGE, "joint": float("nan")}
        for cs in (self.s1, self.s2, self.joint):
            if cs is None:
                continue
            rows.append(
                {
                    "level": cs.name,
                    "vocab_size": cs.vocab_size,
                    "used": cs.n_used,
                    "dead": cs.n_dead,
                    "usage": cs.usage,
                    "paper_usage": paper[cs.name],
                    "perplexity": cs.perplexity,
                    "normalized_entropy": cs.normalized_entropy,
                    "top1pct_share": cs.top1pct_share,
                }
            )
        return pd.DataFrame(rows).set_index("level")

    def summary(self) -> str:
        return (
            f"{self.n_tokens:,} tokens: s1 usage {self.s1.usage:.1%} (paper {PAPER_S1_USAGE:.2%}), "
            f"perplexity {self.s1.perplexity:.1f}/{self.s1.vocab_size}; "
            f"s2 usage {self.s2.usage:.1%} (paper {PAPER_S2_USAGE:.2%}), "
            f"perplexity {self.s2.perplexity:.1f}/{self.s2.vocab_size}"
        )


# --------------------------------------------------------------------------------------------
# streaming accumulator
# --------------------------------------------------------------------------------------------


class CodebookCounter:
    """Streaming code counts: call :meth:`update` per batch, then :meth:`stats`.

    With ``joint=True`` (default) a single ``torch.bincount`` on the joint index
    ``s1 | s2 << s1_bits`` per update is enough: the s1 and s2 counts are its marginals.  That costs
    ``8 * 2**(s1_bits + s2_bits)`` bytes (8 MiB for 10 + 10 bits); pass ``joint=False`` for larger
    codebooks, which counts s1 and s2 separately.
    """

    def __init__(self, s1_bits: int, s2_bits: int, *, joint: bool = True, device: str | torch.device = "cpu") -> None:
        if s1_bits < 1 or s2_bits < 1:
            raise ValueError("s1_bits and s2_bits must be >= 1")
        self.s1_bits, self.s2_bits = int(s1_bits), int(s2_bits)
        self.k1, self.k2 = 2**self.s1_bits, 2**self.s2_bits
        self.track_joint = bool(joint)
        self.device = torch.device(device)
        self.n_tokens = 0
        if self.track_joint:
            self._joint = torch.zeros(self.k1 * self.k2, dtype=torch.int64, device=self.device)
        else:
            self._s1 = torch.zeros(self.k1, dtype=torch.int64, device=self.device)
            self._s2 = torch.zeros(self.k2, dtype=torch.int64, device=self.device)

    def update(self, s1: torch.Tensor | np.ndarray, s2: torch.Tensor | np.ndarray) -> CodebookCounter:
        """Count one batch of indices (any shape, the same for s1 and s2)."""
        s1 = torch.as_tensor(s1, device=self.device).reshape(-1).long()
        s2 = torch.as_tensor(s2, device=self.device).reshape(-1).long()
        if s1.shape != s2.shape:
            raise ValueError(f"s1 and s2 must have the same number of tokens, got {s1.numel()} and {s2.numel()}")
        if s1.numel() == 0:
            return self
        # One range check per tensor: an out-of-range s1 would silently alias into the joint index.
        for name, ids, k in (("s1", s1, self.k1), ("s2", s2, self.k2)):
            lo, hi = torch.aminmax(ids)
            if int(lo) < 0 or int(hi) >= k:
                raise ValueError(f"{name} indices must lie in [0, {k}), got [{int(lo)}, {int(hi)}]")
        if self.track_joint:
            self._joint += torch.bincount(s1 | (s2 << self.s1_bits), minlength=self.k1 * self.k2)
        else:
            self._s1 += torch.bincount(s1, minlength=self.k1)
            self._s2 += torch.bincount(s2, minlength=self.k2)
        self.n_tokens += s1.numel()
        return self

    def merge(self, other: CodebookCounter) -> CodebookCounter:
        """Add another counter's counts (e.g. from another process or split)."""
        if (other.s1_bits, other.s2_bits, other.track_joint) != (
            self.s1_bits,
            self.s2_bits,
            self.track_joint,
        ):
            raise ValueError("can only merge counters with the same bits and joint setting")
        if self.track_joint:
            self._joint += other._joint.to(self.device)
        else:
            self._s1 += other._s1.to(self.device)
            self._s2 += other._s2.to(self.device)
        self.n_tokens += other.n_tokens
        return self

    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(s1_counts, s2_counts, joint_counts or None)`` as int64 numpy arrays."""
        if self.track_joint:
            joint = self._joint.cpu().numpy()
            # joint index = s1 + s2 * K1, so row = s2 and column = s1.
            grid = joint.reshape(self.k2, self.k1)
            return grid.sum(axis=0), grid.sum(axis=1), joint
        return self._s1.cpu().numpy(), self._s2.cpu().numpy(), None

    def stats(self) -> CodebookStats:
        s1, s2, joint = self.counts()
        return CodebookStats.from_counts(self.s1_bits, self.s2_bits, s1, s2, joint)


# --------------------------------------------------------------------------------------------
# running a tokenizer over batches
# --------------------------------------------------------------------------------------------


def _module_device(module: Any) -> torch.device | None:
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return None


@contextmanager
def _inference(tokenizer: Any, device: str | torch.device | None) -> Iterator[torch.device]:
    """eval() + no_grad() (+ a temporary move to ``device``), restoring mode and device afterwards."""
    was_training = getattr(tokenizer, "training", False)
    home = _module_device(tokenizer)
    target = torch.device(device) if device is not None else (home or torch.device("cpu"))
    # "cuda" and "cuda:0" name the same place; only move when the device really differs
    moved = home is not None and (home.type != target.type or (target.index is not None and home != target))
    if hasattr(tokenizer, "eval"):
        tokenizer.eval()
    if moved:
        tokenizer.to(target)
    try:
        with torch.no_grad():
            yield target
    finally:
        if moved:
            tokenizer.to(home)
        if hasattr(tokenizer, "train"):
            tokenizer.train(was_training)


def _is_window_dataset(obj: Any) -> bool:
    """True for a map-style dataset (or list) of single windows, as opposed to an iterable of batches."""
    if isinstance(obj, torch.Tensor) or not (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")):
        return False
    try:
        if len(obj) == 0:
            return False
        first = obj[0]
    except (KeyError, IndexError, TypeError):
        return False
    return isinstance(first, Mapping) and "x" in first and torch.as_tensor(first["x"]).ndim == 2


def iter_batches(data: Any, *, batch_size: int = 64) -> Iterable[Any]:
    """Batches from ``data``: a window dataset (or list of window dicts) is wrapped in a DataLoader,
    anything else is taken to already be an iterable of batches."""
    if _is_window_dataset(data):
        return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    return data


def _batch_parts(
    batch: Any,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, list[str] | None]:
    """``(x, mean, std, symbols)`` of one batch; the last three are None when the batch lacks them."""
    if isinstance(batch, Mapping):
        x = torch.as_tensor(batch["x"])
        mean = batch.get("mean")
        std = batch.get("std")
        sym = batch.get("symbol")
        mean = torch.as_tensor(mean) if mean is not None else None
        std = torch.as_tensor(std) if std is not None else None
        if x.ndim == 2:  # a single window
            x = x[None]
            mean = mean[None] if mean is not None else None
            std = std[None] if std is not None else None
            sym = [sym] if isinstance(sym, str) else sym
        if isinstance(sym, str):
            sym = [sym] * x.shape[0]
        return x, mean, std, (list(sym) if sym is not None else None)
    if isinstance(batch, (tuple, list)):
        return _batch_parts(batch[0])
    x = torch.as_tensor(batch)
    return (x[None] if x.ndim == 2 else x), None, None, None


def _progress(iterable: Iterable[Any], *, enabled: bool, total: int | None, desc: str) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


def _limited(batches: Iterable[Any], max_batches: int | None) -> tuple[Iterable[Any], int | None]:
    try:
        total: int | None = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is None:
        return batches, total
    total = max_batches if total is None else min(total, max_batches)

    def _take() -> Iterator[Any]:
        for i, b in enumerate(batches):
            if i >= max_batches:
                return
            yield b

    return _take(), total


def codebook_stats(
    tokenizer: Any,
    batches: Iterable[Any],
    *,
    device: str | torch.device | None = "cpu",
    max_batches: int | None = None,
    progress: bool = True,
    joint: bool = True,
) -> CodebookStats:
    """Encode every batch with ``tokenizer.encode(x, half=True)`` and return the codebook statistics.

    The tokenizer runs in eval mode under ``torch.no_grad()`` on ``device`` (None: where it already
    lives); its training mode and device are restored afterwards.  ``batches`` may also be a window
    dataset, which is batched for you.
    """
    data, total = _limited(iter_batches(batches), max_batches)
    with _inference(tokenizer, device) as dev:
        counter = CodebookCounter(tokenizer.s1_bits, tokenizer.s2_bits, joint=joint, device=dev)
        for batch in _progress(data, enabled=progress, total=total, desc="codebook"):
            x, *_ = _batch_parts(batch)
            s1, s2 = tokenizer.encode(x.to(dev, torch.float32), half=True)
            counter.update(s1, s2)
    return counter.stats()


# --------------------------------------------------------------------------------------------
# comparing two distributions
# --------------------------------------------------------------------------------------------


def _as_distribution(c: np.ndarray) -> np.ndarray:
    c = np.asarray(c, dtype=np.float64)
    s = c.sum()
    if s <= 0:
        raise ValueError("cannot compare an empty distribution")
    return c / s


def total_variation(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """Total-variation distance ``0.5 * sum |p - q|`` of two count vectors (normalized here); in [0, 1]."""
    p, q = _as_distribution(p_counts), _as_distribution(q_counts)
    return float(0.5 * np.abs(p - q).sum())


def js_distance(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """Jensen-Shannon *distance* with base-2 logarithms: ``sqrt(JSD)``, in [0, 1].

    ``JSD = 0.5 KL(p || m) + 0.5 KL(q || m)`` with ``m = (p + q) / 2``; it is 0 for identical
    distributions and 1 for disjoint supports.  (The square root makes it a metric.)
    """
    p, q = _as_distribution(p_counts), _as_distribution(q_counts)
    m = 0.5 * (p + q)

    def _kl(a: np.ndarray) -> float:
        nz = a > 0  # where a > 0, m > 0 as well
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    jsd = 0.5 * _kl(p) + 0.5 * _kl(q)
    return float(math.sqrt(min(max(jsd, 0.0), 1.0)))  # clip rounding noise


@dataclass
class DistributionShift:
    """How one vocabulary's usage moved from ``a`` to ``b``."""

    level: str
    tv: float
    js_distance: float
    newly_used: list[int]
    newly_dead: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "tv": self.tv,
            "js_distance": self.js_distance,
            "newly_used": list(self.newly_used),
            "newly_dead": list(self.newly_dead),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DistributionShift:
        return cls(d["level"], float(d["tv"]), float(d["js_distance"]), list(d["newly_used"]), list(d["newly_dead"]))


@dataclass
class CodebookComparison:
    """Shift of code usage between two :class:`CodebookStats` (``a`` -> ``b``), per vocabulary.

    Distances are total variation and the base-2 Jensen-Shannon *distance* (sqrt of the divergence),
    both in [0, 1].  ``newly_used``: codes seen in ``b`` but never in ``a``; ``newly_dead``: codes
    seen in ``a`` but never in ``b``.
    """

    name_a: str
    name_b: str
    s1: DistributionShift
    s2: DistributionShift
    joint: DistributionShift | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name_a": self.name_a,
            "name_b": self.name_b,
            "s1": self.s1.to_dict(),
            "s2": self.s2.to_dict(),
            "joint": self.joint.to_dict() if self.joint is not None else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CodebookComparison:
        joint = DistributionShift.from_dict(d["joint"]) if d.get("joint") is not None else None
        return cls(
            d["name_a"],
            d["name_b"],
            DistributionShift.from_dict(d["s1"]),
            DistributionShift.from_dict(d["s2"]),
            joint,
        )

    def summary(self) -> str:
        """One sentence, e.g. for a notebook cell or a log line."""
        parts = []
        for s in (self.s1, self.s2, self.joint):
            if s is None:
                continue
            parts.append(
                f"{s.level} TV {s.tv:.3f}, JS distance {s.js_distance:.3f} "
                f"({len(s.newly_used)} newly used, {len(s.newly_dead)} newly dead)"
            )
        return f"From {self.name_a} to {self.name_b}: " + "; ".join(parts) + "."


def _shift(level: str, a: CodeStats, b: CodeStats) -> DistributionShift:
    if a.vocab_size != b.vocab_size:
        raise ValueError(f"{level}: vocabulary sizes differ ({a.vocab_size} vs {b.vocab_size})")
    used_a, used_b = a.counts > 0, b.counts > 0
    return DistributionShift(
        level=level,
        tv=total_variation(a.counts, b.counts),
        js_distance=js_distance(a.counts, b.counts),
        newly_used=np.flatnonzero(used_b & ~used_a).tolist(),
        newly_dead=np.flatnonzero(used_a & ~used_b).tolist(),
    )


def compare_codebooks(
    a: CodebookStats, b: CodebookStats, *, names: tuple[str, str] = ("before", "after")
) -> CodebookComparison:
    """Compare code usage of ``a`` (e.g. before adaptation, or train) with ``b`` (after, or test)."""
    joint = _shift("joint", a.joint, b.joint) if a.joint is not None and b.joint is not None else None
    return CodebookComparison(names[0], names[1], _shift("s1", a.s1, b.s1), _shift("s2", a.s2, b.s2), joint)


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
    ``price_mae`` after de-normalization (``x * (std + 1e-5) + mean``) back to prices and volumes,
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
class ReconstructionReport(_JsonFile):
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

    def to_frame(self, *, per_symbol: bool = True) -> pd.DataFrame:
        """Long summary table: rows (symbol, decoder, metric), columns the channels plus ``mean``.

        ``symbol`` is ``"(all)"`` for the overall rows.  ``mean`` is left NaN for price-space rows,
        where averaging prices with volumes would mix units.
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



def _unpack_forward(out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_pre, z)`` from ``tokenizer(x)``, which returns ``((z_pre, z), bsq_loss, quantized, indices)``."""
    z_pre, z = out[0]
    return z_pre, z


def _window_sums(x: torch.Tensor, recon: torch.Tensor, scale: torch.Tensor | None) -> np.ndarray:
    """(B, 4, C) per-window sums of squared / absolute error, normalized and in price space."""
    # float64 where the device has it (MPS does not); the sums run over one window only
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    err = (recon.float() - x.float()).to(dtype)
    sums = [err.pow(2).sum(1), err.abs().sum(1)]
    if scale is not None:
        # de-normalized error: (recon*s + m) - (x*s + m) = err * s, with s = std + 1e-5
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
    features: Sequence[str] = FEATURES,
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
    data, total = _limited(iter_batches(batches), max_batches)
    with _inference(tokenizer, device) as dev:
        for batch in _progress(data, enabled=progress, total=total, desc="reconstruction"):
            x, mean, std, symbols = _batch_parts(batch)
            x = x.to(dev, torch.float32)
            if x.shape[-1] != c:
                raise ValueError(f"batch has {x.shape[-1]} channels but {c} feature names were given")
            recon = dict(zip(DECODERS, _unpack_forward(tokenizer(x))))
            scale = (std.to(dev, torch.float32) + DENORM_EPS) if std is not None else None
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
class GateResult(_JsonFile):
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
            "metrics": {k: _json_float(v) if v is not None else None for k, v in self.metrics.items()},
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
    *,
    max_full_mse: float | None = 0.5,
    min_s1_usage: float | None = 0.2,
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

    With ``stats=None`` the codebook checks are skipped (their metrics are None).
    """
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
        """``a * (std + 1e-5) + mean``; ``a`` unchanged when the window has no mean/std."""
        if self.mean is None or self.std is None:
            return a
        return a * (self.std + DENORM_EPS) + self.mean


def reconstruct_window(
    tokenizer: Any,
    window: Mapping[str, Any] | torch.Tensor | np.ndarray,
    *,
    device: str | torch.device | None = "cpu",
) -> WindowReconstruction:
    """Run one window (a dataset item or an (L, C) array) through the tokenizer."""
    x, mean, std, symbols = _batch_parts(window if isinstance(window, Mapping) else torch.as_tensor(window))
    with _inference(tokenizer, device) as dev:
        xd = x[:1].to(dev, torch.float32)
        z_pre, z = _unpack_forward(tokenizer(xd))
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
    features: list[str] = field(default_factory=lambda: list(FEATURES))

    @property
    def n_tokens(self) -> int:
        return int(self.counts.sum())

    def mean_ohlc(self, code: int) -> np.ndarray:
        """Mean normalized open, high, low, close of the bars carrying ``code`` (NaN if none)."""
        idx = [self.features.index(f) for f in ("open", "high", "low", "close")]
        return self.mean_features[code, idx]


def code_profile(
    tokenizer: Any,
    batches: Iterable[Any],
    *,
    device: str | torch.device | None = "cpu",
    max_batches: int | None = None,
    progress: bool = False,
    features: Sequence[str] = FEATURES,
) -> CodeProfile:
    """Count s1 codes and average the normalized input features of the bars that carry each code."""
    k1 = 2**tokenizer.s1_bits
    sums = torch.zeros(k1, len(features), dtype=torch.float64)
    counts = torch.zeros(k1, dtype=torch.int64)
    data, total = _limited(iter_batches(batches), max_batches)
    with _inference(tokenizer, device) as dev:
        for batch in _progress(data, enabled=progress, total=total, desc="code profile"):
            x, *_ = _batch_parts(batch)
            x = x.to(dev, torch.float32)
            s1, _ = tokenizer.encode(x, half=True)
            ids = s1.reshape(-1).cpu()
            sums.index_add_(0, ids, x.reshape(-1, x.shape[-1]).cpu().double())
            counts += torch.bincount(ids, minlength=k1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (sums / counts[:, None].double()).numpy()  # NaN rows for unused codes
    return CodeProfile(tokenizer.s1_bits, counts.numpy(), mean, list(features))
