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


class SlowMeanLogit(MeanLogit):
    """Advances the fake clock by 100 s per analysis, as a slow analysis would."""

    name = "slow_mean_logit"

    def __init__(self, clock, **kwargs):
        super().__init__(**kwargs)
        self.clock = clock

    def analyse(self, model, batches):
        self.clock.now += 100.0
        return super().analyse(model, batches)

    def log_extra(self, trainer, result, epoch):
        self.clock.now += 10.0  # figures and tables count as analysis cost too


def test_analysis_cost_and_share_use_training_time_only(tmp_path, monkeypatch):
    """A later callback's share of the epoch excludes earlier callbacks' analyses; seconds include log_extra."""
    import callbacks.base as base

    class Clock:
        now = 0.0

    clock = Clock()
    monkeypatch.setattr(base.time, "perf_counter", lambda: clock.now)

    class Step(pl.Callback):  # each training batch takes 1 fake second
        def on_train_batch_end(self, *args):
            clock.now += 1.0

    class Second(SlowMeanLogit):
        name = "second"

    first, second = SlowMeanLogit(clock, num_images=8, batch_size=8), Second(clock, num_images=8, batch_size=8)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path, callbacks=[Step(), first, second])
    data = SynthFacesDataModule(num_train=16, num_val=8, num_identities=4, batch_size=8, num_workers=0)
    trainer.fit(AttributeModule("resnet18", attributes=["Eyeglasses"]), datamodule=data)
    for cb in (first, second):
        (entry,) = cb.history
        assert entry[f"{cb.name}/seconds"] == 110.0
        assert entry[f"{cb.name}/share_of_epoch"] == 110.0 / 2.0
