"""Two-process CPU DDP (gloo) runs of a biased and a recognition config log the same metrics as one process.

Each run is a `train.py fit` subprocess: DDP launches its second rank by re-running the command, which is
robust where spawning ranks from inside pytest is not.
"""
import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "bias_eyeglasses": ["--data.init_args.pool_size", "240", "--data.init_args.num_val", "120",
                        "--data.init_args.num_identities", "120", "--data.init_args.batch_size", "16",
                        "--data.init_args.num_workers", "0", "--data.init_args.cache", "false"],
    "recognition": ["--data.init_args.source", "synthfaces", "--data.init_args.synth_identities", "6",
                    "--data.init_args.images_per_identity", "5", "--data.init_args.batch_size", "8",
                    "--data.init_args.num_workers", "0", "--data.init_args.cache", "false",
                    "--model.init_args.backbone", "resnet18", "--trainer.precision", "32-true"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit(config: str, out: Path, devices: int) -> tuple[set[str], dict[str, str]]:
    """Run one tiny fit; returns the metric names of the CSVLogger's metrics.csv and its last validation row."""
    args = [sys.executable, "train.py", "fit", "--config", f"configs/{config}.yaml",
            "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.max_epochs", "1",
            "--trainer.logger", "pytorch_lightning.loggers.CSVLogger", "--trainer.logger.save_dir", str(out),
            "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false",
            "--trainer.num_sanity_val_steps", "0", *TINY[config]]
    if devices > 1:
        args += ["--trainer.strategy", "ddp"]
    env = {**os.environ, "WANDB_MODE": "offline", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    files = list(out.rglob("metrics.csv"))
    assert len(files) == 1, files
    with open(files[0]) as f:
        rows = list(csv.DictReader(f))
    names = {k for k in rows[0] if k not in ("epoch", "step")}
    val_rows = [r for r in rows if any(r[k] for k in names if k.startswith("val/"))]
    return names, val_rows[-1]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["bias_eyeglasses", "recognition"])
def test_ddp_two_processes_log_the_same_metrics(config, tmp_path):
    single, _ = fit(config, tmp_path / "single", 1)
    double, last = fit(config, tmp_path / "ddp", 2)
    assert single == double
    if config == "bias_eyeglasses":
        assert {"val/bias/gap", "val/bias/aligned_accuracy", "val/bias/conflicting_accuracy"} <= double
        # accuracies from counts summed over both ranks: the gap is their difference
        gap = float(last["val/bias/aligned_accuracy"]) - float(last["val/bias/conflicting_accuracy"])
        assert float(last["val/bias/gap"]) == pytest.approx(gap, abs=1e-6)
    else:
        assert {"val/identification_accuracy", "val/verification_auc", "val/tar@far=0.001"} <= double
        assert 0.0 <= float(last["val/verification_auc"]) <= 1.0
