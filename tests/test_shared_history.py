"""Generation that shares each series' history across its sample paths gives the forecasts of the slow
paths kept beside it: the same tokens, and bars equal to float rounding.

The references: attention over a history copied to every path; the tokenizer decoding every window in
full (`use_cache=False`); each path generated as a series of its own (`sample_count=1` on histories
repeated: same rows, same random numbers, nothing shared); and the uncached reference algorithm.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DATA

import kronos_kit.forecast as forecast
import kronos_kit.generation as generation
from kronos_kit.data import FEATURE_COLUMNS
from kronos_kit.data.schema import normalize
from kronos_kit.forecast import KronosPredictor
from kronos_kit.generation import Sampler, decode_forecast, generate_tokens
from kronos_kit.model import Kronos, KronosTokenizer
from kronos_kit.model.layers import CrossAttention, KVCache, SelfAttention

SAMPLERS = {
    "greedy": Sampler(top_k=1),
    "top_p": Sampler(temperature=1.0, top_p=0.9),
    "top_k+top_p": Sampler(temperature=1.3, top_k=5, top_p=0.8),
    "reference_filtering": Sampler(temperature=1.3, top_k=5, top_p=0.8, reference_filtering=True),
}


@pytest.fixture(scope="module")
def base() -> tuple[Kronos, KronosTokenizer]:
    return Kronos.from_pretrained("embedded:base/predictor"), KronosTokenizer.from_pretrained("embedded:base/tokenizer")


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    return pd.read_csv(DATA / "ashare_5min_sample.csv", parse_dates=["timestamps"])


# ------------------------------------------------------------------ the layer


def _attention_pair(cls, seed=0):
    torch.manual_seed(seed)
    return cls(32, 4, 0.0, 0.0).eval()  # head_dim 8: the query scaling is not a power of two here


@torch.no_grad()
def test_shared_prefix_attention_equals_attention_over_a_copied_history():
    attn, groups, n, hist = _attention_pair(SelfAttention), 3, 4, 7
    gen = torch.Generator().manual_seed(1)
    history = torch.randn(groups, hist, 32, generator=gen)
    copied, shared = KVCache(), KVCache()
    attn(history.repeat_interleave(n, 0), cache=copied)
    attn(history, cache=shared)
    shared.share(n)
    assert shared.length == copied.length == hist and shared.shared_k.shape[0] == groups
    for t in (3, 1, 1):  # a chunk of own positions (causal among them), then single steps
        x = torch.randn(groups * n, t, 32, generator=gen)
        torch.testing.assert_close(attn(x, cache=shared), attn(x, cache=copied), rtol=1e-5, atol=1e-6)
    # the approximate sliding window forgets the oldest positions, the shared ones first, then own ones
    for drop in (hist - 2, 4):
        shared.drop_front(drop), copied.drop_front(drop)
        x = torch.randn(groups * n, 1, 32, generator=gen)
        torch.testing.assert_close(attn(x, cache=shared), attn(x, cache=copied), rtol=1e-5, atol=1e-6)
    assert shared.shared_k is None and shared.next_position == copied.next_position == hist + 5 + 2


@torch.no_grad()
def test_shared_s2_cache_equals_a_copied_one():
    attn, groups, n = _attention_pair(CrossAttention, seed=2), 2, 5
    gen = torch.Generator().manual_seed(3)
    context = torch.randn(groups, 6, 32, generator=gen)
    copied, shared = KVCache(), KVCache()
    copied.append(*attn.project_kv(context.repeat_interleave(n, 0)))
    shared.append(*attn.project_kv(context))
    shared.share(n)
    for _ in range(2):  # no own position yet (right after the history), then one generated
        query = torch.randn(groups * n, 1, 32, generator=gen)
        torch.testing.assert_close(attn.attend_one(query, shared), attn.attend_one(query, copied), rtol=1e-5,
                                   atol=1e-6)
        step = torch.randn(groups * n, 1, 32, generator=gen)
        shared.append(*attn.project_kv(step)), copied.append(*attn.project_kv(step))


# ------------------------------------------------------------------ the tokenizer


@pytest.mark.parametrize("history,paths", [(12, 4), (12, 1), (0, 3)])
@torch.no_grad()
def test_decode_paths_equals_decoding_the_whole_window(base, history, paths):
    _, tokenizer = base
    gen = torch.Generator().manual_seed(history + paths)
    series, tail = 3, 5
    own = torch.randint(0, 64, (2, series, history), generator=gen).repeat_interleave(paths, 1)
    s1, s2 = (torch.cat([h, torch.randint(0, 64, (series * paths, tail), generator=gen)], 1) for h in own)
    full = tokenizer.decode([s1, s2], half=True)[:, history:]
    torch.testing.assert_close(tokenizer.decode_paths(s1, s2, history=history, paths=paths), full, rtol=1e-5,
                               atol=1e-5)


# ------------------------------------------------------------------ generation


def _tokens(seed: int, series: int, hist_len: int, pred_len: int):
    gen = torch.Generator().manual_seed(seed)
    s1, s2 = torch.randint(0, 64, (2, series, hist_len), generator=gen)
    stamps = torch.stack([torch.randint(0, size, (series, hist_len + pred_len), generator=gen)
                          for size in (60, 24, 7, 32, 13)], -1).float()
    return s1, s2, stamps


@pytest.mark.parametrize("sliding", ["exact", "approx"])
@pytest.mark.parametrize("sampler", SAMPLERS.values(), ids=SAMPLERS.keys())
@pytest.mark.parametrize("series,paths", [(1, 5), (3, 4)])
def test_shared_history_gives_the_tokens_of_one_series_per_path(base, sliding, sampler, series, paths):
    """12 history bars, 20 forecast with max_context 16: the window slides from the 5th forecast bar on, and
    the last 12 forecast bars are decoded in a window of their own."""
    model, tokenizer = base
    s1, s2, stamps = _tokens(series * 10 + paths, series, 12, 20)
    opts = {"max_context": 16, "sampler": sampler, "sliding": sliding}
    t1, t2 = generate_tokens(model, s1, s2, stamps, 20, sample_count=paths, **opts,
                             generator=torch.Generator().manual_seed(9))
    alone = [x.repeat_interleave(paths, 0) for x in (s1, s2, stamps)]
    r1, r2 = generate_tokens(model, *alone, 20, sample_count=1, **opts, generator=torch.Generator().manual_seed(9))
    assert torch.equal(t1, r1) and torch.equal(t2, r2)
    if sliding == "exact":  # the reference algorithm: every window recomputed from its first bar
        u1, u2 = generate_tokens(model, s1, s2, stamps, 20, sample_count=paths, **opts, use_cache=False,
                                 generator=torch.Generator().manual_seed(9))
        assert torch.equal(t1, u1) and torch.equal(t2, u2)
    shared = decode_forecast(tokenizer, t1, t2, 20, max_context=16, sample_count=paths)
    unshared = decode_forecast(tokenizer, t1, t2, 20, max_context=16, sample_count=1)
    full = decode_forecast(tokenizer, t1, t2, 20, max_context=16, use_cache=False)
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unshared, full, rtol=1e-5, atol=1e-5)


def _windows(bars: pd.DataFrame, series: int, hist_len: int, pred_len: int):
    starts = [97 * i for i in range(series)]
    return ([bars.iloc[a : a + hist_len][list(FEATURE_COLUMNS)] for a in starts],
            [bars["timestamps"].iloc[a : a + hist_len] for a in starts],
            [bars["timestamps"].iloc[a + hist_len : a + hist_len + pred_len] for a in starts])


@pytest.mark.parametrize("pred_len", [6, 30], ids=["within max_context", "beyond max_context"])
@pytest.mark.parametrize("sampler", SAMPLERS.values(), ids=SAMPLERS.keys())
@pytest.mark.parametrize("series,paths", [(1, 1), (4, 8)])
def test_fast_forecast_equals_the_slow_reference_path(base, bars, pred_len, sampler, series, paths):
    """`predict_paths_batch` as it runs by default against `use_cache=False` (every window recomputed and
    decoded in full for every path): a token sampled differently would move its bars by far more than the
    tolerance (1e-4 of a price, volume or amount)."""
    predictor = KronosPredictor(*base, max_context=24)
    inputs = _windows(bars, series, 20, pred_len)
    opts = {"T": sampler.temperature, "top_k": sampler.top_k, "top_p": sampler.top_p, "sample_count": paths,
            "reference_filtering": sampler.reference_filtering, "verbose": False, "seed": 5}
    fast = predictor.predict_paths_batch(*inputs, pred_len, **opts).paths
    slow = predictor.predict_paths_batch(*inputs, pred_len, **opts, use_cache=False).paths
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(predictor.predict_paths_batch(*inputs, pred_len, **opts).paths, fast)  # reruns


def test_decoding_a_few_series_at_a_time_changes_nothing(base, bars, monkeypatch):
    predictor = KronosPredictor(*base, max_context=24)
    inputs = _windows(bars, 5, 20, 8)
    opts = {"sample_count": 3, "verbose": False, "seed": 2}
    whole = predictor.predict_paths_batch(*inputs, 8, **opts).paths
    monkeypatch.setattr(generation, "DECODE_CHUNK_TOKENS", 20)  # 20 // (3 paths x 8 bars) -> one series per call
    np.testing.assert_allclose(predictor.predict_paths_batch(*inputs, 8, **opts).paths, whole, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ inputs


def test_batched_calendar_features_equal_per_series_ones():
    zoned = pd.Series(pd.date_range("2024-03-09 20:00", periods=30, freq="h", tz="America/New_York"))  # DST
    naive = pd.date_range("2024-01-01", periods=30, freq="D")
    text = list(pd.date_range("2024-01-01 09:30", periods=30, freq="5min").astype(str))
    seconds = pd.Series(pd.date_range("2024-01-01", periods=30, freq="D").as_unit("s"))
    per_series = [np.concatenate([forecast.time_stamps(a), forecast.time_stamps(b)])
                  for a, b in ((zoned, naive), (text, seconds))]
    batched = forecast._stacked_time_stamps([[forecast._datetime_index(a), forecast._datetime_index(b)]
                                             for a, b in ((zoned, naive), (text, seconds))])
    np.testing.assert_array_equal(batched, np.stack(per_series))
    assert per_series[0][2].tolist() == [0, 22, 5, 9, 3]  # local wall clock: Sat 9 Mar 22:00 in New York


def test_the_callers_history_is_left_as_it_was(base, bars):
    predictor = KronosPredictor(*base, max_context=24)
    hist, x_ts, y_ts = (part[0] for part in _windows(bars, 1, 20, 4))
    prices = hist[["open", "high", "low", "close"]].copy()
    before = prices.copy()
    predictor.predict_paths(prices, x_ts, y_ts, 4, verbose=False, seed=0)
    pd.testing.assert_frame_equal(prices, before)  # no volume/amount columns added to the caller's frame


def test_history_is_normalised_bit_for_bit_as_pandas_gives_it(base, bars):
    """The mean and std sum each column pairwise as NumPy does over pandas' column-major values: a row-major
    copy sums in another order, changes their last bits and can change the tokens sampled."""
    predictor = KronosPredictor(*base, max_context=24)
    for hist, x_ts, y_ts in zip(*_windows(bars, 6, 90, 4)):
        values = hist[list(FEATURE_COLUMNS)].to_numpy(np.float64).astype(np.float32)
        expected = normalize(values, values.mean(0), values.std(0), predictor.clip)
        np.testing.assert_array_equal(predictor._prepare(hist, x_ts, y_ts, 4, "history")[0], expected)


def test_the_history_is_kept_once_per_series_not_per_path(base):
    """Memory: the history's keys and values are not copied to each path (at 128 series x 32 paths a copy
    per path held ~1 GB); a path's cache holds only the bars generated on it."""
    model, _ = base
    s1, s2, stamps = _tokens(0, 2, 12, 3)
    tokens1, tokens2 = (torch.cat([x.repeat_interleave(4, 0), x.new_zeros(8, 3)], 1) for x in (s1, s2))
    step = generation._CachedStepper(model, tokens1, tokens2, stamps, stamps.repeat_interleave(4, 0), 2, 4, 16, "exact")
    with torch.no_grad():
        step.advance(12)
        for cache in [*step.cache.blocks, step.cache.dep]:
            assert cache.shared_k.shape[:3] == (2, cache.shared_k.shape[1], 12) and cache.k is None
        step.advance(13)
    assert all(c.k.shape[:3] == (8, c.k.shape[1], 1) for c in step.cache.blocks)
