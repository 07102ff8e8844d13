"""What every analysis callback shares: a fixed probe set, a schedule, timing, outputs beside the checkpoint,
W&B logging on rank zero, and a history that survives resume."""
from __future__ import annotations

import abc
import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset

from callbacks.run_directory import run_dir


class AnalysisCallback(pl.Callback, abc.ABC):
    """Runs `analyse(model, batches)` on a fixed probe set every `every_n_epochs` epochs and at the last epoch.

    Subclasses implement `analyse` (calling `analysis.*`), `headline` (scalars that plot over training) and
    optionally `log_extra` (tables, figures). Results go to `<run>/analysis/<name>/epochNNN.json` and W&B.
    The analysis runs on rank zero over the whole probe set while other ranks wait at a barrier, so results do
    not depend on the number of processes.
    """

    name = "analysis"

    def __init__(self, every_n_epochs: int = 1, num_images: int = 256, split: str = "val", batch_size: int = 32,
                 run_on_last_epoch: bool = True):
        if every_n_epochs < 1:
            raise ValueError(f"{type(self).__name__}.every_n_epochs must be >= 1, got {every_n_epochs}")
        if num_images < 1:
            raise ValueError(f"{type(self).__name__}.num_images must be >= 1, got {num_images}")
        if split not in ("train", "val", "test"):
            raise ValueError(f"{type(self).__name__}.split must be train, val or test, got {split!r}")
        self.every_n_epochs, self.num_images, self.split = every_n_epochs, num_images, split
        self.batch_size, self.run_on_last_epoch = batch_size, run_on_last_epoch
        self.history: list[dict[str, Any]] = []
        self._epoch_started = 0.0
        self._last_train_seconds = 0.0

    # -- to implement ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    def analyse(self, model: torch.nn.Module, batches: list[dict]) -> Any:
        """Run the analysis on the probe batches; return a result with `to_dict()`."""

    def headline(self, result: Any) -> dict[str, float]:
        return {}

    def log_extra(self, trainer: pl.Trainer, result: Any, epoch: int) -> None:
        """Tables and figures for the logger (rank zero only)."""

    # -- probe set ------------------------------------------------------------------------------------------
    def probe_batches(self, trainer: pl.Trainer, device: torch.device) -> list[dict]:
        """The first `num_images` of the split, prepared like evaluation batches (centre crop, no augmentation)."""
        datamodule = trainer.datamodule
        loader = getattr(datamodule, f"{self.split}_dataloader")()
        dataset = loader.dataset
        subset = Subset(dataset, range(min(self.num_images, len(dataset))))
        batches = []
        for batch in DataLoader(subset, batch_size=self.batch_size, shuffle=False, num_workers=0,
                                collate_fn=loader.collate_fn):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            batches.append(prepare_eval_batch(datamodule, batch))
        return batches

    # -- schedule -------------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_train_seconds = time.perf_counter() - self._epoch_started
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch == trainer.max_epochs - 1
        if (epoch + 1) % self.every_n_epochs and not (self.run_on_last_epoch and (last or trainer.should_stop)):
            return
        if trainer.is_global_zero:
            self.run_now(trainer, pl_module, epoch)
        trainer.strategy.barrier()

    def run_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> Any:
        started = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                result = self.analyse(pl_module, self.probe_batches(trainer, pl_module.device))
        finally:
            pl_module.train(was_training)
        seconds = time.perf_counter() - started
        scalars = {f"{self.name}/{k}": float(v) for k, v in self.headline(result).items()}
        scalars[f"{self.name}/seconds"] = seconds
        if self._last_train_seconds > 0:
            scalars[f"{self.name}/share_of_epoch"] = seconds / self._last_train_seconds
        self.history.append({"epoch": epoch, "step": trainer.global_step, **scalars})
        self.save(trainer, result, epoch)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        self.log_extra(trainer, result, epoch)
        return result

    def save(self, trainer: pl.Trainer, result: Any, epoch: int) -> Path:
        folder = run_dir(trainer) / "analysis" / self.name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"epoch{epoch:03d}.json"
        write_json(path, result.to_dict() if hasattr(result, "to_dict") else result)
        write_json(folder / "history.json", self.history)
        return path

    # -- resume ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))


def prepare_eval_batch(datamodule, batch: dict) -> dict:
    """Apply the datamodule's evaluation-time batch transform (e.g. CelebA's centre crop), never augmentation."""
    transform = getattr(datamodule, "transform_batch", None)
    return transform(batch, train=False) if transform is not None else batch


def write_json(path: Path, payload: Any) -> None:
    """Write atomically (temp file + rename) so a killed run never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_plain))
    tmp.replace(path)


def _plain(value: Any):
    if torch.is_tensor(value):
        return value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
