"""Resume: `train.py fit --ckpt_path last` continues the newest run (same run folder, same W&B run id, steps
continuing from the checkpoint) and ends at the same step and epoch as a run that was never interrupted."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import wandb

import train
from facelens.wandb_io import find_runs, read_offline_run
from lightning_modules.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def args(root, *extra):
    return [
        "--config", "configs/quickstart.yaml",
        "--trainer.max_epochs", "3",
        "--trainer.deterministic", "true",
        "--trainer.reload_dataloaders_every_n_epochs", "1",  # each epoch's order independent of the history
        "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "1",
        "--data.init_args.num_train", "64",
        "--data.init_args.num_val", "32",
        "--data.init_args.num_test", "16",
        "--data.init_args.num_identities", "16",
        "--data.init_args.batch_size", "16",
        "--data.init_args.num_workers", "0",
        "--data.init_args.cache", "false",
        "--model.init_args.attributes", '["Eyeglasses", "Smiling", "Male"]',
        *extra,
    ]


def only_run(root: Path) -> Path:
    (run,) = [p.parent.parent for p in (root / "runs").glob("*/checkpoints/last.ckpt")]
    return run


def assert_same_end(reference: Path, resumed: Path) -> None:
    a, b = read_checkpoint(reference / "checkpoints" / "last.ckpt"), read_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 12 and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.isfinite(v).all() for v in b["state_dict"].values() if v.is_floating_point())
    differ = [k for k in a["state_dict"] if not torch.allclose(a["state_dict"][k].float(), b["state_dict"][k].float(),
                                                                rtol=1e-5, atol=1e-6)]
    assert not differ, f"resumed weights differ from the uninterrupted run's: {differ[:3]}"
    metrics = json.loads((resumed / "summary.json").read_text())["metrics"]
    assert {"val/loss", "val/mean_error"} <= metrics.keys()


class Crash(RuntimeError):
    pass


class CrashAtEpoch(pl.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise Crash(f"simulated failure at epoch {self.epoch}")


def test_latest_last_checkpoint_is_the_newest_file(tmp_path):
    for i, run in enumerate(["b", "a", "c"]):
        path = tmp_path / run / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    (tmp_path / "d" / "checkpoints").mkdir(parents=True)  # a run that died before its first checkpoint
    assert train.latest_last_checkpoint(tmp_path) == tmp_path / "c" / "checkpoints" / "last.ckpt"
    assert train.latest_last_checkpoint(tmp_path / "none") is None


@pytest.mark.slow
def test_ckpt_path_last_resumes_the_newest_run(tmp_path, offline):
    reference = tmp_path / "reference"
    train.main(["fit", *args(reference)])
    wandb.finish()

    work = tmp_path / "work"
    cli = train.main(args(work), run=False)
    cli.trainer.callbacks.append(CrashAtEpoch(2))
    with pytest.raises(Crash):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    wandb.finish()
    first = only_run(work)
    stopped_at = read_checkpoint(first / "checkpoints" / "last.ckpt")["global_step"]
    assert stopped_at == 8  # 2 epochs x 4 batches

    train.main(["fit", *args(work), "--ckpt_path", "last"])
    wandb.finish()
    assert only_run(work) == first  # same run folder, no new one
    assert_same_end(only_run(reference), first)

    runs = find_runs(work / "wandb")
    assert {p.name.rsplit("-", 1)[-1] for p in runs} == {first.name}  # W&B continues the same run id
    resumed = read_offline_run(runs[-1])
    steps = resumed.metric("trainer/global_step")
    assert steps and min(steps) >= stopped_at  # continues from the checkpoint, no restart from step 0


def test_ckpt_path_last_without_a_run_starts_fresh(tmp_path, offline):
    with pytest.warns(UserWarning, match="no .*last.ckpt yet; starting fresh"):
        cli = train.main(["fit", *args(tmp_path, "--trainer.max_epochs", "1"), "--ckpt_path", "last"])
    assert cli.trainer.global_step == 4  # one epoch of 64 images in batches of 16, from scratch


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(tmp_path):
    """A real process killed with SIGKILL after its first checkpoint resumes from the last epoch-boundary
    last.ckpt into the same run folder and ends at the same step as an uninterrupted run."""
    # no WANDB_* from this process: an earlier in-process run leaves its service address there for children
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), PYTHONUNBUFFERED="1")
    command = [sys.executable, "train.py", "fit"]
    reference = tmp_path / "reference"
    subprocess.run([*command, *args(reference)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)

    work = tmp_path / "work"
    proc = subprocess.Popen([*command, *args(work, "--trainer.max_epochs", "3")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list((work / "runs").glob("*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
        assert proc.poll() is None, "training ended before writing a checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, W&B's service process included, as a preemption does
    proc.wait()
    killed = only_run(work)
    assert read_checkpoint(killed / "checkpoints" / "last.ckpt")["global_step"] < 12
    assert not (killed / "summary.json").exists()  # it really died before the end

    resumed = subprocess.run([*command, *args(work), "--ckpt_path", "last"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert only_run(work) == killed
    assert_same_end(only_run(reference), killed)
