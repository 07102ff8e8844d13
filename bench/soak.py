"""Soak run: resident memory over a long fit with every analysis callback running on schedule.

Trains a resnet18 on SynthFaces at 64 px (the smallest SynthFaces renders) with a tiny batch for --steps
optimizer steps, as epochs of --every steps (the analysis callbacks schedule by epoch), with Grad-CAM AMR,
probing, dissection and the saliency sanity check all running after every epoch and W&B logging offline. After each analysis round a
last callback samples the process's resident set size (VmRSS). A leak in a callback (figures never closed,
hooks never removed, histories holding tensors, W&B tables piling up) shows as RSS that keeps growing from
round to round; allocator warm-up shows only over the first rounds, so growth is measured from the 3rd.

    python bench/soak.py [--steps 1000] [--every 100] [--size 64] [--batch 4] [--root DIR]
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

MIB = 2**20
# a few attributes keep each analysis round cheap: Grad-CAM and saliency cost one backward per attribute
ATTRIBUTES = ("Male", "Eyeglasses", "Smiling", "Wearing_Hat")


def rss_bytes() -> int:
    """Current resident set size of this process (psutil when installed, else /proc/self/status VmRSS)."""
    try:
        import psutil
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("soak: no psutil and no VmRSS in /proc/self/status; cannot read resident memory")
    return psutil.Process().memory_info().rss


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (wall time misleads on shared cores)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RSSSampler(pl.Callback):
    """Samples RSS at the end of every training epoch; listed after the analysis callbacks, so each sample
    follows that epoch's analysis round. Collects garbage first so only memory still referenced counts."""

    def __init__(self, verbose: bool = False):
        self.samples: list[dict] = []
        self.verbose = verbose
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gc.collect()
        self.samples.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "rss": rss_bytes(),
                             "seconds": time.perf_counter() - self._started, "cpu_seconds": cpu_seconds()})
        if self.verbose:
            s = self.samples[-1]
            print(f"round {len(self.samples)}: step {s['step']}, RSS {s['rss'] / MIB:.1f} MiB, "
                  f"{s['seconds']:.0f} s wall, "
                  f"{s['cpu_seconds']:.0f} s CPU",
                  flush=True)


def analysis_callbacks(size: int) -> list[pl.Callback]:
    """All four analysis callbacks every epoch, with probe sets small enough for a CPU soak."""
    from callbacks.dissection import DissectionCallback
    from callbacks.gradcam_amr import GradCamAMRCallback
    from callbacks.probing import ProbingCallback
    from callbacks.saliency import SaliencySanityCallback

    return [
        GradCamAMRCallback(num_images=32, batch_size=16, every_n_epochs=1),
        ProbingCallback(layers=["layer2", "layer3", "layer4"], attributes=["Male", "Eyeglasses"], n_train=16,
                        n_val=16, num_images=96, n_components=2, top_k=2, batch_size=32, every_n_epochs=1),
        DissectionCallback(layers=["layer4"], dictionary_count=16, dictionary_size=size, top_units=1,
                           every_n_epochs=1),
        SaliencySanityCallback(methods=["gradcam", "occlusion", "smoothgrad"], attributes=["Male"], num_images=2,
                               batch_size=2,
                               every_n_epochs=1, config={"smoothgrad_samples": 2, "hiding_steps": 4,
                                                         "occlusion_window": 32, "occlusion_stride": 16,
                                                         "randomization_images": 1, "randomization_steps": ["fc"]}),
    ]


def soak(root: Path, steps: int = 1000, every: int = 100, size: int = 64, batch: int = 4,
         accelerator: str = "auto", verbose: bool = False) -> tuple[list[dict], list[pl.Callback]]:
    """Fit for `steps` steps with all analysis callbacks every `every` steps; W&B offline under `root`.
    Returns the RSS samples (one per analysis round) and the analysis callbacks (their histories hold the
    per-run seconds)."""
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    from datamodules.synthfaces import SynthFacesDataModule
    from facelens.wandb_io import offline_wandb
    from lightning_modules.attribute_module import AttributeModule

    if steps % every:
        raise ValueError(f"soak: steps={steps} must be a multiple of every={every} (analysis runs per epoch)")
    root.mkdir(parents=True, exist_ok=True)
    with offline_wandb(root):
        pl.seed_everything(0, verbose=False)
        dm = SynthFacesDataModule(size=size, num_train=every * batch, num_val=128, num_test=16, num_identities=32,
                                  batch_size=batch, num_workers=0, cache=True)
        model = AttributeModule(backbone="resnet18", attributes=list(ATTRIBUTES), scheduler="none")
        callbacks = analysis_callbacks(size)
        sampler = RSSSampler(verbose)
        trainer = pl.Trainer(accelerator=accelerator, devices=1, max_epochs=steps // every,
                             limit_train_batches=every, limit_val_batches=0, num_sanity_val_steps=0,
                             logger=WandbLogger(project="facelens", save_dir=str(root), offline=True),
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[*callbacks, sampler], default_root_dir=root, log_every_n_steps=50)
        trainer.fit(model, datamodule=dm)
        if trainer.global_step != steps:
            raise RuntimeError(f"soak: trained {trainer.global_step} steps, expected {steps}")
        wandb.finish()
    return sampler.samples, callbacks


def growth(samples: list[dict], start: int = 2) -> float:
    """RSS growth in bytes from the (start+1)-th analysis round to the last."""
    return samples[-1]["rss"] - samples[start]["rss"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--root", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        samples, callbacks = soak(args.root or Path(tmp), args.steps, args.every, args.size, args.batch,
                                  verbose=True)
    print(f"\nresnet18, {args.size} px, batch {args.batch}, {args.steps} steps, analysis every {args.every} steps; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'round':>5s}{'step':>6s}{'RSS MiB':>9s}{'vs 3rd':>8s}{'wall s':>8s}{'CPU s':>8s}")
    for i, s in enumerate(samples):
        delta = (s["rss"] - samples[min(2, len(samples) - 1)]["rss"]) / MIB
        print(f"{i + 1:>5d}{s['step']:>6d}{s['rss'] / MIB:>9.1f}{delta:>+8.1f}{s['seconds']:>8.1f}"
              f"{s['cpu_seconds']:>8.1f}")
    for cb in callbacks:
        seconds = [r[f"{cb.name}/seconds"] for r in cb.history]
        print(f"{cb.name}: {len(seconds)} runs, {sum(seconds) / len(seconds):.2f} s per run")
    if len(samples) >= 3:
        print(f"growth from round 3 to round {len(samples)}: {growth(samples) / MIB:+.1f} MiB; "
              f"peak RSS {max(s['rss'] for s in samples) / MIB:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
