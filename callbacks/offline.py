"""Shared plumbing of `analyze.py` subcommands: checkpoint, data, probe batches, output folder, W&B run."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset

from callbacks.base import prepare_eval_batch
from lightning_modules.checkpoint import load_module, read_checkpoint


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a facelens .ckpt file")
    parser.add_argument("--random-init", action="store_true", help="same architecture, untrained (baseline)")
    parser.add_argument("--data", default="auto", choices=("auto", "synthfaces", "celeba"),
                        help="probe data; auto = the data set the checkpoint was trained on")
    parser.add_argument("--root", help="CelebA root folder (for --data celeba)")
    parser.add_argument("--size", type=int, help="image size (default: the training size)")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--wandb", action="store_true", help="also log the results to a W&B run (offline default)")


def load_model(args: argparse.Namespace) -> pl.LightningModule:
    return load_module(args.checkpoint, random_init=args.random_init).to(args.device).eval()


def build_datamodule(args: argparse.Namespace, **overrides) -> pl.LightningDataModule:
    """The checkpoint's own datamodule settings (or SynthFaces defaults), with command-line overrides."""
    saved = read_checkpoint(args.checkpoint).get("datamodule_hyper_parameters", {}) or {}
    kind = args.data
    if kind == "auto":
        kind = "celeba" if "root" in saved or args.root else "synthfaces"
    if kind == "celeba":
        from datamodules.celeba import CelebADataModule

        root = args.root or saved.get("root")
        if not root:
            raise ValueError("--root: CelebA needs its root folder")
        size = args.size or saved.get("image_size", 224)
        return CelebADataModule(root=root, image_size=size, batch_size=args.batch_size, num_workers=0, **overrides)
    from datamodules.synthfaces import SynthFacesDataModule

    keep = ("seed", "prior_preset", "priors", "correlations", "grayscale_rate", "num_identities")
    options = {k: saved[k] for k in keep if k in saved}
    options.update(size=args.size or saved.get("size", 64), batch_size=args.batch_size, num_workers=0,
                   num_val=max(args.num_images, 1), num_test=max(args.num_images, 1))
    options.update(overrides)
    return SynthFacesDataModule(**options)


def probe_batches(args: argparse.Namespace, datamodule: pl.LightningDataModule) -> list[dict]:
    """The first `--num-images` images of `--split`, evaluation-prepared, on `--device`."""
    datamodule.setup("validate" if args.split == "val" else "test" if args.split == "test" else "fit")
    loader = getattr(datamodule, f"{args.split}_dataloader")()
    dataset = loader.dataset
    subset = Subset(dataset, range(min(args.num_images, len(dataset))))
    batches = []
    for batch in DataLoader(subset, batch_size=args.batch_size, collate_fn=loader.collate_fn):
        batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        batches.append(prepare_eval_batch(datamodule, batch))
    return batches


def output_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def wandb_run(args: argparse.Namespace, job: str):
    """An offline-by-default W&B run for an analyze.py job, or None without --wandb."""
    if not args.wandb:
        return None
    import wandb

    from facelens.wandb_io import default_offline

    default_offline()
    return wandb.init(project="facelens", job_type=job, dir=str(output_dir(args)),
                      config={k: v for k, v in vars(args).items() if k != "func"})
