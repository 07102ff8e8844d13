"""A tiny Lightning fit on SynthFaces with an offline W&B logger, shared by the analysis-callback tests."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
import wandb
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

from datamodules.synthfaces import SynthFacesDataModule
from facelens.wandb_io import offline_wandb
from lightning_modules.attribute_module import AttributeModule


def tiny_fit(tmp: Path, callback: pl.Callback, backbone: str = "resnet18", attributes=("Male", "Eyeglasses"),
             **data_options) -> tuple[str, AttributeModule]:
    """One short epoch (2 train batches, 1 val batch) with `callback`; W&B offline under `tmp`.
    Returns the last checkpoint's path and the trained module."""
    with offline_wandb(tmp):
        torch.manual_seed(0)
        model = AttributeModule(backbone=backbone, attributes=list(attributes))
        options = dict(size=64, num_train=32, num_val=16, num_test=16, num_identities=16, batch_size=16, num_workers=0)
        options.update(data_options)
        checkpoint = ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True)
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", devices=1,
                             logger=WandbLogger(project="facelens", save_dir=str(tmp), offline=True),
                             callbacks=[checkpoint, callback], default_root_dir=tmp, enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.fit(model, datamodule=SynthFacesDataModule(**options))
        wandb.finish()
    return checkpoint.last_model_path, model
