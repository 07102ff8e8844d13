import json

import pytest
from fixtures_training import tiny_fit

import analyze
from callbacks.saliency import SCALARS, SaliencyConfig, SaliencySanityCallback

# Kept small: the whole file must stay well under a minute on a loaded 2-core machine.
CHEAP = {"occlusion_window": 16, "occlusion_stride": 16, "smoothgrad_samples": 2, "ig_steps": 2, "hiding_steps": 2,
         "randomization_images": 1, "randomization_steps": ["fc", "layer4", "conv1"]}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny resnet10t fit with the callback and an offline W&B logger; returns (tmp, checkpoint, callback)."""
    tmp = tmp_path_factory.mktemp("fit")
    cb = SaliencySanityCallback(methods=["gradcam", "smoothgrad"], num_images=1, batch_size=1, config=CHEAP)
    checkpoint, _ = tiny_fit(tmp, cb, "resnet10t", ["Eyeglasses", "Smiling"], num_train=16, num_val=4, num_test=4,
                             num_identities=8, batch_size=8)
    return tmp, checkpoint, cb


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
