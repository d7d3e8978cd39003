"""Batch plumbing shared by everything that runs a model over windows: the one batch loop.

A *batch* is a dict as a ``DataLoader`` over `WindowDataset` yields it (``x`` (B, L, 6),
``mean``/``std`` (B, 6), ``stamp`` (B, L, 5), ``symbol`` list of str, ...), a bare ``x`` tensor
(B, L, 6), or a tuple/list whose first element is ``x``. Anything that takes ``batches`` also
takes a window dataset (or a list of window dicts), which is batched here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader

from kronos_kit.runtime import tqdm


class Batch(NamedTuple):
    x: torch.Tensor  # (B, L, C)
    mean: torch.Tensor | None  # (B, C)
    std: torch.Tensor | None  # (B, C)
    symbols: list[str] | None


def is_window_dataset(obj: Any) -> bool:
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
    if is_window_dataset(data):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    return data


def take(batches: Iterable[Any], n: int) -> Iterator[Any]:
    """The first ``n`` batches."""
    for i, batch in enumerate(batches):
        if i >= n:
            return
        yield batch


def loop_batches(data: Any, *, max_batches: int | None = None, progress: bool = False,
                 desc: str = "batches") -> Iterator[Any]:
    """The one batch loop: batch a window dataset, stop after ``max_batches``, show a progress bar."""
    batches = iter_batches(data)
    try:
        total: int | None = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
        batches = take(batches, max_batches)
    yield from tqdm(batches, total=total, desc=desc, leave=False, disable=not progress)


def unpack_batch(batch: Any) -> Batch:
    """``(x, mean, std, symbols)`` of one batch or one window; the last three are None when absent."""
    if isinstance(batch, Mapping):
        x = torch.as_tensor(batch["x"])
        mean, std, sym = batch.get("mean"), batch.get("std"), batch.get("symbol")
        mean = torch.as_tensor(mean) if mean is not None else None
        std = torch.as_tensor(std) if std is not None else None
        if x.ndim == 2:  # a single window
            x = x[None]
            mean = mean[None] if mean is not None else None
            std = std[None] if std is not None else None
            sym = [sym] if isinstance(sym, str) else sym
        if isinstance(sym, str):
            sym = [sym] * x.shape[0]
        return Batch(x, mean, std, list(sym) if sym is not None else None)
    if isinstance(batch, (tuple, list)):
        return unpack_batch(batch[0])
    x = torch.as_tensor(batch)
    return Batch(x[None] if x.ndim == 2 else x, None, None, None)


def in_split_mask(batch: Any, x: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the bars of each window that belong to its split (``in_split``; all of them for data
    without the mask). A val/test window borrows its first bars from the previous split as context; a
    score of that split counts only the bars where this is True."""
    mask = batch.get("in_split") if isinstance(batch, Mapping) else None
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    mask = torch.as_tensor(mask, dtype=torch.bool, device=x.device)
    return mask[None] if mask.ndim == 1 else mask
