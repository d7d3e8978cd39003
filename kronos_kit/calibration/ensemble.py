"""Ensembles of a model's sample paths with naive forecasts' paths: a linear pool and quantile averaging.

Members are the model (its paths after its own path calibration) and naive probabilistic forecasts
(:mod:`kronos_kit.naive`), each S paths on the same origins. The combination is S paths again:

- ``linear_pool``: the weighted mixture of the members' distributions. Weights are multiples of 1/S, so
  the mixture is exactly S whole paths: member k fills ``w_k S`` consecutive path slots, and slot j holds
  that member's path j (members are independent draws, so which of its paths a member gives does not
  matter, and no path is used twice). Every path is a member's own path, candles and all.
- ``quantile_average``: the weighted average of the members' quantile functions (Vincentization), per
  origin and step, on close log-returns relative to the origin's last close: the i-th smallest combined
  close is ``sum_k w_k`` (member k's i-th smallest). Sorting per step loses which value belongs to which
  path, so the combined closes are put back on paths in the rank order of the template member (the one
  with the largest weight; ensemble copula coupling, Schefzik et al. 2013): path j gets the combined close
  whose rank equals the template's path j's rank at that step, and the template path's open / high / low
  relative to its close (so candles stay valid).

Rule for volume and amount: path j of the combination carries the model's path j's volume and amount (the
naive forecasts do not forecast them: they carry the last bar's values), whatever the weights.

Fitting sees validation arrays only and minimizes the fair close CRPS (:func:`~kronos_kit.metrics.fair_crps`)
over the simplex of weights, every member alone included (weight 1 on the model, weight 1 on a naive
forecast), so in-sample the fitted combination is never worse than any member:

- linear pool: the fair CRPS of an S-path pool with ``n_k`` paths of member k is, in expectation,
  ``sum_k (n_k/S) a_k - [sum_k n_k (n_k - 1) B_kk + sum_{k != l} n_k n_l B_kl] / (2 S (S - 1))`` with
  ``a_k = E|X_k - y|`` and ``B_kl = E|X_k - X_l|`` over distinct paths, estimated per origin once; every
  split of the S slots is scored exactly (a few thousand for four members and 32 paths);
- quantile averaging: the pair term of sorted combinations is linear in the weights, ``E|q - y|`` is
  computed per grid point; weights on a simplex grid of step 1/20.

Exact ties (e.g. a model that is a copy of a member) go to the most even split among the tied members.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kronos_kit.calibration.paths import (
    PRICE_CHANNELS,
    from_plain,
    plain_fields,
    price_log_returns,
    with_price_log_returns,
)
from kronos_kit.config import ENSEMBLE_METHODS, NAIVE_PROBABILISTIC
from kronos_kit.metrics import CLOSE

MODEL = "model"  # the member name of the model's own paths
COMBINATIONS: tuple[str, ...] = (MODEL, *ENSEMBLE_METHODS)  # "model": the model alone (no ensemble)
QUANTILE_GRID_STEP = 20  # quantile averaging: weights on the simplex grid of step 1/20
MAX_POOL_SPLITS = 400_000  # linear pool: coarser slot groups when the S-slot splits would exceed this
_TIE = 1e-12  # relative: objective values this close are ties


@dataclass
class Ensemble:
    """A fitted combination (plain JSON via :meth:`to_dict` / :meth:`from_dict`).

    ``members`` starts with ``"model"``; the others are naive forecast names; ``weights`` (one per member,
    >= 0, summing to 1) are multiples of 1/``paths`` for a linear pool (``paths``: the S it was fitted
    with; at another S the slot counts are rounded by largest remainder).
    """

    method: str = MODEL
    members: list[str] = field(default_factory=lambda: [MODEL])
    weights: list[float] = field(default_factory=lambda: [1.0])

    def __post_init__(self) -> None:
        if self.method not in COMBINATIONS:
            raise ValueError(f"ensemble method must be one of {list(COMBINATIONS)}, got {self.method!r}")
        members, weights = list(self.members), list(self.weights)
        if not members or members[0] != MODEL or len(set(members)) != len(members) \
                or set(members[1:]) - set(NAIVE_PROBABILISTIC):
            raise ValueError(f"ensemble members must be 'model' followed by distinct names from "
                             f"{list(NAIVE_PROBABILISTIC)}, got {members!r}")
        if len(weights) != len(members) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and 0 <= w <= 1
                for w in weights) or abs(sum(weights) - 1) > 1e-6:
            raise ValueError(f"ensemble weights must be one number in [0, 1] per member {members}, summing to 1; got "
                             f"{weights!r}")
        if self.method == MODEL and weights[0] != 1:
            raise ValueError(f"the 'model' combination puts weight 1 on the model, got {weights!r}")

    @property
    def model_weight(self) -> float:
        return float(self.weights[0])

    @property
    def naive_members(self) -> list[str]:
        """The naive members with a positive weight (the ones a forecast must draw)."""
        return [m for m, w in zip(self.members[1:], self.weights[1:]) if w > 0]

    def describe(self, model: str = "the model") -> str:
        positive = [m for m, w in zip(self.members, self.weights) if w > 0]
        if self.method == MODEL or positive == [MODEL]:
            return f"{model} alone (no ensemble)"
        if len(positive) == 1:
            return f"{positive[0]} alone: {model} has weight 0"
        parts = ", ".join(f"{w:.0%} {model if m == MODEL else m}" for m, w in zip(self.members, self.weights) if w > 0)
        return f"{self.method.replace('_', ' ')}: {parts}"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "members": list(self.members), "weights": [float(w) for w in self.weights]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "calibration") -> Ensemble:
        return from_plain(cls, plain_fields(data, cls, where=where, what="ensemble"), where=where)

    def combine(self, model_paths: np.ndarray, members: Mapping[str, np.ndarray], last_close: np.ndarray, *,
                where: str = "ensemble") -> np.ndarray:
        """The combination's paths (N, S, H, C) from the model's paths and each naive member's (same shape)."""
        model_paths = np.asarray(model_paths, dtype=np.float64)
        if self.method == MODEL:
            return model_paths.copy()
        stack = [model_paths]
        for name in self.members[1:]:
            if name not in members:
                if self.weights[self.members.index(name)] > 0:
                    raise ValueError(f"{where}: the naive member {name!r} is missing")
                stack.append(model_paths)  # weight 0: never read
                continue
            paths = np.asarray(members[name], dtype=np.float64)
            if paths.shape[:3] != model_paths.shape[:3] or paths.shape[-1] < PRICE_CHANNELS:
                raise ValueError(f"{where}: member {name!r} has paths of shape {paths.shape}; the model's are "
                                 f"{model_paths.shape}")
            stack.append(paths)
        if self.method == "linear_pool":
            return _pool(stack, slot_counts(self.weights, model_paths.shape[1]))
        return _quantile_average(stack, np.asarray(self.weights), last_close, where)


NO_ENSEMBLE = Ensemble()


def slot_counts(weights: Sequence[float], paths: int) -> np.ndarray:
    """Whole path counts per member summing to ``paths``: ``weights * paths`` rounded by largest remainder
    (remainder ties go to the earlier member)."""
    raw = np.asarray(weights, dtype=np.float64) * paths
    counts = np.floor(raw + 1e-9).astype(int)
    left = paths - int(counts.sum())
    order = sorted(range(len(raw)), key=lambda k: (-(raw[k] - counts[k]), k))
    for k in order[:max(left, 0)]:
        counts[k] += 1
    return counts


def _pool(stack: list[np.ndarray], counts: np.ndarray) -> np.ndarray:
    """Linear pool: slots [start_k, start_k + n_k) hold member k's paths at those indices; volume / amount from
    the model (member 0) at every slot."""
    out = stack[0].copy()
    start = 0
    for paths, n in zip(stack, counts):
        out[:, start:start + n, :, :PRICE_CHANNELS] = paths[:, start:start + n, :, :PRICE_CHANNELS]
        start += n
    return out


def _quantile_average(stack: list[np.ndarray], weights: np.ndarray, last_close: np.ndarray, where: str) -> np.ndarray:
    """Weighted average of the members' sorted close log-returns, put on paths by the template's ranks (ECC)."""
    r = [price_log_returns(p, last_close) for p in stack]  # each (N, S, H, 4)
    combined = sum(w * np.sort(rk[..., CLOSE], axis=1) for w, rk in zip(weights, r) if w > 0)  # (N, S, H)
    template = r[int(np.argmax(weights))]  # first of the largest weights: the model on a tie
    ranks = np.argsort(np.argsort(template[..., CLOSE], axis=1, kind="stable"), axis=1, kind="stable")
    close = np.take_along_axis(combined, ranks, axis=1)
    r_new = close[..., None] + (template - template[..., CLOSE:CLOSE + 1])  # the template's candle shape
    return with_price_log_returns(stack[0], last_close, r_new, where=where)


# ------------------------------------------------------------------------------------------- fitting


class CloseMembers:
    """Close paths of the members on validation origins with what the fits need per origin.

    ``close`` is a list of (N, S, H) arrays in price units (the model first), ``realized`` (N, H). Per origin,
    averaged over steps: ``a`` (M, N) mean |X_k - y| and ``b`` (M, M, N) mean |X_k - X_l| over distinct
    path indices (the fair pair term of one member on the diagonal).
    """

    def __init__(self, close: Sequence[np.ndarray], realized: np.ndarray):
        self.close = [np.asarray(c, dtype=np.float64) for c in close]
        self.y = np.asarray(realized, dtype=np.float64)
        self.paths = self.close[0].shape[1]
        m = len(self.close)
        self.a = np.stack([np.abs(c - self.y[:, None]).mean(axis=(1, 2)) for c in self.close])
        self.b = np.empty((m, m, len(self.y)))
        for k, l_ in itertools.combinations_with_replacement(range(m), 2):
            self.b[k, l_] = self.b[l_, k] = _distinct_pair_mean(self.close[k], self.close[l_])

    def pool_scores(self, counts: np.ndarray, origins: np.ndarray) -> np.ndarray:
        """Expected fair CRPS over ``origins`` of S-path pools with the given slot counts (P, M) -> (P,)."""
        s = self.paths
        a = self.a[:, origins].mean(axis=1)
        b = self.b[:, :, origins].mean(axis=2)
        n = counts.astype(np.float64)
        pairs = np.einsum("pk,kl,pl->p", n, b, n) - n @ np.diag(b)
        return n @ a / s - pairs / (2 * s * (s - 1))


def _distinct_pair_mean(x: np.ndarray, y: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Per origin (N,) mean over steps and path pairs i != j of |x_i - y_j| (x, y: (N, S, H))."""
    n, s, _ = x.shape
    out = np.empty(n)
    off = ~np.eye(s, dtype=bool)
    for i in range(0, n, chunk):
        d = np.abs(x[i:i + chunk, :, None, :] - y[i:i + chunk, None, :, :])  # (n, S, S, H)
        out[i:i + chunk] = d[:, off].mean(axis=(1, 2))
    return out


def compositions(total: int, parts: int) -> np.ndarray:
    """Every way to split ``total`` into ``parts`` whole numbers >= 0 (rows), the first part's largest first."""
    bars = np.array(list(itertools.combinations(range(total + parts - 1), parts - 1)), dtype=int).reshape(-1, parts - 1)
    edges = np.concatenate([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), total + parts - 1)], axis=1)
    out = np.diff(edges, axis=1) - 1
    return out[np.argsort(-out[:, 0], kind="stable")]


def _most_even(scores: np.ndarray, weights: np.ndarray) -> int:
    """Index of the lowest score; among exact ties, the most even split (then the larger model weight)."""
    best = scores.min()
    tied = np.flatnonzero(scores <= best + _TIE * max(abs(best), 1e-300))
    spread = (weights[tied] ** 2).sum(axis=1)
    return int(tied[np.lexsort((-weights[tied, 0], np.round(spread, 12)))[0]])


def fit_linear_pool(members: CloseMembers, origins: np.ndarray) -> list[float]:
    """Slot counts / S of the best S-path pool over ``origins`` (every split of the S slots scored)."""
    s, m = members.paths, len(members.close)
    group = 1
    while math.comb(s // group + m - 1, m - 1) > MAX_POOL_SPLITS:
        group += 1
    grid = compositions(s // group, m)
    counts = np.array([slot_counts(row / row.sum(), s) for row in grid]) if group > 1 else grid
    scores = members.pool_scores(counts, origins)
    return (counts[_most_even(scores, counts / s)] / s).tolist()


def fit_quantile_average(members: CloseMembers, origins: np.ndarray, last_close: np.ndarray) -> list[float]:
    """Weights (step 1/QUANTILE_GRID_STEP) of the quantile average with the lowest mean fair close CRPS on ``origins``.

    The objective is convex in the weights, so the simplex is searched at step 2/QUANTILE_GRID_STEP first and
    then at full resolution within one coarse step of the best point.
    """
    m, fine = len(members.close), QUANTILE_GRID_STEP
    coarse = compositions(fine // 2, m) * 2
    scores = quantile_average_scores(members, coarse / fine, last_close, origins)
    centre = coarse[_most_even(scores, coarse / fine)]
    grid = compositions(fine, m)
    near = grid[np.abs(grid - centre).max(axis=1) <= 2]
    scores = quantile_average_scores(members, near / fine, last_close, origins)
    return (near[_most_even(scores, near / fine)] / fine).tolist()


def quantile_average_scores(members: CloseMembers, weights: np.ndarray, last_close: np.ndarray,
                            origins: np.ndarray) -> np.ndarray:
    """Mean fair close CRPS over ``origins`` (P,) of the quantile average for each weight row (P, M).

    The combination averages log-return quantiles, so its closes are ``c0 exp(sum_k w_k r_k(i))``, sorted;
    the pair term of sorted values is a weighted sum, E|q - y| is computed per grid point.
    """
    c0 = np.asarray(last_close, dtype=np.float64)[origins, None, None]
    logs = np.stack([np.sort(np.log(np.maximum(c[origins], 1e-300) / c0), axis=1) for c in members.close])
    y = members.y[origins]
    s = members.paths
    rank_weights = 2.0 * np.arange(1, s + 1) - s - 1
    out = np.empty(len(weights))
    chunk = max(1, 4_000_000 // logs[0].size)  # weight rows per pass: about 32 MB per array, whatever the origins
    for i in range(0, len(weights), chunk):
        q = c0[None] * np.exp(np.einsum("pk,knsh->pnsh", weights[i:i + chunk], logs))  # sorted along s
        term1 = np.abs(q - y[None, :, None, :]).mean(axis=2)
        pair = 2.0 * np.einsum("pnsh,s->pnh", q, rank_weights) / (s * (s - 1))
        out[i:i + chunk] = (term1 - 0.5 * pair).mean(axis=(1, 2))
    return out


def fit_ensemble(method: str, members: CloseMembers, origins: np.ndarray, last_close: np.ndarray,
                 names: Sequence[str]) -> Ensemble:
    """The ``method`` combination of ``names`` (the model first) with weights fitted on ``origins``."""
    if method == MODEL:
        return Ensemble(MODEL, list(names), [1.0] + [0.0] * (len(names) - 1))
    if method == "linear_pool":
        weights = fit_linear_pool(members, origins)
    else:
        weights = fit_quantile_average(members, origins, last_close)
    return Ensemble(method, list(names), [round(float(w), 12) for w in weights])


__all__ = ["COMBINATIONS", "MODEL", "NO_ENSEMBLE", "CloseMembers", "Ensemble", "compositions", "fit_ensemble",
           "fit_linear_pool", "fit_quantile_average", "quantile_average_scores", "slot_counts"]
