"""Token-level metrics: next-token accuracy and perplexity of the s1 / s2 heads on held-out windows."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kronos_kit.runs import jsonable, save_json


def token_metrics(model: Any, tokenizer: Any, batches: Iterable[Mapping[str, Any]], *, device: str = "cpu") -> dict:
    """Next-token accuracy and perplexity of the s1 and s2 heads on test windows.

    Uses the causal path: inputs are tokens ``[:, :-1]``, targets ``[:, 1:]``, the model in eval mode
    under ``no_grad`` with ``use_teacher_forcing=True, s1_targets=s1[:, 1:]`` (Kronos conditions the s2
    head on the true s1 of the same step, which is available when decoding). ``model`` and
    ``tokenizer`` must already be on ``device``; their train/eval modes are restored afterwards.
    Perplexity = exp(mean token NLL). Returns s1/s2 accuracy, nll, perplexity and the token count.
    Only targets whose bar lies in the split count (a batch's ``in_split``; context bars borrowed
    from the previous split are not scored).
    """
    import torch

    from kronos_kit.data.batches import loop_batches
    from kronos_kit.runtime import inference

    sums = [0.0] * 5  # s1 NLL, s2 NLL, s1 hits, s2 hits, tokens
    n_batches = 0
    with inference(*[m for m in (model, tokenizer) if isinstance(m, torch.nn.Module)]):
        for batch in loop_batches(batches):  # a window dataset is batched; batches pass through
            x = torch.as_tensor(batch["x"], dtype=torch.float32, device=device)
            s1, s2 = tokenizer.encode(x, half=True)
            scores = model.score_next_tokens(s1, s2, torch.as_tensor(batch["stamp"], device=device),
                                             batch.get("in_split"))  # test targets only, not val context
            sums = [a + b for a, b in zip(sums, scores)]
            n_batches += 1
    nll = {"s1": sums[0], "s2": sums[1]}
    hits = {"s1": sums[2], "s2": sums[3]}
    n_tokens = int(sums[4])
    if n_tokens == 0:
        raise ValueError("token_metrics got no tokens (empty batches or windows of length 1)")
    out: dict[str, float | int] = {}
    for key in ("s1", "s2"):
        mean_nll = nll[key] / n_tokens
        out[f"{key}_accuracy"] = hits[key] / n_tokens
        out[f"{key}_nll"] = mean_nll
        out[f"{key}_perplexity"] = math.exp(mean_nll)
    out["n_tokens"] = n_tokens
    out["n_batches"] = n_batches
    return out

TOKEN_HEADLINE: tuple[tuple[str, str, str], ...] = (
    ("s1_accuracy", "s1 next-token accuracy", "higher"),
    ("s1_perplexity", "s1 perplexity", "lower"),
    ("s2_accuracy", "s2 next-token accuracy", "higher"),
    ("s2_perplexity", "s2 perplexity", "lower"),
)

def save_token_metrics(metrics: Mapping[str, Mapping[str, float]], path: str | Path) -> Path:
    """Write {model name: token_metrics(...)} as JSON (NaN as null)."""
    return save_json(path, jsonable(dict(metrics)))

__all__ = ["TOKEN_HEADLINE", "save_token_metrics", "token_metrics"]
