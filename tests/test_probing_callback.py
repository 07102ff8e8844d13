"""ProbingCallback inside a tiny fit, and `analyze.py probe` on the checkpoint it leaves."""
from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

import analyze
from analysis.probing import ProbingResult, probe
from callbacks.probing import ProbingCallback, default_layers, probed_network, resolve_layers
from datamodules.synthfaces import SynthFacesDataModule
from lightning_modules.attribute_module import AttributeModule

ATTRS = ["Eyeglasses", "Male", "Smiling"]
LAYERS = ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
KEYS = ("layer_acc", "channel_acc", "neuron_acc", "top_channels", "top_neurons")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two epochs of resnet18 on 64-px SynthFaces with the callback probing four blocks at every epoch."""
    root = tmp_path_factory.mktemp("fit")
    pl.seed_everything(0)
    data = SynthFacesDataModule(size=64, num_train=64, num_val=160, num_test=16, num_identities=32, batch_size=32,
                                num_workers=0, prior_preset="uniform")
    model = AttributeModule(backbone="resnet18", attributes=ATTRS, lr=0.003)
    callback = ProbingCallback(layers=LAYERS, n_train=48, n_val=48, num_images=160, n_components=4, top_k=4,
                               every_n_epochs=1)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    trainer = pl.Trainer(max_epochs=2, default_root_dir=root, logger=CSVLogger(root), callbacks=[callback, checkpoint],
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_train_batches=2, limit_val_batches=1, accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=data)
    return root, callback, model, checkpoint.last_model_path


def test_callback_writes_json_and_scalars(fitted):
    root, callback, _, _ = fitted
    folder = root / "runs" / "unnamed" / "analysis" / "probing"
    assert sorted(p.name for p in folder.glob("epoch*.json")) == ["epoch000.json", "epoch001.json"]
    assert (folder / "epoch001.png").stat().st_size > 1000
    data = json.loads((folder / "epoch001.json").read_text())
    assert data["layers"] == LAYERS and data["attributes"] == ATTRS and data["config"]["skipped"] == {}
    for layer in LAYERS:
        for attr in ATTRS:
            cell = data["results"][layer][attr]
            assert all(k in cell for k in KEYS)
            assert 0.0 <= cell["layer_acc"] <= 1.0 and len(cell["top_neurons"]) == 4 and cell["n_train"] == 48
    again = ProbingResult.from_dict(data)
    assert again[("layer4.1", "Male")].layer_acc == data["results"]["layer4.1"]["Male"]["layer_acc"]
    # headline scalars in the history and the CSV log: per-attribute last layer, per-layer mean
    last = callback.history[-1]
    assert last["epoch"] == 1
    mean_last = sum(data["results"]["layer4.1"][a]["layer_acc"] for a in ATTRS) / 3
    assert last["probing/mean_last_layer_acc"] == pytest.approx(mean_last)
    assert last["probing/mean_layer_acc/layer4.1"] == pytest.approx(mean_last)
    assert last["probing/last_layer_acc/Male"] == pytest.approx(data["results"]["layer4.1"]["Male"]["layer_acc"])
    metrics = next(root.glob("lightning_logs/version_*/metrics.csv")).read_text()
    assert "probing/mean_last_layer_acc" in metrics and "probing/last_layer_acc/Eyeglasses" in metrics


def test_callback_result_equals_direct_probe(fitted):
    """The callback's numbers are those of `analysis.probing.probe` on the same pool."""
    root, callback, model, _ = fitted
    data = json.loads((root / "runs" / "unnamed" / "analysis" / "probing" / "epoch001.json").read_text())
    data_module = SynthFacesDataModule(size=64, num_train=64, num_val=160, num_test=16, num_identities=32,
                                       batch_size=32, num_workers=0, prior_preset="uniform")
    data_module.setup("validate")
    loader = data_module.val_dataloader()
    batch = next(iter(torch.utils.data.DataLoader(loader.dataset, batch_size=160, collate_fn=loader.collate_fn)))
    direct = probe(probed_network(model), ["layer4.1"], batch["image"], batch["attributes"], batch["attribute_mask"],
                   ["Male"], 48, 48, 4, 4)
    assert direct[("layer4.1", "Male")].layer_acc == pytest.approx(data["results"]["layer4.1"]["Male"]["layer_acc"])


def test_layer_and_attribute_errors_name_valid_choices():
    model = AttributeModule(backbone="resnet18", attributes=ATTRS)
    assert default_layers(model) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert resolve_layers(model, "all")[0] == "conv1"
    with pytest.raises(ValueError, match=r"(?s)layer9\.1.*Probing points.*layer4\.1"):
        resolve_layers(model, ["layer9.1"])
    with pytest.raises(ValueError, match="Bald_Head.*valid CelebA attributes"):
        ProbingCallback(attributes=["Bald_Head"])
    with pytest.raises(ValueError, match="num_images"):
        ProbingCallback(n_train=256, n_val=256, num_images=300)


def run_probe(ckpt, out, *extra, attributes=("Male", "Eyeglasses")):
    return analyze.main(["probe", "--checkpoint", str(ckpt), "--out", str(out), "--layers", "layer2.1", "layer4.1",
                         "--attributes", *attributes, "--num-images", "128", "--n-train", "48",
                         "--n-val", "48", "--n-components", "4", "--top-k", "4", "--device", "cpu", *extra])


def test_analyze_probe_writes_json_and_figures_and_random_init_differs(fitted, tmp_path):
    _, _, _, ckpt = fitted
    assert run_probe(ckpt, tmp_path, "--compare-random", attributes=("Male",)) == 0
    trained = json.loads((tmp_path / "probing.json").read_text())
    random = json.loads((tmp_path / "probing_random_init.json").read_text())
    assert trained["layers"] == ["layer2.1", "layer4.1"] and trained["attributes"] == ["Male"]
    for layer in trained["layers"]:
        assert all(k in trained["results"][layer]["Male"] for k in KEYS)
    assert trained["config"]["random_init"] is False and random["config"]["random_init"] is True
    assert trained["results"] != random["results"]
    for name in ("probing_accuracy_over_depth.png", "probing_random_init_accuracy_over_depth.png",
                 "mean_accuracy_over_depth.png"):
        assert (tmp_path / name).stat().st_size > 1000, name


@pytest.mark.slow
def test_analyze_probe_ablation_vip_and_random_init_alone(fitted, tmp_path):
    _, _, _, ckpt = fitted
    assert run_probe(ckpt, tmp_path / "a", "--compare-random", "--ablation", "layer2.1", "--vip-analysis",
                     "--vip-neurons", "10") == 0
    out = tmp_path / "a"
    trained = json.loads((out / "probing.json").read_text())
    random = json.loads((out / "probing_random_init.json").read_text())
    assert (out / "vip_layer4.1_Male.png").stat().st_size > 1000
    ablation = json.loads((out / "ablation.json").read_text())
    assert set(ablation) == {"Male", "Eyeglasses"} and ablation["Male"]["layer"] == "layer2.1"
    # the same fitted probe on the same images (features from other batch sizes: one flip at most)
    assert ablation["Male"]["baseline"]["layer4.1"]["layer"] == pytest.approx(
        trained["results"]["layer4.1"]["Male"]["layer_acc"], abs=1.5 / 48)
    assert ablation["Male"]["accuracy"]["0.1"]["layer4.1"]["layer"] <= 1.0
    vip = json.loads((out / "vip_analysis.json").read_text())
    assert len(vip["layer4.1"]["Male"]["neurons"]) == 10
    # --random-init alone gives the baseline written by --compare-random (drawn from --seed)
    assert run_probe(ckpt, tmp_path / "b", "--random-init") == 0
    alone = json.loads((tmp_path / "b" / "probing.json").read_text())
    assert alone["results"] == random["results"]


def test_analyze_probe_rejects_bad_names(fitted, tmp_path):
    _, _, _, ckpt = fitted
    with pytest.raises(ValueError, match=r"(?s)--layers.*layer7.*Probing points"):
        analyze.main(["probe", "--checkpoint", str(ckpt), "--out", str(tmp_path), "--layers", "layer7",
                      "--num-images", "64", "--device", "cpu"])
    with pytest.raises(ValueError, match="--attributes.*Smiles"):
        run_probe(ckpt, tmp_path, "--attributes", "Smiles")
    with pytest.raises(ValueError, match="--ablation layer4.1"):
        run_probe(ckpt, tmp_path, "--ablation", "layer4.1")


def test_feature_budget_must_be_positive():
    with pytest.raises(ValueError, match="max_feature_mib"):
        ProbingCallback(max_feature_mib=0)
