"""Portfolios on a cross-sectional signal: pure functions of (scores, prices, costs, rules), no hidden state.

Timing, as the reference's qlib backtest (``delay_execution``, ``deal_price="open"``): the signal of a rebalance
day is known at its close, the orders fill at the next bar's open, and the book is marked at every close.
Prices are (T, K) grids over the calendar (NaN: no bar that day); a name without an open that day cannot
trade (its order is skipped, as qlib skips a suspended stock), and a name without a close keeps its last one.

- :func:`topk_dropout`: qlib's ``TopkDropoutStrategy`` (``method_sell="bottom"``, ``method_buy="top"``):
  hold ``topk`` names; each rebalance, the best-ranked names not held are candidates, held names among the
  ``n_drop`` worst of (held + candidates) are sold if held at least ``hold_bars`` bars, and as many
  candidates are bought as names were sold plus empty slots, each with an equal share of the cash. As in
  qlib, a sell blocked by the minimum hold does not block the buy (the book may hold more than ``topk``
  names for a while), held names without a score rank last, and positions drift with prices between
  rebalances. Unlike qlib's default ``risk_degree=0.95`` the cash is fully invested (``risk_degree=1``), so
  the excess return over the benchmark measures selection, not a cash drag.
- :func:`long_short`: equal-weight long the top quantile group and short the bottom one, one unit of capital
  per side, rebalanced to equal weights at every rebalance.

Costs (:class:`Costs`) are a share of each trade's value, by side, with an optional minimum per trade in the
account's currency (qlib's ``open_cost``, ``close_cost``, ``min_cost``); a buy spends its allotment on the
shares and their cost together, so the cash never goes negative.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kronos_kit.evaluate.cross_section import quantile_groups

BPS = 1e-4  # one basis point


@dataclass(frozen=True)
class Costs:
    """Trading costs: ``buy`` / ``sell`` as shares of the traded value, ``minimum`` per trade, ``account`` capital."""

    buy: float = 10 * BPS
    sell: float = 15 * BPS
    minimum: float = 0.0
    account: float = 1e8

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) and v >= 0 for v in (self.buy, self.sell, self.minimum)):
            raise ValueError(f"costs must be finite and >= 0, got buy {self.buy}, sell {self.sell}, "
                             f"minimum {self.minimum}")
        if not (math.isfinite(self.account) and self.account > 0):
            raise ValueError(f"account must be a finite number > 0, got {self.account}")

    def of(self, value: float, side: str) -> float:
        """Cost of trading ``value`` (currency, > 0) on ``side`` ("buy" or "sell")."""
        rate = self.buy if side == "buy" else self.sell
        return max(value * rate, self.minimum) if value > 0 else 0.0


@dataclass(frozen=True)
class Backtest:
    """A simulated book, day by day over ``days`` (indices into the price grid's calendar).

    ``gross``: the day's return before costs; ``cost``: the day's costs over the previous close's value;
    ``net`` = gross - cost (the change of the book's value); ``benchmark``: the equal-weight universe's
    return (0 for a long-short book, which is measured against cash); ``turnover``: value bought plus
    sold over the previous close's value; ``weights`` (days, K): each name's share of the book at the
    close (negative: short); ``trades``: one row per fill (day, symbol, side, shares, price, value, cost);
    ``rebalances``: positions in ``days`` of the days orders were placed.
    """

    days: np.ndarray
    gross: np.ndarray
    cost: np.ndarray
    benchmark: np.ndarray
    turnover: np.ndarray
    weights: np.ndarray
    trades: pd.DataFrame
    rebalances: np.ndarray

    @property
    def net(self) -> np.ndarray:
        return self.gross - self.cost

    @property
    def excess(self) -> np.ndarray:
        """Daily return over the benchmark after costs."""
        return self.net - self.benchmark

    @property
    def excess_gross(self) -> np.ndarray:
        return self.gross - self.benchmark


@dataclass
class _Book:
    """Shares, cash and the days each name was bought; records fills, costs and traded value of the day."""

    costs: Costs
    shares: np.ndarray
    cash: float
    entry: np.ndarray  # day a held name was bought (-1: not held)
    symbols: list[str]
    fills: list[tuple] = field(default_factory=list)
    day_cost: float = 0.0
    day_traded: float = 0.0

    def trade(self, k: int, shares: float, price: float, day: int) -> None:
        """Buy (``shares`` > 0) or sell ``|shares|`` of name ``k`` at ``price``; pays the cost from the cash."""
        if shares == 0 or not np.isfinite(price):
            return
        side = "buy" if shares > 0 else "sell"
        value = abs(shares) * price
        cost = self.costs.of(value, side)
        self.cash -= shares * price + cost
        was_flat = self.shares[k] == 0
        self.shares[k] += shares
        if abs(self.shares[k]) < 1e-12 * max(abs(shares), 1.0):
            self.shares[k], self.entry[k] = 0.0, -1
        elif was_flat:
            self.entry[k] = day
        self.day_cost += cost
        self.day_traded += value
        self.fills.append((day, self.symbols[k], side, float(abs(shares)), float(price), float(value), float(cost)))

    def buy_value(self, k: int, allotment: float, price: float, day: int) -> None:
        """Spend ``allotment`` on name ``k``, shares and cost together (a minimum cost above it: no trade)."""
        if allotment <= 0 or not np.isfinite(price):
            return
        value = allotment / (1 + self.costs.buy)
        if value * self.costs.buy < self.costs.minimum:
            value = allotment - self.costs.minimum
        if value > 0:
            self.trade(k, value / price, price, day)

    def value(self, prices: np.ndarray) -> float:
        held = self.shares != 0
        return self.cash + float((self.shares[held] * prices[held]).sum())


Decide = Callable[[int, int, _Book, np.ndarray, np.ndarray], None]
"""(rebalance index, trade day, book, open prices of the day, marks at the day's open) -> orders on the book."""


def _simulate(open_: np.ndarray, close: np.ndarray, rebalance: np.ndarray, end: int, decide: Decide, costs: Costs,
              symbols: list[str], benchmark: bool) -> Backtest:
    """Run ``decide`` at the open after each rebalance day and mark the book at every close up to ``end``."""
    open_, close = np.asarray(open_, dtype=np.float64), np.asarray(close, dtype=np.float64)
    if open_.shape != close.shape or open_.ndim != 2 or len(symbols) != close.shape[1]:
        raise ValueError(f"open {open_.shape}, close {close.shape} and {len(symbols)} symbols must agree as (T, K)")
    rebalance = np.asarray(rebalance, dtype=np.int64)
    if len(rebalance) == 0 or np.any(np.diff(rebalance) <= 0) or rebalance[0] < 0 or rebalance[-1] >= end:
        raise ValueError(f"rebalance days must increase and lie before the last day {end}, got {rebalance.tolist()}")
    marks = pd.DataFrame(close).ffill().to_numpy()  # a name without a bar keeps its last close
    book = _Book(costs, np.zeros(close.shape[1]), costs.account, np.full(close.shape[1], -1), list(symbols))
    trade_on = {int(r) + 1: d for d, r in enumerate(rebalance)}
    days = np.arange(rebalance[0] + 1, end + 1)
    n = len(days)
    gross, cost, turnover, bench = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    weights = np.zeros((n, close.shape[1]))
    previous, rebalanced = costs.account, []
    for i, t in enumerate(days):
        book.day_cost = book.day_traded = 0.0
        if t in trade_on:
            opening = np.where(np.isfinite(open_[t]), open_[t], marks[t - 1])
            decide(trade_on[t], int(t), book, open_[t], opening)
            rebalanced.append(i)
        mark = np.where(np.isfinite(marks[t]), marks[t], 0.0)
        value = book.value(mark)
        gross[i] = (value - previous + book.day_cost) / previous
        cost[i], turnover[i] = book.day_cost / previous, book.day_traded / previous
        weights[i] = book.shares * mark / value if value != 0 else 0.0
        if benchmark:
            with np.errstate(invalid="ignore", divide="ignore"):
                moves = close[t] / close[t - 1] - 1.0
            bench[i] = float(np.nanmean(moves)) if np.isfinite(moves).any() else 0.0
        previous = value
    trades = pd.DataFrame(book.fills, columns=["day", "symbol", "side", "shares", "price", "value", "cost"])
    return Backtest(days, gross, cost, bench, turnover, weights, trades, np.asarray(rebalanced, dtype=np.int64))


def _order(score: np.ndarray, names: np.ndarray) -> np.ndarray:
    """``names`` sorted best first: by score descending, missing scores last, ties by position."""
    s = np.where(np.isfinite(score[names]), score[names], -np.inf)
    return names[np.lexsort((names, -s))] if len(names) else names


def topk_dropout_orders(score: np.ndarray, held: np.ndarray, topk: int, n_drop: int) -> tuple[np.ndarray, np.ndarray]:
    """qlib's TopkDropoutStrategy decision (bottom / top): (names to sell, names to buy in order).

    ``score`` (K,) is the signal (NaN: not ranked; held such names rank last, unheld ones are never
    bought); ``held`` (K,) bool the current book. The minimum hold and tradability are checked when filling.
    """
    if topk < 1 or n_drop < 1:
        raise ValueError(f"topk and n_drop must be >= 1, got {topk} and {n_drop}")
    last = _order(score, np.flatnonzero(held))
    free = np.flatnonzero(~held & np.isfinite(score))
    today = _order(score, free)[: max(n_drop + topk - len(last), 0)]
    comb = _order(score, np.concatenate([last, today]))
    sell = last[np.isin(last, comb[-n_drop:])]
    buy = today[: max(len(sell) + topk - len(last), 0)]
    return sell, buy


def topk_dropout(scores: np.ndarray, open_: np.ndarray, close: np.ndarray, rebalance: np.ndarray, *, topk: int,
                 n_drop: int, hold_bars: int, costs: Costs, symbols: list[str], end: int | None = None) -> Backtest:
    """Long-only top-k dropout book (see the module docstring) on ``scores`` (D, K) known at the close of each
    ``rebalance`` day (D,), traded at the next open, marked at every close through ``end`` (default: the
    last day of the grid). ``hold_bars``: a name bought on day b may be sold from day b + hold_bars on."""
    if hold_bars < 1:
        raise ValueError(f"hold_bars must be >= 1, got {hold_bars}")

    def decide(d: int, day: int, book: _Book, opens: np.ndarray, _marks: np.ndarray) -> None:
        sell, buy = topk_dropout_orders(scores[d], book.shares > 0, topk, n_drop)
        for k in sell:
            if np.isfinite(opens[k]) and day - book.entry[k] >= hold_bars:
                book.trade(k, -book.shares[k], opens[k], day)
        allotment = book.cash / len(buy) if len(buy) else 0.0  # qlib divides by every name to buy
        for k in buy:
            book.buy_value(k, allotment, opens[k], day)

    last = close.shape[0] - 1 if end is None else end
    return _simulate(open_, close, rebalance, last, decide, costs, symbols, benchmark=True)


def long_short(scores: np.ndarray, open_: np.ndarray, close: np.ndarray, rebalance: np.ndarray, *, n_quantiles: int,
               costs: Costs, symbols: list[str], end: int | None = None) -> Backtest:
    """Long the top quantile group, short the bottom one (:func:`~kronos_kit.evaluate.cross_section.quantile_groups`),
    equal weights, the book's value per side, rebalanced at the open after each ``rebalance`` day."""
    groups = quantile_groups(np.asarray(scores, dtype=np.float64), n_quantiles)

    def decide(d: int, day: int, book: _Book, opens: np.ndarray, marks: np.ndarray) -> None:
        equity = book.value(np.where(np.isfinite(marks), marks, 0.0))
        target = np.zeros(len(opens))
        for group, sign in ((n_quantiles, 1.0), (1, -1.0)):
            names = np.flatnonzero(groups[d] == group)
            if len(names):
                target[names] = sign * equity / len(names)
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = np.where(np.isfinite(opens), target / opens - book.shares, 0.0)
        for k in np.flatnonzero(delta < 0):  # sells and shorts first, then buys and covers
            book.trade(k, delta[k], opens[k], day)
        for k in np.flatnonzero(delta > 0):
            book.trade(k, delta[k], opens[k], day)

    last = close.shape[0] - 1 if end is None else end
    return _simulate(open_, close, rebalance, last, decide, costs, symbols, benchmark=False)


def periods_per_year(dates: pd.DatetimeIndex | np.ndarray) -> float:
    """Bars per year of a calendar: 252 trading days times the median bars per day (252 for daily bars)."""
    stamps = pd.DatetimeIndex(dates)
    if len(stamps) == 0:
        return 252.0
    per_day = pd.Series(1, index=stamps).groupby(stamps.normalize()).size()
    return 252.0 * float(per_day.median())


def performance(bt: Backtest, bars_per_year: float) -> dict[str, float]:
    """The reference's risk analysis (qlib ``risk_analysis``, mode "sum") and what a trader asks besides.

    Annualized mean returns (mean x bars_per_year) of the book after and before costs, of the benchmark and
    of the excess over it; volatility and tracking error (std x sqrt(bars_per_year)); the information ratio
    of the excess (after and before costs); the max drawdown of the cumulative excess (summed, as qlib);
    ``turnover``: the mean share of the book replaced per rebalance ((bought + sold) / 2 / value); the hit
    rate: the share of holding periods (rebalance to rebalance) whose excess after costs is positive;
    ``breakeven_bps``: the cost per side, in basis points of the traded value, at which the excess return is
    zero: mean gross excess / mean (bought + sold) / value, per bar (negative: it loses before costs).
    """
    n = len(bt.net)
    years = bars_per_year

    def annual(x: np.ndarray) -> float:
        return float(np.mean(x) * years) if n else float("nan")

    def ratio(x: np.ndarray) -> float:
        sd = float(np.std(x, ddof=1)) if n > 1 else float("nan")
        return float(np.mean(x) / sd * np.sqrt(years)) if sd > 0 else float("nan")

    cum = np.cumsum(bt.excess)
    periods = np.split(bt.excess, bt.rebalances[1:]) if len(bt.rebalances) else []
    traded = float(np.mean(bt.turnover)) if n else float("nan")
    return {
        "annual_return": annual(bt.net), "annual_return_gross": annual(bt.gross),
        "benchmark_return": annual(bt.benchmark),
        "excess_return": annual(bt.excess), "excess_return_gross": annual(bt.excess_gross),
        "volatility": float(np.std(bt.net, ddof=1) * np.sqrt(years)) if n > 1 else float("nan"),
        "tracking_error": float(np.std(bt.excess, ddof=1) * np.sqrt(years)) if n > 1 else float("nan"),
        "information_ratio": ratio(bt.excess), "information_ratio_gross": ratio(bt.excess_gross),
        "max_drawdown": float(np.min(cum - np.maximum.accumulate(cum), initial=0.0)) if n else float("nan"),
        "cost": annual(bt.cost),
        "turnover": float(np.mean(bt.turnover[bt.rebalances]) / 2) if len(bt.rebalances) else float("nan"),
        "hit_rate": float(np.mean([p.sum() > 0 for p in periods])) if len(periods) else float("nan"),
        "breakeven_bps": float(np.mean(bt.excess_gross) / traded / BPS) if traded > 0 else float("nan"),
        "n_bars": n, "n_rebalances": int(len(bt.rebalances)),
    }


__all__ = ["BPS", "Backtest", "Costs", "long_short", "performance", "periods_per_year", "topk_dropout",
           "topk_dropout_orders"]
