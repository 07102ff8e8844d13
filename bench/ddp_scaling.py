"""DDP scaling: training images per second on 1, 2, ... processes, same per-process batch, in one run.

Each device count runs as its own `python bench/ddp_scaling.py --worker N` subprocess (Lightning `ddp` for N > 1:
gloo on CPU, NCCL on GPUs) training the AttributeModule on SynthFaces; rank zero times the steps after the warm-up
and prints the global images per second. Scaling efficiency = rate(N) / (N * rate(1)).

    python bench/ddp_scaling.py --devices 1 2                                   # CPU: one thread per process
    python bench/ddp_scaling.py --accelerator gpu --devices 1 2 4 8 --backbone resnet50 --size 224 --batch 256 \\
        --precision bf16-mixed --workers 8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args: argparse.Namespace) -> None:
    import pytorch_lightning as pl
    import torch

    from datamodules.synthfaces import SynthFacesDataModule
    from lightning_modules.attribute_module import AttributeModule

    if args.accelerator == "cpu":
        torch.set_num_threads(args.threads)

    class Timer(pl.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            self.times.append(time.perf_counter())

    n = args.worker
    timer = Timer()
    pl.seed_everything(0)
    steps = args.warmup + args.steps
    data = SynthFacesDataModule(size=args.size, num_train=steps * args.batch * n, num_val=args.batch,
                                num_identities=64, batch_size=args.batch, num_workers=args.workers)
    model = AttributeModule(backbone=args.backbone, channels_last=args.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(accelerator=args.accelerator, devices=n, strategy="ddp" if n > 1 else "auto",
                             precision=args.precision, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[timer], default_root_dir=tmp)
        trainer.fit(model, datamodule=data)
    if trainer.global_rank == 0:
        seconds = timer.times[-1] - timer.times[args.warmup - 1]
        print(json.dumps({"devices": n, "images_per_second": n * args.batch * args.steps / seconds}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="per process")
    p.add_argument("--steps", type=int, default=12, help="timed steps after the warm-up")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="data loader workers per process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or min(args.devices) < 1:
        p.error("--warmup, --steps and --devices must be >= 1")
    if args.worker:
        worker(args)
        return 0
    rates = {}
    options = ["--accelerator", args.accelerator, "--backbone", args.backbone, "--size", str(args.size),
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--workers", str(args.workers), "--threads", str(args.threads), "--precision", args.precision,
               *(["--channels-last"] if args.channels_last else [])]
    for n in args.devices:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
        out = subprocess.run([sys.executable, __file__, "--worker", str(n), *options], capture_output=True, text=True,
                             env=env, cwd=ROOT)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{n} device(s): the worker failed (exit {out.returncode})")
        rates[n] = json.loads(lines[-1])["images_per_second"]
        base = rates[min(rates)] / min(rates)
        print(f"{args.accelerator} x{n}: {rates[n]:.1f} img/s, {rates[n] / rates[min(rates)]:.2f}x the "
              f"{min(rates)}-device rate, efficiency {rates[n] / (n * base):.0%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
