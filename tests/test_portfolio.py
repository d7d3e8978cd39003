"""The portfolio engine against cases small enough to compute by hand: qlib's top-k dropout decision, the book's
holdings, trades, costs and returns day by day, the long-short book, and the performance summary."""

from __future__ import annotations

import numpy as np
import pytest

from kronos_kit.evaluate.portfolio import Costs, long_short, performance, periods_per_year, topk_dropout
from kronos_kit.evaluate.portfolio import topk_dropout_orders as orders

NAN = np.nan
SYMBOLS = ["A", "B", "C"]
# 3 symbols x 6 days: A rises 10 -> 13, B stays at 20, C rises 5 -> 6.6 from day 3
OPEN = np.array([[10, 20, 5], [10, 20, 5], [11, 20, 5], [12, 20, 5], [12, 20, 5.5], [13, 20, 6]], dtype=float)
CLOSE = np.array([[10, 20, 5], [11, 20, 5], [12, 20, 5], [12, 20, 5.5], [13, 20, 6], [13, 20, 6.6]], dtype=float)
SCORES = np.array([[3.0, 2.0, 1.0],   # day 0's close: A ranks first
                   [1.0, 2.0, 3.0]])  # day 2's close: C first, A last
REBALANCE = np.array([0, 2])
COSTS = Costs(buy=0.001, sell=0.002, minimum=0.0, account=1000.0)


def book(**kwargs):
    args = {"topk": 1, "n_drop": 1, "hold_bars": 1, "costs": COSTS, "symbols": SYMBOLS, **kwargs}
    return topk_dropout(SCORES, OPEN, CLOSE, REBALANCE, **args)


def test_topk_dropout_by_hand():
    bt = book()
    assert bt.days.tolist() == [1, 2, 3, 4, 5] and bt.rebalances.tolist() == [0, 2]
    # day 1, open: buy A with all 1000; the shares and their 0.1% cost together spend it
    a_value = 1000 / 1.001
    a_shares = a_value / 10
    # day 3, open: A (held 2 bars) is among the n_drop worst of {A held, C candidate}: sold at 12 (0.2% cost),
    # C bought with the proceeds at 5
    proceeds = a_shares * 12
    sell_cost = 0.002 * proceeds
    c_value = (proceeds - sell_cost) / 1.001
    c_shares = c_value / 5
    trades = bt.trades
    assert trades[["day", "symbol", "side"]].values.tolist() == [[1, "A", "buy"], [3, "A", "sell"], [3, "C", "buy"]]
    np.testing.assert_allclose(trades["shares"], [a_shares, a_shares, c_shares], rtol=1e-12)
    np.testing.assert_allclose(trades["price"], [10, 12, 5])
    np.testing.assert_allclose(trades["cost"], [0.001 * a_value, sell_cost, 0.001 * c_value], rtol=1e-12)
    # the book's value at each close, and the returns before / after costs
    value = np.array([a_shares * 11, a_shares * 12, c_shares * 5.5, c_shares * 6, c_shares * 6.6])
    before = np.r_[1000.0, value[:-1]]
    day_cost = np.array([0.001 * a_value, 0, sell_cost + 0.001 * c_value, 0, 0])
    np.testing.assert_allclose(bt.net, value / before - 1, rtol=1e-12)
    np.testing.assert_allclose(bt.cost, day_cost / before, rtol=1e-12)
    np.testing.assert_allclose(bt.gross, (value - before + day_cost) / before, rtol=1e-12)
    np.testing.assert_allclose(bt.turnover, [a_value / 1000, 0, (proceeds + c_value) / value[1], 0, 0], rtol=1e-12)
    # holdings: all in A on days 1-2, all in C from day 3
    np.testing.assert_allclose(bt.weights, [[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]], atol=1e-12)
    # the equal-weight universe: the mean close-to-close move of the three names
    np.testing.assert_allclose(bt.benchmark, [0.1 / 3, (12 / 11 - 1) / 3, 0.1 / 3, (13 / 12 - 1 + 6 / 5.5 - 1) / 3,
                                              0.1 / 3], rtol=1e-12)


def test_the_minimum_hold_blocks_the_sell_and_cash_bounds_the_buy():
    bt = book(hold_bars=3)  # A was bought on day 1: on day 3 it has been held 2 bars
    assert bt.trades["day"].tolist() == [1]  # no sell; the buy of C finds no cash (qlib sizes by cash)
    np.testing.assert_allclose(bt.weights[:, 0], 1.0)


def test_a_name_without_an_open_cannot_trade():
    opens = OPEN.copy()
    opens[3, 0] = NAN  # A suspended on day 3: the sell is skipped, and C gets no cash
    bt = topk_dropout(SCORES, opens, CLOSE, REBALANCE, topk=1, n_drop=1, hold_bars=1, costs=COSTS, symbols=SYMBOLS)
    assert bt.trades["day"].tolist() == [1]


def test_zero_costs_make_net_and_gross_identical():
    free = Costs(buy=0.0, sell=0.0, minimum=0.0, account=1000.0)
    bt = book(costs=free)
    np.testing.assert_array_equal(bt.net, bt.gross)
    assert not bt.cost.any()
    perf = performance(bt, 252)
    assert perf["excess_return"] == perf["excess_return_gross"]
    assert perf["information_ratio"] == perf["information_ratio_gross"]


def test_a_minimum_cost_applies_per_trade():
    bt = book(costs=Costs(buy=0.001, sell=0.002, minimum=5.0, account=1000.0))
    # 0.1% of ~1000 is ~1, below the minimum of 5: the buy pays 5 and gets 995 of shares
    assert bt.trades.loc[0, "cost"] == pytest.approx(5.0)
    assert bt.trades.loc[0, "value"] == pytest.approx(995.0)


def test_topk_dropout_orders_follow_qlib():
    score = np.array([5.0, 4.0, 1.0, 3.0, 2.0])  # A B C D E
    held = np.array([True, True, True, False, False])
    sell, buy = orders(score, held, topk=3, n_drop=1)
    assert sell.tolist() == [2] and buy.tolist() == [3]  # C (worst held) out, D (best candidate) in
    # a candidate worse than every held name: nothing is sold high to buy low
    sell, buy = orders(np.array([5.0, 4.0, 1.0, 0.5, 0.2]), held, topk=3, n_drop=1)
    assert sell.tolist() == [] and buy.tolist() == []
    # a held name without a score ranks last and is dropped first
    sell, buy = orders(np.array([NAN, 4.0, 1.0, 3.0, 2.0]), held, topk=3, n_drop=1)
    assert sell.tolist() == [0] and buy.tolist() == [3]
    # an empty book buys the top k; names without a score are never bought
    sell, buy = orders(np.array([1.0, NAN, 3.0, 2.0, 0.0]), np.zeros(5, bool), topk=2, n_drop=1)
    assert sell.tolist() == [] and buy.tolist() == [2, 3]
    # a book below topk (a name sold earlier) fills up beyond n_drop
    sell, buy = orders(score, np.array([True, False, False, False, False]), topk=3, n_drop=1)
    assert sell.tolist() == [] and buy.tolist() == [1, 3]


def test_long_short_by_hand():
    # 4 names, 2 groups: long the top two, short the bottom two at day 1's open, no costs
    open_ = np.array([[10, 10, 10, 10], [10, 20, 30, 40], [10, 20, 30, 40]], dtype=float)
    close = np.array([[10, 10, 10, 10], [11, 20, 27, 44], [11, 20, 27, 44]], dtype=float)
    scores = np.array([[4.0, 3.0, 2.0, 1.0]])
    bt = long_short(scores, open_, close, np.array([0]), n_quantiles=2, costs=Costs(0, 0, 0, 100.0),
                    symbols=list("ABCD"), end=2)
    long_leg = (11 / 10 - 1 + 20 / 20 - 1) / 2
    short_leg = (27 / 30 - 1 + 44 / 40 - 1) / 2
    assert bt.net[0] == pytest.approx(long_leg - short_leg)
    assert not bt.benchmark.any()  # a long-short book is measured against cash
    sides = dict(zip(bt.trades["symbol"], bt.trades["side"]))
    assert sides == {"A": "buy", "B": "buy", "C": "sell", "D": "sell"}
    np.testing.assert_allclose(bt.turnover[0], 2.0)  # each side the whole equity


def test_performance_annualizes_as_qlib_and_breakeven_zeroes_the_excess():
    bt = book()
    perf = performance(bt, 252)
    assert perf["excess_return"] == pytest.approx(np.mean(bt.net - bt.benchmark) * 252)
    ex = bt.net - bt.benchmark
    assert perf["information_ratio"] == pytest.approx(ex.mean() / ex.std(ddof=1) * np.sqrt(252))
    cum = np.cumsum(ex)
    assert perf["max_drawdown"] == pytest.approx(min(0.0, (cum - np.maximum.accumulate(cum)).min()))
    # at the breakeven cost per side, buys and sells cost exactly the gross excess on average
    rate = perf["breakeven_bps"] * 1e-4
    assert np.mean(bt.excess_gross) - rate * np.mean(bt.turnover) == pytest.approx(0.0, abs=1e-15)
    assert perf["turnover"] == pytest.approx(np.mean(bt.turnover[[0, 2]]) / 2)
    assert periods_per_year(np.array(["2024-01-02", "2024-01-03"], dtype="datetime64[ns]")) == 252.0
