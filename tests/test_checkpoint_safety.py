"""Checkpoints: atomic writes, weights_only loading, refusal of pickled code (also through `train.py --ckpt_path`)."""
import os
import pickle

import pytest
import torch

import train
from lightning_modules.checkpoint import (AtomicCheckpointIO, NonFiniteCheckpointError, load_module,
                                          read_checkpoint)


class Payload:
    """Unpickling this runs `os.system`, which writes a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {}, "x": Payload(marker)}, path)
    return path, marker


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    path, marker = malicious_checkpoint(tmp_path)
    for load in (read_checkpoint, load_module, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(ValueError, match=r"evil\.ckpt was refused.*weights_only=True"):
            load(path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="weights_only=True"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()


def test_train_ckpt_path_refuses_pickled_code(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))
    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"evil\.ckpt was refused"):
        train.main(["fit", "--config", "configs/quickstart.yaml", "--trainer.logger", "false",
                    "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(path)])
    assert not marker.exists()


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(4.0)}, "global_step": 1}, path)
    io.save_checkpoint({"state_dict": {"w": torch.arange(4.0) * 2}, "global_step": 2}, path)
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 2 and torch.equal(loaded["state_dict"]["w"], torch.arange(4.0) * 2)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 5}, path)
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise pickle.PicklingError("boom mid-write")

    with pytest.raises(pickle.PicklingError):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "bad": Unpicklable()}, path)
    with pytest.raises(NonFiniteCheckpointError, match=r"last\.ckpt not written.*w"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_cli_installs_atomic_io(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))
    cli = train.main(["--config", "configs/quickstart.yaml", "--trainer.logger", "false",
                      "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
