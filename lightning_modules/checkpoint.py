"""Load facelens checkpoints safely (weights_only=True): no code from a checkpoint ever runs."""
from __future__ import annotations

import inspect
import pickle
from pathlib import Path

import pytorch_lightning as pl
import torch


def _module_classes() -> dict[str, type[pl.LightningModule]]:
    from lightning_modules.attribute_module import AttributeModule
    from lightning_modules.recognition_module import RecognitionModule

    return {"AttributeModule": AttributeModule, "RecognitionModule": RecognitionModule}


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The raw checkpoint dict; a file carrying pickled code is refused with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"checkpoint {path} was refused: it holds objects other than tensors and plain data "
                         f"(possibly executable code), and facelens loads checkpoints with weights_only=True. "
                         f"Details: {str(err).splitlines()[0]}") from err


def load_module(path: str | Path, map_location="cpu", random_init: bool = False) -> pl.LightningModule:
    """Rebuild the LightningModule from the checkpoint's hyper-parameters, then load its weights.

    `random_init=True` gives the same architecture untrained (the random-init baseline of the analyses).
    """
    checkpoint = read_checkpoint(path, map_location)
    classes = _module_classes()
    name = checkpoint.get("facelens_module", "AttributeModule")
    if name not in classes:
        raise ValueError(f"checkpoint {path}: unknown module class {name!r}; known: {sorted(classes)}")
    cls = classes[name]
    accepted = inspect.signature(cls.__init__).parameters
    # LightningCLI adds bookkeeping keys (_class_path, _instantiator); keep only constructor arguments
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k in accepted}
    hparams.pop("pretrained_path", None)
    module = cls(**hparams)
    if not random_init:
        module.load_state_dict(checkpoint["state_dict"])
    return module.eval()
