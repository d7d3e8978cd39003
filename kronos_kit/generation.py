"""Token generation for the forecaster: sampling, KV-cached generation of every sample path, decoding.

Generation is incremental: each new bar runs one position through the transformer against a
key/value cache, and the s2 layer reuses cached key/value projections of the context. Each series'
history runs once and its keys and values are shared by the series' sample paths (`KVCache.share`):
a path's cache holds only the bars generated on it, and attention takes the history part as one
(paths x history) product per series. Once history plus generated bars exceed `max_context`, the
reference drops the oldest bar and recomputes the window from position 0. `sliding="exact"`
(default) does the same, so results equal the reference, again running the window's history part
once per series. `sliding="approx"` (opt-in) instead drops the oldest cached position and keeps
going: much faster for long forecasts, but the remaining positions' hidden states still reflect
the dropped bars, so it no longer equals the reference.

The tokenizer's decoder is causal, so the bars of a window's history part decode the same for every
path: `decode_forecast` runs them once per series and decodes only the forecast bars per path
(`KronosTokenizer.decode_paths`). `use_cache=False` keeps the slow reference path: every window
recomputed per bar and decoded in full for every path; the fast path samples the same tokens and
decodes the same bars to float rounding (tests/test_shared_history.py).

A temperature at or below `GREEDY_TEMPERATURE` (1e-5) samples greedily (argmax): dividing logits by
a smaller one overflows float32, and the distribution is a point mass anyway. `top_k` keeps exactly
k tokens (ties go to the lower token id). A horizon longer than `max_context` is generated with the
sliding window above and decoded in windows of `max_context` tokens counted back from the last bar
(the reference decodes only the last window, which covers any horizon up to `max_context`, so
results there are unchanged).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from kronos_kit.config import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from kronos_kit.model import Kronos, KronosTokenizer, PredictorCache
from kronos_kit.runtime import tqdm

GREEDY_TEMPERATURE = 1e-5  # temperatures <= this take the argmax instead of sampling
SLIDING_MODES = ("exact", "approx")
DECODE_CHUNK_TOKENS = 4096  # path tokens per tokenizer decode call on a CPU (`_decode_paths`)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_sliding(sliding: object) -> None:
    if sliding not in SLIDING_MODES:
        raise ValueError(f"sliding must be 'exact' or 'approx', got {sliding!r}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, *, reference: bool = False):
    """Mask logits outside the top-k and/or the top-p nucleus (at least one token always kept).

    Top-k keeps exactly k tokens; ties with the k-th largest logit go to the lower token ids.

    By default both filters apply when both are set. `reference=True` reproduces the reference,
    which applies only top-k when `top_k > 0` and ignores `top_p` then.
    """
    logits = logits.clone()
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        above, tie = logits > kth, logits == kth
        # exactly k: of the tokens tied with the k-th largest, keep the lowest ids that fill k
        keep = above | (tie & (tie.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
        logits[~keep] = float("-inf")
        if reference:
            return logits
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
        remove[..., 0] = False
        logits[remove.scatter(-1, order, remove)] = float("-inf")
    return logits


@dataclass(frozen=True)
class Sampler:
    """Temperature, top-k and top-p sampling of the next token; greedy (argmax) when
    `temperature <= GREEDY_TEMPERATURE`."""

    temperature: float = DEFAULT_TEMPERATURE  # >= 0; <= GREEDY_TEMPERATURE takes the argmax
    top_k: int = 0  # keep the k most likely tokens; 0 disables it
    top_p: float = DEFAULT_TOP_P  # keep the smallest set with this much probability; 1 disables it
    reference_filtering: bool = False  # True: top-k alone when both are set, as the reference

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, numbers.Real) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (<= {GREEDY_TEMPERATURE:g} takes the "
                             f"argmax), got {t!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        p = self.top_p
        if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0 < p <= 1:  # NaN fails too
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.greedy:  # top-k and top-p always keep the largest logit; ties take the lowest id
            return logits.argmax(-1)
        logits = filter_logits(logits.float() / self.temperature, self.top_k, self.top_p,
                               reference=self.reference_filtering)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def generate_tokens(
    model: Kronos,
    s1: torch.Tensor,
    s2: torch.Tensor,
    stamps: torch.Tensor,
    pred_len: int,
    *,
    max_context: int,
    sample_count: int = 1,
    sampler: Sampler | None = None,
    use_cache: bool = True,
    sliding: str = "exact",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate `pred_len` (s1, s2) pairs after each history; `sample_count` paths per series.

    s1, s2: (N, H) history tokens; stamps: (N, H + pred_len, 5). Returns (N * sample_count,
    H + pred_len) token tensors, series-major (rows n * sample_count ... are series n's paths).
    Both paths draw random numbers in the same order, so a seeded generator gives the same tokens.
    """
    _check_sliding(sliding)
    sampler = sampler or Sampler()
    n, hist_len = s1.shape
    s1 = s1.repeat_interleave(sample_count, 0)
    s2 = s2.repeat_interleave(sample_count, 0)
    stamps_rows = stamps.repeat_interleave(sample_count, 0)
    tokens1 = torch.cat([s1, s1.new_zeros(s1.shape[0], pred_len)], 1)
    tokens2 = torch.cat([s2, s2.new_zeros(s2.shape[0], pred_len)], 1)
    step = _CachedStepper(model, tokens1, tokens2, stamps, stamps_rows, n, sample_count, max_context, sliding) \
        if use_cache else None
    for i in tqdm(range(pred_len), desc="forecast", unit="bar", disable=not progress, leave=False):
        cur = hist_len + i  # tokens known so far
        if step is None:
            start = max(0, cur - max_context)
            logits1, context = model.decode_s1(tokens1[:, start:cur], tokens2[:, start:cur],
                                               stamps_rows[:, start:cur])
            next1 = sampler(logits1[:, -1], generator)
            next2 = sampler(model.decode_s2(context, next1[:, None])[:, -1], generator)
        else:
            logits1, last_context = step.advance(cur)
            next1 = sampler(logits1, generator)
            next2 = sampler(model.decode_s2_step(last_context, next1, step.cache), generator)
        tokens1[:, cur], tokens2[:, cur] = next1, next2
    return tokens1, tokens2


def decode_forecast(
    tokenizer: KronosTokenizer,
    tokens1: torch.Tensor,
    tokens2: torch.Tensor,
    pred_len: int,
    *,
    max_context: int,
    sample_count: int = 1,
    use_cache: bool = True,
) -> torch.Tensor:
    """Decode the last `pred_len` token pairs into (B, pred_len, d_in) normalised bars.

    As the reference, the last `max_context` tokens are decoded together and the forecast bars
    among them kept; a longer horizon continues in windows of `max_context` tokens counted back
    from the end (the tokenizer is causal, so no bar is decoded from later tokens). Rows are
    series-major paths (`generate_tokens`): with `use_cache`, the history part of a window is
    decoded once per series and shared by its `sample_count` paths (`KronosTokenizer.decode_paths`);
    `use_cache=False` decodes every window in full for every path, as the reference.
    """
    parts, end, first = [], tokens1.shape[1], tokens1.shape[1] - pred_len
    while end > first:
        start = max(0, end - max_context)
        window1, window2 = tokens1[:, start:end], tokens2[:, start:end]
        history = max(start, first) - start
        if use_cache:
            parts.append(_decode_paths(tokenizer, window1, window2, history, sample_count))
        else:
            parts.append(tokenizer.decode([window1, window2], half=True)[:, history:])
        end = start
    return torch.cat(parts[::-1], dim=1)


def _decode_paths(tokenizer: KronosTokenizer, tokens1: torch.Tensor, tokens2: torch.Tensor, history: int,
                  sample_count: int) -> torch.Tensor:
    """`KronosTokenizer.decode_paths`, on a CPU a few series at a time: with about `DECODE_CHUNK_TOKENS`
    path tokens per call its intermediates stay small, ~30% faster at 32 series x 32 paths x 10 bars
    than all at once (same numbers: rows do not mix). A GPU takes every series at once."""
    rows = len(tokens1)
    if tokens1.device.type == "cpu":
        series = max(1, DECODE_CHUNK_TOKENS // (sample_count * max(1, tokens1.shape[1] - history)))
        rows = series * sample_count
    return torch.cat([tokenizer.decode_paths(tokens1[i : i + rows], tokens2[i : i + rows], history=history,
                                             paths=sample_count) for i in range(0, len(tokens1), rows)])


class _CachedStepper:
    """Keeps a predictor cache in step with the token buffers during generation. A window's history part
    runs once per series, its keys and values kept once and shared by the series' paths (`KVCache.share`)."""

    def __init__(self, model, tokens1, tokens2, stamps, stamps_rows, n_series, samples, max_context, sliding):
        self.model, self.tokens1, self.tokens2 = model, tokens1, tokens2
        self.stamps, self.stamps_rows = stamps, stamps_rows
        self.n_series, self.samples, self.max_context, self.sliding = n_series, samples, max_context, sliding
        self.hist_len = 0  # set on the first advance
        self.cache: PredictorCache | None = None

    def _run(self, start: int, end: int, rows_are_series: bool):
        """Feed positions [start, end) into the cache; rows are series (N) or paths (N * samples)."""
        rows = slice(None, None, self.samples) if rows_are_series else slice(None)
        stamps = self.stamps[:, start:end] if rows_are_series else self.stamps_rows[:, start:end]
        logits, context = self.model.decode_s1(self.tokens1[rows, start:end], self.tokens2[rows, start:end],
                                               stamps, cache=self.cache)
        self.model.extend_s2_cache(context, self.cache)
        return logits[:, -1], context[:, -1:]

    def _rebuild(self, start: int, cur: int, hist_len: int):
        """Recompute the window [start, cur) from position 0, sharing the history part per series."""
        self.cache = PredictorCache.empty(self.model.n_layers)
        logits, context = None, None
        if start < hist_len:
            logits, context = self._run(start, min(hist_len, cur), rows_are_series=True)
            self.cache.share(self.samples)
            logits = logits.repeat_interleave(self.samples, 0)
            context = context.repeat_interleave(self.samples, 0)
        if cur > max(start, hist_len):
            logits, context = self._run(max(start, hist_len), cur, rows_are_series=False)
        return logits, context

    def advance(self, cur: int):
        """s1 logits and last context for the window ending at token `cur` (exclusive)."""
        if self.cache is None:  # first step: everything known is history
            self.hist_len = cur
            return self._rebuild(max(0, cur - self.max_context), cur, cur)
        if cur <= self.max_context:
            return self._run(cur - 1, cur, rows_are_series=False)
        if self.sliding == "approx":
            self.cache.drop_front(self.cache.length + 1 - self.max_context)
            return self._run(cur - 1, cur, rows_are_series=False)
        return self._rebuild(cur - self.max_context, cur, self.hist_len)


__all__ = ["DECODE_CHUNK_TOKENS", "GREEDY_TEMPERATURE", "SLIDING_MODES", "Sampler", "decode_forecast", "filter_logits",
           "generate_tokens"]
