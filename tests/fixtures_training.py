"""A tiny Lightning fit on SynthFaces with an offline W&B logger, shared by the analysis-callback tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
import wandb
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

from datamodules.synthfaces import SynthFacesDataModule
from lightning_modules.attribute_module import AttributeModule


def tiny_fit(tmp: Path, callback: pl.Callback, backbone: str = "resnet18", attributes=("Male", "Eyeglasses"),
             **data_options) -> tuple[str, AttributeModule]:
    """One short epoch (2 train batches, 1 val batch) with `callback`; W&B offline under `tmp`.
    Returns the last checkpoint's path and the trained module."""
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_DIR")}
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(tmp))
    try:
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
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return checkpoint.last_model_path, model
