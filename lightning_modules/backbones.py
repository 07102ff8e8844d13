"""timm backbones by name, wrapped so every facelens model takes [0, 1] images and names layers as timm does."""
from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FaceNet(nn.Module):
    """Normalisation + a timm network. Layers keep timm's names under `backbone.` (`backbone.layer4`);
    `analysis.layers.resolve_layer` also accepts them without the prefix."""

    def __init__(self, backbone: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features before the classifier."""
        return self.embed_and_classify(images)[0]

    def embed_and_classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features and logits from one pass through the trunk."""
        features = self.backbone.forward_features(self.normalize(images))
        return self.backbone.forward_head(features, pre_logits=True), self.backbone.forward_head(features)


def check_backbone(name: str, option: str = "backbone") -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=6)
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise ValueError(f"{option}: unknown timm backbone {name!r}.{hint}")


def create_backbone(name: str, num_outputs: int, pretrained_path: str | None = None, **kwargs) -> FaceNet:
    """A timm model with `num_outputs` logits. Weights come from a local file only (never a hub download)."""
    check_backbone(name)
    model = timm.create_model(name, pretrained=False, num_classes=num_outputs, **kwargs)
    if pretrained_path:
        load_local_weights(model, pretrained_path)
    return FaceNet(model)


def load_local_weights(model: nn.Module, path: str) -> None:
    """Load a local state dict (safely, weights_only) and skip a classifier whose shape differs."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"pretrained_path: no such file {path}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not compatible:
        raise ValueError(f"pretrained_path: {path} holds no weights matching {type(model).__name__}")
    model.load_state_dict(compatible, strict=False)
