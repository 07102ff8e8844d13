"""Accuracy on bias-aligned and bias-conflicting validation groups (e.g. women with eyeglasses)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from facelens.attributes import ATTRIBUTE_INDEX

MALE = ATTRIBUTE_INDEX["Male"]


def group_names(concept: str) -> tuple[str, str, str, str]:
    return (f"male_with_{concept}", f"male_no_{concept}", f"female_with_{concept}", f"female_no_{concept}")


class BiasGroupsCallback(pl.Callback):
    """For a gender model (first logit = Male) on batches carrying `bias`: accuracy per gender x concept group,
    on aligned (male with / female without the concept) and conflicting groups, and their gap.
    Counts are summed over ranks before the rates are taken."""

    def __init__(self, concept: str = "eyeglasses"):
        self.concept = concept
        self._counts: torch.Tensor | None = None  # (4 groups, [correct, total])

    def on_validation_epoch_start(self, trainer, pl_module):
        self._counts = torch.zeros(4, 2, dtype=torch.float64, device=pl_module.device)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if "bias" not in batch or outputs is None:
            return
        male = batch["attributes"][:, MALE] > 0.5
        correct = ((outputs[:, 0] > 0) == male).double()
        bias = batch["bias"].bool()
        for g, mask in enumerate((male & bias, male & ~bias, ~male & bias, ~male & ~bias)):
            self._counts[g, 0] += correct[mask].sum()
            self._counts[g, 1] += mask.sum()

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._counts is None or trainer.sanity_checking:
            return
        counts = trainer.strategy.reduce(self._counts, reduce_op="sum")
        if counts[:, 1].sum() == 0:
            return
        values = group_accuracies(counts, self.concept)
        pl_module.log_dict({f"val/bias/{k}": torch.tensor(v, dtype=torch.float32) for k, v in values.items()})


def group_accuracies(counts: torch.Tensor, concept: str = "eyeglasses") -> dict[str, float]:
    """Rates from (4, 2) counts [correct, total] in `group_names` order; aligned = male with + female without."""
    c = counts.double().cpu()

    def rate(rows):
        return float(c[rows, 0].sum() / c[rows, 1].sum().clamp_min(1))

    out = {name: rate([i]) for i, name in enumerate(group_names(concept))}
    out["aligned_accuracy"], out["conflicting_accuracy"] = rate([0, 3]), rate([1, 2])
    out["gap"] = out["aligned_accuracy"] - out["conflicting_accuracy"]
    return out
