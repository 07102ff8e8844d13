"""A grid of validation faces with their predicted attributes, logged each validation epoch."""
from __future__ import annotations

import pytorch_lightning as pl
import torch


class PredictionGridCallback(pl.Callback):
    """Logs `num_images` fixed validation faces, each captioned with its top predictions (✓ right, ✗ wrong)."""

    def __init__(self, num_images: int = 16, attributes_shown: int = 4, every_n_epochs: int = 1):
        self.num_images = num_images
        self.attributes_shown = attributes_shown
        self.every_n_epochs = every_n_epochs
        self._batch: dict | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and self._batch is None and trainer.is_global_zero:
            keep = slice(0, self.num_images)
            self._batch = {k: batch[k][keep].detach().cpu() for k in ("image", "attributes", "attribute_mask")}

    def on_validation_epoch_end(self, trainer, pl_module):
        if (trainer.sanity_checking or self._batch is None or not trainer.is_global_zero
                or trainer.current_epoch % self.every_n_epochs):
            return
        log_image = getattr(trainer.logger, "log_image", None)
        if log_image is None:
            return
        with torch.no_grad():
            logits = pl_module(self._batch["image"].to(pl_module.device)).float().cpu()
        targets, mask = pl_module.select({k: v.to(pl_module.device) for k, v in self._batch.items()})
        captions = _captions(logits, targets.cpu(), mask.cpu(), pl_module.attribute_names, self.attributes_shown)
        images = [img.permute(1, 2, 0).numpy() for img in self._batch["image"]]
        log_image(key="val/predictions", images=images, caption=captions, step=trainer.global_step)


def _captions(logits, targets, mask, names, shown) -> list[str]:
    """For each face: its most confident known attributes, e.g. 'Eyeglasses+ ✓ | Smiling- ✗'."""
    captions = []
    confidence = logits.abs().masked_fill(~mask, -1)
    for i in range(logits.shape[0]):
        parts = []
        for j in confidence[i].argsort(descending=True)[:shown].tolist():
            if not mask[i, j]:
                continue
            predicted = bool(logits[i, j] > 0)
            mark = "✓" if predicted == bool(targets[i, j] > 0.5) else "✗"
            parts.append(f"{names[j]}{'+' if predicted else '-'} {mark}")
        captions.append(" | ".join(parts))
    return captions
