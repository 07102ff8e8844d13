"""Analysis callbacks keep their history across a resume (state saved in the checkpoint)."""
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from callbacks.base import AnalysisCallback
from datamodules.synthfaces import SynthFacesDataModule
from lightning_modules.attribute_module import AttributeModule
from lightning_modules.checkpoint import read_checkpoint


class MeanLogit(AnalysisCallback):
    name = "mean_logit"

    def analyse(self, model, batches):
        with torch.no_grad():
            return {"mean_logit": float(torch.cat([model(b["image"]) for b in batches]).mean())}

    def headline(self, result):
        return result


def fit(tmp_path, epochs, ckpt_path=None):
    callback = MeanLogit(num_images=8, batch_size=8)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                         callbacks=[callback, ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")])
    data = SynthFacesDataModule(num_train=16, num_val=8, num_identities=4, batch_size=8, num_workers=0)
    trainer.fit(AttributeModule("resnet18", attributes=["Eyeglasses"]), datamodule=data, ckpt_path=ckpt_path)
    return callback


def test_history_survives_resume(tmp_path):
    first = fit(tmp_path, 2)
    assert [h["epoch"] for h in first.history] == [0, 1]
    saved = read_checkpoint(tmp_path / "ckpt" / "last.ckpt")["callbacks"]
    assert any(state.get("history") == first.history for state in saved.values())
    resumed = fit(tmp_path, 3, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert resumed.history[:2] == first.history  # restored, not recomputed
    assert (tmp_path / "runs" / "unnamed" / "analysis" / "mean_logit" / "epoch002.json").is_file()
