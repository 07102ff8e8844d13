import json
import os

import pytest
import pytorch_lightning as pl
import torch
import wandb
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

import analyze
from callbacks.saliency import SCALARS, SaliencyConfig, SaliencySanityCallback
from datamodules.synthfaces import SynthFacesDataModule
from lightning_modules.attribute_module import AttributeModule

# Kept small: the whole file must stay well under a minute on a loaded 2-core machine.
CHEAP = {"occlusion_window": 16, "occlusion_stride": 16, "smoothgrad_samples": 2, "ig_steps": 2, "hiding_steps": 2,
         "randomization_images": 1, "randomization_steps": ["fc", "layer4", "conv1"]}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny resnet10t fit with the callback and an offline W&B logger; returns (tmp, checkpoint, callback)."""
    tmp = tmp_path_factory.mktemp("fit")
    old = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_DIR")}
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(tmp))
    torch.manual_seed(0)
    model = AttributeModule(backbone="resnet10t", attributes=["Eyeglasses", "Smiling"])
    data = SynthFacesDataModule(size=64, num_train=16, num_val=4, num_test=4, num_identities=8, batch_size=8,
                                num_workers=0)
    cb = SaliencySanityCallback(methods=["gradcam", "smoothgrad"], num_images=1, batch_size=1, config=CHEAP)
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", devices=1,
                         logger=WandbLogger(project="facelens", save_dir=str(tmp), offline=True),
                         callbacks=[ckpt, cb], default_root_dir=tmp, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    wandb.finish()
    yield tmp, ckpt.last_model_path, cb
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_callback_writes_json_and_headline(fitted):
    tmp, _, cb = fitted
    files = sorted(tmp.rglob("analysis/saliency/epoch000.json"))
    assert files, list(tmp.rglob("*.json"))
    data = json.loads(files[0].read_text())
    assert data["num_images"] == 1 and set(data["methods"]) == {"gradcam", "smoothgrad"}
    entry = data["methods"]["smoothgrad"]["Eyeglasses"]
    assert entry["randomization"]["steps"] == ["fc", "layer4", "conv1"]
    assert len(entry["randomization"]["spearman"]) == 3 and all(-1 <= v <= 1 for v in entry["randomization"]["ssim"])
    assert 0 <= entry["deletion_auc"] <= 1 and entry["insertion_auc"] is None  # insertion off in the callback
    h = cb.history[-1]
    for key in ("saliency/gradcam/deletion_auc", "saliency/smoothgrad/randomization_spearman_last",
                "saliency/smoothgrad/amr", "saliency/seconds"):
        assert key in h, sorted(h)
    figures = list(tmp.rglob("media/images/saliency/*.png"))
    assert figures, "no W&B figure logged"


def test_config_errors():
    with pytest.raises(ValueError, match="SaliencySanityCallback.config: unknown option"):
        SaliencySanityCallback(config={"occlusion_windw": 3})
    with pytest.raises(ValueError, match="unknown \\['lime'\\]"):
        SaliencyConfig(methods=["lime"])


def test_analyze_saliency_writes_json_and_figure(fitted, tmp_path):
    _, ckpt, _ = fitted
    out = tmp_path / "out"
    rc = analyze.main(["saliency", "--checkpoint", ckpt, "--methods", "gradcam,occlusion,smoothgrad,integrated_gradients",
                       "--num-images", "1", "--batch-size", "1", "--device", "cpu", "--out", str(out),
                       "--occlusion-window", "16", "--occlusion-stride", "16", "--smoothgrad-samples", "2",
                       "--ig-steps", "2", "--hiding-steps", "2", "--randomization-images", "1",
                       "--randomization-steps", "fc,layer4"])
    assert rc == 0
    data = json.loads((out / "saliency.json").read_text())
    assert data["attributes"] == ["Eyeglasses", "Smiling"]
    assert set(data["methods"]) == {"gradcam", "occlusion", "smoothgrad", "integrated_gradients"}
    for method, per_attr in data["methods"].items():
        for attr, entry in per_attr.items():
            assert set(SCALARS) | {"randomization"} == set(entry), (method, attr)
            for k in ("amr", "energy", "deletion_auc", "insertion_auc"):
                assert entry[k] is not None and 0 <= entry[k] <= 1, (method, attr, k, entry[k])
            assert entry["randomization"]["steps"] == ["fc", "layer4"]
            assert len(entry["randomization"]["spearman"]) == 2
    assert (out / "saliency_methods.png").stat().st_size > 0
    assert (out / "saliency_randomization.png").stat().st_size > 0
    with pytest.raises(ValueError, match="unknown \\['lime'\\]"):
        analyze.main(["saliency", "--checkpoint", ckpt, "--methods", "lime", "--device", "cpu",
                      "--out", str(tmp_path / "bad")])
