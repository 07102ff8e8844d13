"""Shared test setup: `gpu` tests skip themselves without CUDA (so `make test-all` runs everywhere), and the
`offline` fixture for tests that run train.py from the repository root with W&B offline under tmp_path."""
from pathlib import Path

import pytest
import torch
import wandb

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(ROOT)
    yield
    wandb.finish()
    wandb.teardown()  # waits for W&B's service to exit: until then the run file may still be written
