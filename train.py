"""Train facelens models: `python train.py fit --config configs/<experiment>.yaml [--section.option value ...]`."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from facelens.wandb_io import default_offline, wandb_preflight

default_offline()

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO  # noqa: E402
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback  # noqa: E402
from pytorch_lightning.utilities import rank_zero_warn  # noqa: E402

from callbacks.run_directory import RunDirectory, run_dir  # noqa: E402
from lightning_modules.checkpoint import AtomicCheckpointIO, read_checkpoint  # noqa: E402


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Sends the fully resolved config to the logger (W&B) and writes it into the run folder."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is not None:
            trainer.logger.log_hyperparams(self.config.as_dict())
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(folder / "config.yaml"), skip_none=False, overwrite=True,
                         multifile=False)


def latest_last_checkpoint(runs_root: str | Path) -> Path | None:
    """The most recently written `<runs_root>/<run id>/checkpoints/last.ckpt`, or None."""
    found = [p for p in Path(runs_root).glob("*/checkpoints/last.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _wandb_loggers(logger) -> list:
    loggers = logger if isinstance(logger, list) else [logger]
    return [lg for lg in loggers if hasattr(lg, "get") and str(lg.get("class_path", "")).endswith("WandbLogger")]


class FacelensCLI(LightningCLI):
    """LightningCLI with facelens resume rules: `--ckpt_path last` means the newest
    `<default_root_dir>/runs/<run id>/checkpoints/last.ckpt` (none yet: start fresh, with a warning); a resumed
    fit keeps its run folder and its W&B run id; checkpoints are read with weights_only=True and written
    atomically (see docs/RELIABILITY.md)."""

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        self.resumed_run: Path | None = None
        subcommand = self.config.get("subcommand")
        if not subcommand or "ckpt_path" not in self.config[subcommand]:
            return
        config = self.config[subcommand]
        if config.get("weights_only", False) is None:
            config.weights_only = True
        ckpt = config.get("ckpt_path")
        if ckpt == "last":
            root = Path(config.trainer.get("default_root_dir") or os.getcwd()) / "runs"
            found = latest_last_checkpoint(root)
            if found is None:
                rank_zero_warn(f"--ckpt_path last: no {root}/<run id>/checkpoints/last.ckpt yet; starting fresh")
            ckpt = config.ckpt_path = str(found) if found else None
        if not ckpt:
            return
        read_checkpoint(ckpt)  # refuses files carrying code with a clear message, before anything is built
        if subcommand == "fit" and Path(ckpt).parent.name == "checkpoints":
            self.resumed_run = Path(ckpt).parent.parent
            for logger in _wandb_loggers(config.trainer.get("logger")):
                init_args = logger.get("init_args")
                if init_args is not None and not init_args.get("id") and not init_args.get("version"):
                    init_args.id = self.resumed_run.name  # the run folder is named after the W&B run id

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        if getattr(self, "resumed_run", None) is not None:
            for cb in self.trainer.callbacks:
                if isinstance(cb, RunDirectory) and cb.path is None:
                    cb.path = self.resumed_run


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The CLI; `run=False` only builds trainer, model and data (for scripts and tests)."""
    wandb_preflight()
    return FacelensCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LoggerSaveConfigCallback,
        save_config_kwargs={"save_to_log_dir": False},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["sweep"]:
        import experiments

        sys.exit(experiments.main(sys.argv[2:]))
    main()  # LightningCLI reads sys.argv itself
