import json

import pytest
from fixtures_training import tiny_fit

import analyze
from callbacks.dissection import DissectionCallback
from lightning_modules.attribute_module import AttributeModule


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny resnet18 fit with the callback and an offline W&B logger; returns (tmp, checkpoint, callback)."""
    tmp = tmp_path_factory.mktemp("fit")
    cb = DissectionCallback(layers=["layer3", "layer4"], dictionary_count=12, dictionary_size=64, top_units=1,
                            config={"quantile": 0.02})
    checkpoint, _ = tiny_fit(tmp, cb, "resnet18", ["Male", "Eyeglasses"])
    return tmp, checkpoint, cb


def test_callback_writes_json_and_headline(fitted):
    tmp, _, cb = fitted
    files = sorted(tmp.rglob("analysis/dissection/epoch000.json"))
    assert files, list(tmp.rglob("*.json"))
    data = json.loads(files[0].read_text())
    assert set(data["layers"]) == {"layer3", "layer4"}
    layer4 = data["layers"]["layer4"]
    assert layer4["num_units"] == 512 and len(layer4["units"]) == 512
    unit = layer4["units"][0]
    assert {"concept", "iou"} <= set(unit["netdissect"]) and {"region", "concepts", "global"} <= set(unit["hnd"])
    assert set(unit["hnd"]["global"]) == {"gender", "age_group", "skin_tone", "grayscale"}
    h = cb.history[-1]
    assert 0 <= h["dissection/layer4/netdissect_fraction"] <= 1
    assert h["dissection/layer4/netdissect_units"] == sum(u["netdissect"]["interpretable"] for u in layer4["units"])
    assert "dissection/layer3/biased/gender" in h and "dissection/layer4/region/eyes" in h


def test_bad_layer_fails_with_valid_names():
    cb = DissectionCallback(layers=["layer9"], dictionary_count=2)
    model = AttributeModule(backbone="resnet18", attributes=["Male"])
    with pytest.raises(ValueError, match="layer9.*layer4"):
        cb.setup(None, model, "fit")
    with pytest.raises(ValueError, match="DissectionCallback.config"):
        DissectionCallback(config={"quantil": 0.1})


def test_analyze_dissect_writes_json_and_figures(fitted, tmp_path):
    _, ckpt, _ = fitted
    out = tmp_path / "out"
    rc = analyze.main(["dissect", "--checkpoint", ckpt, "--layers", "layer4", "--dictionary-count", "8",
                       "--device", "cpu", "--out", str(out), "--top-units", "1", "--quantile", "0.02"])
    assert rc == 0
    data = json.loads((out / "dissection.json").read_text())
    units = data["layers"]["layer4"]["units"]
    assert len(units) == 512
    for u in units[:5]:
        assert isinstance(u["netdissect"]["concept"], str) and 0 <= u["netdissect"]["iou"] <= 1
        assert "region" in u["hnd"] and isinstance(u["hnd"]["concepts"], list)
        assert set(u["hnd"]["global"]["gender"]["probabilities"]) == {"female", "male"}
    pngs = {p.name for p in out.glob("*.png")}
    assert {"coverage.png", "layer4_concepts.png", "layer4_regions.png"} <= pngs
    assert any(p.startswith("layer4_unit") for p in pngs)
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        analyze.main(["dissect", "--checkpoint", ckpt, "--layers", "nope", "--dictionary-count", "2",
                      "--device", "cpu", "--out", str(tmp_path / "bad")])
