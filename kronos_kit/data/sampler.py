"""The order training and validation draw windows in: one permutation per (seed, epoch), strided over ranks."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["EpochSampler"]


class EpochSampler(Sampler[int]):
    """Shuffled (or ordered) indices from (seed, epoch), strided over ranks, resumable mid-epoch.

    Rank r takes positions r, r + world, ... of the epoch's permutation, so the union of the ranks'
    k-th batches is the k-th global batch a single process would draw.

    With `even` (training) every rank gets the same count, dropping up to world - 1 items so DDP
    ranks stay in step; without it (validation, whose sums are reduced over ranks) every item goes
    to exactly one rank, and a rank may get one item fewer, or none.
    """

    def __init__(self, n: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0, world: int = 1,
                 skip: int = 0, even: bool = True):
        order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)
        usable = (n // world) * world if even else n
        # this rank's share as its own array (8 bytes an index; a list of ints would be ~36 at market scale)
        self.indices = order[:usable][rank::world][skip:].copy()

    def __iter__(self) -> Iterator[int]:
        return map(int, self.indices)

    def __len__(self) -> int:
        return len(self.indices)
