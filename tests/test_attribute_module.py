import pytest
import torch

from analysis.layers import resolve_layer
from lightning_modules.attribute_module import AttributeModule


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv2_100", "vgg16"])
def test_backbones_give_one_logit_per_attribute(backbone):
    model = AttributeModule(backbone, attributes=["Male", "Eyeglasses", "Smiling"])
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 3)


def test_resnet50_affact_shape():
    model = AttributeModule("resnet50")
    assert model.net.backbone.fc.out_features == 40
    assert model.net.backbone.fc.in_features == 2048


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="model.backbone.*resnet5O"):
        AttributeModule("resnet5O")


def test_unknown_attribute_is_named():
    with pytest.raises(ValueError, match="model.attributes.*Sunglasses"):
        AttributeModule("resnet18", attributes=["Male", "Sunglasses"])


def test_bad_loss_and_rate_are_named():
    with pytest.raises(ValueError, match="model.loss"):
        AttributeModule("resnet18", loss="fancy")
    with pytest.raises(ValueError, match="model.target_rate"):
        AttributeModule("resnet18", target_rate=1.5)


def test_layers_resolve_with_and_without_prefix():
    model = AttributeModule("resnet18", attributes=["Male"]).net
    assert resolve_layer(model, "layer4") is resolve_layer(model, "backbone.layer4")
    with pytest.raises(ValueError, match="layer5.*Valid layers"):
        resolve_layer(model, "layer5")


def test_select_picks_attribute_columns():
    model = AttributeModule("resnet18", attributes=["Young", "5_o_Clock_Shadow"])
    batch = {"attributes": torch.arange(40.0).repeat(2, 1), "attribute_mask": torch.ones(2, 40, dtype=torch.bool)}
    targets, mask = model.select(batch)
    assert targets[0].tolist() == [39.0, 0.0]
    assert mask.all()
