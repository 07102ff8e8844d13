"""Training-time safety nets: stop on a non-finite loss before it reaches the weights."""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; raised before backward, so the weights are still the last good ones."""


class NonFiniteGuard(pl.Callback):
    """Stops training when the training loss is NaN/Inf, naming the global step, epoch and batch.

    The check runs in `on_before_backward`, i.e. before gradients and the optimizer step, so the model in memory
    and every checkpoint on disk keep the last finite weights (`AtomicCheckpointIO` also refuses to write NaN/Inf
    weights). `check_every_n_steps` trades the device-to-host sync per step for a later stop.
    """

    def __init__(self, check_every_n_steps: int = 1):
        if check_every_n_steps < 1:
            raise ValueError(f"NonFiniteGuard.check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        step = trainer.global_step
        if step % self.check_every_n_steps:
            return
        value = float(loss.detach().float().sum())
        if math.isfinite(value):
            return
        batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
            trainer.checkpoint_callback, "best_model_path", "")
        raise NonFiniteLossError(
            f"training loss is {value} at global step {step} (epoch {trainer.current_epoch}, batch {batch}); "
            f"training stopped before this step changed the weights. Last checkpoint: {last or 'none written'}. "
            f"Lower the learning rate, check the inputs of this batch, or use gradient clipping.")
