"""W&B across a resume: `StepAlignedWandbLogger` logs at the trainer step and skips the steps the run already holds,
and `read_offline_run` merges a run's folders into one history with one row per step (docs/RELIABILITY.md)."""
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import wandb

import train
from facelens.wandb_io import OfflineRun, StepAlignedWandbLogger, find_runs, merge_runs, read_offline_run
from lightning_modules.checkpoint import read_checkpoint
from tests.test_resume import ROOT, Crash, args, only_run


def finish():
    """End the run and wait for W&B's service to exit: until then the run file may still be written."""
    wandb.finish()
    wandb.teardown()


def part(run_id, rows, folder="f", config=None, summary=None):
    return OfflineRun(run_id=run_id, directories=[Path(folder)], history=rows, config=config or {},
                      summary=summary or {})


def row(step, **values):
    return {"_step": step, "trainer/global_step": step, **values}


def test_merge_keeps_one_row_per_step_and_the_first_value():
    killed = part("r1", [row(0, loss=1.0), row(1, loss=0.9), row(2, loss=0.8, epoch=0)], "a", {"lr": 1}, {"loss": 0.8})
    resumed = part("r1", [row(2, loss=0.7, val=0.5), row(3, loss=0.6)], "b", {"lr": 2}, {"loss": 0.6})
    merged = merge_runs([killed, resumed])
    assert [r["_step"] for r in merged.history] == [0, 1, 2, 3]
    assert merged.history[2] == row(2, loss=0.8, epoch=0, val=0.5)  # first wins; keys only the later one had join
    assert merged.metric("loss") == [1.0, 0.9, 0.8, 0.6]
    assert merged.config == {"lr": 2} and merged.summary == {"loss": 0.6}  # later wins: the latest values
    assert merged.directories == [Path("a"), Path("b")] and merged.directory == Path("b")


def test_merge_orders_by_step_not_by_arrival():
    merged = merge_runs([part("r", [row(5, x=5)]), part("r", [row(1, x=1), row(7, x=7)])])
    assert merged.metric("x") == [1, 5, 7]


def test_merge_refuses_other_runs_and_call_counted_steps():
    with pytest.raises(ValueError, match="different W&B runs"):
        merge_runs([part("a", [row(0)]), part("b", [row(1)])])
    stock = part("a", [{"_step": 0, "trainer/global_step": 9, "loss": 1.0}], "old")
    with pytest.raises(ValueError, match="old: history row with _step 0 but trainer/global_step 9"):
        merge_runs([stock, part("a", [row(10)])])
    assert merge_runs([stock]).history == stock.history  # one folder alone is read as it is
    with pytest.raises(ValueError, match="no W&B run folders"):
        merge_runs([])


def test_logger_skips_steps_the_run_holds_and_keeps_late_logs(tmp_path, offline):
    first = StepAlignedWandbLogger(project="facelens", save_dir=str(tmp_path), id="run1")
    for step in range(6):
        first.log_metrics({"loss": float(step)}, step=step)
    first.log_metrics({"grid": 1.0}, step=6)  # a callback logging at trainer.global_step ...
    first.log_metrics({"loss_epoch": 2.5, "epoch": 0}, step=5)  # ... then Lightning's epoch-end metrics at step - 1
    first.experiment.log({"image": 4.0}, step=6)  # a callback calling the run directly
    first.log_metrics({"table": 3.0})  # no step: the newest row
    first.log_metrics({"loss": 7.0, "epoch": 1}, step=7)
    first.log_metrics({"very_late": 9.0}, step=2)  # below W&B's open row (6): joins it rather than being dropped
    first.finalize("failed")
    finish()
    time.sleep(1.1)  # W&B names run folders to the second; a restart within the same second would reuse the folder

    second = StepAlignedWandbLogger(project="facelens", save_dir=str(tmp_path), id="run1")
    for step in range(4, 10):  # replayed from a checkpoint at step 4
        second.log_metrics({"loss": 100.0 + step}, step=step)
    second.finalize("success")
    finish()

    folders = find_runs(tmp_path / "wandb")
    assert len(folders) == 2 and all(f.name.endswith("-run1") for f in folders)
    killed, resumed = (read_offline_run(f) for f in folders)
    rows = {r["_step"]: {k: v for k, v in r.items() if not k.startswith("_")} for r in killed.history}
    assert sorted(rows) == list(range(8))
    assert rows[5] == {"loss": 5.0, "loss_epoch": 2.5, "epoch": 0, "trainer/global_step": 5}
    assert rows[6] == {"grid": 1.0, "image": 4.0, "table": 3.0, "very_late": 9.0, "trainer/global_step": 6}
    assert [r["_step"] for r in resumed.history] == [8, 9]  # nothing the first folder already holds
    merged = read_offline_run(tmp_path / "wandb")
    assert merged.metric("trainer/global_step") == list(range(10))
    assert merged.metric("loss") == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 108.0, 109.0]


class CrashAtStep(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"simulated failure at step {self.step}")


def history_by_step(run):
    steps = run.metric("trainer/global_step")
    assert len(steps) == len(set(steps)), f"duplicate steps: {sorted(s for s in steps if steps.count(s) > 1)}"
    return {r["trainer/global_step"]: r for r in run.history}


@pytest.mark.slow
def test_killed_and_resumed_run_logs_every_step_once(tmp_path, offline):
    reference_root = tmp_path / "reference"
    train.main(["fit", *args(reference_root)])
    finish()
    reference = history_by_step(read_offline_run(reference_root / "wandb"))

    work = tmp_path / "work"
    cli = train.main(args(work), run=False)
    cli.trainer.callbacks.append(CrashAtStep(6))  # epoch 1, two steps after the epoch-0 checkpoint
    with pytest.raises(Crash):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finish()
    checkpoint_step = read_checkpoint(only_run(work) / "checkpoints" / "last.ckpt")["global_step"]
    killed_steps = read_offline_run(find_runs(work / "wandb")[0]).metric("trainer/global_step")
    assert checkpoint_step == 4 and max(killed_steps) > checkpoint_step  # it logged steps the resume replays

    train.main(["fit", *args(work), "--ckpt_path", "last"])
    finish()
    folders = find_runs(work / "wandb")
    assert len(folders) == 2 and {f.name.rsplit("-", 1)[-1] for f in folders} == {only_run(work).name}
    resumed_steps = read_offline_run(folders[1]).metric("trainer/global_step")
    assert min(resumed_steps) > max(killed_steps)  # nothing logged twice, not even in the raw files

    merged = history_by_step(read_offline_run(work / "wandb"))
    assert sorted(merged) == sorted(reference)  # every step of the uninterrupted run, each once
    # each epoch's validation sits on its last step with its own epoch, although the prediction grid was logged
    # at trainer.global_step (the next step) before it
    assert {s: r["epoch"] for s, r in merged.items() if "val/mean_error" in r} == {3: 0, 7: 1, 11: 2}
    for step, ref in reference.items():
        assert merged[step].keys() - {"_runtime", "_timestamp"} == ref.keys() - {"_runtime", "_timestamp"}, step
        for key in ("train/loss_step", "val/mean_error", "lr-AdamW"):
            if key in ref:
                assert merged[step][key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (step, key)
