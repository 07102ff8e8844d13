"""One folder per run (`runs/<run id>/`) for checkpoints and analysis outputs, agreed on by every rank."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info


def run_id(trainer: pl.Trainer) -> str:
    """The logger's run id (the W&B id) when there is one, else a timestamp; the same string on all ranks."""
    name = None
    if trainer.is_global_zero:
        version = getattr(trainer.logger, "version", None) if trainer.logger else None
        name = str(version) if version not in (None, "") else time.strftime("%Y%m%d-%H%M%S")
    return trainer.strategy.broadcast(name, src=0)


def run_dir(trainer: pl.Trainer) -> Path:
    """The run folder chosen by `RunDirectory` (or `<default_root_dir>/runs/unnamed`)."""
    for cb in trainer.callbacks:
        if isinstance(cb, RunDirectory) and cb.path is not None:
            return cb.path
    return Path(trainer.default_root_dir) / "runs" / "unnamed"


class RunDirectory(pl.Callback):
    """Puts checkpoints under `root/<run id>/checkpoints` (root defaults to `<trainer.default_root_dir>/runs`)
    and prints where everything went at the end of fit."""

    def __init__(self, root: str | None = None):
        self.root = root
        self.path: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.path is None:
            root = Path(self.root) if self.root else Path(trainer.default_root_dir) / "runs"
            self.path = root / run_id(trainer)
        for cb in trainer.checkpoint_callbacks:
            if cb.dirpath is None:
                cb.dirpath = str(self.path / "checkpoints")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self.path is None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        ckpt = trainer.checkpoint_callback
        last = self.path / "checkpoints" / "last.ckpt"
        summary = {
            "run_dir": str(self.path),
            "best_checkpoint": getattr(ckpt, "best_model_path", None) or None,
            "last_checkpoint": str(last) if last.is_file() else None,
            "wandb_run": _wandb_dir(trainer),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        }
        report = getattr(pl_module, "last_report", None)
        if report is not None:
            summary["validation"] = report.to_dict()
            rank_zero_info("\nValidation, per attribute (ordered by class imbalance):\n" + report.format())
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2))
        rank_zero_info(
            f"\nRun folder:  {self.path}\nCheckpoint:  {summary['best_checkpoint'] or summary['last_checkpoint']}"
            f"\nW&B run:     {summary['wandb_run']}\nSummary:     {self.path / 'summary.json'}"
        )


def _wandb_dir(trainer: pl.Trainer) -> str | None:
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return str(Path(logger.experiment.dir).parent)
    return None
