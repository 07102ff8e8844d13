"""End to end: the CLI trains on SynthFaces, lowers validation loss, writes a checkpoint and an offline W&B run."""
import json
import os

import pytest
import torch
import wandb

import train
from facelens.wandb_io import read_offline_run
from lightning_modules.checkpoint import load_module, read_checkpoint


def cli_args(tmp_path, *extra):
    return [
        "--config", "configs/quickstart.yaml",
        "--trainer.max_epochs", "3",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--data.init_args.num_train", "384",
        "--data.init_args.num_val", "128",
        "--data.init_args.num_identities", "64",
        "--data.init_args.batch_size", "32",
        "--data.init_args.num_workers", "0",
        "--model.init_args.attributes", '["Eyeglasses", "Smiling", "Wearing_Hat", "Male", "Blond_Hair"]',
        "--data.init_args.augment.rotation_std", "5",  # mild AFFACT augmentation: must survive weights_only loading
        *extra,
    ]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))
    yield
    wandb.finish()


def test_fit_lowers_val_loss_and_logs_to_wandb(tmp_path, offline):
    cli = train.main(cli_args(tmp_path), run=False)
    before = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/loss"]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/loss"]
    assert after < before * 0.95, (before, after)
    wandb.finish()

    run = read_offline_run(tmp_path / "wandb")
    losses = run.metric("train/loss_step")
    assert len(losses) >= 3 and all(isinstance(v, float) for v in losses)
    assert run.metric("val/mean_error") and run.metric("val/error/Eyeglasses")
    assert run.config["model"]["init_args"]["backbone"] == "resnet18"
    assert run.config["data"]["init_args"]["num_train"] == 384
    assert run.media("*.table.json"), "per-attribute table missing"
    assert run.media("*.png"), "prediction grid missing"
    table = json.loads(run.media("*.table.json")[-1].read_text())
    assert {row[0] for row in table["data"]} == {"Eyeglasses", "Smiling", "Wearing_Hat", "Male", "Blond_Hair"}

    ckpt = tmp_path / "runs" / run.run_id / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert read_checkpoint(ckpt)["global_step"] == cli.trainer.global_step  # last.ckpt holds the final weights
    raw = read_checkpoint(ckpt)  # weights_only=True
    assert raw["facelens_module"] == "AttributeModule"
    model = load_module(ckpt)
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(model(images), cli.model.eval().cpu()(images))
    summary = json.loads((tmp_path / "runs" / run.run_id / "summary.json").read_text())
    assert summary["validation"]["mean_error"] < summary["validation"]["mean_majority_error"] + 0.5


def test_bad_config_value_names_the_option(tmp_path, offline, capsys):
    with pytest.raises((SystemExit, ValueError)) as info:
        train.main(["fit", *cli_args(tmp_path, "--model.init_args.backbone", "resnet5000")])
    message = str(info.value) + capsys.readouterr().err
    assert "model.backbone" in message and "resnet5000" in message
