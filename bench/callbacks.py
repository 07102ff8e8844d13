"""Cost of the default analysis callbacks: time per invocation and share of the training epoch.

Trains the same small AttributeModule on SynthFaces for --epochs epochs twice, without and with the default
callback set (GradCamAMRCallback, ProbingCallback, DissectionCallback, each with its default settings), and
prints each callback's seconds per invocation and share of the epoch (the `<name>/seconds` and
`<name>/share_of_epoch` scalars `callbacks.base.AnalysisCallback` logs), their sum, and the wall-time
difference between the two runs. The issue's budget: defaults under 10% of training time.

    python bench/callbacks.py [--num-train 2048] [--size 64] [--backbone resnet18] [--epochs 2]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

BUDGET = 0.10


def default_callbacks() -> list[pl.Callback]:
    from callbacks.dissection import DissectionCallback
    from callbacks.gradcam_amr import GradCamAMRCallback
    from callbacks.probing import ProbingCallback

    return [GradCamAMRCallback(), ProbingCallback(), DissectionCallback()]


def fit(args: argparse.Namespace, callbacks: list[pl.Callback], root: Path) -> float:
    from datamodules.synthfaces import SynthFacesDataModule
    from lightning_modules.attribute_module import AttributeModule

    pl.seed_everything(0, verbose=False)
    # the probe sets of the defaults need up to 1024 validation images (ProbingCallback.num_images)
    dm = SynthFacesDataModule(size=args.size, num_train=args.num_train, num_val=args.num_val, num_test=64,
                              num_identities=max(1, args.num_train // 8), batch_size=args.batch,
                              num_workers=args.workers)
    model = AttributeModule(backbone=args.backbone, scheduler="none")
    accelerator = "gpu" if args.device == "cuda" else args.device
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_epochs=args.epochs, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         default_root_dir=root)
    started = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=2048)
    parser.add_argument("--num-val", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        plain = fit(args, [], Path(tmp) / "plain")
        cbs = default_callbacks()
        with_cbs = fit(args, cbs, Path(tmp) / "with")

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"\ndevice: {device}; load average {os.getloadavg()[0]:.2f}; {args.backbone}, {args.size} px, "
          f"{args.num_train} training images, batch {args.batch}, {args.epochs} epochs")
    print(f"{'callback':<14s}{'runs':>5s}{'s / run':>10s}{'share of epoch':>16s}")
    total_share = 0.0
    for cb in cbs:
        runs = cb.history
        seconds = [r[f"{cb.name}/seconds"] for r in runs]
        shares = [r.get(f"{cb.name}/share_of_epoch", float("nan")) for r in runs]
        mean_share = sum(shares) / max(len(shares), 1)
        total_share += mean_share
        print(f"{cb.name:<14s}{len(runs):>5d}{sum(seconds) / max(len(seconds), 1):>10.2f}{mean_share:>16.1%}")
    verdict = "within" if total_share < BUDGET else "OVER"
    print(f"{'all defaults':<14s}{'':>5s}{'':>10s}{total_share:>16.1%}  ({verdict} the {BUDGET:.0%} budget)")
    print(f"wall time: without callbacks {plain:.1f} s, with {with_cbs:.1f} s "
          f"(+{(with_cbs - plain) / plain:.1%})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cuda = f", CUDA peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if args.device == "cuda" else ""
    print(f"host peak RSS {peak:.2f} GiB{cuda}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
