"""End-to-end training throughput from JPEG files on disk, next to the same model's ceiling, in one run.

Phases (each a short Lightning fit of the AFFACT AttributeModule, 40 logits, same switches):
  ceiling     one batch already on the device, replayed every step (model + optimiser only)
  celeba      CelebA-layout JPEGs (178x218, written with the test fixture) through CelebADataModule:
              worker decode (PIL) or, with --decode-on-device, batched decode_jpeg + crop on the device;
              AFFACT augmentation on the device in both cases
  synthfaces  SynthFacesDataModule: faces rendered in the workers, AFFACT augmentation on the device
Images per second are timed between training-batch ends after --warmup steps (so waiting for data counts),
with a device synchronisation at each end. Peak memory: CUDA max_memory_allocated per phase; on the CPU
the process's and its workers' max RSS (getrusage, whole run).

    python bench/train_throughput.py --device cpu --backbone resnet18 --image-size 64 --batch 16 --steps 10
    python bench/train_throughput.py --device cuda --batch 256 --precision bf16-mixed --channels-last \\
        --compile --decode-on-device --workers 16 --images 4096 --steps 60
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

PHASES = ("ceiling", "celeba", "synthfaces")


class StepTimer(pl.Callback):
    """Wall time between training-batch ends, after `warmup` steps; synchronises the device at each end."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.images = warmup, [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.times.append(time.perf_counter())
        if len(self.times) > self.warmup + 1:
            self.images += int(batch["image"].shape[0])

    def images_per_second(self) -> float:
        if len(self.times) < self.warmup + 2:
            raise RuntimeError(f"need more than --warmup {self.warmup} + 1 steps, got {len(self.times)}")
        return self.images / (self.times[-1] - self.times[self.warmup])


class _Replay(Dataset):
    """The same device batch, `steps` times (already collated: the loader must not batch it again)."""

    def __init__(self, batch: dict, steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> dict:
        return self.batch


def _trainer(args: argparse.Namespace, timer: StepTimer, root: Path) -> pl.Trainer:
    accelerator = "gpu" if args.device == "cuda" else args.device
    return pl.Trainer(accelerator=accelerator, devices=1, precision=args.precision, max_steps=args.steps,
                      limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                      default_root_dir=root)


def _model(args: argparse.Namespace):
    from lightning_modules.attribute_module import AttributeModule

    return AttributeModule(backbone=args.backbone, scheduler="none", channels_last=args.channels_last,
                           compile=args.compile, compile_mode=args.compile_mode)


def _device_batch(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    n, s = args.batch, args.image_size
    return {"image": torch.rand(n, 3, s, s, generator=g).to(device),
            "attributes": (torch.rand(n, 40, generator=g) > 0.5).float().to(device),
            "attribute_mask": torch.ones(n, 40, dtype=torch.bool, device=device)}


def _datamodule(phase: str, args: argparse.Namespace, data_root: Path):
    from datamodules.celeba import CelebADataModule
    from datamodules.synthfaces import SynthFacesDataModule
    from datamodules.transforms import AffactAugmentConfig

    pin = args.device == "cuda"
    if phase == "celeba":
        return CelebADataModule(str(data_root), image_size=args.image_size, batch_size=args.batch,
                                num_workers=args.workers, augment=AffactAugmentConfig(), seed=0,
                                check_image_sizes=False, pin_memory=pin, decode_on_device=args.decode_on_device)
    return SynthFacesDataModule(size=args.image_size, num_train=args.images, num_val=args.batch,
                                num_test=args.batch, num_identities=max(1, args.images // 8),
                                batch_size=args.batch, num_workers=args.workers, augment=AffactAugmentConfig())


def run_phase(phase: str, args: argparse.Namespace, data_root: Path, work: Path) -> dict:
    pl.seed_everything(0, verbose=False)
    timer = StepTimer(args.warmup)
    trainer = _trainer(args, timer, work)
    model = _model(args)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if phase == "ceiling":
        batch = _device_batch(args)
        trainer.fit(model, train_dataloaders=DataLoader(_Replay(batch, args.steps), batch_size=None))
    else:
        trainer.fit(model, datamodule=_datamodule(phase, args, data_root))
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    return {"phase": phase, "img_per_s": timer.images_per_second(), "cuda_peak_gib": peak}


def write_jpegs(root: Path, images: int) -> Path:
    """`images` CelebA-like aligned JPEGs (178x218) in the original layout; half of them form the train split."""
    from fixtures_celeba import write_celeba

    return write_celeba(root, layout="txt", n=2 * images, identity=True, bbox=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"))
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--decode-on-device", action="store_true")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--steps", type=int, default=40, help="training steps per phase")
    parser.add_argument("--warmup", type=int, default=3, help="steps not timed (compilation, worker start)")
    parser.add_argument("--images", type=int, default=1024, help="training JPEGs / SynthFaces written")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.steps < args.warmup + 2:
        parser.error(f"--steps must be at least --warmup + 2 = {args.warmup + 2}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_root = tmp / "celeba"
        if "celeba" in args.phases:
            started = time.perf_counter()
            write_jpegs(data_root, args.images)
            print(f"wrote {2 * args.images} JPEGs (178x218) in {time.perf_counter() - started:.1f} s")
        results = [run_phase(p, args, data_root, tmp / p) for p in args.phases]

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"\ndevice: {device}; torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}")
    print(f"{args.backbone}, {args.image_size} px, 40 logits, batch {args.batch}, precision {args.precision}, "
          f"channels_last {args.channels_last}, compile {args.compile}, decode_on_device {args.decode_on_device}, "
          f"workers {args.workers}, {args.steps} steps ({args.warmup} warm-up)")
    ceiling = next((r["img_per_s"] for r in results if r["phase"] == "ceiling"), None)
    print(f"{'phase':<12s}{'img/s':>10s}{'of ceiling':>12s}{'CUDA peak GiB':>15s}")
    for r in results:
        ratio = f"{r['img_per_s'] / ceiling:.1%}" if ceiling else "-"
        peak = f"{r['cuda_peak_gib']:.2f}" if r["cuda_peak_gib"] is not None else "-"
        print(f"{r['phase']:<12s}{r['img_per_s']:>10.1f}{ratio:>12s}{peak:>15s}")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"host peak RSS: main process {own:.2f} GiB, largest worker {workers:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
