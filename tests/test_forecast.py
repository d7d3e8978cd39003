"""Forecasting: reference numbers, cache equivalence, batching, sample paths, bad calls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DATA

from kronos_kit.data import FEATURE_COLUMNS
from kronos_kit.forecast import KronosPredictor, Sampler, filter_logits, generate_tokens
from kronos_kit.model import Kronos, KronosTokenizer


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    return pd.read_csv(DATA / "ashare_5min_sample.csv", parse_dates=["timestamps"])


@pytest.fixture(scope="module")
def reference_predictor(reference_dirs) -> KronosPredictor:
    tok = KronosTokenizer.from_pretrained(reference_dirs["tokenizer"])
    model = Kronos.from_pretrained(reference_dirs["predictor"])
    return KronosPredictor(model, tok, max_context=40, clip=5)


def window(bars, a, b, n):
    hist, fut = bars.iloc[a:b], bars.iloc[b : b + n]
    return hist[list(FEATURE_COLUMNS)], hist["timestamps"], fut["timestamps"]


@pytest.mark.parametrize("key", ["fc_within", "fc_sliding"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_forecast_reproduces_reference(reference_predictor, bars, golden, key, use_cache):
    a, b, n = golden[f"{key}_ctx_rows"]
    hist, x_ts, y_ts = window(bars, a, b, n)
    out = reference_predictor.predict(hist, x_ts, y_ts, int(n), top_k=1, verbose=False, use_cache=use_cache)
    np.testing.assert_allclose(out.to_numpy(), golden[key], rtol=1e-4)
    assert list(out.index) == list(y_ts)


SAMPLERS = [Sampler(top_k=1), Sampler(temperature=1.3, top_k=5, top_p=0.8)]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["greedy", "sampled"])
@pytest.mark.parametrize("hist_len", [20, 45])  # within max_context, and already past it
def test_cached_and_uncached_give_the_same_tokens(sampler, hist_len):
    model = Kronos.from_preset("tiny", seed=3)
    gen = torch.Generator().manual_seed(0)
    s1 = torch.randint(0, 64, (2, hist_len), generator=gen)
    s2 = torch.randint(0, 64, (2, hist_len), generator=gen)
    stamps = torch.randint(0, 7, (2, hist_len + 15, 5), generator=gen).float()
    runs = [generate_tokens(model, s1, s2, stamps, 15, max_context=32, sample_count=3, sampler=sampler,
                            use_cache=use_cache, generator=torch.Generator().manual_seed(7))
            for use_cache in (True, False)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    # the history is kept and the 3 paths of a series share it
    assert torch.equal(runs[0][0][:3, :hist_len], s1[:1].expand(3, -1))


def test_predict_batch_equals_per_series_predict(reference_predictor, bars):
    windows = [window(bars, a, a + 30, 8) for a in (0, 500, 1200)]
    batch = reference_predictor.predict_batch(*[list(z) for z in zip(*windows)], pred_len=8, top_k=1, verbose=False)
    for (hist, x_ts, y_ts), out in zip(windows, batch):
        single = reference_predictor.predict(hist, x_ts, y_ts, 8, top_k=1, verbose=False)
        np.testing.assert_allclose(out.to_numpy(), single.to_numpy(), rtol=1e-5)


def test_sample_paths_are_kept_and_summarised(reference_predictor, bars):
    hist, x_ts, y_ts = window(bars, 0, 30, 6)
    fc = reference_predictor.predict_paths(hist, x_ts, y_ts, 6, T=1.0, top_p=0.9, sample_count=5, verbose=False,
                                           seed=1, quantile_levels=(0.1, 0.5, 0.9))
    assert fc.paths.shape == (1, 5, 6, 6)
    assert not np.allclose(fc.paths[0, 0], fc.paths[0, 1])  # distinct paths, not an average
    np.testing.assert_allclose(fc.mean().to_numpy(), fc.paths[0].mean(0), rtol=1e-6)
    q = fc.quantiles()
    assert list(q) == [0.1, 0.5, 0.9]
    assert (q[0.1].to_numpy() <= q[0.9].to_numpy() + 1e-9).all()
    np.testing.assert_allclose(q[0.5].to_numpy(), fc.median().to_numpy())
    again = reference_predictor.predict_paths(hist, x_ts, y_ts, 6, sample_count=5, verbose=False, seed=1)
    np.testing.assert_array_equal(again.paths, fc.paths)  # a seed fixes the paths


def test_models_run_in_eval_and_get_their_mode_back(bars):
    tok, model = KronosTokenizer.from_preset("tiny"), Kronos.from_preset("tiny")
    model.token_drop.p = 0.5  # dropout that would change greedy forecasts if it fired
    model.train()
    tok.eval()
    predictor = KronosPredictor(model, tok, max_context=64)
    hist, x_ts, y_ts = window(bars, 0, 40, 5)
    first = predictor.predict(hist, x_ts, y_ts, 5, top_k=1, verbose=False)
    second = predictor.predict(hist, x_ts, y_ts, 5, top_k=1, verbose=False)
    pd.testing.assert_frame_equal(first, second)
    assert model.training and not tok.training


def test_top_k_and_top_p_combine_unless_reference():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    both = filter_logits(logits, top_k=3, top_p=0.6)
    assert torch.isfinite(both).tolist() == [[True, True, False, False]]
    reference = filter_logits(logits, top_k=3, top_p=0.6, reference=True)
    assert torch.isfinite(reference).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.4)).tolist() == [[True, False, False, False]]


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda h, x, y: (h, x[:-1], y), "x_timestamp has"),
        (lambda h, x, y: (h, x, y[:-1]), "y_timestamp has"),
        (lambda h, x, y: (h.assign(close=h["close"].where(h.index != h.index[3])), x, y), "NaN.*'close'"),
        (lambda h, x, y: (h.drop(columns=["high"]), x, y), r"price columns \['high'\]"),
        (lambda h, x, y: (h.iloc[:1], x.iloc[:1], y), "at least 2"),
    ],
    ids=["x_timestamp", "y_timestamp", "nan", "missing_column", "too_short"],
)
def test_bad_calls_fail_clearly(reference_predictor, bars, mutate, match):
    hist, x_ts, y_ts = mutate(*window(bars, 0, 30, 4))
    with pytest.raises(ValueError, match=match):
        reference_predictor.predict(hist, x_ts, y_ts, 4, verbose=False)


def test_missing_volume_is_filled_like_the_reference(reference_predictor, bars):
    hist, x_ts, y_ts = window(bars, 0, 30, 4)
    out = reference_predictor.predict(hist[["open", "high", "low", "close"]], x_ts, y_ts, 4, top_k=1, verbose=False)
    assert list(out.columns) == list(FEATURE_COLUMNS) and np.isfinite(out.to_numpy()).all()
