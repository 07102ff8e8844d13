"""Confusion counts per attribute as a torchmetrics Metric, so they are summed across DDP ranks."""
from __future__ import annotations

import torch
from torchmetrics import Metric


class AttributeConfusion(Metric):
    """Running tp, fp, tn, fn per attribute over known labels; works for any number of attributes (even 1)."""

    full_state_update = False

    def __init__(self, num_attributes: int):
        super().__init__()
        for name in ("tp", "fp", "tn", "fn"):
            self.add_state(name, default=torch.zeros(num_attributes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> None:
        pred = logits > 0
        truth = targets > 0.5
        # out of place: states may be inference tensors after a `trainer.validate` run
        self.tp = self.tp + (pred & truth & mask).sum(0)
        self.fp = self.fp + (pred & ~truth & mask).sum(0)
        self.tn = self.tn + (~pred & ~truth & mask).sum(0)
        self.fn = self.fn + (~pred & truth & mask).sum(0)

    def compute(self) -> torch.Tensor:
        return torch.stack([self.tp, self.fp, self.tn, self.fn], dim=1)
