"""NonFiniteGuard: a NaN/Inf loss stops training naming the step; last.ckpt keeps the last finite weights."""
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.reliability import NonFiniteGuard, NonFiniteLossError
from lightning_modules.checkpoint import AtomicCheckpointIO, read_checkpoint


class Poisoned(pl.LightningModule):
    """Linear regression whose loss becomes `bad` at global step `at`."""

    def __init__(self, at: int, bad: float):
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.at, self.bad = at, bad

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y)
        if self.global_step == self.at:
            loss = loss * self.bad
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, at, bad):
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 3), torch.randn(32, 1)), batch_size=4)
    model = Poisoned(at, bad)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last", every_n_train_steps=1, save_top_k=1,
                           enable_version_counter=False)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[NonFiniteGuard(), ckpt], plugins=[AtomicCheckpointIO()],
                         default_root_dir=tmp_path)
    return model, trainer, data


@pytest.mark.parametrize("bad,shown", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_non_finite_loss_stops_at_its_step_and_keeps_last_good_checkpoint(tmp_path, bad, shown):
    model, trainer, data = fit(tmp_path, at=10, bad=bad)
    with pytest.raises(NonFiniteLossError, match=rf"loss is {shown} at global step 10 \(epoch 1, batch 2\)"):
        trainer.fit(model, data)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = read_checkpoint(tmp_path / "last.ckpt")
    assert saved["global_step"] == 10  # saved after the 10 finite steps (0..9)
    for name, value in model.state_dict().items():
        assert torch.equal(saved["state_dict"][name], value), name  # the weights in memory are the last good ones


def test_finite_training_is_untouched(tmp_path):
    model, trainer, data = fit(tmp_path, at=-1, bad=1.0)
    trainer.fit(model, data)
    assert trainer.global_step == 16


def test_check_every_n_steps_is_validated():
    with pytest.raises(ValueError, match="check_every_n_steps"):
        NonFiniteGuard(check_every_n_steps=0)
