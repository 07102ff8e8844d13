"""Eyeglasses-biased gender models at P = 50 and P = 100 on SynthFaces: aligned / conflicting accuracy and gap.

    python bench/bias_gap.py [--epochs 6] [--pool-size 6000] [--p 50 100]

Trains configs/bias_eyeglasses.yaml (resnet18, 64 px) once per P with the same training-set size, evaluates on
the unbiased (P = 50) split and prints the accuracy of bias-aligned groups (men with, women without eyeglasses),
of bias-conflicting groups (men without, women with) and their gap. A model that learned "eyeglasses = male"
shows a much larger gap at P = 100 than at P = 50.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402


def run(p: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    cli = train.main([
        "--config", "configs/bias_eyeglasses.yaml", "--trainer.max_epochs", str(args.epochs),
        "--trainer.logger", "pytorch_lightning.loggers.CSVLogger", "--trainer.logger.save_dir", str(out / f"p{p}"),
        "--trainer.default_root_dir", str(out / f"p{p}"),
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", args.accelerator,
        "--data.init_args.p", str(p), "--data.init_args.pool_size", str(args.pool_size),
        "--data.init_args.num_val", str(args.num_val), "--data.init_args.num_workers", str(args.num_workers),
        "--seed_everything", str(args.seed),
    ], run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    rates = cli.datamodule.rates()
    return {"p": p, "train_size": rates["train_size"], "male_rate": rates["train_male_rate"],
            "female_rate": rates["train_female_rate"], "eval_size": rates["eval_size"],
            "accuracy": 1 - metrics["val/error/Male"], "aligned": metrics["val/bias/aligned_accuracy"],
            "conflicting": metrics["val/bias/conflicting_accuracy"], "gap": metrics["val/bias/gap"],
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pool-size", type=int, default=6000, help="SynthFaces training pool the selection uses")
    parser.add_argument("--num-val", type=int, default=2000, help="SynthFaces validation pool")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in args.p:
            rows.append(run(p, args, Path(tmp)))
    print(f"\n{'P':>4} {'train':>6} {'male%':>6} {'fem%':>6} {'eval':>5} {'acc':>6} {'aligned':>8} "
          f"{'conflict':>8} {'gap':>7} {'sec':>6}")
    for r in rows:
        print(f"{r['p']:>4} {r['train_size']:>6} {100 * r['male_rate']:>6.1f} {100 * r['female_rate']:>6.1f} "
              f"{r['eval_size']:>5} {r['accuracy']:>6.3f} {r['aligned']:>8.3f} {r['conflicting']:>8.3f} "
              f"{r['gap']:>7.3f} {r['seconds']:>6.0f}")
    if len(rows) >= 2:
        print(f"gap ratio P={rows[-1]['p']} / P={rows[0]['p']}: "
              f"{rows[-1]['gap'] / max(abs(rows[0]['gap']), 1e-3):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
