"""Train facelens models: `python train.py fit --config configs/<experiment>.yaml [--section.option value ...]`."""
from __future__ import annotations

import sys

from facelens.wandb_io import default_offline

default_offline()

from pytorch_lightning.cli import LightningCLI, SaveConfigCallback  # noqa: E402

from callbacks.run_directory import run_dir  # noqa: E402


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Sends the fully resolved config to the logger (W&B) and writes it into the run folder."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is not None:
            trainer.logger.log_hyperparams(self.config.as_dict())
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(folder / "config.yaml"), skip_none=False, overwrite=True,
                         multifile=False)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The CLI; `run=False` only builds trainer, model and data (for scripts and tests)."""
    return LightningCLI(
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
    main(sys.argv[1:])
