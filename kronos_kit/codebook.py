"""Codebook health of the Kronos tokenizer: usage statistics, a streaming counter, comparisons.

The tokenizer quantizes every bar into a coarse index ``s1`` (``s1_bits`` bits) and a fine index
``s2`` (``s2_bits`` bits).  Before phase 2 (predictor finetuning) a researcher wants to know:

* does the tokenizer use its codebook?  -> :class:`CodebookCounter`, :func:`codebook_stats`
* did adaptation change what it uses?   -> :func:`compare_codebooks`

How well it reconstructs candles, and the gate before phase 2, live in `kronos_kit.reconstruction`.
``batches`` are anything `kronos_kit.data.loop_batches` takes (a window dataset or batches).
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
from kronos_kit.runs import JsonFile, json_float
from kronos_kit.runtime import inference

__all__ = [
    "PAPER_S1_USAGE",
    "PAPER_S2_USAGE",
    "PAPER_VOCAB_SIZE",
    "CodeStats",
    "CodebookStats",
    "CodebookCounter",
    "codebook_stats",
    "DistributionShift",
    "CodebookComparison",
    "compare_codebooks",
    "total_variation",
    "js_distance",
]

#: Coarse (s1) codebook usage the Kronos paper reports on its pretraining corpus.
PAPER_S1_USAGE = 0.9766
#: Fine (s2) codebook usage the Kronos paper reports on its pretraining corpus.
PAPER_S2_USAGE = 0.8525
#: Codes per level behind the paper's usage figures (10 bits each): a usage share of a smaller codebook is not
#: comparable with them (64 codes are far easier to fill than 1,024).
PAPER_VOCAB_SIZE = 1024

# Dense counts are readable in JSON for small vocabularies; the joint vocabulary (2**20 for the
# base model) is written sparsely instead so that a stats file stays small.
_DENSE_JSON_MAX_VOCAB = 4096


# --------------------------------------------------------------------------------------------
# statistics of one vocabulary
# --------------------------------------------------------------------------------------------


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
            "entropy": json_float(self.entropy),
            "perplexity": json_float(self.perplexity),
            "normalized_entropy": json_float(self.normalized_entropy),
            "top_k": self.top_k,
            "top1pct_share": json_float(self.top1pct_share),
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


def _bit_matrix(bits: int) -> np.ndarray:
    """(2**bits, bits) 0/1 matrix; row c holds the LSB-first bits of code c."""
    codes = np.arange(2**bits, dtype=np.int64)[:, None]
    return (codes >> np.arange(bits, dtype=np.int64)) & 1


@dataclass
class CodebookStats(JsonFile):
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
            "bit_balance": [json_float(b) for b in self.bit_balance],
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
        """One row per vocabulary (s1, s2, joint) with the headline numbers and the paper's usage, the latter only
        for a vocabulary of the paper's size (`PAPER_VOCAB_SIZE`; n/a otherwise: not comparable)."""
        rows = []
        paper = {"s1": PAPER_S1_USAGE, "s2": PAPER_S2_USAGE, "joint": float("nan")}
        paper = {k: v if getattr(self, k) is not None and getattr(self, k).vocab_size == PAPER_VOCAB_SIZE
                 else float("nan") for k, v in paper.items()}
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
        def paper(level: CodeStats, usage: float) -> str:
            if level.vocab_size == PAPER_VOCAB_SIZE:
                return f" (paper {usage:.2%})"
            return f" (the paper's {usage:.2%} is of {PAPER_VOCAB_SIZE:,} codes: not comparable)"

        return (
            f"{self.n_tokens:,} tokens: s1 usage {self.s1.usage:.1%} of {self.s1.vocab_size:,} codes"
            f"{paper(self.s1, PAPER_S1_USAGE)}, perplexity {self.s1.perplexity:.1f}/{self.s1.vocab_size}; "
            f"s2 usage {self.s2.usage:.1%} of {self.s2.vocab_size:,} codes{paper(self.s2, PAPER_S2_USAGE)}, "
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

    Only each window's in-split bars are counted (`kronos_kit.data.in_split_mask`: a validation
    window's context bars belong to the training split). The tokenizer runs in eval mode under
    ``torch.no_grad()`` on ``device`` (None: where it already lives); its training mode and device are
    restored afterwards.  ``batches`` may also be a window dataset, which is batched for you.
    """
    with inference(tokenizer, device=device) as dev:
        counter = CodebookCounter(tokenizer.s1_bits, tokenizer.s2_bits, joint=joint, device=dev)
        for batch in loop_batches(batches, max_batches=max_batches, progress=progress, desc="codebook"):
            x = unpack_batch(batch).x.to(dev, torch.float32)
            s1, s2 = tokenizer.encode(x, half=True)
            keep = in_split_mask(batch, x)
            counter.update(s1[keep], s2[keep])
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
