"""Cost of the analysis callbacks: time per invocation, share of an epoch, and total share of a whole run.

Trains a small AttributeModule on SynthFaces for --epochs epochs twice, without and with the analysis callbacks
(by default the entries of configs/analysis/*.yaml, the settings users add to a run; `--class-defaults` takes
each callback class with no arguments instead), and prints each callback's seconds per invocation and share of
the measured epoch (the `<name>/seconds` and `<name>/share_of_epoch` scalars `callbacks.base.AnalysisCallback`
logs to W&B).

A run's analysis cost is a roughly fixed time per invocation, while its epoch time grows with the training set,
so the bench also projects onto a real run: `--run-config` (default configs/quickstart.yaml) gives the epoch
length (data.init_args.num_train) and trainer.max_epochs; the epoch time is that length over the training
throughput measured here, and each callback runs at the epochs its `every_n_epochs` picks plus the last. The
issue's budget: the default callbacks cost under 10% of the run's training time.

    python bench/callbacks.py [--run-config configs/quickstart.yaml] [--num-train 512] [--epochs 2]
"""
from __future__ import annotations

import argparse
import importlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 0.10
SNIPPETS = ("gradcam", "probing", "dissection", "saliency")


def snippet_entries(path: Path) -> list[dict]:
    """The callback entries of a configs/analysis snippet: a bare list, or a config with trainer.callbacks."""
    data = yaml.safe_load(path.read_text())
    entries = data.get("trainer", {}).get("callbacks", []) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of callbacks or trainer.callbacks, got {type(entries).__name__}")
    return entries


def analysis_callbacks(paths: list[Path]) -> list[pl.Callback]:
    """The AnalysisCallback entries of the snippets, instantiated with their init_args."""
    from callbacks.base import AnalysisCallback

    out = []
    for path in paths:
        for i, entry in enumerate(snippet_entries(path)):
            module, _, name = entry["class_path"].rpartition(".")
            cls = getattr(importlib.import_module(module), name)
            if isinstance(cls, type) and issubclass(cls, AnalysisCallback):
                try:
                    out.append(cls(**(entry.get("init_args") or {})))
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{path}: callback {i} ({entry['class_path']}): {err}") from None
    return out


def class_default_callbacks() -> list[pl.Callback]:
    from callbacks.dissection import DissectionCallback
    from callbacks.gradcam_amr import GradCamAMRCallback
    from callbacks.probing import ProbingCallback
    from callbacks.saliency import SaliencySanityCallback

    return [GradCamAMRCallback(), ProbingCallback(), DissectionCallback(), SaliencySanityCallback()]


def run_shape(path: Path) -> tuple[int, int, str, int]:
    """(training images per epoch, epochs, backbone, image size) of a training config."""
    cfg = yaml.safe_load(path.read_text())
    try:
        data = cfg["data"]["init_args"]
        return (int(data["num_train"]), int(cfg["trainer"]["max_epochs"]),
                cfg["model"]["init_args"]["backbone"], int(data["size"]))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: needs data.init_args.num_train/size, trainer.max_epochs and "
                         f"model.init_args.backbone ({err!r} missing)") from None


def invocations(every_n_epochs: int, epochs: int, run_on_last_epoch: bool = True) -> int:
    """How many times a callback runs in a fit of `epochs` epochs (the schedule of AnalysisCallback)."""
    return sum(1 for e in range(epochs) if (e + 1) % every_n_epochs == 0 or (run_on_last_epoch and e == epochs - 1))


def fit(args: argparse.Namespace, callbacks: list[pl.Callback], root: Path) -> float:
    """Fit with W&B logging offline under `root` (the callbacks' figures and tables are part of their cost)."""
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    from datamodules.synthfaces import SynthFacesDataModule
    from lightning_modules.attribute_module import AttributeModule

    root.mkdir(parents=True, exist_ok=True)
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true")
    pl.seed_everything(0, verbose=False)
    dm = SynthFacesDataModule(size=args.size, num_train=args.num_train, num_val=args.num_val, num_test=64,
                              num_identities=max(1, args.num_train // 8), batch_size=args.batch,
                              num_workers=args.workers, cache=True)
    model = AttributeModule(backbone=args.backbone, scheduler="none")
    accelerator = "gpu" if args.device == "cuda" else args.device
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_epochs=args.epochs, limit_val_batches=0,
                         num_sanity_val_steps=0, enable_checkpointing=False,
                         logger=WandbLogger(project="facelens", save_dir=str(root), offline=True),
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         default_root_dir=root)
    started = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - started
    wandb.finish()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--run-config", type=Path, default=ROOT / "configs" / "quickstart.yaml",
                        help="training config whose epoch length, epochs, backbone and size the costs project onto")
    parser.add_argument("--snippets", nargs="+", type=Path,
                        default=[ROOT / "configs" / "analysis" / f"{s}.yaml" for s in SNIPPETS])
    parser.add_argument("--class-defaults", action="store_true",
                        help="measure each callback class with no arguments instead of the snippets")
    parser.add_argument("--backbone", default=None, help="default: the run config's")
    parser.add_argument("--size", type=int, default=None, help="default: the run config's")
    parser.add_argument("--num-train", type=int, default=512, help="training images per measured epoch")
    parser.add_argument("--num-val", type=int, default=1024, help="validation images (the probe sets' pool)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--skip-plain", action="store_true", help="skip the run without callbacks")
    args = parser.parse_args(argv)
    run_images, run_epochs, backbone, size = run_shape(args.run_config)
    args.backbone = args.backbone or backbone
    args.size = args.size or size

    cbs = class_default_callbacks() if args.class_defaults else analysis_callbacks(args.snippets)
    with tempfile.TemporaryDirectory() as tmp:
        plain = None if args.skip_plain else fit(args, [], Path(tmp) / "plain")
        with_cbs = fit(args, cbs, Path(tmp) / "with")

    # the epoch time the callbacks themselves measured (training only, no validation)
    epoch_seconds = min(cb._last_train_seconds for cb in cbs)
    images_per_second = args.num_train / epoch_seconds
    run_epoch_seconds = run_images / images_per_second
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    source = "class defaults" if args.class_defaults else ", ".join(p.name for p in args.snippets)
    print(f"\ndevice: {device}; load average {os.getloadavg()[0]:.2f}; {args.backbone}, {args.size} px, batch "
          f"{args.batch}; callbacks: {source}")
    print(f"measured: {args.num_train}-image epochs of {epoch_seconds:.1f} s ({images_per_second:.1f} img/s); "
          f"projected onto {args.run_config.name}: {run_epochs} epochs of {run_images} images, "
          f"{run_epoch_seconds:.0f} s each")
    print(f"| callback | every_n_epochs | s / run | share of measured epoch "
          f"| share of {args.run_config.stem} epoch "
          f"| runs in {args.run_config.stem} | share of {args.run_config.stem} run |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    total = 0.0
    for cb in cbs:
        seconds = [r[f"{cb.name}/seconds"] for r in cb.history]  # the whole run: analysis, files, figures, tables
        per_run = sum(seconds) / len(seconds)
        runs = invocations(cb.every_n_epochs, run_epochs, cb.run_on_last_epoch)
        run_share = runs * per_run / (run_epochs * run_epoch_seconds)
        total += run_share
        print(f"| {cb.name} | {cb.every_n_epochs} | {per_run:.2f} "
              f"| {per_run / epoch_seconds:.1%} "
              f"| {per_run / run_epoch_seconds:.1%} | {runs} | {run_share:.1%} |")
    verdict = "within" if total < BUDGET else "OVER"
    print(f"| all | | | | | | **{total:.1%}** ({verdict} the {BUDGET:.0%} budget) |")
    if plain is not None:
        print(f"wall time of the measured fit: without callbacks {plain:.1f} s, with {with_cbs:.1f} s "
              f"(+{(with_cbs - plain) / plain:.1%})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cuda = f", CUDA peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if args.device == "cuda" else ""
    print(f"host peak RSS {peak:.2f} GiB{cuda}")
    return 0 if total < BUDGET else 1


if __name__ == "__main__":
    sys.exit(main())
