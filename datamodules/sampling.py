"""Shuffling that depends only on (seed, epoch), so a resumed run sees the same order as an uninterrupted one."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


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


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool, seed: int = 0,
                pin_memory: bool | None = None, collate_fn=None) -> DataLoader:
    """The loader every datamodule uses: `EpochShuffle` when shuffling, persistent workers, pinned host memory
    when a GPU is present (unless `pin_memory` says otherwise)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochShuffle(len(dataset), seed) if shuffle else None,
                      num_workers=num_workers, persistent_workers=num_workers > 0,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      collate_fn=collate_fn)
