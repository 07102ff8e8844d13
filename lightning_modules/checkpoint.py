"""Load facelens checkpoints safely (weights_only=True): no code from a checkpoint ever runs."""
from __future__ import annotations

import inspect
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


def _module_classes() -> dict[str, type[pl.LightningModule]]:
    from lightning_modules.attribute_module import AttributeModule
    from lightning_modules.recognition_module import RecognitionModule

    return {"AttributeModule": AttributeModule, "RecognitionModule": RecognitionModule}


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
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


class NonFiniteCheckpointError(RuntimeError):
    """A checkpoint about to be written holds NaN/Inf weights; the previous file is kept."""


def non_finite_tensors(state: dict) -> list[str]:
    """Names of floating-point tensors in `state` holding NaN or Inf."""
    return [name for name, value in state.items()
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the target folder, fsyncs it, then renames it over the
    target, so a kill at any moment leaves either the old or the new file, never half of one. Loads with
    `weights_only=True` (a file carrying pickled code is refused), and refuses to write NaN/Inf weights so a
    diverged model never replaces the last good checkpoint."""

    def __init__(self, refuse_non_finite: bool = True):
        self.refuse_non_finite = refuse_non_finite

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        if self.refuse_non_finite:
            bad = non_finite_tensors(checkpoint.get("state_dict", {}))
            if bad:
                raise NonFiniteCheckpointError(
                    f"checkpoint {path} not written: {len(bad)} weight tensor(s) hold NaN/Inf (first: {bad[0]}); "
                    f"the previous checkpoint file is kept")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = True) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(f"checkpoint {path}: facelens only loads checkpoints with weights_only=True")
        return read_checkpoint(path, map_location=map_location)


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
