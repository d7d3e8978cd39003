"""The forecaster's generation as it was before issue 25 item 10 (commit aa8ddee), pinned for bench_universe.

`bench_universe.py` measures the old and the new `predict_paths_batch` interleaved in one process, and
checks that both sample the same tokens. The library no longer has the old path, so its parts that changed
are kept here, as they were: the KV cache that copies the history's keys and values to every sample path
(`repeat_interleave`) and grows in blocks of at least 64 positions, the stepper's rebuild that fills it, the
tokenizer decode of the whole window for every path, and the per-series input preparation (pandas calls per
series). Everything else (the models' layers, the stepping, `Sampler`, `normalize`) is the library's, which
that work left as it was.
Only valid inputs are handled (the checks that raise are the library's business).

Do not use this for forecasting: it exists to measure against.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from kronos_kit.data.schema import FEATURE_COLUMNS, denormalize, normalize, time_features
from kronos_kit.forecast import KronosPredictor, Sampler
from kronos_kit.generation import _CachedStepper
from kronos_kit.model import PredictorCache
from kronos_kit.runtime import inference


class OldKVCache:
    """The KV cache before: one buffer per row, capacity max(64, 2 * needed), copied n-fold for n paths."""

    shared_k = None  # the new attention asks; the old cache never shares

    def __init__(self) -> None:
        self._k = self._v = None
        self.length = 0
        self.dropped = 0

    @property
    def k(self):
        return None if self._k is None else self._k[:, :, : self.length]

    @property
    def v(self):
        return None if self._v is None else self._v[:, :, : self.length]

    @property
    def next_position(self) -> int:
        return self.dropped + self.length

    def append(self, k, v):
        n = k.shape[-2]
        if self._k is None or self.length + n > self._k.shape[-2]:
            capacity = max(64, 2 * (self.length + n))
            grown_k = k.new_empty(*k.shape[:-2], capacity, k.shape[-1])
            grown_v = v.new_empty(*v.shape[:-2], capacity, v.shape[-1])
            if self.length:
                grown_k[:, :, : self.length] = self.k
                grown_v[:, :, : self.length] = self.v
            self._k, self._v = grown_k, grown_v
        self._k[:, :, self.length : self.length + n] = k
        self._v[:, :, self.length : self.length + n] = v
        self.length += n
        return self.k, self.v

    def drop_front(self, n: int) -> None:
        if self._k is not None and n > 0:
            self._k, self._v = self._k[:, :, n:], self._v[:, :, n:]
            self.length -= n
            self.dropped += n

    def repeat_interleave(self, n: int) -> None:
        if self._k is not None:
            self._k = self._k.repeat_interleave(n, dim=0)
            self._v = self._v.repeat_interleave(n, dim=0)


def _old_cache(n_layers: int) -> PredictorCache:
    return PredictorCache([OldKVCache() for _ in range(n_layers)], OldKVCache())


class OldStepper(_CachedStepper):
    """`_CachedStepper` before: the history's keys and values copied to every path (stepping is unchanged)."""

    def _rebuild(self, start, cur, hist_len):
        self.cache = _old_cache(self.model.n_layers)
        logits, context = None, None
        if start < hist_len:
            logits, context = self._run(start, min(hist_len, cur), rows_are_series=True)
            for c in [*self.cache.blocks, self.cache.dep]:
                c.repeat_interleave(self.samples)
            logits = logits.repeat_interleave(self.samples, 0)
            context = context.repeat_interleave(self.samples, 0)
        if cur > max(start, hist_len):
            logits, context = self._run(max(start, hist_len), cur, rows_are_series=False)
        return logits, context


@torch.no_grad()
def old_generate_tokens(model, s1, s2, stamps, pred_len, *, max_context, sample_count, sampler, sliding, generator):
    n, hist_len = s1.shape
    s1, s2 = s1.repeat_interleave(sample_count, 0), s2.repeat_interleave(sample_count, 0)
    stamps_rows = stamps.repeat_interleave(sample_count, 0)
    tokens1 = torch.cat([s1, s1.new_zeros(s1.shape[0], pred_len)], 1)
    tokens2 = torch.cat([s2, s2.new_zeros(s2.shape[0], pred_len)], 1)
    step = OldStepper(model, tokens1, tokens2, stamps, stamps_rows, n, sample_count, max_context, sliding)
    for i in range(pred_len):
        cur = hist_len + i
        logits1, last_context = step.advance(cur)
        next1 = sampler(logits1, generator)
        next2 = sampler(model.decode_s2_step(last_context, next1, step.cache), generator)
        tokens1[:, cur], tokens2[:, cur] = next1, next2
    return tokens1, tokens2


def old_decode_forecast(tokenizer, tokens1, tokens2, pred_len, *, max_context):
    """The whole window (history + horizon) decoded for every path."""
    parts, end, first = [], tokens1.shape[1], tokens1.shape[1] - pred_len
    while end > first:
        start = max(0, end - max_context)
        decoded = tokenizer.decode([tokens1[:, start:end], tokens2[:, start:end]], half=True)
        parts.append(decoded[:, max(start, first) - start :])
        end = start
    return torch.cat(parts[::-1], dim=1)


def _old_time_stamps(timestamps) -> np.ndarray:
    return time_features(pd.to_datetime(pd.Series(timestamps).to_numpy())).to_numpy(np.float32)


def _old_prepare(predictor: KronosPredictor, df, x_timestamp, y_timestamp):
    df = df.rename(columns={})  # the old `_lowercase_features` always renamed (a copy)
    values = df[list(FEATURE_COLUMNS)].to_numpy(dtype=np.float64)
    assert np.isfinite(values).all()
    x = values.astype(np.float32)
    mean, std = x.mean(0), x.std(0)
    x = normalize(x, mean, std, predictor.clip)
    stamps = np.concatenate([_old_time_stamps(x_timestamp), _old_time_stamps(y_timestamp)])
    future = pd.DatetimeIndex(pd.to_datetime(pd.Series(y_timestamp).to_numpy()))
    return x, stamps, mean, std, future


def old_predict_paths_batch(predictor: KronosPredictor, df_list, x_timestamp_list, y_timestamp_list, pred_len: int,
                            *, sampler: Sampler, sample_count: int, seed: int, sliding: str = "exact"):
    """(paths (N, S, pred_len, 6), tokens1, tokens2, decoded bars before de-normalising) as before."""
    prepared = [_old_prepare(predictor, *args) for args in zip(df_list, x_timestamp_list, y_timestamp_list)]
    x = torch.from_numpy(np.stack([p[0] for p in prepared])).to(predictor.device)
    stamps = torch.from_numpy(np.stack([p[1] for p in prepared])).to(predictor.device)
    generator = torch.Generator(device=predictor.device).manual_seed(seed)
    with inference(predictor.model, predictor.tokenizer):
        s1, s2 = predictor.tokenizer.encode(x, half=True)
        tokens1, tokens2 = old_generate_tokens(predictor.model, s1, s2, stamps, pred_len,
                                               max_context=predictor.max_context, sample_count=sample_count,
                                               sampler=sampler, sliding=sliding, generator=generator)
        decoded = old_decode_forecast(predictor.tokenizer, tokens1, tokens2, pred_len,
                                      max_context=predictor.max_context)
    preds = decoded.float().cpu().numpy().reshape(len(prepared), sample_count, pred_len, len(FEATURE_COLUMNS))
    mean = np.stack([p[2] for p in prepared])[:, None, None]
    std = np.stack([p[3] for p in prepared])[:, None, None]
    return denormalize(preds, std=std, mean=mean), tokens1, tokens2, decoded
