"""Phase 2's tokens on disk: every window encoded once by the frozen tokenizer, shared by the runs that point there.

The tokenizer is frozen during phase 2, so a window's tokens are fixed; `train.FrozenTokens` already keeps
them in memory for one run. With `predictor.token_cache_dir` set, `open_token_tables` keeps them on disk
instead, one entry per (tokenizer weights, data, windows) under that folder: a sweep's trials that share a
phase-1 tokenizer encode each window once between them, not once each.

An entry `tokens-<key>/` holds per split (`train`, `val`) the s1 and s2 ids of every window (N, L) and the
window's (symbol, start), as `.npy` (memory-mapped when read), and `meta.json`, written last (an entry
without it is incomplete and is built again). The key hashes the tokenizer's weights (`runtime.weights_hash`,
checked again when the entry is opened), the data (the data cache's key: the source's bytes and loader
options) and the `data.*` settings that place the windows, so an entry never serves other weights or windows.
One process builds an entry while others wanting it wait (`run_lock.waiting_run_lock`). The tokens equal
those encoded on the fly bit for bit (`tests/test_sweep_pieces.py`), so a run trains the same with or without.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from kronos_kit.config import KitConfig
from kronos_kit.run_lock import waiting_run_lock
from kronos_kit.runs import atomic_write, save_json
from kronos_kit.runtime import inference, module_device, tqdm, weights_hash

__all__ = ["FORMAT", "SPLITS", "TokenTable", "open_token_tables", "token_cache_key"]

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when the entry layout changes: old entries are then never read
SPLITS = ("train", "val")  # phase 2 reads tokens of these windows
META = "meta.json"
ENCODE_BATCH = 64


@dataclass
class TokenTable:
    """The cached tokens of one split's windows, looked up by the window's (symbol, start)."""

    s1: np.ndarray  # (N, L) ids
    s2: np.ndarray  # (N, L) ids
    index: dict[tuple[str, int], int]  # (symbol, start) -> row

    def lookup(self, symbols: Sequence[str], starts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The (B, L) int64 s1 and s2 ids of these windows, as `KronosTokenizer.encode` returns them."""
        try:
            rows = np.array([self.index[(s, int(t))] for s, t in zip(symbols, starts)])
        except KeyError as err:
            raise KeyError(f"window {err.args[0]} is not in the token cache: the cache was built for other windows; "
                           "delete the entry (predictor.token_cache_dir) so it is built again") from None
        return torch.from_numpy(self.s1[rows].astype(np.int64)), torch.from_numpy(self.s2[rows].astype(np.int64))

    @classmethod
    def open(cls, entry: Path, split: str, symbols: list[str]) -> TokenTable:
        keys = np.load(entry / f"{split}_keys.npy")  # (N, 2): symbol index, start
        index = {(symbols[k], int(start)): row for row, (k, start) in enumerate(keys.tolist())}
        return cls(np.load(entry / f"{split}_s1.npy", mmap_mode="r"), np.load(entry / f"{split}_s2.npy", mmap_mode="r"),
                   index)


def token_cache_key(tokenizer_sha256: str, data_key: str, cfg: KitConfig) -> str:
    """sha256 naming the entry: the tokenizer's weights, the data and the `data.*` settings that place windows
    (all but the per-epoch sample cap, which draws from the same windows)."""
    windows = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "max_samples_per_epoch"}
    text = json.dumps({"format": FORMAT, "tokenizer": tokenizer_sha256, "data": data_key, "windows": windows},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def open_token_tables(folder: str | Path, tokenizer: torch.nn.Module, datasets: Mapping[str, Any], *,
                      data_key: str, cfg: KitConfig, progress: bool = True) -> dict[str, TokenTable]:
    """The token tables of `datasets` (split name -> `WindowDataset`) under the frozen `tokenizer`, from the
    entry for (its weights, `data_key`, `cfg.data`) in `folder`, built first when there is none."""
    sha = weights_hash(tokenizer)
    entry = Path(folder) / f"tokens-{token_cache_key(sha, data_key, cfg)[:32]}"
    with waiting_run_lock(entry, "building a token cache"):
        meta = _read_meta(entry)
        if meta is None or not set(datasets) <= set(meta["splits"]):
            meta = _build(entry, tokenizer, datasets, sha=sha, data_key=data_key, progress=progress)
    if meta["tokenizer_sha256"] != sha:
        raise ValueError(f"{entry}: built for a tokenizer with weights {meta['tokenizer_sha256'][:12]}..., not this "
                         f"one ({sha[:12]}...); delete the entry so it is built again")
    return {split: TokenTable.open(entry, split, meta["symbols"]) for split in datasets}


def _read_meta(entry: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((entry / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _build(entry: Path, tokenizer: torch.nn.Module, datasets: Mapping[str, Any], *, sha: str, data_key: str,
           progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    symbols: dict[str, int] = {}
    counts = {}
    bits = max(tokenizer.s1_bits, tokenizer.s2_bits)
    dtype = np.int16 if bits <= 15 else np.int32
    for split, dataset in datasets.items():
        windows = dataset.every_window()
        s1, s2, keys = _encode(tokenizer, windows, symbols, progress=progress, label=f"tokens ({split})")
        for name, array in (("s1", s1.astype(dtype)), ("s2", s2.astype(dtype)), ("keys", keys)):
            atomic_write(entry / f"{split}_{name}.npy", lambda tmp, a=array: _save_npy(tmp, a))
        counts[split] = len(windows)
    meta = {"format": FORMAT, "tokenizer_sha256": sha, "data": data_key, "splits": counts,
            "symbols": list(symbols), "seconds": round(time.perf_counter() - start, 2)}
    save_json(entry / META, meta)  # last: an entry without it is incomplete
    logger.info("token cache: encoded %s windows once into %s (%.1f s)",
                " + ".join(f"{n} {s}" for s, n in counts.items()), entry, meta["seconds"])
    return meta


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to the temporary's name
        np.save(f, array, allow_pickle=False)


def _encode(tokenizer: torch.nn.Module, windows: Any, symbols: dict[str, int], *, progress: bool,
            label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every window's s1 and s2 ids and its (symbol index, start), in window order."""
    loader = DataLoader(windows, batch_size=ENCODE_BATCH, shuffle=False, generator=torch.Generator())
    s1s, s2s, keys = [], [], []
    device = module_device(tokenizer)
    with inference(tokenizer):
        for batch in tqdm(loader, desc=label, unit="batch", disable=not progress, leave=False):
            s1, s2 = tokenizer.encode(batch["x"].to(device), half=True)
            s1s.append(s1.cpu().numpy())
            s2s.append(s2.cpu().numpy())
            ids = [symbols.setdefault(s, len(symbols)) for s in batch["symbol"]]
            keys.append(np.stack([np.asarray(ids, np.int64), np.asarray(batch["start"], np.int64)], axis=1))
    return np.concatenate(s1s), np.concatenate(s2s), np.concatenate(keys)
