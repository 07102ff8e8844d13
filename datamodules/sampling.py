"""Shuffling that depends only on (seed, epoch), so a resumed run sees the same order as an uninterrupted one."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffle(Sampler[int]):
    """A fresh permutation each epoch, drawn from (seed, epoch). Lightning calls `set_epoch` before every epoch
    (and wraps this sampler for DDP), so the order of epoch e never depends on how many epochs ran before."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = int(size), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size
